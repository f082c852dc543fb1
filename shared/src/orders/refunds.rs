//! Refunds are decided in the transaction that holds the order's row (so
//! two decisions never both see the same money left) and sent to Stripe by
//! the payments worker, with the refund's id as the idempotency key.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    contracts::RefundRequested,
    envelope::Envelope,
    orders::{Actor, Change, MoveError, OrderStatus, SellerOrderStatus, status},
    outbox,
};

/// What a refund is of.
#[derive(Debug, Clone, Copy)]
pub struct Refund<'a> {
    pub order: Uuid,
    pub payment: Uuid,
    /// The seller order whose money goes back; `None` for a payment that
    /// never bought anything (it came after the order died, or twice).
    pub seller_order: Option<Uuid>,
    pub amount_minor: i64,
    pub reason: &'a str,
}

/// Records the refund and asks for it; `None` (and nothing written) when
/// it would give back more than is left of the payment, or of what was
/// paid for the seller order. The caller must hold the order's row lock.
pub async fn request(
    conn: &mut PgConnection,
    refund: Refund<'_>,
    correlation_id: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    request_keyed(conn, refund, None, correlation_id).await
}

/// As [`request`], the refund keyed by `key` (unique per seller order):
/// `None` too when a refund of that seller order already has that key.
async fn request_keyed(
    conn: &mut PgConnection,
    refund: Refund<'_>,
    key: Option<&str>,
    correlation_id: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    if refund.amount_minor <= 0 {
        return Ok(None);
    }
    let id = Uuid::now_v7();
    let recorded: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO refunds (id, order_id, payment_id, seller_order_id, amount_minor, reason,
                              idempotency_key)
         SELECT $1, $2, p.id, $4, $5, $6, $7 FROM payments p
          WHERE p.id = $3 AND p.order_id = $2
            AND p.amount_minor - (SELECT coalesce(sum(r.amount_minor), 0) FROM refunds r
                                   WHERE r.payment_id = p.id AND r.status <> 'failed') >= $5
            -- and never more than was paid for the seller order
            AND ($4::uuid IS NULL OR
                 (SELECT so.total_minor FROM seller_orders so WHERE so.id = $4)
                 - (SELECT coalesce(sum(r.amount_minor), 0) FROM refunds r
                     WHERE r.seller_order_id = $4 AND r.status <> 'failed') >= $5)
         ON CONFLICT (seller_order_id, idempotency_key) WHERE idempotency_key IS NOT NULL
         DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(refund.order)
    .bind(refund.payment)
    .bind(refund.seller_order)
    .bind(refund.amount_minor)
    .bind(refund.reason)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    if recorded.is_some() {
        let message = RefundRequested { refund_id: id };
        outbox::enqueue(conn, &Envelope::new(&message, correlation_id)).await?;
    }
    Ok(recorded)
}

/// A refund Stripe refused, of a seller order since cancelled (or of an
/// order since cancelled): what the cancel left to it is still owed, since
/// the cancel counted it as on its way. A new refund asks for what is
/// still owed now (for a seller order: its total less every refund not
/// failed; for a refund of no seller order: what is left of the payment),
/// with a key naming the failed one (`replaces:{id}`), so one failed
/// refund gets at most one replacement, and a replacement that fails in
/// turn gets none (it is flagged for an admin instead: no loop). `None`
/// when nothing is replaced. The caller must hold the order's row lock.
pub async fn replace_failed(
    conn: &mut PgConnection,
    failed: Uuid,
    correlation_id: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let row: Option<(Uuid, Uuid, Option<Uuid>, String, bool)> = sqlx::query_as(
        "SELECT r.order_id, r.payment_id, r.seller_order_id, r.reason,
                EXISTS (SELECT 1 FROM refunds f WHERE r.idempotency_key = 'replaces:' || f.id::text)
           FROM refunds r
           JOIN orders o ON o.id = r.order_id
           LEFT JOIN seller_orders so ON so.id = r.seller_order_id
          WHERE r.id = $1 AND r.status = 'failed'
            AND (o.status = 'cancelled' OR so.status = 'cancelled')",
    )
    .bind(failed)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((order, payment, seller_order, reason, is_replacement)) = row else {
        return Ok(None);
    };
    if is_replacement {
        return Ok(None);
    }
    let owed = match seller_order {
        Some(part) => left_of(conn, part).await?,
        None => {
            sqlx::query_scalar(
                "SELECT p.amount_minor - (SELECT coalesce(sum(r.amount_minor), 0) FROM refunds r
                                           WHERE r.payment_id = p.id AND r.status <> 'failed')::bigint
                   FROM payments p WHERE p.id = $1",
            )
            .bind(payment)
            .fetch_one(&mut *conn)
            .await?
        }
    };
    let refund = Refund {
        order,
        payment,
        seller_order,
        amount_minor: owed,
        reason: &reason,
    };
    let key = format!("replaces:{failed}");
    request_keyed(conn, refund, Some(&key), correlation_id).await
}

