//! Stock changes shared by the API (seller adjustments) and the workers
//! (reservations, sales): each is one conditional UPDATE, never a read then
//! a write, so concurrent changes cannot break `on_hand >= reserved >= 0`.

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{contracts::EmailRequested, envelope::Envelope, outbox};

/// Adds `delta` (negative to remove) to a variant's `on_hand` and records
/// the change with who and why. `None` when it would leave less on hand than
/// is reserved; nothing is written then.
pub async fn adjust(
    tx: &mut PgConnection,
    variant: Uuid,
    actor: Option<Uuid>,
    delta: i32,
    reason: &str,
    correlation_id: &str,
) -> Result<Option<i32>, sqlx::Error> {
    let on_hand: Option<i32> = sqlx::query_scalar(
        "UPDATE variants SET on_hand = on_hand + $2
          WHERE id = $1 AND on_hand + $2 >= reserved
         RETURNING on_hand",
    )
    .bind(variant)
    .bind(delta)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(on_hand) = on_hand else {
        return Ok(None);
    };
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
    .bind(on_hand)
    .execute(&mut *tx)
    .await?;
    check_low_stock(tx, variant, correlation_id).await?;
    Ok(Some(on_hand))
}

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
    sqlx::query("INSERT INTO notifications (id, user_id, kind, data) VALUES ($1, $2, 'low_stock', $3)")
        .bind(Uuid::now_v7())
        .bind(f.owner_id)
        .bind(&data)
        .execute(&mut *tx)
        .await?;
    let mut mail_data = data;
    mail_data["name"] = json!(f.owner_name);
    let mail = EmailRequested {
        to: f.owner_email,
        template: "low_stock".into(),
        data: mail_data,
    };
    outbox::enqueue(tx, &Envelope::new(&mail, correlation_id)).await
}
