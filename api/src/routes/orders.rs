//! A customer's orders: history, detail (with the client secret while it
//! can be paid), the tracking timeline, and cancelling. Every query is
//! scoped to the caller: another customer's order is a 404.

use axum::{Json, extract::State};
use serde::Deserialize;
use souk_shared::orders::{Actor, OrderStatus, cancel};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    middleware::RequestId,
    order_views::{self, Order, OrderSummary, Scope, TrackingEvent},
    routes::catalog::{Page, Paging},
    state::AppState,
};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OrderQuery {
    /// Only orders in this status.
    pub status: Option<OrderStatus>,
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100; 20 if absent.
    pub per_page: Option<u32>,
}

impl Validate for OrderQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// Orders, newest first, for a customer (or everyone, for admins).
pub async fn list(
    state: &AppState,
    customer: Option<Uuid>,
    shop: Option<Uuid>,
    query: &OrderQuery,
) -> Result<Page<OrderSummary>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let filter = "($1::uuid IS NULL OR o.customer_id = $1) AND ($2::text IS NULL OR o.status = $2)
                  AND ($3::uuid IS NULL OR EXISTS (SELECT 1 FROM seller_orders so
                                                    WHERE so.order_id = o.id AND so.shop_id = $3))";
    let status = query.status.map(|s| s.as_str());
    let items: Vec<OrderSummary> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT o.id, o.status, o.currency, o.subtotal_minor, o.total_minor,
                (SELECT coalesce(sum(l.quantity), 0) FROM order_lines l WHERE l.order_id = o.id)::bigint AS item_count,
                o.created_at, o.paid_at
           FROM orders o WHERE {filter}
          ORDER BY o.created_at DESC, o.id DESC LIMIT $4 OFFSET $5"
    )))
    .bind(customer)
    .bind(status)
    .bind(shop)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM orders o WHERE {filter}"
    )))
    .bind(customer)
    .bind(status)
    .bind(shop)
    .fetch_one(&state.pool)
    .await?;
    Ok(paging.page(items, total))
}

/// The caller's orders, newest first.
#[utoipa::path(
    get, path = "/orders", tag = "orders", security(("bearer" = [])), params(OrderQuery),
    responses(
        (status = 200, description = "a page of orders", body = Page<OrderSummary>),
        (status = 401, description = "not signed in", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn mine(
    State(state): State<AppState>,
    caller: Caller,
    ValidQuery(query): ValidQuery<OrderQuery>,
) -> Result<Json<Page<OrderSummary>>, ApiError> {
    Ok(Json(list(&state, Some(caller.id), None, &query).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OrderWait {
    /// Hold the answer until the order is in this status, or can no longer
    /// get there (out of stock, cancelled...), or `wait_ms` has passed: a
    /// storefront waits for `awaiting_payment` after checkout and for
    /// `paid` after the card, without polling.
    pub wait_for: Option<OrderStatus>,
    /// How long to hold at most, in milliseconds: 1 to 30000 (10000).
    pub wait_ms: Option<u32>,
}

/// The longest a request may be held.
const MAX_WAIT_MS: u32 = 30_000;

impl Validate for OrderWait {
    fn validate(&self) -> Vec<FieldError> {
        match self.wait_ms {
            Some(ms) if ms == 0 || ms > MAX_WAIT_MS => vec![FieldError::new(
                "wait_ms",
                format!("must be 1 to {MAX_WAIT_MS}"),
            )],
            _ => vec![],
        }
    }
}

/// One of the caller's orders. While it awaits payment it carries the
/// PaymentIntent's client secret for Stripe.js. With `wait_for`, the
/// answer comes when the order reaches that status (or cannot any more),
/// or when `wait_ms` runs out: the order as it is then.
#[utoipa::path(
    get, path = "/orders/{id}", tag = "orders", security(("bearer" = [])), params(("id" = Uuid, Path), OrderWait),
    responses(
        (status = 200, description = "the order", body = Order),
        (status = 404, description = "no such order of yours", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a bad wait_for or wait_ms", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    ValidQuery(wait): ValidQuery<OrderWait>,
) -> Result<Json<Order>, ApiError> {
    if let Some(target) = wait.wait_for {
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(wait.wait_ms.unwrap_or(10_000).into());
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 AND customer_id = $2")
                .bind(id)
                .bind(caller.id)
                .fetch_optional(&state.pool)
                .await?;
        let mut status = status
            .as_deref()
            .and_then(OrderStatus::parse)
            .ok_or(ApiError::NotFound)?;
        // Each move is handed over by the watcher, so waiting costs the
        // database nothing per request beyond this first read.
        while status != target && status.can_reach(target) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match state.orders.changed(id, status, left).await {
                Some(moved) => status = moved,
                None => break,
            }
        }
    }
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        order_views::order(&mut conn, id, Scope::Customer(caller.id)).await?,
    ))
}

/// The order's history, oldest first: placed, paid, each seller's
/// processing, shipment (carrier and tracking number) and delivery.
#[utoipa::path(
    get, path = "/orders/{id}/tracking", tag = "orders", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the timeline", body = Vec<TrackingEvent>),
        (status = 404, description = "no such order of yours", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn tracking(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Vec<TrackingEvent>>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let mine: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1 AND customer_id = $2)",
    )
    .bind(id)
    .bind(caller.id)
    .fetch_one(&mut *conn)
    .await?;
    if !mine {
        return Err(ApiError::NotFound);
    }
    Ok(Json(order_views::tracking(&mut conn, id).await?))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Why, in a few words (kept with the order).
    #[serde(default)]
    pub reason: Option<String>,
}

impl Validate for CancelRequest {
    fn validate(&self) -> Vec<FieldError> {
        match &self.reason {
            Some(r) if r.chars().count() > 500 => {
                vec![FieldError::new("reason", "must be at most 500 characters")]
            }
            _ => vec![],
        }
    }
}

/// Cancel an order until a seller ships. Unpaid: its stock goes back on
/// sale and its PaymentIntent is cancelled. Paid: every seller's part is
/// refunded in full through Stripe and its stock restored.
#[utoipa::path(
    post, path = "/orders/{id}/cancel", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = CancelRequest,
    responses(
        (status = 200, description = "the cancelled order (refunds follow within seconds)", body = Order),
        (status = 404, description = "no such order of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "too late: shipped, or already over (field `status`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<CancelRequest>,
) -> Result<Json<Order>, ApiError> {
    let reason = body
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .unwrap_or("cancelled by the customer");
    let mut tx = state.pool.begin().await?;
    let actor = Actor::Customer(caller.id);
    cancel::cancel_order(&mut tx, id, Some(caller.id), actor, reason, &request_id.0).await?;
    state.commit_with_messages(tx).await?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        order_views::order(&mut conn, id, Scope::Customer(caller.id)).await?,
    ))
}
