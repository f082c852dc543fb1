//! The order-splitter: one seller order per shop in a placed order, with
//! that seller's items, share of the coupon, shipping and commission
//! (`souk_shared::orders::pricing`), and the order's totals. Shipping and
//! commission come from the rates fixed when the order was placed.

use souk_shared::{
    config::{ConfigError, Env},
    contracts::{OrderPlaced, OrderSplit},
    envelope::Envelope,
    orders::pricing::{self, Discount, ShopInput},
    outbox, topology,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runtime::{Failure, Handler};

/// The platform's defaults, for shops without their own terms (applied at
/// the split: the API placing orders does not know them).
#[derive(Debug, Clone)]
pub struct SplitterConfig {
    /// Flat shipping per seller order, minor units.
    pub shipping_flat_minor: i64,
    /// Commission in basis points (1000 = 10 %).
    pub commission_bps: i32,
}

impl SplitterConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let shipping_flat_minor: i64 = env.or("SHIPPING_FLAT_MINOR", 499)?;
        let commission_bps: i32 = env.or("COMMISSION_BPS", 1000)?;
        if shipping_flat_minor < 0 {
            return Err(ConfigError {
                var: "SHIPPING_FLAT_MINOR".into(),
                reason: "must not be negative".into(),
            });
        }
        if !(0..=10_000).contains(&commission_bps) {
            return Err(ConfigError {
                var: "COMMISSION_BPS".into(),
                reason: "must be 0 to 10000 (basis points)".into(),
            });
        }
        Ok(Self {
            shipping_flat_minor,
            commission_bps,
        })
    }
}

pub struct OrderSplitter {
    pub config: SplitterConfig,
}

impl Handler for OrderSplitter {
    type Prepared = ();
    const GROUP: &'static str = topology::ORDER_SPLITTER.name;
    const BINDINGS: &'static [&'static str] = topology::ORDER_SPLITTER.bindings;
    const EMITS: &'static [&'static str] = &["order.split"];

    async fn prepare(&self, _: &Envelope) -> Result<(), Failure> {
        Ok(())
    }

    async fn apply(&self, tx: &mut PgConnection, msg: &Envelope, _: ()) -> Result<(), Failure> {
        let OrderPlaced { order_id } = msg.payload().map_err(Failure::permanent)?;
        #[derive(sqlx::FromRow)]
        struct Row {
            status: String,
            split: bool,
            discount_minor: i64,
            membership_discount_minor: i64,
            free_shipping: bool,
            coupon_shop: Option<Uuid>,
        }
        let order: Option<Row> = sqlx::query_as(
            "SELECT o.status, o.split_at IS NOT NULL AS split, o.discount_minor, o.membership_discount_minor,
                    o.free_shipping, c.shop_id AS coupon_shop
               FROM orders o LEFT JOIN coupons c ON c.id = o.coupon_id
              WHERE o.id = $1 FOR NO KEY UPDATE OF o",
        )
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(order) = order else {
            return Err(Failure::permanent(anyhow::anyhow!("no order {order_id}")));
        };
        if order.split || order.status != "pending" {
            // Split already, or cancelled before it got here.
            return Ok(());
        }
        // Each shop's rates as they were when the order was placed
        // (`order_shop_terms`, written by `place`), never the shop's rates
        // now: a placed order's terms do not change. Only an order placed
        // without them (by an API older than that table, during a rolling
        // deploy) falls back to the shop's rates now.
        let shops: Vec<(Uuid, i64, Option<i64>, Option<i32>)> = sqlx::query_as(
            "SELECT l.shop_id, sum(l.unit_price_minor * l.quantity)::bigint,
                    CASE WHEN t.order_id IS NULL THEN s.shipping_flat_minor ELSE t.shipping_flat_minor END,
                    CASE WHEN t.order_id IS NULL THEN s.commission_bps ELSE t.commission_bps END
               FROM order_lines l JOIN shops s ON s.id = l.shop_id
               LEFT JOIN order_shop_terms t ON t.order_id = l.order_id AND t.shop_id = l.shop_id
              WHERE l.order_id = $1
              GROUP BY l.shop_id, t.order_id, t.shipping_flat_minor, t.commission_bps,
                       s.shipping_flat_minor, s.commission_bps",
        )
        .bind(order_id)
        .fetch_all(&mut *tx)
        .await?;
        let inputs = shops
            .into_iter()
            .map(|(shop_id, items, shipping, commission)| ShopInput {
                shop_id,
                items_minor: items,
                // A member's free shipping: no seller order carries any.
                shipping_minor: if order.free_shipping {
                    0
                } else {
                    shipping.unwrap_or(self.config.shipping_flat_minor)
                },
                commission_bps: commission.unwrap_or(self.config.commission_bps),
            })
            .collect();
        // A shop coupon's discount is its shop's; a platform coupon's and the
        // membership's are shared by every seller.
        let coupon = order.discount_minor - order.membership_discount_minor;
        let discount = match order.coupon_shop {
            Some(shop) => Discount {
                shop: Some((shop, coupon)),
                platform_minor: order.membership_discount_minor,
            },
            None => Discount {
                shop: None,
                platform_minor: order.discount_minor,
            },
        };
        let parts = pricing::split(inputs, discount);
        let shipping: i64 = parts.iter().map(|p| p.shipping_minor).sum();
        let total: i64 = parts.iter().map(|p| p.total_minor).sum();
        let column = |f: fn(&pricing::ShopSplit) -> i64| parts.iter().map(f).collect::<Vec<_>>();
        // Every seller order and the order's totals in one statement.
        sqlx::query(
            "WITH parts AS (
                 INSERT INTO seller_orders (id, order_id, shop_id, status, items_minor, discount_minor,
                                            shipping_minor, total_minor, commission_bps,
                                            commission_minor, payout_minor)
                 SELECT u.id, $1, u.shop_id, 'pending', u.items, u.discount, u.shipping, u.total,
                        u.commission_bps, u.commission, u.payout
                   FROM unnest($2::uuid[], $3::uuid[], $4::bigint[], $5::bigint[], $6::bigint[],
                               $7::bigint[], $8::int[], $9::bigint[], $10::bigint[])
                        AS u(id, shop_id, items, discount, shipping, total, commission_bps, commission, payout))
             UPDATE orders SET shipping_minor = $11, total_minor = $12, split_at = now(), updated_at = now()
              WHERE id = $1",
        )
        .bind(order_id)
        .bind(parts.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
        .bind(parts.iter().map(|p| p.shop_id).collect::<Vec<_>>())
        .bind(column(|p| p.items_minor))
        .bind(column(|p| p.discount_minor))
        .bind(column(|p| p.shipping_minor))
        .bind(column(|p| p.total_minor))
        .bind(parts.iter().map(|p| p.commission_bps).collect::<Vec<_>>())
        .bind(column(|p| p.commission_minor))
        .bind(column(|p| p.payout_minor))
        .bind(shipping)
        .bind(total)
        .execute(&mut *tx)
        .await?;
        let next = Envelope::new(&OrderSplit { order_id }, msg.correlation_id.clone());
        outbox::enqueue(tx, &next).await?;
        Ok(())
    }
}
