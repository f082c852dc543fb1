//! Refunds are decided in the transaction that holds the order's row (so
//! two decisions never both see the same money left) and sent to Stripe by
//! the payments worker, with the refund's id as the idempotency key.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::{contracts::RefundRequested, envelope::Envelope, outbox};

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
