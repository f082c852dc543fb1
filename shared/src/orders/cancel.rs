//! Cancelling an order until a seller ships it: for its customer (API), an
//! admin (API) or the system (a replenishment whose card was declined).

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    contracts::OrderCancelled,
    envelope::Envelope,
    orders::{
        Actor, Change, MoveError, OrderStatus, SellerOrderStatus, notices,
        refunds::{self, Refund},
        status,
    },
    outbox,
};

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no such order")]
    NotFound,
    /// Shipped, or already over.
    #[error("{0}")]
    TooLate(String),
    #[error("a refund of seller order {0} would exceed its payment")]
    Overdrawn(Uuid),
    #[error(transparent)]
    Move(#[from] MoveError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Cancels an order until a seller ships it (for its customer, or an
/// admin: `customer` scopes the lookup). Unpaid: the seller orders are
/// cancelled and `order.cancelled` releases the stock and the intent. Paid:
/// each seller's part is refunded in full and its seller told.
pub async fn cancel_order(
    tx: &mut PgConnection,
    id: Uuid,
    customer: Option<Uuid>,
    actor: Actor,
    reason: &str,
    corr: &str,
) -> Result<(), CancelError> {
    let current: Option<String> = sqlx::query_scalar(
        "SELECT status FROM orders WHERE id = $1 AND ($2::uuid IS NULL OR customer_id = $2) FOR NO KEY UPDATE",
    )
    .bind(id)
    .bind(customer)
    .fetch_optional(&mut *tx)
    .await?;
    let current = current
        .as_deref()
        .and_then(OrderStatus::parse)
        .ok_or(CancelError::NotFound)?;
    if !current.cancellable() {
        return Err(CancelError::TooLate(format!(
            "a {current} order can no longer be cancelled"
        )));
    }
    let parts: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, status FROM seller_orders WHERE order_id = $1 ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let parts: Vec<(Uuid, SellerOrderStatus)> = parts
        .into_iter()
        .filter_map(|(id, s)| SellerOrderStatus::parse(&s).map(|s| (id, s)))
        .collect();
    if parts
        .iter()
        .any(|(_, s)| matches!(s, SellerOrderStatus::Shipped | SellerOrderStatus::Delivered))
    {
        return Err(CancelError::TooLate(
            "a seller has already shipped part of this order".into(),
        ));
    }
    status::move_order(tx, id, OrderStatus::Cancelled, actor, Change::note(reason)).await?;
    sqlx::query("UPDATE orders SET failure_reason = $2 WHERE id = $1")
        .bind(id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    let payment = refunds::order_payment(tx, id).await?;
    let mut refunded = 0;
    for (part, part_status) in parts {
        if part_status == SellerOrderStatus::Cancelled || part_status == SellerOrderStatus::Refunded
        {
            continue;
        }
        status::move_seller_order(
            tx,
            part,
            SellerOrderStatus::Cancelled,
            actor,
            Change::note(reason),
        )
        .await?;
        if current != OrderStatus::Paid {
            continue;
        }
        // Less any refund already on its way (a seller's or an admin's). An
        // order with nothing to pay (a 100 % coupon) has no payment, but
        // its sellers must still hear not to ship it.
        if let Some(payment) = payment {
            let left = refunds::left_of(tx, part).await?;
            let refund = Refund {
                order: id,
                payment,
                seller_order: Some(part),
                amount_minor: left,
                reason,
            };
            if left > 0 && refunds::request(tx, refund, corr).await?.is_none() {
                return Err(CancelError::Overdrawn(part));
            }
            refunded += left;
        }
        // Refunded in full before this cancel (an admin's refund, say):
        // no refund is left to land and move it, so it is refunded now.
        // One still on its way moves it when it lands instead.
        refunds::settle_part(tx, part, actor, Change::note(reason)).await?;
        let extra = json!({ "reason": reason });
        notices::to_seller(
            tx,
            part,
            "seller_order_cancelled",
            "order_cancelled",
            extra,
            corr,
        )
        .await?;
    }
    // Likewise the order, once all its money was back before the cancel
    // and every part is over now.
    refunds::settle_order(tx, id, actor, Change::note(reason)).await?;
    outbox::enqueue(tx, &Envelope::new(&OrderCancelled { order_id: id }, corr)).await?;
    let extra = json!({ "reason": reason, "refund_minor": refunded });
    notices::to_customer(tx, id, "order_cancelled", None, extra, corr).await?;
    Ok(())
}
