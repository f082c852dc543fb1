//! Checkout: the cart becomes an order in one transaction.
//!
//! The order, its line snapshots (title, SKU and unit price as they are
//! now), the cleared cart and the `order.placed` message commit together;
//! the rest (split, reservation, payment) happens in the workers. The cart's
//! rows are locked first, so two checkouts of one cart cannot both see it.
//! With an `Idempotency-Key`, a retry answers the order the first attempt
//! made; the same key with another body is refused.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use serde::{Deserialize, Serialize};
use souk_shared::orders::place;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Customer,
    error::{ApiError, FieldError, Problem},
    extract::{ValidJson, Validate},
    idempotency::{self, Key, Keyed},
    middleware::RequestId,
    order_views::{self, Order, Scope},
    routes::cart::{self, LineProblem},
    state::AppState,
};

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// One of the caller's addresses; the default shipping address if absent.
    #[serde(default)]
    pub address_id: Option<Uuid>,
}

impl Validate for CheckoutRequest {
    fn validate(&self) -> Vec<FieldError> {
        vec![]
    }
}

/// Place an order for everything in the cart.
///
/// Answers 202: the order is pending while it is split per seller and its
/// stock reserved; read it again for its totals and, once it is
/// `awaiting_payment`, the client secret to pay with.
#[utoipa::path(
    post, path = "/checkout", tag = "orders", security(("bearer" = [])), request_body = CheckoutRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes retries safe: the same key returns the same order")),
    responses(
        (status = 202, description = "the order, pending", body = Order),
        (status = 403, description = "not a customer, or the email is not verified", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "empty cart, a line that cannot be bought, a coupon that no longer applies, no address, or a reused Idempotency-Key (the fields say which)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn checkout(
    State(state): State<AppState>,
    Customer(caller): Customer,
    request_id: RequestId,
    headers: HeaderMap,
    ValidJson(body): ValidJson<CheckoutRequest>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    caller.require_verified()?;
    let key = Key::from_request(&headers, &body)?;

    let mut tx = state.pool.begin().await?;
    // Two checkouts of one cart queue here; the second then finds it empty
    // (or, with the same key, the first one's order).
    sqlx::query("SELECT 1 FROM cart_items WHERE user_id = $1 FOR NO KEY UPDATE")
        .bind(caller.id)
        .execute(&mut *tx)
        .await?;
    // The coupon on the cart, its row locked so that a coupon put on (or
    // taken off) from another tab waits for this checkout; the order is
    // priced with exactly this one (`cart::load_in` is handed it rather
    // than reading the cart's again), so it cannot carry a coupon whose
    // lock it does not hold. A coupon applied to a cart that had none (a
    // new row, not locked here) stays for the next order.
    //
    // Checkouts with one coupon queue on the coupon's row too, so each
    // counts the orders the others placed with it against its limits. One
    // statement: the cart's row is locked inside the CTE, before the join
    // can yield the coupon's row to lock.
    let coupon_id: Option<Uuid> = sqlx::query_scalar(
        "WITH cc AS (SELECT coupon_id FROM cart_coupons WHERE user_id = $1 FOR NO KEY UPDATE)
         SELECT c.id FROM cc JOIN coupons c ON c.id = cc.coupon_id FOR NO KEY UPDATE OF c",
    )
    .bind(caller.id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(key) = &key
        && let Some(id) = idempotency::earlier(&mut tx, Keyed::Orders, caller.id, key).await?
    {
        drop(tx);
        return answer(&state, id, caller.id).await;
    }

    let cart = cart::load_in(&mut tx, caller.id, cart::CouponOf::Locked(coupon_id)).await?;
    if cart.shops.is_empty() {
        return Err(ApiError::Validation(vec![FieldError::new(
            "cart",
            "your cart is empty",
        )]));
    }
    let problems: Vec<FieldError> = cart
        .shops
        .iter()
        .flat_map(|g| &g.lines)
        .filter_map(|l| {
            let message = match l.problem? {
                LineProblem::Unavailable => format!("{} is no longer for sale", l.title),
                LineProblem::InsufficientStock => {
                    format!("only {} of {} available", l.available, l.title)
                }
            };
            Some(FieldError::new(format!("cart.{}", l.variant_id), message))
        })
        .collect();
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    if let Some(problem) = cart.coupon.as_ref().and_then(|c| c.problem.clone()) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "coupon", problem,
        )]));
    }
    let address = place::shipping_address(&mut tx, caller.id, body.address_id)
        .await?
        .ok_or_else(|| {
            let message = match body.address_id {
                Some(_) => "no such address in your address book",
                None => "add a shipping address (or choose one) first",
            };
            ApiError::Validation(vec![FieldError::new("address_id", message)])
        })?;
    let lines = cart
        .shops
        .iter()
        .flat_map(|g| {
            g.lines.iter().map(move |l| place::Line {
                shop_id: g.shop_id,
                product_id: l.product_id,
                variant_id: l.variant_id,
                title: l.title.clone(),
                variant_title: l.variant_title.clone(),
                sku: l.sku.clone(),
                unit_price_minor: l.unit_price_minor,
                quantity: l.quantity,
            })
        })
        .collect();
    let coupon = cart.coupon.as_ref().map(|c| place::AppliedCoupon {
        id: c.id,
        code: c.code.clone(),
        discount_minor: c.discount_minor,
    });
    let order = place::NewOrder {
        customer: caller.id,
        currency: state.market.currency.clone(),
        lines,
        coupon,
        benefit: cart.benefit,
        shipping_address: address,
        idempotency: key.map(|k| (k.key, k.hash)),
        payment_method: None,
        replenishment_run: None,
        correlation_id: request_id.0,
    };
    let id = place::place(&mut tx, order).await?;
    // Clears what was ordered, not the whole cart: an item added from
    // another tab while this ran (a new row, not locked above) stays for
    // the next order instead of vanishing unordered; so does a coupon
    // applied meanwhile.
    let ordered: Vec<Uuid> = cart
        .shops
        .iter()
        .flat_map(|g| g.lines.iter().map(|l| l.variant_id))
        .collect();
    sqlx::query(
        "WITH emptied AS (DELETE FROM cart_items WHERE user_id = $1 AND variant_id = ANY($2))
         DELETE FROM cart_coupons WHERE user_id = $1 AND coupon_id IS NOT DISTINCT FROM $3",
    )
    .bind(caller.id)
    .bind(&ordered)
    .bind(cart.coupon.as_ref().map(|c| c.id))
    .execute(&mut *tx)
    .await?;
    state.commit_with_messages(tx).await?;
    answer(&state, id, caller.id).await
}

async fn answer(
    state: &AppState,
    order: Uuid,
    customer: Uuid,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let mut conn = state.pool.acquire().await?;
    let order = order_views::order(&mut conn, order, Scope::Customer(customer)).await?;
    Ok((StatusCode::ACCEPTED, Json(order)))
}
