//! What customers and sellers are told about their orders: each notice is a
//! mail (and, where it calls for action, an in-app notification) written in
//! the transaction of the change it is about. The API and the workers both
//! send them through here, so a mail about an order looks the same whoever
//! caused it.

use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::notify;

/// The order as a mail shows it: its lines, money and shipping address; for
/// a seller (`shop`), only that shop's lines and the address.
async fn order_data(
    conn: &mut PgConnection,
    order: Uuid,
    shop: Option<Uuid>,
) -> Result<Value, sqlx::Error> {
    let lines: Vec<(String, String, String, i32, i64)> = sqlx::query_as(
        "SELECT title, variant_title, sku, quantity, unit_price_minor FROM order_lines
          WHERE order_id = $1 AND ($2::uuid IS NULL OR shop_id = $2)
          ORDER BY shop_id, id",
    )
    .bind(order)
    .bind(shop)
    .fetch_all(&mut *conn)
    .await?;
    let head: (String, i64, i64, Option<i64>, Option<i64>, i64, Value) = sqlx::query_as(
        "SELECT currency, subtotal_minor, discount_minor, shipping_minor, total_minor, refunded_minor,
                shipping_address
           FROM orders WHERE id = $1",
    )
    .bind(order)
    .fetch_one(&mut *conn)
    .await?;
    let (currency, subtotal, discount, shipping, total, refunded, address) = head;
    let lines: Vec<Value> = lines
        .into_iter()
        .map(|(title, variant_title, sku, quantity, unit)| {
            json!({
                "title": title, "variant_title": variant_title, "sku": sku, "quantity": quantity,
                "unit_price_minor": unit, "line_total_minor": unit * i64::from(quantity),
            })
        })
        .collect();
    if shop.is_some() {
        // A seller sees its own lines, never the rest of the order's money.
        return Ok(
            json!({ "id": order, "currency": currency, "lines": lines, "address": address }),
        );
    }
    Ok(json!({
        "id": order,
        "currency": currency,
        "lines": lines,
        "subtotal_minor": subtotal,
        "discount_minor": discount,
        "shipping_minor": shipping.unwrap_or(0),
        "total_minor": total.unwrap_or(subtotal - discount),
        "refunded_minor": refunded,
        "address": address,
    }))
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base
}

/// Tells the order's customer: mail `template` with the order and `extra`;
/// with `in_app`, also a notification of that kind.
pub async fn to_customer(
    conn: &mut PgConnection,
    order: Uuid,
    template: &str,
    in_app: Option<&str>,
    extra: Value,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    let (user, email, name): (Uuid, String, String) = sqlx::query_as(
        "SELECT u.id, u.email, u.name FROM orders o JOIN users u ON u.id = o.customer_id WHERE o.id = $1",
    )
    .bind(order)
    .fetch_one(&mut *conn)
    .await?;
    let data = json!({ "name": name, "order": order_data(conn, order, None).await? });
    let data = merge(data, extra);
    if let Some(kind) = in_app {
        let note = json!({ "order_id": order, "template": template, "reason": data.get("reason") });
        notify::in_app(conn, user, kind, &note).await?;
    }
    notify::email(conn, &email, template, data, correlation_id).await
}

/// Tells the seller of `seller_order`: mail `template` with that seller's
/// part of the order and `extra`, and an in-app notification of `in_app`.
pub async fn to_seller(
    conn: &mut PgConnection,
    seller_order: Uuid,
    template: &str,
    in_app: &str,
    extra: Value,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        order_id: Uuid,
        shop_id: Uuid,
        shop_name: String,
        owner_id: Uuid,
        email: String,
        name: String,
        status: String,
        total_minor: i64,
        commission_minor: i64,
        payout_minor: i64,
    }
    let r: Row = sqlx::query_as(
        "SELECT so.order_id, so.shop_id, s.name AS shop_name, u.id AS owner_id, u.email, u.name,
                so.status, so.total_minor, so.commission_minor, so.payout_minor
           FROM seller_orders so JOIN shops s ON s.id = so.shop_id JOIN users u ON u.id = s.owner_id
          WHERE so.id = $1",
    )
    .bind(seller_order)
    .fetch_one(&mut *conn)
    .await?;
    let data = json!({
        "name": r.name,
        "shop": r.shop_name,
        "seller_order": {
            "id": seller_order, "status": r.status, "total_minor": r.total_minor,
            "commission_minor": r.commission_minor, "payout_minor": r.payout_minor,
        },
        "order": order_data(conn, r.order_id, Some(r.shop_id)).await?,
    });
    let data = merge(data, extra);
    let note =
        json!({ "order_id": r.order_id, "seller_order_id": seller_order, "template": template });
    notify::in_app(conn, r.owner_id, in_app, &note).await?;
    notify::email(conn, &r.email, template, data, correlation_id).await
}
