//! Placing an order: the one way an order comes to exist, whether a
//! customer checks out or a replenishment schedule runs. In the caller's
//! transaction: the order with its money and address, immutable line
//! snapshots, each shop's shipping and commission terms as they are now,
//! the first event of its history and `order.placed`.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{contracts::OrderPlaced, envelope::Envelope, outbox};

/// A line as it is bought: snapshots of the names and the price now.
#[derive(Debug, Clone)]
pub struct Line {
    pub shop_id: Uuid,
    pub product_id: Uuid,
    pub variant_id: Uuid,
    pub title: String,
    pub variant_title: String,
    pub sku: String,
    pub unit_price_minor: i64,
    pub quantity: i32,
}

/// A coupon checked against the order: what it takes off.
#[derive(Debug, Clone)]
pub struct AppliedCoupon {
    pub id: Uuid,
    pub code: String,
    pub discount_minor: i64,
}

/// A membership's benefits while it is active.
#[derive(Debug, Clone, Copy)]
pub struct Benefit {
    pub membership_id: Uuid,
    pub free_shipping: bool,
    pub percent_off: i32,
}

impl Benefit {
    /// The percentage off what is left after the coupon, rounded down.
    pub fn discount(&self, after_coupon: i64) -> i64 {
        after_coupon * i64::from(self.percent_off) / 100
    }
}

#[derive(Debug, Clone)]
pub struct NewOrder {
    pub customer: Uuid,
    pub currency: String,
    pub lines: Vec<Line>,
    pub coupon: Option<AppliedCoupon>,
    pub benefit: Option<Benefit>,
    /// The shipping address as it is now.
    pub shipping_address: Value,
    /// Checkout's `Idempotency-Key` and the digest of its request.
    pub idempotency: Option<(String, Vec<u8>)>,
    /// A saved card to charge off session (replenishment).
    pub payment_method: Option<Uuid>,
    pub replenishment_run: Option<Uuid>,
    pub correlation_id: String,
}

/// Writes the order; returns its id.
pub async fn place(tx: &mut PgConnection, order: NewOrder) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    let subtotal: i64 = order
        .lines
        .iter()
        .map(|l| l.unit_price_minor * i64::from(l.quantity))
        .sum();
    let coupon_discount = order.coupon.as_ref().map_or(0, |c| c.discount_minor);
    let membership_discount = order
        .benefit
        .map_or(0, |b| b.discount(subtotal - coupon_discount));
    let (key, hash) = order.idempotency.clone().unzip();
    let lines = &order.lines;
    // The order, its lines, each shop's terms and the first event of its
    // history (placed, by its customer; every later move is `status`'s) in
    // one statement: one round trip, the foreign keys checked at its end.
    //
    // The terms are the shops' shipping and commission rates as they are
    // now: the order is priced on them when it is split, so a rate changed
    // after it was placed is not the order's (NULL: the shop has no rate of
    // its own and the platform's default applies).
    sqlx::query(
        "WITH placed AS (
             INSERT INTO orders (id, customer_id, status, currency, subtotal_minor, discount_minor, coupon_id,
                                 coupon_code, shipping_address, idempotency_key, request_hash, correlation_id,
                                 membership_id, membership_discount_minor, free_shipping, payment_method_id,
                                 replenishment_run_id)
             VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)),
         lines AS (
             INSERT INTO order_lines (id, order_id, shop_id, product_id, variant_id, title, variant_title, sku,
                                      unit_price_minor, quantity)
             SELECT u.id, $1, u.shop_id, u.product_id, u.variant_id, u.title, u.variant_title, u.sku, u.price,
                    u.quantity
               FROM unnest($17::uuid[], $18::uuid[], $19::uuid[], $20::uuid[], $21::text[], $22::text[],
                           $23::text[], $24::bigint[], $25::int[])
                    AS u(id, shop_id, product_id, variant_id, title, variant_title, sku, price, quantity)),
         terms AS (
             INSERT INTO order_shop_terms (order_id, shop_id, shipping_flat_minor, commission_bps)
             SELECT $1, s.id, s.shipping_flat_minor, s.commission_bps FROM shops s WHERE s.id = ANY($18))
         INSERT INTO order_events (id, order_id, subject, to_status, actor_id, actor_role)
         VALUES ($26, $1, 'order', 'pending', $2, 'customer')",
    )
    .bind(id)
    .bind(order.customer)
    .bind(&order.currency)
    .bind(subtotal)
    .bind(coupon_discount + membership_discount)
    .bind(order.coupon.as_ref().map(|c| c.id))
    .bind(order.coupon.as_ref().map(|c| c.code.clone()))
    .bind(&order.shipping_address)
    .bind(key)
    .bind(hash)
    .bind(&order.correlation_id)
    .bind(order.benefit.map(|b| b.membership_id))
    .bind(membership_discount)
    .bind(order.benefit.is_some_and(|b| b.free_shipping))
    .bind(order.payment_method)
    .bind(order.replenishment_run)
    .bind(lines.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.shop_id).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.product_id).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.variant_id).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.title.clone()).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.variant_title.clone()).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.sku.clone()).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.unit_price_minor).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.quantity).collect::<Vec<_>>())
    .bind(Uuid::now_v7())
    .execute(&mut *tx)
    .await?;
    let placed = Envelope::new(&OrderPlaced { order_id: id }, order.correlation_id);
    outbox::enqueue(tx, &placed).await?;
    Ok(id)
}

