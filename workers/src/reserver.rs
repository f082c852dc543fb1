//! The stock-reserver: holds an order's stock (every line or none), gives
//! it back when an unpaid order is cancelled or its reservation runs out,
//! and puts sold units back on the shelf when a paid order (or one seller's
//! part of it) is cancelled.
//!
//! The order's `stock` column moves forward one conditional UPDATE at a
//! time (`none` → `reserved` → `committed`/`released`), so a release can
//! never race a sale into both happening.

use std::time::Duration;

use serde_json::json;
use souk_shared::{
    catalog::VISIBLE,
    config::{ConfigError, Env},
    contracts::{OrderCancelled, OrderExpired, OrderSplit, SellerOrderCancelled, StockReserved},
    envelope::Envelope,
    inventory::{self, Units},
    orders::{Actor, Change, OrderStatus, SellerOrderStatus, notices, status},
    outbox, topology,
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::runtime::{Failure, Handler};

#[derive(Debug, Clone)]
pub struct ReserverConfig {
    /// How long an unpaid order holds its stock.
    pub reservation_ttl: Duration,
    /// How often the expiry sweep looks for reservations that ran out.
    pub expiry_poll: Duration,
}

impl ReserverConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let ttl: u64 = env.or("RESERVATION_TTL_SECS", 900)?;
        if ttl == 0 {
            return Err(ConfigError {
                var: "RESERVATION_TTL_SECS".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            reservation_ttl: Duration::from_secs(ttl),
            expiry_poll: env.millis("EXPIRY_POLL_MS", 5_000)?,
        })
    }
}

pub struct StockReserver {
    pub config: ReserverConfig,
}

impl Handler for StockReserver {
    type Prepared = ();
    const GROUP: &'static str = topology::STOCK_RESERVER.name;
    const BINDINGS: &'static [&'static str] = topology::STOCK_RESERVER.bindings;
    const EMITS: &'static [&'static str] = &["stock.reserved", "notify.email"];

    async fn prepare(&self, _: &Envelope) -> Result<(), Failure> {
        Ok(())
    }

    /// `reserve` reads visibility under the locks `lock_batch` takes.
    const LOCKS_ALONE: bool = true;

    async fn lock_batch(&self, tx: &mut PgConnection, msgs: &[&Envelope]) -> Result<(), Failure> {
        let mut orders = vec![];
        let mut parts = vec![];
        for msg in msgs {
            match msg.kind.as_str() {
                "order.split" => orders.push(msg.payload::<OrderSplit>().map(|m| m.order_id)),
                "order.cancelled" => {
                    orders.push(msg.payload::<OrderCancelled>().map(|m| m.order_id))
                }
                "seller_order.cancelled" => parts.push(
                    msg.payload::<SellerOrderCancelled>()
                        .map(|m| m.seller_order_id),
                ),
                _ => {}
            }
        }
        // A bad payload fails in `apply`, where it is parked on its own.
        let mut orders: Vec<Uuid> = orders.into_iter().flatten().collect();
        let parts: Vec<Uuid> = parts.into_iter().flatten().collect();
        if !parts.is_empty() {
            let of_parts: Vec<Uuid> =
                sqlx::query_scalar("SELECT order_id FROM seller_orders WHERE id = ANY($1)")
                    .bind(&parts)
                    .fetch_all(&mut *tx)
                    .await?;
            orders.extend(of_parts);
        }
        inventory::lock_for_orders(tx, &orders).await?;
        Ok(())
    }

    async fn apply(&self, tx: &mut PgConnection, msg: &Envelope, _: ()) -> Result<(), Failure> {
        let corr = msg.correlation_id.as_str();
        match msg.kind.as_str() {
            "order.split" => {
                let OrderSplit { order_id } = msg.payload().map_err(Failure::permanent)?;
                reserve(tx, order_id, self.config.reservation_ttl, corr).await
            }
            "order.cancelled" => {
                let OrderCancelled { order_id } = msg.payload().map_err(Failure::permanent)?;
                give_back(tx, order_id, corr).await
            }
            "seller_order.cancelled" => {
                let SellerOrderCancelled { seller_order_id } =
                    msg.payload().map_err(Failure::permanent)?;
                restock_seller_order(tx, seller_order_id, corr).await
            }
            other => Err(Failure::permanent(anyhow::anyhow!(
                "stock-reserver does not handle {other}"
            ))),
        }
    }
}

