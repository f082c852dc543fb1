//! A seller's orders: its shop's seller orders only (another shop's are a
//! 404), fulfilment (processing, shipped with carrier and tracking number,
//! delivered; each step mailed to the customer and kept in the order's
//! timeline) and cancelling its own part with a refund of that part.

use axum::{Json, extract::State};
use serde::Deserialize;
use serde_json::json;
use souk_shared::{
    contracts::{SellerOrderCancelled, SellerOrderDelivered},
    envelope::Envelope,
    orders::{
        Actor, Change, OrderStatus, SellerOrderStatus, notices,
        refunds::{self, Refund},
        status,
    },
    outbox,
};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Seller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    middleware::RequestId,
    order_views::{self, Scope, SellerOrder, SellerOrderSummary},
    routes::{
        admin::Reason,
        catalog::{Page, Paging},
    },
    state::AppState,
};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SellerOrderQuery {
    /// Only seller orders in this status.
    pub status: Option<SellerOrderStatus>,
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100; 20 if absent.
    pub per_page: Option<u32>,
}

impl Validate for SellerOrderQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// The shop's seller orders, newest first.
#[utoipa::path(
    get, path = "/seller/orders", tag = "seller", security(("bearer" = [])), params(SellerOrderQuery),
    responses(
        (status = 200, description = "a page of seller orders", body = Page<SellerOrderSummary>),
        (status = 403, description = "not a seller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    seller: Seller,
    ValidQuery(query): ValidQuery<SellerOrderQuery>,
) -> Result<Json<Page<SellerOrderSummary>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let status = query.status.map(|s| s.as_str());
    let items: Vec<SellerOrderSummary> = sqlx::query_as(
        "SELECT so.id, so.order_id, so.status, so.total_minor, so.payout_minor,
                (SELECT coalesce(sum(l.quantity), 0) FROM order_lines l
                  WHERE l.order_id = so.order_id AND l.shop_id = so.shop_id)::bigint AS item_count,
                so.created_at, o.paid_at
           FROM seller_orders so JOIN orders o ON o.id = so.order_id
          WHERE so.shop_id = $1 AND ($2::text IS NULL OR so.status = $2)
          ORDER BY so.created_at DESC, so.id DESC LIMIT $3 OFFSET $4",
    )
    .bind(seller.shop_id)
    .bind(status)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM seller_orders WHERE shop_id = $1 AND ($2::text IS NULL OR status = $2)",
    )
    .bind(seller.shop_id)
    .bind(status)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(paging.page(items, total)))
}

/// One of the shop's seller orders; the shipping address once it is paid.
#[utoipa::path(
    get, path = "/seller/orders/{id}", tag = "seller", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the seller order", body = SellerOrder),
        (status = 404, description = "no such seller order of your shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    seller: Seller,
    Path(id): Path<Uuid>,
) -> Result<Json<SellerOrder>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        order_views::seller_order(&mut conn, id, Scope::Shop(seller.shop_id)).await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FulfilmentUpdate {
    /// `processing`, `shipped` or `delivered`.
    pub status: SellerOrderStatus,
    /// Needed to ship, and only then: with any other status a carrier is
    /// refused (422 naming `carrier`). Trimmed; blank is the same as absent.
    #[serde(default)]
    pub carrier: Option<String>,
    /// Needed to ship, and only then: with any other status a tracking
    /// number is refused (422 naming `tracking_number`). Trimmed; blank is
    /// the same as absent.
    #[serde(default)]
    pub tracking_number: Option<String>,
    /// Shown to the customer with the step.
    #[serde(default)]
    pub note: Option<String>,
}

