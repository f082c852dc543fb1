//! Stock changes shared by the API (seller adjustments) and the workers
//! (reservations, sales): each is one conditional UPDATE, never a read then
//! a write, so concurrent changes cannot break `on_hand >= reserved >= 0`.
//! Locks are taken in one order everywhere: an order's row before its
//! stock, and several orders, variants or products each in id order
//! ([`lock_for_orders`]), so no two paths wait on each other in a circle.

use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::notify;

/// The most a seller may keep on hand of one variant. Far above any real
/// shelf, and far enough below `i32::MAX` that the system's own restocks
/// (units of cancelled or refunded orders coming back) never overflow.
pub const MAX_ON_HAND: i32 = 1_000_000_000;

/// Adds `delta` (negative to remove) to a variant's `on_hand` and records
/// the change with who and why. `None` when it would leave less on hand than
/// is reserved, or (for a person's change) more than [`MAX_ON_HAND`];
/// nothing is written then.
pub async fn adjust(
    tx: &mut PgConnection,
    variant: Uuid,
    actor: Option<Uuid>,
    delta: i32,
    reason: &str,
    correlation_id: &str,
) -> Result<Option<i32>, sqlx::Error> {
    let changed: Option<(i32, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE variants SET on_hand = on_hand + $2
          WHERE id = $1 AND on_hand::bigint + $2 >= reserved
            AND on_hand::bigint + $2 <= CASE WHEN $3::uuid IS NULL THEN 2147483647 ELSE {MAX_ON_HAND} END
         RETURNING on_hand, {ALERT_DUE}"
    )))
    .bind(variant)
    .bind(delta)
    .bind(actor)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((on_hand, alert_due)) = changed else {
        return Ok(None);
    };
    record(tx, variant, actor, delta, reason, on_hand).await?;
    if alert_due {
        check_low_stock(tx, variant, correlation_id).await?;
    }
    Ok(Some(on_hand))
}

/// Appends one change of `on_hand` to the variant's history.
async fn record(
    tx: &mut PgConnection,
    variant: Uuid,
    actor: Option<Uuid>,
    delta: i32,
    reason: &str,
    on_hand_after: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        // clock_timestamp(), not now(): taken after the row lock above, so
        // the history's order is the order the changes were applied in.
        "INSERT INTO stock_adjustments (id, variant_id, actor_id, delta, reason, on_hand_after, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp())",
    )
    .bind(Uuid::now_v7())
    .bind(variant)
    .bind(actor)
    .bind(delta)
    .bind(reason)
    .bind(on_hand_after)
    .execute(tx)
    .await?;
    Ok(())
}

/// Whether the low-stock flag no longer matches the stock (returned by each
/// stock UPDATE, so [`check_low_stock`] runs only when it has work to do).
const ALERT_DUE: &str = "low_stock_alerted <> (on_hand - reserved < low_stock_threshold)";

/// After any change of a variant's stock or threshold: if available stock
/// has just fallen below the threshold, tell the seller once (an in-app
/// notification and a mail); when it is back at or above, re-arm. The flag
/// flips in one UPDATE under the row lock, so concurrent changes notify once.
pub async fn check_low_stock(
    tx: &mut PgConnection,
    variant: Uuid,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Flipped {
        alerted: bool,
        available: i32,
        threshold: i32,
        sku: String,
        variant_title: String,
        product_id: Uuid,
        product_title: String,
        owner_id: Uuid,
        owner_email: String,
        owner_name: String,
    }
    let flipped: Option<Flipped> = sqlx::query_as(
        "WITH flipped AS (
             UPDATE variants SET low_stock_alerted = NOT low_stock_alerted
              WHERE id = $1
                AND low_stock_alerted <> (on_hand - reserved < low_stock_threshold)
             RETURNING low_stock_alerted AS alerted, on_hand - reserved AS available,
                       low_stock_threshold AS threshold, sku, title AS variant_title,
                       product_id, shop_id)
         SELECT f.alerted, f.available, f.threshold, f.sku, f.variant_title, f.product_id,
                p.title AS product_title, u.id AS owner_id, u.email AS owner_email,
                u.name AS owner_name
           FROM flipped f
           JOIN products p ON p.id = f.product_id
           JOIN shops s ON s.id = f.shop_id
           JOIN users u ON u.id = s.owner_id",
    )
    .bind(variant)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(f) = flipped.filter(|f| f.alerted) else {
        return Ok(());
    };
    let data = json!({
        "variant_id": variant,
        "product_id": f.product_id,
        "product_title": f.product_title,
        "variant_title": f.variant_title,
        "sku": f.sku,
        "available": f.available,
        "threshold": f.threshold,
    });
    notify::in_app(tx, f.owner_id, "low_stock", &data).await?;
    let mut mail_data = data;
    mail_data["name"] = json!(f.owner_name);
    notify::email(tx, &f.owner_email, "low_stock", mail_data, correlation_id).await
}

