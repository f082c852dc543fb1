//! What customers and sellers are told about their orders: each notice is a
//! mail (and, where it calls for action, an in-app notification) written in
//! the transaction of the change it is about. The API and the workers both
//! send them through here, so a mail about an order looks the same whoever
//! caused it.

use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::notify;

/// The order's columns a mail shows, over `orders o`: its money, shipping
/// address and lines (as JSON); for a seller (over `seller_orders so`) only
/// that shop's lines.
fn order_columns(seller: bool) -> String {
    let shop = if seller {
        "l.shop_id = so.shop_id"
    } else {
        "true"
    };
    format!(
        "o.currency, o.subtotal_minor, o.discount_minor, o.shipping_minor, o.total_minor,
         o.refunded_minor, o.shipping_address,
         (SELECT coalesce(json_agg(json_build_object(
                     'title', l.title, 'variant_title', l.variant_title, 'sku', l.sku,
                     'quantity', l.quantity, 'unit_price_minor', l.unit_price_minor,
                     'line_total_minor', l.unit_price_minor * l.quantity) ORDER BY l.shop_id, l.id), '[]')
            FROM order_lines l WHERE l.order_id = o.id AND {shop}) AS lines"
    )
}

/// What [`order_columns`] reads.
#[derive(sqlx::FromRow)]
struct OrderColumns {
    currency: String,
    subtotal_minor: i64,
    discount_minor: i64,
    shipping_minor: Option<i64>,
    total_minor: Option<i64>,
    refunded_minor: i64,
    shipping_address: Value,
    lines: Value,
}

impl OrderColumns {
    /// The order as a mail shows it; a seller sees its own lines and the
    /// address, never the rest of the order's money.
    fn data(self, order: Uuid, seller: bool) -> Value {
        if seller {
            return json!({
                "id": order, "currency": self.currency, "lines": self.lines,
                "address": self.shipping_address,
            });
        }
        json!({
            "id": order,
            "currency": self.currency,
            "lines": self.lines,
            "subtotal_minor": self.subtotal_minor,
            "discount_minor": self.discount_minor,
            "shipping_minor": self.shipping_minor.unwrap_or(0),
            "total_minor": self.total_minor.unwrap_or(self.subtotal_minor - self.discount_minor),
            "refunded_minor": self.refunded_minor,
            "address": self.shipping_address,
        })
    }
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
    #[derive(sqlx::FromRow)]
    struct Row {
        user_id: Uuid,
        email: String,
        name: String,
        #[sqlx(flatten)]
        order: OrderColumns,
    }
    // The customer and the order in one read.
    let r: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT u.id AS user_id, u.email, u.name, {}
           FROM orders o JOIN users u ON u.id = o.customer_id WHERE o.id = $1",
        order_columns(false)
    )))
    .bind(order)
    .fetch_one(&mut *conn)
    .await?;
    let user = r.user_id;
    let email = r.email;
    let data = json!({ "name": r.name, "order": r.order.data(order, false) });
    let data = merge(data, extra);
    if let Some(kind) = in_app {
        // Why, whoever gave it: a cancel's reason, or the note a seller or an
        // admin wrote with a fulfilment change.
        let why = data.get("reason").or(data.get("note"));
        let note = json!({ "order_id": order, "template": template, "reason": why });
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
        shop_name: String,
        owner_id: Uuid,
        email: String,
        name: String,
        status: String,
        part_total: i64,
        commission_minor: i64,
        payout_minor: i64,
        #[sqlx(flatten)]
        order: OrderColumns,
    }
    // The seller, its part and the order in one read.
    let r: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT so.order_id, s.name AS shop_name, u.id AS owner_id, u.email, u.name,
                so.status, so.total_minor AS part_total, so.commission_minor, so.payout_minor, {}
           FROM seller_orders so JOIN shops s ON s.id = so.shop_id JOIN users u ON u.id = s.owner_id
           JOIN orders o ON o.id = so.order_id
          WHERE so.id = $1",
        order_columns(true)
    )))
    .bind(seller_order)
    .fetch_one(&mut *conn)
    .await?;
    let data = json!({
        "name": r.name,
        "shop": r.shop_name,
        "seller_order": {
            "id": seller_order, "status": r.status, "total_minor": r.part_total,
            "commission_minor": r.commission_minor, "payout_minor": r.payout_minor,
        },
        "order": r.order.data(r.order_id, true),
    });
    let data = merge(data, extra);
    let note =
        json!({ "order_id": r.order_id, "seller_order_id": seller_order, "template": template });
    notify::in_app(conn, r.owner_id, in_app, &note).await?;
    notify::email(conn, &r.email, template, data, correlation_id).await
}
