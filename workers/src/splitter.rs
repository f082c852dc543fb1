//! The order-splitter: one seller order per shop in a placed order, with
//! that seller's items, share of the coupon, shipping and commission
//! (`souk_shared::orders::pricing`), and the order's totals.

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

/// The platform's defaults, for shops without their own terms.
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
        let shops: Vec<(Uuid, i64, Option<i64>, Option<i32>)> = sqlx::query_as(
            "SELECT l.shop_id, sum(l.unit_price_minor * l.quantity)::bigint,
                    s.shipping_flat_minor, s.commission_bps
               FROM order_lines l JOIN shops s ON s.id = l.shop_id
              WHERE l.order_id = $1
              GROUP BY l.shop_id, s.shipping_flat_minor, s.commission_bps",
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
        for part in &parts {
            sqlx::query(
                "INSERT INTO seller_orders (id, order_id, shop_id, status, items_minor, discount_minor,
                                            shipping_minor, total_minor, commission_bps,
                                            commission_minor, payout_minor)
                 VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(Uuid::now_v7())
            .bind(order_id)
            .bind(part.shop_id)
            .bind(part.items_minor)
            .bind(part.discount_minor)
            .bind(part.shipping_minor)
            .bind(part.total_minor)
            .bind(part.commission_bps)
            .bind(part.commission_minor)
            .bind(part.payout_minor)
            .execute(&mut *tx)
            .await?;
        }
        let shipping: i64 = parts.iter().map(|p| p.shipping_minor).sum();
        let total: i64 = parts.iter().map(|p| p.total_minor).sum();
        sqlx::query(
            "UPDATE orders SET shipping_minor = $2, total_minor = $3, split_at = now(), updated_at = now()
              WHERE id = $1",
        )
        .bind(order_id)
        .bind(shipping)
        .bind(total)
        .execute(&mut *tx)
        .await?;
        let next = Envelope::new(&OrderSplit { order_id }, msg.correlation_id.clone());
        outbox::enqueue(tx, &next).await?;
        Ok(())
    }
}