/// Units of one variant an order line claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Units {
    pub variant_id: Uuid,
    pub quantity: i32,
}

/// Why a reservation failed: this variant has fewer units available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    pub variant_id: Uuid,
    pub available: i32,
}

/// The units an order's lines claim.
pub async fn of_order(conn: &mut PgConnection, order: Uuid) -> Result<Vec<Units>, sqlx::Error> {
    sqlx::query_as("SELECT variant_id, quantity FROM order_lines WHERE order_id = $1")
        .bind(order)
        .fetch_all(conn)
        .await
}

/// The lines by variant, in id order (the order rows are locked in), two
/// lines of one variant taken together.
fn in_lock_order(lines: &[Units]) -> Vec<Units> {
    let mut lines = lines.to_vec();
    lines.sort_by_key(|l| l.variant_id);
    lines.dedup_by(|next, kept| {
        let same = next.variant_id == kept.variant_id;
        if same {
            kept.quantity += next.quantity;
        }
        same
    });
    lines
}

/// Locks the orders, then the stock rows their lines touch (variants, then
/// their products), each in id order: what a batch of stock changes (and the
/// expiry sweep) takes first so that batches sharing variants queue instead
/// of deadlocking. Orders come first because every single-order path (a
/// payment, a cancel, a refund's restock) locks its order and then its
/// stock: a batch holding stock while it waits for an order would close a
/// circle with one of them.
pub async fn lock_for_orders(tx: &mut PgConnection, orders: &[Uuid]) -> Result<(), sqlx::Error> {
    if orders.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT 1 FROM orders WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(orders)
        .execute(&mut *tx)
        .await?;
    for (table, column) in [("variants", "variant_id"), ("products", "product_id")] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM {table} WHERE id IN (SELECT {column} FROM order_lines WHERE order_id = ANY($1))
              ORDER BY id FOR NO KEY UPDATE"
        )))
        .bind(orders)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Reserves every line or none: one conditional UPDATE per variant inside a
/// savepoint, rolled back at the first variant that is short.
pub async fn reserve(
    tx: &mut PgConnection,
    lines: &[Units],
    correlation_id: &str,
) -> Result<Result<(), Short>, sqlx::Error> {
    let lines = in_lock_order(lines);
    let mut savepoint = tx.begin().await?;
    let mut alerts = vec![];
    for line in &lines {
        let done: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE variants SET reserved = reserved + $2
              WHERE id = $1 AND on_hand - reserved >= $2
             RETURNING {ALERT_DUE}"
        )))
        .bind(line.variant_id)
        .bind(line.quantity)
        .fetch_optional(&mut *savepoint)
        .await?;
        if done == Some(true) {
            alerts.push(line.variant_id);
        }
        if done.is_none() {
            savepoint.rollback().await?;
            // Read only to tell the customer; nothing is decided on it.
            let available: i32 = sqlx::query_scalar(
                "SELECT greatest(on_hand - reserved, 0) FROM variants WHERE id = $1",
            )
            .bind(line.variant_id)
            .fetch_one(&mut *tx)
            .await?;
            return Ok(Err(Short {
                variant_id: line.variant_id,
                available,
            }));
        }
    }
    savepoint.commit().await?;
    for variant in alerts {
        check_low_stock(tx, variant, correlation_id).await?;
    }
    Ok(Ok(()))
}

