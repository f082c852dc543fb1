//! Orders as the API shows them, read with the reader's scope in the
//! query itself: a customer's own orders, a shop's own seller orders, or
//! anything for admins. Out of scope reads as not found, never as data.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::orders::{OrderStatus, SellerOrderStatus};
use sqlx::{PgConnection, types::Json};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{error::ApiError, routes::catalog::ShopRef};

/// Who is reading.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    Customer(Uuid),
    Shop(Uuid),
    Admin,
}

impl Scope {
    fn customer(self) -> Option<Uuid> {
        match self {
            Self::Customer(id) => Some(id),
            _ => None,
        }
    }
    fn shop(self) -> Option<Uuid> {
        match self {
            Self::Shop(id) => Some(id),
            _ => None,
        }
    }
}

/// The shipping address as it was at checkout.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ShippingAddress {
    pub full_name: String,
    pub line1: String,
    pub line2: String,
    pub city: String,
    pub region: String,
    pub postal_code: String,
    pub country: String,
    pub phone: String,
}

/// A line as bought: what it was called and cost then.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct OrderLine {
    pub id: Uuid,
    pub product_id: Uuid,
    pub variant_id: Uuid,
    pub title: String,
    pub variant_title: String,
    pub sku: String,
    pub unit_price_minor: i64,
    pub quantity: i32,
    pub line_total_minor: i64,
}

/// One seller's part of an order, as its customer sees it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SellerPart {
    pub id: Uuid,
    pub shop: ShopRef,
    pub status: SellerOrderStatus,
    pub items_minor: i64,
    pub discount_minor: i64,
    pub shipping_minor: i64,
    pub total_minor: i64,
    pub refunded_minor: i64,
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub shipped_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// The lines this seller fulfils.
    pub line_ids: Vec<Uuid>,
}

/// What the storefront needs to take the payment with Stripe.js; shown to
/// the order's customer only, while the order can be paid.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentDetails {
    pub payment_intent_id: String,
    pub client_secret: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub status: OrderStatus,
    pub currency: String,
    pub subtotal_minor: i64,
    pub discount_minor: i64,
    /// The membership's percentage off, part of `discount_minor`.
    pub membership_discount_minor: i64,
    /// Shipped free for a member.
    pub free_shipping: bool,
    /// Known once the order is split per seller (absent while pending).
    pub shipping_minor: Option<i64>,
    pub total_minor: Option<i64>,
    pub refunded_minor: i64,
    pub coupon_code: Option<String>,
    /// The replenishment schedule that placed it, if one did.
    pub replenishment_schedule_id: Option<Uuid>,
    pub shipping_address: ShippingAddress,
    pub lines: Vec<OrderLine>,
    pub seller_orders: Vec<SellerPart>,
    /// Present while the order awaits payment (or may be retried).
    pub payment: Option<PaymentDetails>,
    /// Pay before this, or the items go back on sale.
    pub reserved_until: Option<DateTime<Utc>>,
    /// Why it failed, expired or was cancelled.
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    status: String,
    currency: String,
    subtotal_minor: i64,
    discount_minor: i64,
    membership_discount_minor: i64,
    free_shipping: bool,
    shipping_minor: Option<i64>,
    total_minor: Option<i64>,
    refunded_minor: i64,
    coupon_code: Option<String>,
    replenishment_schedule_id: Option<Uuid>,
    shipping_address: Json<ShippingAddress>,
    payment_intent_id: Option<String>,
    client_secret: Option<String>,
    reserved_until: Option<DateTime<Utc>>,
    failure_reason: Option<String>,
    created_at: DateTime<Utc>,
    paid_at: Option<DateTime<Utc>>,
    lines: Json<Vec<OrderLine>>,
    parts: Json<Vec<PartRow>>,
}

/// A seller's part as [`order`] reads it, within the order's row.
#[derive(Deserialize)]
struct PartRow {
    id: Uuid,
    slug: String,
    name: String,
    status: String,
    items_minor: i64,
    discount_minor: i64,
    shipping_minor: i64,
    total_minor: i64,
    refunded_minor: i64,
    carrier: Option<String>,
    tracking_number: Option<String>,
    shipped_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    line_ids: Vec<Uuid>,
}

const LINE_COLUMNS: &str = "id, product_id, variant_id, title, variant_title, sku, unit_price_minor, \
     quantity, unit_price_minor * quantity AS line_total_minor";

fn status<T>(parse: fn(&str) -> Option<T>, raw: &str) -> Result<T, ApiError> {
    parse(raw).ok_or_else(|| ApiError::Internal(anyhow::anyhow!("unknown status {raw}")))
}