/// A free-text field's length, counted once trimmed.
pub(crate) fn text(errors: &mut Vec<FieldError>, field: &str, value: &Option<String>, max: usize) {
    if let Some(v) = value.as_deref().map(str::trim)
        && v.chars().count() > max
    {
        errors.push(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
}

/// A carrier or tracking number as sent, read the same way by the seller's
/// and the admin's status routes: trimmed, and a blank one is none, so it
/// never counts as given and never erases the one on record.
pub(crate) fn parcel_value(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The carrier and tracking number sent with a status change. They belong
/// to the shipped step, the one whose timeline entry and mail show them:
/// with any other status they would be kept on the seller order with no
/// event saying so, so each one given is refused by name, as the API
/// refuses any field it does not expect.
pub(crate) fn parcel_errors(
    status: SellerOrderStatus,
    carrier: &Option<String>,
    tracking_number: &Option<String>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (field, value) in [("carrier", carrier), ("tracking_number", tracking_number)] {
        if status != SellerOrderStatus::Shipped && parcel_value(value).is_some() {
            errors.push(FieldError::new(field, "is only sent with status shipped"));
        } else {
            text(&mut errors, field, value, 100);
        }
    }
    errors
}

/// Shipped means a parcel the customer can follow: each of carrier and
/// tracking number (as the parcel will stand) that is missing, by name.
pub(crate) fn unshippable(carrier: Option<&str>, tracking_number: Option<&str>) -> Vec<FieldError> {
    [("carrier", carrier), ("tracking_number", tracking_number)]
        .into_iter()
        .filter(|(_, v)| v.is_none())
        .map(|(field, _)| FieldError::new(field, "is needed to ship"))
        .collect()
}

impl Validate for FulfilmentUpdate {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        use SellerOrderStatus::*;
        if !matches!(self.status, Processing | Shipped | Delivered) {
            errors.push(FieldError::new(
                "status",
                "must be processing, shipped or delivered (cancel with POST …/cancel)",
            ));
        }
        errors.extend(parcel_errors(
            self.status,
            &self.carrier,
            &self.tracking_number,
        ));
        // A seller ships with the parcel in hand: both are given now.
        if self.status == Shipped {
            errors.extend(unshippable(
                parcel_value(&self.carrier),
                parcel_value(&self.tracking_number),
            ));
        }
        text(&mut errors, "note", &self.note, 500);
        errors
    }
}

/// Moves a seller order along, tells the customer and, on delivery,
/// announces it (settlement credits the seller from that message).
pub async fn fulfil(
    tx: &mut PgConnection,
    seller_order: Uuid,
    body: &FulfilmentUpdate,
    actor: Actor,
    change: Change<'_>,
    corr: &str,
) -> Result<(), ApiError> {
    // The parcel as it now stands: what is given, else what was on record
    // (a correction back to shipped keeps the carrier and number it had),
    // so the timeline and the mail show what the customer can follow. Only
    // the shipped step stores a parcel: it is the step whose event records
    // it (the routes refuse one with any other status).
    let shipped_now = body.status == SellerOrderStatus::Shipped;
    let (order, shop, carrier, tracking): (Uuid, String, Option<String>, Option<String>) =
        sqlx::query_as(
            "UPDATE seller_orders so
                SET carrier = coalesce($2, so.carrier), tracking_number = coalesce($3, so.tracking_number)
               FROM shops s WHERE so.id = $1 AND s.id = so.shop_id
             RETURNING so.order_id, s.name, so.carrier, so.tracking_number",
        )
        .bind(seller_order)
        .bind(parcel_value(&body.carrier).filter(|_| shipped_now))
        .bind(parcel_value(&body.tracking_number).filter(|_| shipped_now))
        .fetch_one(&mut *tx)
        .await?;
    let shipping = matches!(
        body.status,
        SellerOrderStatus::Shipped | SellerOrderStatus::Delivered
    );
    let (carrier, tracking) = if shipping {
        (carrier, tracking)
    } else {
        (None, None)
    };
    let data = json!({ "carrier": carrier, "tracking_number": tracking });
    let change = Change {
        data: Some(data),
        ..change
    };
    let note = change.note.map(str::to_string);
    // An admin's correction is signed by the platform, not by the shop.
    let correction = change.correction;
    status::move_seller_order(tx, seller_order, body.status, actor, change).await?;
    let note_from = if correction {
        "the Souk team"
    } else {
        shop.as_str()
    };
    let extra = json!({
        "shop": shop, "status": body.status, "note": note, "note_from": note_from,
        "carrier": carrier, "tracking_number": tracking, "refund_minor": null,
    });
    notices::to_customer(tx, order, "order_update", Some("order_update"), extra, corr).await?;
    if body.status == SellerOrderStatus::Delivered {
        let delivered = SellerOrderDelivered {
            seller_order_id: seller_order,
        };
        outbox::enqueue(tx, &Envelope::new(&delivered, corr)).await?;
    }
    Ok(())
}

/// Mark a seller order processing, shipped (with carrier and tracking
/// number, sent with this step only) or delivered. The customer gets a mail
/// and a timeline entry.
#[utoipa::path(
    post, path = "/seller/orders/{id}/status", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = FulfilmentUpdate,
    responses(
        (status = 200, description = "the seller order", body = SellerOrder),
        (status = 404, description = "no such seller order of your shop", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not a step from its current status (field `status`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a bad status, shipping without carrier and tracking number, or either sent with another status", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update_status(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<FulfilmentUpdate>,
) -> Result<Json<SellerOrder>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let mine: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM seller_orders WHERE id = $1 AND shop_id = $2)",
    )
    .bind(id)
    .bind(seller.shop_id)
    .fetch_one(&mut *tx)
    .await?;
    if !mine {
        return Err(ApiError::NotFound);
    }
    let change = Change {
        note: body
            .note
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty()),
        ..Change::default()
    };
    fulfil(
        &mut tx,
        id,
        &body,
        Actor::Seller(seller.caller.id),
        change,
        &request_id.0,
    )
    .await?;
    state.commit_with_messages(tx).await?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        order_views::seller_order(&mut conn, id, Scope::Shop(seller.shop_id)).await?,
    ))
}