/// Gives reserved units back (an order expired or was cancelled unpaid).
pub async fn release(
    tx: &mut PgConnection,
    lines: &[Units],
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    for line in in_lock_order(lines) {
        let alert_due: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE variants SET reserved = reserved - $2 WHERE id = $1 RETURNING {ALERT_DUE}"
        )))
        .bind(line.variant_id)
        .bind(line.quantity)
        .fetch_one(&mut *tx)
        .await?;
        if alert_due {
            check_low_stock(tx, line.variant_id, correlation_id).await?;
        }
    }
    Ok(())
}

/// Turns reserved units into sold ones: `on_hand` and `reserved` both drop,
/// the history says which order took them and the products' sold counts grow.
///
/// Two statements for the whole order: the variants are locked in id order
/// first, then one UPDATE sells every line and writes every line's history
/// (the units were reserved, so `on_hand >= reserved` still holds).
pub async fn sell(tx: &mut PgConnection, lines: &[Units], reason: &str) -> Result<(), sqlx::Error> {
    let lines = in_lock_order(lines);
    let (variants, quantities): (Vec<Uuid>, Vec<i32>) =
        lines.iter().map(|l| (l.variant_id, l.quantity)).unzip();
    sqlx::query("SELECT 1 FROM variants WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(&variants)
        .execute(&mut *tx)
        .await?;
    let history: Vec<Uuid> = lines.iter().map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        // clock_timestamp(): taken under the row locks, as in `record`.
        "WITH sold AS (
             UPDATE variants v SET on_hand = v.on_hand - u.n, reserved = v.reserved - u.n
               FROM unnest($1::uuid[], $2::int[], $3::uuid[]) AS u(id, n, entry)
              WHERE v.id = u.id
             RETURNING v.id, u.n, u.entry, v.on_hand)
         INSERT INTO stock_adjustments (id, variant_id, actor_id, delta, reason, on_hand_after, created_at)
         SELECT entry, id, NULL, -n, $4, on_hand, clock_timestamp() FROM sold",
    )
    .bind(&variants)
    .bind(&quantities)
    .bind(&history)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    count_sold(tx, &lines, 1).await
}

/// Puts sold units back on the shelf (a paid order or seller order was
/// cancelled) and takes them off the sold counts.
pub async fn restock(
    tx: &mut PgConnection,
    lines: &[Units],
    reason: &str,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    for line in in_lock_order(lines) {
        // Adding stock always satisfies on_hand >= reserved.
        adjust(
            tx,
            line.variant_id,
            None,
            line.quantity,
            reason,
            correlation_id,
        )
        .await?;
    }
    count_sold(tx, lines, -1).await
}

async fn count_sold(tx: &mut PgConnection, lines: &[Units], sign: i64) -> Result<(), sqlx::Error> {
    let (variants, quantities): (Vec<Uuid>, Vec<i64>) = lines
        .iter()
        .map(|l| (l.variant_id, sign * i64::from(l.quantity)))
        .unzip();
    // Product rows locked in id order first (ORDER BY applies before the
    // locks), as variants are: no two orders wait on each other in a circle.
    // NO KEY UPDATE, like the UPDATE itself: a plain FOR UPDATE would also
    // block every checkout's foreign-key check on these products.
    sqlx::query(
        "UPDATE products p SET sold_count = greatest(p.sold_count + d.n, 0)
           FROM (SELECT v.product_id, sum(u.n) AS n
                   FROM unnest($1::uuid[], $2::bigint[]) AS u(variant_id, n)
                   JOIN variants v ON v.id = u.variant_id
                  GROUP BY v.product_id) d
          WHERE p.id = d.product_id
            AND p.id IN (SELECT p2.id FROM products p2
                          WHERE p2.id IN (SELECT product_id FROM variants WHERE id = ANY($1))
                          ORDER BY p2.id FOR NO KEY UPDATE)",
    )
    .bind(variants)
    .bind(quantities)
    .execute(tx)
    .await?;
    Ok(())
}