/// An order in the reader's scope (customers: their own; admins: any).
pub async fn order(conn: &mut PgConnection, id: Uuid, scope: Scope) -> Result<Order, ApiError> {
    if matches!(scope, Scope::Shop(_)) {
        return Err(ApiError::NotFound);
    }
    // One statement: the order's row with its lines and seller parts
    // gathered as JSON, so reading an order is one round trip.
    let row: OrderRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT o.id, o.status, o.currency, o.subtotal_minor, o.discount_minor, o.membership_discount_minor,
                o.free_shipping, o.shipping_minor, o.total_minor, o.refunded_minor, o.coupon_code,
                (SELECT schedule_id FROM replenishment_runs r WHERE r.id = o.replenishment_run_id)
                    AS replenishment_schedule_id,
                o.shipping_address, o.payment_intent_id, o.client_secret, o.reserved_until, o.failure_reason,
                o.created_at, o.paid_at,
                (SELECT coalesce(json_agg(l ORDER BY l.shop_id, l.id), '[]')
                   FROM (SELECT {LINE_COLUMNS}, shop_id FROM order_lines WHERE order_id = o.id) l) AS lines,
                (SELECT coalesce(json_agg(p ORDER BY p.name, p.id), '[]')
                   FROM (SELECT so.id, s.slug, s.name, so.status, so.items_minor, so.discount_minor,
                                so.shipping_minor, so.total_minor, so.refunded_minor,
                                -- A parcel the customer can follow only while
                                -- there is one: a part corrected back to
                                -- processing keeps its carrier on record (for
                                -- shipping it again), not on show.
                                CASE WHEN so.status IN ('shipped', 'delivered') THEN so.carrier END AS carrier,
                                CASE WHEN so.status IN ('shipped', 'delivered') THEN so.tracking_number END
                                  AS tracking_number,
                                so.shipped_at, so.delivered_at,
                                array(SELECT l.id FROM order_lines l
                                       WHERE l.order_id = so.order_id AND l.shop_id = so.shop_id
                                       ORDER BY l.id) AS line_ids
                           FROM seller_orders so JOIN shops s ON s.id = so.shop_id
                          WHERE so.order_id = o.id) p) AS parts
           FROM orders o WHERE o.id = $1 AND ($2::uuid IS NULL OR o.customer_id = $2)"
    )))
    .bind(id)
    .bind(scope.customer())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ApiError::NotFound)?;
    let status_now = status(OrderStatus::parse, &row.status)?;
    let payment = match (&row.payment_intent_id, &row.client_secret, scope) {
        (Some(intent), Some(secret), Scope::Customer(_)) if status_now.payable() => {
            Some(PaymentDetails {
                payment_intent_id: intent.clone(),
                client_secret: secret.clone(),
            })
        }
        _ => None,
    };
    let seller_orders = row
        .parts
        .0
        .into_iter()
        .map(|p| {
            Ok(SellerPart {
                id: p.id,
                shop: ShopRef {
                    slug: p.slug,
                    name: p.name,
                },
                status: status(SellerOrderStatus::parse, &p.status)?,
                items_minor: p.items_minor,
                discount_minor: p.discount_minor,
                shipping_minor: p.shipping_minor,
                total_minor: p.total_minor,
                refunded_minor: p.refunded_minor,
                carrier: p.carrier,
                tracking_number: p.tracking_number,
                shipped_at: p.shipped_at,
                delivered_at: p.delivered_at,
                line_ids: p.line_ids,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(Order {
        id: row.id,
        status: status_now,
        currency: row.currency,
        subtotal_minor: row.subtotal_minor,
        discount_minor: row.discount_minor,
        membership_discount_minor: row.membership_discount_minor,
        free_shipping: row.free_shipping,
        shipping_minor: row.shipping_minor,
        total_minor: row.total_minor,
        refunded_minor: row.refunded_minor,
        coupon_code: row.coupon_code,
        replenishment_schedule_id: row.replenishment_schedule_id,
        shipping_address: row.shipping_address.0,
        lines: row.lines.0,
        seller_orders,
        payment,
        reserved_until: row
            .reserved_until
            .filter(|_| status_now.payable() || status_now == OrderStatus::Reserved),
        failure_reason: row.failure_reason,
        created_at: row.created_at,
        paid_at: row.paid_at,
    })
}

/// An order in a list.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct OrderSummary {
    pub id: Uuid,
    #[sqlx(try_from = "String")]
    pub status: OrderStatus,
    pub currency: String,
    pub subtotal_minor: i64,
    pub total_minor: Option<i64>,
    pub item_count: i64,
    pub created_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
}

/// A seller's part of an order, as that seller sees it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SellerOrder {
    pub id: Uuid,
    pub order_id: Uuid,
    pub status: SellerOrderStatus,
    pub currency: String,
    pub lines: Vec<OrderLine>,
    pub items_minor: i64,
    pub discount_minor: i64,
    pub shipping_minor: i64,
    /// What the customer pays for this part.
    pub total_minor: i64,
    pub commission_bps: i32,
    pub commission_minor: i64,
    /// What the seller keeps: total less commission.
    pub payout_minor: i64,
    pub refunded_minor: i64,
    /// Only once the order is paid.
    pub shipping_address: Option<ShippingAddress>,
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub created_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub shipped_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A seller order in the reader's scope (sellers: their shop's; admins: any).
pub async fn seller_order(
    conn: &mut PgConnection,
    id: Uuid,
    scope: Scope,
) -> Result<SellerOrder, ApiError> {
    if matches!(scope, Scope::Customer(_)) {
        return Err(ApiError::NotFound);
    }
    #[derive(sqlx::FromRow)]
    struct Row {
        id: Uuid,
        order_id: Uuid,
        shop_id: Uuid,
        status: String,
        currency: String,
        items_minor: i64,
        discount_minor: i64,
        shipping_minor: i64,
        total_minor: i64,
        commission_bps: i32,
        commission_minor: i64,
        payout_minor: i64,
        refunded_minor: i64,
        shipping_address: Json<ShippingAddress>,
        carrier: Option<String>,
        tracking_number: Option<String>,
        created_at: DateTime<Utc>,
        paid_at: Option<DateTime<Utc>>,
        shipped_at: Option<DateTime<Utc>>,
        delivered_at: Option<DateTime<Utc>>,
    }
    let r: Row = sqlx::query_as(
        "SELECT so.id, so.order_id, so.shop_id, so.status, o.currency, so.items_minor, so.discount_minor,
                so.shipping_minor, so.total_minor, so.commission_bps, so.commission_minor, so.payout_minor,
                so.refunded_minor, o.shipping_address, so.carrier, so.tracking_number, so.created_at,
                o.paid_at, so.shipped_at, so.delivered_at
           FROM seller_orders so JOIN orders o ON o.id = so.order_id
          WHERE so.id = $1 AND ($2::uuid IS NULL OR so.shop_id = $2)",
    )
    .bind(id)
    .bind(scope.shop())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ApiError::NotFound)?;
    let lines: Vec<OrderLine> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {LINE_COLUMNS} FROM order_lines WHERE order_id = $1 AND shop_id = $2 ORDER BY id"
    )))
    .bind(r.order_id)
    .bind(r.shop_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(SellerOrder {
        id: r.id,
        order_id: r.order_id,
        status: status(SellerOrderStatus::parse, &r.status)?,
        currency: r.currency,
        lines,
        items_minor: r.items_minor,
        discount_minor: r.discount_minor,
        shipping_minor: r.shipping_minor,
        total_minor: r.total_minor,
        commission_bps: r.commission_bps,
        commission_minor: r.commission_minor,
        payout_minor: r.payout_minor,
        refunded_minor: r.refunded_minor,
        // A seller learns where to ship only once there is something to
        // ship, and no longer once its part is called off.
        shipping_address: (r.paid_at.is_some()
            && (scope.shop().is_none()
                || SellerOrderStatus::parse(&r.status).is_some_and(|s| s.is_fulfilment())))
        .then_some(r.shipping_address.0),
        carrier: r.carrier,
        tracking_number: r.tracking_number,
        created_at: r.created_at,
        paid_at: r.paid_at,
        shipped_at: r.shipped_at,
        delivered_at: r.delivered_at,
    })
}

