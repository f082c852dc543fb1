//! Admins' view of orders: every order with its payments, refunds and
//! history; status corrections of seller orders (with a reason kept in the
//! order's history and the audit log); flagged payments; shops' commission.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::orders::{
    Actor, Change, SellerOrderStatus, cancel,
    refunds::{self, Refund},
};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Admin,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    idempotency::{self, Key, Keyed},
    middleware::RequestId,
    order_views::{self, Order, OrderSummary, Scope, SellerOrder, TrackingEvent},
    routes::{
        admin::{Reason, audit, reason_error},
        catalog::{Page, Paging},
        orders::{self, OrderQuery},
        seller_orders::{self, FulfilmentUpdate, fulfil, parcel_value},
    },
    state::AppState,
};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AdminOrderQuery {
    pub status: Option<souk_shared::orders::OrderStatus>,
    /// Only this customer's orders.
    pub customer_id: Option<Uuid>,
    /// Only orders with a part from this shop (its slug).
    pub shop: Option<String>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for AdminOrderQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// Every order, newest first, filtered.
#[utoipa::path(
    get, path = "/admin/orders", tag = "admin", security(("bearer" = [])), params(AdminOrderQuery),
    responses(
        (status = 200, description = "a page of orders", body = Page<OrderSummary>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<AdminOrderQuery>,
) -> Result<Json<Page<OrderSummary>>, ApiError> {
    let shop = match &query.shop {
        None => None,
        Some(slug) => Some(
            sqlx::query_scalar::<_, Uuid>("SELECT id FROM shops WHERE slug = $1")
                .bind(slug)
                .fetch_optional(&state.pool)
                .await?
                .ok_or_else(|| {
                    ApiError::Validation(vec![FieldError::new("shop", "no such shop")])
                })?,
        ),
    };
    let filter = OrderQuery {
        status: query.status,
        page: query.page,
        per_page: query.per_page,
    };
    Ok(Json(
        orders::list(&state, query.customer_id, shop, &filter).await?,
    ))
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Customer {
    pub id: Uuid,
    pub email: String,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PaymentRecord {
    pub id: Uuid,
    pub order_id: Uuid,
    pub payment_intent_id: String,
    pub amount_minor: i64,
    pub currency: String,
    /// A second successful payment of one order (refunded automatically).
    pub duplicate: bool,
    /// Why an admin should look.
    pub flagged_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct RefundRecord {
    pub id: Uuid,
    pub payment_id: Uuid,
    pub seller_order_id: Option<Uuid>,
    pub amount_minor: i64,
    pub reason: String,
    /// `requested`, `succeeded` or `failed`.
    pub status: String,
    pub stripe_refund_id: Option<String>,
    pub failure: Option<String>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// An order with everything admins need to answer a question about it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminOrder {
    pub order: Order,
    pub customer: Customer,
    pub payments: Vec<PaymentRecord>,
    pub refunds: Vec<RefundRecord>,
    pub events: Vec<TrackingEvent>,
}

const PAYMENT_COLUMNS: &str = "id, order_id, payment_intent_id, amount_minor, currency, duplicate, flagged_reason, created_at";

/// Any order, with its customer, payments, refunds and history.
#[utoipa::path(
    get, path = "/admin/orders/{id}", tag = "admin", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the order", body = AdminOrder),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such order", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<Uuid>,
) -> Result<Json<AdminOrder>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let order = order_views::order(&mut conn, id, Scope::Admin).await?;
    let customer: Customer = sqlx::query_as(
        "SELECT u.id, u.email, u.name FROM orders o JOIN users u ON u.id = o.customer_id WHERE o.id = $1",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    let payments: Vec<PaymentRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE order_id = $1 ORDER BY created_at"
    )))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let refunds: Vec<RefundRecord> = sqlx::query_as(
        "SELECT id, payment_id, seller_order_id, amount_minor, reason, status, stripe_refund_id, failure,
                created_at, completed_at
           FROM refunds WHERE order_id = $1 ORDER BY created_at",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let events = order_views::tracking(&mut conn, id).await?;
    Ok(Json(AdminOrder {
        order,
        customer,
        payments,
        refunds,
        events,
    }))
}

/// Any seller order, as its seller sees it.
#[utoipa::path(
    get, path = "/admin/seller-orders/{id}", tag = "admin", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the seller order", body = SellerOrder),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such seller order", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_seller_order(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<Uuid>,
) -> Result<Json<SellerOrder>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        order_views::seller_order(&mut conn, id, Scope::Admin).await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusCorrection {
    /// A fulfilment step: `paid`, `processing`, `shipped` or `delivered`.
    pub status: SellerOrderStatus,
    /// Why; kept in the order's history and the audit log.
    pub reason: String,
    /// Only with `shipped` (refused, 422 naming `carrier`, with any other
    /// status). Trimmed; blank is the same as absent, keeping the carrier
    /// on record; shipped needs one, given now or on record.
    #[serde(default)]
    pub carrier: Option<String>,
    /// Only with `shipped` (refused, 422 naming `tracking_number`, with any
    /// other status). Trimmed; blank is the same as absent, keeping the
    /// number on record; shipped needs one, given now or on record.
    #[serde(default)]
    pub tracking_number: Option<String>,
}

impl Validate for StatusCorrection {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !self.status.is_fulfilment() {
            errors.push(FieldError::new(
                "status",
                "must be paid, processing, shipped or delivered (money moves through cancel and refund)",
            ));
        }
        errors.extend(reason_error(&self.reason));
        errors.extend(seller_orders::parcel_errors(
            self.status,
            &self.carrier,
            &self.tracking_number,
        ));
        errors
    }
}

/// Correct a seller order's fulfilment status, in either direction. Out of
/// delivered only while the seller's earning is still held (its release
/// waits for the next delivery); once released, money comes back by a
/// refund. The reason is kept with the change and in the audit log.
#[utoipa::path(
    post, path = "/admin/seller-orders/{id}/status", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = StatusCorrection,
    responses(
        (status = 200, description = "the corrected seller order", body = SellerOrder),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such seller order", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a fulfilment step, no reason, shipped without carrier and tracking number (given or on record), or either sent with another status", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not a fulfilment step now (cancelled or refunded), or delivered and its earning released", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn correct_status(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<StatusCorrection>,
) -> Result<Json<SellerOrder>, ApiError> {
    let reason = body.reason.trim();
    let mut tx = state.pool.begin().await?;
    // The seller order locked first (settlement's sweep locks it too), then
    // its earning read as committed: no release can slip in between.
    let (carrier, tracking): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT carrier, tracking_number FROM seller_orders WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    // Shipped means a parcel the customer can follow, as for sellers: the
    // carrier and tracking number given now or kept from before (a blank
    // one given is none, so the one on record stands).
    if body.status == SellerOrderStatus::Shipped {
        let missing = seller_orders::unshippable(
            parcel_value(&body.carrier).or(parcel_value(&carrier)),
            parcel_value(&body.tracking_number).or(parcel_value(&tracking)),
        );
        if !missing.is_empty() {
            return Err(ApiError::Validation(missing));
        }
    }
    let released: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM seller_earnings WHERE seller_order_id = $1 AND released_at IS NOT NULL)",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if released && body.status != SellerOrderStatus::Delivered {
        return Err(ApiError::Conflict(FieldError::new(
            "status",
            "delivered and its earning already released to the seller; refund instead",
        )));
    }
    let update = FulfilmentUpdate {
        status: body.status,
        carrier: body.carrier.clone(),
        tracking_number: body.tracking_number.clone(),
        note: Some(reason.to_string()),
    };
    let change = Change {
        note: Some(reason),
        correction: true,
        ..Change::default()
    };
    fulfil(
        &mut tx,
        id,
        &update,
        Actor::Admin(admin.0.id),
        change,
        &request_id.0,
    )
    .await?;
    if body.status != SellerOrderStatus::Delivered {
        // Not delivered after all: the earning waits for the next delivery,
        // whose message sets its hold anew. Until then no release sweep may
        // take it, however long ago its first hold ended (the sweep could
        // otherwise run between a re-delivery and its message).
        sqlx::query(
            "UPDATE seller_earnings SET available_at = 'infinity'
              WHERE seller_order_id = $1 AND released_at IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    let action = format!("seller_order.status.{}", body.status);
    audit(&mut tx, &admin, &action, ("seller_order", id), reason).await?;
    state.commit_with_messages(tx).await?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        order_views::seller_order(&mut conn, id, Scope::Admin).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PagingQuery {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for PagingQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// Payments that need a person: second payments of one order (refunded
/// automatically) and refunds Stripe refused. Newest first.
#[utoipa::path(
    get, path = "/admin/payments/flagged", tag = "admin", security(("bearer" = [])), params(PagingQuery),
    responses(
        (status = 200, description = "a page of flagged payments", body = Page<PaymentRecord>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn flagged_payments(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<PagingQuery>,
) -> Result<Json<Page<PaymentRecord>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let items: Vec<PaymentRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE flagged_reason IS NOT NULL
          ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2"
    )))
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments WHERE flagged_reason IS NOT NULL")
            .fetch_one(&state.pool)
            .await?;
    Ok(Json(paging.page(items, total)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommissionUpdate {
    /// Basis points (1000 = 10 %); `null` for the platform's default.
    pub commission_bps: Option<i32>,
    /// Why; kept in the audit log.
    pub reason: String,
}

impl Validate for CommissionUpdate {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self
            .commission_bps
            .is_some_and(|b| !(0..=10_000).contains(&b))
        {
            errors.push(FieldError::new(
                "commission_bps",
                "must be 0 to 10000 basis points",
            ));
        }
        errors.extend(reason_error(&self.reason));
        errors
    }
}

/// Set a shop's commission rate for orders placed from now on: an order
/// keeps the rates in force at its checkout.
#[utoipa::path(
    put, path = "/admin/shops/{slug}/commission", tag = "admin", security(("bearer" = [])),
    params(("slug" = String, Path)), request_body = CommissionUpdate,
    responses(
        (status = 204, description = "set"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn set_commission(
    State(state): State<AppState>,
    admin: Admin,
    Path(slug): Path<String>,
    ValidJson(body): ValidJson<CommissionUpdate>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let shop: Option<Uuid> =
        sqlx::query_scalar("UPDATE shops SET commission_bps = $2 WHERE slug = $1 RETURNING id")
            .bind(&slug)
            .bind(body.commission_bps)
            .fetch_optional(&mut *tx)
            .await?;
    let shop = shop.ok_or(ApiError::NotFound)?;
    let action = match body.commission_bps {
        Some(bps) => format!("shop.commission.{bps}bps"),
        None => "shop.commission.default".to_string(),
    };
    audit(&mut tx, &admin, &action, ("shop", shop), body.reason.trim()).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Cancel any order until a seller ships it, as its customer could, with a
/// reason (kept in the order's history and the audit log).
#[utoipa::path(
    post, path = "/admin/orders/{id}/cancel", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 200, description = "the cancelled order (refunds follow within seconds)", body = AdminOrder),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "shipped, or already over (field `status`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<AdminOrder>, ApiError> {
    let reason = body.reason.trim();
    let mut tx = state.pool.begin().await?;
    cancel::cancel_order(
        &mut tx,
        id,
        None,
        Actor::Admin(admin.0.id),
        reason,
        &request_id.0,
    )
    .await?;
    audit(&mut tx, &admin, "order.cancel", ("order", id), reason).await?;
    state.commit_with_messages(tx).await?;
    get(State(state), admin, Path(id)).await
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminRefund {
    /// At most what is left of what was paid for the seller order.
    pub amount_minor: i64,
    /// Why; told to the customer and kept in the audit log.
    pub reason: String,
}

impl Validate for AdminRefund {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> = reason_error(&self.reason).into_iter().collect();
        if self.amount_minor < 1 {
            errors.push(FieldError::new(
                "amount_minor",
                "must be a positive amount in minor units",
            ));
        }
        errors
    }
}

/// Refund part (or all) of a paid seller order through Stripe, whatever its
/// fulfilment step; the seller's earnings are taken back in the ledger.
#[utoipa::path(
    post, path = "/admin/seller-orders/{id}/refund", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "the same key refunds once")),
    request_body = AdminRefund,
    responses(
        (status = 200, description = "the seller order (the refund follows within seconds)", body = SellerOrder),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such seller order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not paid, or more than is left of what was paid", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no reason, a bad amount, or an Idempotency-Key used for another refund", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn refund(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<AdminRefund>,
) -> Result<Json<SellerOrder>, ApiError> {
    let reason = body.reason.trim();
    let key = Key::from_request(&headers, &body)?;
    let mut tx = state.pool.begin().await?;
    let order: Option<Uuid> =
        sqlx::query_scalar("SELECT order_id FROM seller_orders WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let order = order.ok_or(ApiError::NotFound)?;
    // The order's row first: refunds are decided under it.
    sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR NO KEY UPDATE")
        .bind(order)
        .execute(&mut *tx)
        .await?;
    // Under the order's lock, so a retry racing the first waits for it.
    if let Some(key) = &key
        && idempotency::earlier(&mut tx, Keyed::Refunds, id, key)
            .await?
            .is_some()
    {
        drop(tx);
        let mut conn = state.pool.acquire().await?;
        return Ok(Json(
            order_views::seller_order(&mut conn, id, Scope::Admin).await?,
        ));
    }
    let payment = refunds::order_payment(&mut tx, order)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(FieldError::new("status", "this order was never paid"))
        })?;
    let request = Refund {
        order,
        payment,
        seller_order: Some(id),
        amount_minor: body.amount_minor,
        reason,
    };
    let made = refunds::request(&mut tx, request, &request_id.0)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(FieldError::new(
                "amount_minor",
                "more than is left of what was paid for this seller order",
            ))
        })?;
    if let Some(key) = &key {
        sqlx::query("UPDATE refunds SET idempotency_key = $2, request_hash = $3 WHERE id = $1")
            .bind(made)
            .bind(&key.key)
            .bind(&key.hash)
            .execute(&mut *tx)
            .await?;
    }
    audit(
        &mut tx,
        &admin,
        "seller_order.refund",
        ("seller_order", id),
        &format!("{reason} ({} minor units)", body.amount_minor),
    )
    .await?;
    state.commit_with_messages(tx).await?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        order_views::seller_order(&mut conn, id, Scope::Admin).await?,
    ))
}