/// Reserves every line of a split order, or fails it as out of stock and
/// tells the customer which item is short or no longer for sale.
async fn reserve(
    tx: &mut PgConnection,
    order: Uuid,
    ttl: Duration,
    corr: &str,
) -> Result<(), Failure> {
    let state: Option<(String, String)> =
        sqlx::query_as("SELECT status, stock FROM orders WHERE id = $1 FOR NO KEY UPDATE")
            .bind(order)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((status, stock)) = state else {
        return Err(Failure::permanent(anyhow::anyhow!("no order {order}")));
    };
    if status != OrderStatus::Pending.as_str() || stock != "none" {
        // Reserved before (a redelivery), or cancelled meanwhile.
        return Ok(());
    }
    // Still for sale? Checkout read the catalog without locking it, and the
    // split may have queued a while, so a product hidden, withdrawn or in a
    // shop suspended since the cart was read would otherwise be reserved and
    // charged. The order fails as a short one does, the customer told
    // which item.
    //
    // The lines' stock and product rows are locked already, in the order
    // every apply transaction of this handler takes them (`lock_batch`,
    // `LOCKS_ALONE`), so no hide or
    // withdrawal commits between this read and the reservation. A shop's or its owner's
    // suspension is read unlocked: locking shops after products here could
    // close a circle with a review counting its rating, which updates its
    // shop and its product in one statement. A suspension committing in
    // that window lands after the reservation, as one after the order is
    // paid does, and the order stands.
    let gone: Option<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT l.title, l.variant_title FROM order_lines l
           JOIN products p ON p.id = l.product_id
           JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
          WHERE l.order_id = $1 AND NOT ({VISIBLE})
          ORDER BY l.id LIMIT 1"
    )))
    .bind(order)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((title, variant_title)) = gone {
        let reason = format!("{title} ({variant_title}) is no longer for sale");
        fail(tx, order, OrderStatus::OutOfStock, &reason, corr).await?;
        return Ok(());
    }
    let wanted = inventory::of_order(tx, order).await?;
    match inventory::reserve(tx, &wanted, corr).await? {
        Ok(()) => {
            sqlx::query(
                "UPDATE orders SET stock = 'reserved', reserved_until = now() + make_interval(secs => $2)
                  WHERE id = $1 AND stock = 'none'",
            )
            .bind(order)
            .bind(ttl.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            status::move_order(
                tx,
                order,
                OrderStatus::Reserved,
                Actor::System,
                Change::default(),
            )
            .await?;
            outbox::enqueue(tx, &Envelope::new(&StockReserved { order_id: order }, corr)).await?;
        }
        Err(short) => {
            let (title, variant_title): (String, String) = sqlx::query_as(
                "SELECT title, variant_title FROM order_lines WHERE order_id = $1 AND variant_id = $2",
            )
            .bind(order)
            .bind(short.variant_id)
            .fetch_one(&mut *tx)
            .await?;
            let reason = match short.available {
                0 => format!("{title} ({variant_title}) is out of stock"),
                n => format!("only {n} of {title} ({variant_title}) left"),
            };
            fail(tx, order, OrderStatus::OutOfStock, &reason, corr).await?;
        }
    }
    Ok(())
}

/// An order that will never be paid: the status, the reason kept for the
/// customer, its seller orders cancelled, and the customer told.
async fn fail(
    tx: &mut PgConnection,
    order: Uuid,
    to: OrderStatus,
    reason: &str,
    corr: &str,
) -> Result<(), Failure> {
    status::move_order(tx, order, to, Actor::System, Change::note(reason)).await?;
    sqlx::query("UPDATE orders SET failure_reason = $2 WHERE id = $1")
        .bind(order)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    // Its seller orders follow: cancelled for good when stock was short;
    // expired (no longer pending for the seller) when a late payment may
    // still revive it.
    let parts = match to {
        OrderStatus::OutOfStock => Some(SellerOrderStatus::Cancelled),
        OrderStatus::Expired => Some(SellerOrderStatus::Expired),
        _ => None,
    };
    if let Some(parts) = parts {
        status::move_pending_parts(tx, order, parts, Actor::System, Change::note(reason)).await?;
    }
    let extra = json!({ "status": to.as_str(), "reason": reason });
    notices::to_customer(tx, order, "order_failed", Some("order_failed"), extra, corr).await?;
    Ok(())
}