/// A seller order in a list.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct SellerOrderSummary {
    pub id: Uuid,
    pub order_id: Uuid,
    #[sqlx(try_from = "String")]
    pub status: SellerOrderStatus,
    pub total_minor: i64,
    pub payout_minor: i64,
    pub item_count: i64,
    pub created_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
}

/// One step of an order's history: the customer's tracking timeline.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct TrackingEvent {
    pub at: DateTime<Utc>,
    /// `order` or `seller_order`.
    pub subject: String,
    pub seller_order_id: Option<Uuid>,
    /// The shop, for a seller order's step.
    pub shop: Option<String>,
    pub from_status: Option<String>,
    pub to_status: String,
    /// `customer`, `seller`, `admin` or `system`.
    pub actor_role: String,
    pub note: Option<String>,
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
}

/// An order's events, oldest first.
pub async fn tracking(
    conn: &mut PgConnection,
    order: Uuid,
) -> Result<Vec<TrackingEvent>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT e.created_at AS at, e.subject, e.seller_order_id, s.name AS shop, e.from_status,
                e.to_status, e.actor_role, e.note, e.data->>'carrier' AS carrier,
                e.data->>'tracking_number' AS tracking_number
           FROM order_events e
           LEFT JOIN seller_orders so ON so.id = e.seller_order_id
           LEFT JOIN shops s ON s.id = so.shop_id
          WHERE e.order_id = $1 ORDER BY e.created_at, e.id",
    )
    .bind(order)
    .fetch_all(conn)
    .await?)
}