/// The snapshot of one of the account's addresses an order ships to
/// (`chosen`, else the default one); `None` if there is no such address.
pub async fn shipping_address(
    conn: &mut PgConnection,
    user: Uuid,
    chosen: Option<Uuid>,
) -> Result<Option<Value>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT jsonb_build_object('full_name', full_name, 'line1', line1, 'line2', line2, 'city', city,
                                   'region', region, 'postal_code', postal_code, 'country', country,
                                   'phone', phone)
           FROM addresses WHERE user_id = $1 AND (id = $2 OR ($2 IS NULL AND is_default))",
    )
    .bind(user)
    .bind(chosen)
    .fetch_optional(conn)
    .await
}

/// Whether the membership `m`'s benefits apply now: it is active and inside
/// its paid period, with three days' grace for the renewal's webhook, so
/// were `customer.subscription.deleted` lost the benefit still ends when the
/// period Stripe was paid for does. A membership cancelled at the period's
/// end has no renewal to wait for: its benefits end with the period. (A
/// macro, so both constants below are one literal.)
macro_rules! benefits_apply {
    () => {
        "m.status = 'active' AND (m.current_period_end IS NULL OR m.current_period_end > now() - CASE WHEN m.cancel_at_period_end THEN interval '0' ELSE interval '3 days' END)"
    };
}

/// [`benefits_apply!`] as a boolean column over `memberships m`.
pub const BENEFITS_APPLY: &str = benefits_apply!();

/// The account `$1`'s membership with its plan while its benefits apply, as
/// a join over `memberships m` and `membership_plans p`: no row if none.
pub const ACTIVE_MEMBERSHIP: &str = concat!(
    "memberships m JOIN membership_plans p ON p.id = m.plan_id AND m.user_id = $1 AND ",
    benefits_apply!()
);

/// The benefit's columns over [`ACTIVE_MEMBERSHIP`], for [`Benefit::from_row`].
pub const BENEFIT_COLUMNS: &str = "m.id, p.free_shipping, p.percent_off";

impl Benefit {
    /// From [`BENEFIT_COLUMNS`], each null where there is no membership.
    pub fn from_row(
        (id, free_shipping, percent_off): (Option<Uuid>, Option<bool>, Option<i32>),
    ) -> Option<Self> {
        Some(Self {
            membership_id: id?,
            free_shipping: free_shipping?,
            percent_off: percent_off?,
        })
    }
}

/// The benefits of the account's membership, if it is active now.
pub async fn benefit(conn: &mut PgConnection, user: Uuid) -> Result<Option<Benefit>, sqlx::Error> {
    let row: Option<(Option<Uuid>, Option<bool>, Option<i32>)> = sqlx::query_as(
        sqlx::AssertSqlSafe(format!("SELECT {BENEFIT_COLUMNS} FROM {ACTIVE_MEMBERSHIP}")),
    )
    .bind(user)
    .fetch_optional(conn)
    .await?;
    Ok(row.and_then(Benefit::from_row))
}