/// An order was cancelled: release what it held, or restock what it bought
/// (the parts no seller has put back already).
async fn give_back(tx: &mut PgConnection, order: Uuid, corr: &str) -> Result<(), Failure> {
    let stock: Option<String> =
        sqlx::query_scalar("SELECT stock FROM orders WHERE id = $1 FOR NO KEY UPDATE")
            .bind(order)
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query(
        "UPDATE orders SET stock = 'released' WHERE id = $1 AND stock IN ('reserved', 'committed')",
    )
    .bind(order)
    .execute(&mut *tx)
    .await?;
    match stock.as_deref() {
        Some("reserved") => {
            let held = inventory::of_order(tx, order).await?;
            inventory::release(tx, &held, corr).await?;
        }
        Some("committed") => {
            let parts: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM seller_orders WHERE order_id = $1 AND stock_returned_at IS NULL ORDER BY id",
            )
            .bind(order)
            .fetch_all(&mut *tx)
            .await?;
            for part in parts {
                restock_seller_order(tx, part, corr).await?;
            }
        }
        // Nothing held (cancelled before its reservation), or given back before.
        _ => {}
    }
    Ok(())
}

/// Puts one seller order's sold units back on the shelf, once.
async fn restock_seller_order(
    tx: &mut PgConnection,
    seller_order: Uuid,
    corr: &str,
) -> Result<(), Failure> {
    let part: Option<(Uuid, Uuid)> = sqlx::query_as(
        "UPDATE seller_orders so SET stock_returned_at = now()
           FROM orders o
          WHERE so.id = $1 AND o.id = so.order_id AND so.stock_returned_at IS NULL
            AND (o.stock = 'committed' OR (o.stock = 'released' AND o.paid_at IS NOT NULL))
         RETURNING so.order_id, so.shop_id",
    )
    .bind(seller_order)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((order, shop)) = part else {
        return Ok(());
    };
    // Less the units already back on the shelf through approved refund
    // requests (what each restocked): each sold unit returns once.
    let sold: Vec<Units> = sqlx::query_as(
        "SELECT variant_id, quantity FROM (
             SELECT l.variant_id,
                    (l.quantity - coalesce((SELECT sum(r.restocked_units) FROM refund_requests r
                                             WHERE r.order_line_id = l.id), 0))::int AS quantity
               FROM order_lines l WHERE l.order_id = $1 AND l.shop_id = $2) left_to_return
          WHERE quantity > 0",
    )
    .bind(order)
    .bind(shop)
    .fetch_all(&mut *tx)
    .await?;
    inventory::restock(
        tx,
        &sold,
        &format!("returned: order {order} cancelled"),
        corr,
    )
    .await?;
    Ok(())
}

/// Expires unpaid orders whose reservation ran out, a batch at a time,
/// until `shutdown`. Safe with several reservers: each takes the orders no
/// other holds (`SKIP LOCKED`) and checks the state again under the lock.
pub async fn sweep_expired(pool: PgPool, poll: Duration, shutdown: CancellationToken) {
    let waker = outbox::Waker::spawn(pool.clone());
    loop {
        match expire_batch(&pool, 100).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(expired = n, "reservations ran out");
                waker.wake();
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed; will try again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Expires up to `limit` orders in one transaction; returns how many.
pub async fn expire_batch(pool: &PgPool, limit: i64) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let due: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, correlation_id FROM orders
          WHERE stock = 'reserved' AND status IN ('reserved', 'awaiting_payment', 'payment_failed')
            AND reserved_until < now()
          ORDER BY reserved_until LIMIT $1
          FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    // The whole batch's stock in id order before any release, as a batch of
    // reservations takes it: released order by order, the variants would be
    // taken out of order and could close a circle with a sale or a batch.
    let ids: Vec<Uuid> = due.iter().map(|(id, _)| *id).collect();
    inventory::lock_for_orders(&mut tx, &ids).await?;
    for (order, corr) in &due {
        let held = inventory::of_order(&mut tx, *order).await?;
        sqlx::query("UPDATE orders SET stock = 'released' WHERE id = $1 AND stock = 'reserved'")
            .bind(order)
            .execute(&mut *tx)
            .await?;
        inventory::release(&mut tx, &held, corr).await?;
        let reason = "the order was not paid in time; its items went back on sale";
        fail(&mut tx, *order, OrderStatus::Expired, reason, corr)
            .await
            .map_err(|f| anyhow::anyhow!("{f:?}"))?;
        outbox::enqueue(
            &mut tx,
            &Envelope::new(&OrderExpired { order_id: *order }, corr.as_str()),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(due.len())
}