/// Cancel the shop's part of a paid order before it ships: that part is
/// refunded through Stripe and its stock restored; the other sellers'
/// parts are untouched.
#[utoipa::path(
    post, path = "/seller/orders/{id}/cancel", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 200, description = "the cancelled seller order (its refund follows within seconds)", body = SellerOrder),
        (status = 404, description = "no such seller order of your shop", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not paid, or already shipped (field `status`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<SellerOrder>, ApiError> {
    let reason = body.reason.trim();
    let corr = request_id.0.as_str();
    let mut tx = state.pool.begin().await?;
    let order: Option<Uuid> =
        sqlx::query_scalar("SELECT order_id FROM seller_orders WHERE id = $1 AND shop_id = $2")
            .bind(id)
            .bind(seller.shop_id)
            .fetch_optional(&mut *tx)
            .await?;
    let order = order.ok_or(ApiError::NotFound)?;
    // The order's row first: refunds are decided under it.
    let order_status: String =
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR NO KEY UPDATE")
            .bind(order)
            .fetch_one(&mut *tx)
            .await?;
    if order_status != OrderStatus::Paid.as_str() {
        return Err(ApiError::Conflict(FieldError::new(
            "status",
            format!(
                "only a paid order's part can be cancelled by its seller (the order is {order_status})"
            ),
        )));
    }
    let actor = Actor::Seller(seller.caller.id);
    status::move_seller_order(
        &mut tx,
        id,
        SellerOrderStatus::Cancelled,
        actor,
        Change::note(reason),
    )
    .await?;
    // Less any refund already on its way (a refund request approved, say).
    // An order with nothing to pay (a 100 % coupon) has no payment and
    // nothing to give back.
    let left = refunds::left_of(&mut tx, id).await?;
    if left > 0 {
        let payment = refunds::order_payment(&mut tx, order)
            .await?
            .ok_or_else(|| anyhow::anyhow!("paid order {order} has no payment"))?;
        let refund = Refund {
            order,
            payment,
            seller_order: Some(id),
            amount_minor: left,
            reason,
        };
        refunds::request(&mut tx, refund, corr)
            .await?
            .ok_or_else(|| anyhow::anyhow!("refund of seller order {id} exceeds its payment"))?;
    }
    // Refunded in full before this cancel (an admin's refund, say): no
    // refund is left to land and move it, so it is refunded now, and the
    // order too once all of it is back and no part is left to fulfil.
    refunds::settle(&mut tx, order, Some(id), actor, Change::note(reason)).await?;
    outbox::enqueue(
        &mut tx,
        &Envelope::new(
            &SellerOrderCancelled {
                seller_order_id: id,
            },
            corr,
        ),
    )
    .await?;
    let shop: String = sqlx::query_scalar("SELECT name FROM shops WHERE id = $1")
        .bind(seller.shop_id)
        .fetch_one(&mut *tx)
        .await?;
    let extra = json!({
        "shop": shop, "status": SellerOrderStatus::Cancelled, "note": reason, "note_from": shop,
        "carrier": null, "tracking_number": null, "refund_minor": left,
    });
    notices::to_customer(
        &mut tx,
        order,
        "order_update",
        Some("order_update"),
        extra,
        corr,
    )
    .await?;
    state.commit_with_messages(tx).await?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        order_views::seller_order(&mut conn, id, Scope::Shop(seller.shop_id)).await?,
    ))
}