/// What is left to give back of what was paid for `seller_order`: its
/// total less every refund not failed (asked for, on its way, or done), so
/// a refund still waiting for Stripe counts as given.
pub async fn left_of(conn: &mut PgConnection, seller_order: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT so.total_minor - (SELECT coalesce(sum(r.amount_minor), 0) FROM refunds r
                                   WHERE r.seller_order_id = so.id AND r.status <> 'failed')::bigint
           FROM seller_orders so WHERE so.id = $1",
    )
    .bind(seller_order)
    .fetch_one(conn)
    .await
}

/// The payment that counts for `order` (not a duplicate), if it was paid.
pub async fn order_payment(
    conn: &mut PgConnection,
    order: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM payments WHERE order_id = $1 AND NOT duplicate")
        .bind(order)
        .fetch_optional(conn)
        .await
}

/// A cancelled seller order whose money is all back (`refunded_minor ==
/// total_minor > 0`, every refund of it through) becomes refunded. Called
/// when a refund of it lands, and when it is cancelled: a part refunded in
/// full before its cancel has no refund left to land, so without the call
/// at cancel time it would stay `cancelled` for good. `true` if it moved.
/// The caller must hold the order's row lock.
pub async fn settle_part(
    conn: &mut PgConnection,
    seller_order: Uuid,
    actor: Actor,
    change: Change<'_>,
) -> Result<bool, MoveError> {
    let row: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT status, refunded_minor, total_minor FROM seller_orders WHERE id = $1
            FOR NO KEY UPDATE",
    )
    .bind(seller_order)
    .fetch_optional(&mut *conn)
    .await?;
    let (current, refunded, total) = row.ok_or(MoveError::NotFound)?;
    if current != SellerOrderStatus::Cancelled.as_str() || total <= 0 || refunded != total {
        return Ok(false);
    }
    status::move_seller_order(
        conn,
        seller_order,
        SellerOrderStatus::Refunded,
        actor,
        change,
    )
    .await?;
    Ok(true)
}

/// The order becomes refunded once all its money is back (`refunded_minor
/// == total_minor > 0`) and every seller order is over, cancelled or
/// refunded. A part still paid, processing, shipped or delivered (an
/// admin refunded it in full while the parcel is on its way, say) keeps
/// the order `paid`: `refunded` is where an order ends, and that part still
/// moves through its steps (earning its seller nothing: its earning nets
/// the refunds, docs/ledger.md). Called when a refund lands and when an
/// order or a part is cancelled; `true` if it moved. The caller must hold
/// the order's row lock.
pub async fn settle_order(
    conn: &mut PgConnection,
    order: Uuid,
    actor: Actor,
    change: Change<'_>,
) -> Result<bool, MoveError> {
    let row: Option<(String, i64, Option<i64>, bool)> = sqlx::query_as(
        "SELECT o.status, o.refunded_minor, o.total_minor,
                EXISTS (SELECT 1 FROM seller_orders so
                         WHERE so.order_id = o.id AND so.status NOT IN ('cancelled', 'refunded'))
           FROM orders o WHERE o.id = $1 FOR NO KEY UPDATE",
    )
    .bind(order)
    .fetch_optional(&mut *conn)
    .await?;
    let (current, refunded, total, live_part) = row.ok_or(MoveError::NotFound)?;
    let current = OrderStatus::parse(&current).ok_or(MoveError::NotFound)?;
    if live_part
        || !total.is_some_and(|total| total > 0 && refunded == total)
        || !current.may_become(OrderStatus::Refunded)
    {
        return Ok(false);
    }
    status::move_order(conn, order, OrderStatus::Refunded, actor, change).await?;
    Ok(true)
}

/// [`settle_part`] for `seller_order` (if any), then [`settle_order`]: what
/// a landed refund, or a seller's cancel of its part, may finish.
pub async fn settle(
    conn: &mut PgConnection,
    order: Uuid,
    seller_order: Option<Uuid>,
    actor: Actor,
    change: Change<'_>,
) -> Result<(), MoveError> {
    if let Some(part) = seller_order {
        settle_part(conn, part, actor, change.clone()).await?;
    }
    settle_order(conn, order, actor, change).await?;
    Ok(())
}
