//! Coupon rules, shared by the cart (API) and checkout and payment (workers),
//! so a coupon means the same thing everywhere.
//!
//! Rounding: a percent discount is `floor(eligible × percent / 100)` in minor
//! units; a fixed discount never exceeds what it applies to.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Coupon {
    pub id: Uuid,
    pub code: String,
    /// `None`: a platform coupon, on the whole cart.
    pub shop_id: Option<Uuid>,
    pub percent_off: Option<i32>,
    pub amount_off_minor: Option<i64>,
    pub min_order_minor: i64,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub max_uses: Option<i32>,
    pub max_uses_per_customer: Option<i32>,
    pub uses: i32,
    pub disabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// Why a coupon does not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Disabled,
    NotStarted,
    Ended,
    UsedUp,
    UsedUpByYou,
    /// The eligible items come to less than the minimum order.
    BelowMinimum(i64),
    /// A shop coupon with none of that shop's items in the cart.
    NoEligibleItems,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Disabled => write!(f, "this coupon is no longer valid"),
            Self::NotStarted => write!(f, "this coupon is not valid yet"),
            Self::Ended => write!(f, "this coupon has expired"),
            Self::UsedUp => write!(f, "this coupon has been used up"),
            Self::UsedUpByYou => write!(f, "you have used this coupon as often as allowed"),
            Self::BelowMinimum(min) => write!(f, "needs a minimum order of {min} (minor units)"),
            Self::NoEligibleItems => write!(f, "nothing in the cart is from this coupon's shop"),
        }
    }
}

pub const COLUMNS: &str = "id, code, shop_id, percent_off, amount_off_minor, min_order_minor, \
     starts_at, ends_at, max_uses, max_uses_per_customer, uses, disabled_at, created_at";

impl Coupon {
    /// The discount on `eligible` (minor units: the coupon's shop's items, or
    /// the whole cart for a platform coupon) for a customer who has used the
    /// coupon `customer_uses` times, at `now`.
    pub fn discount(
        &self,
        now: DateTime<Utc>,
        customer_uses: i64,
        eligible: i64,
    ) -> Result<i64, Refusal> {
        if self.disabled_at.is_some() {
            return Err(Refusal::Disabled);
        }
        if self.starts_at.is_some_and(|s| now < s) {
            return Err(Refusal::NotStarted);
        }
        if self.ends_at.is_some_and(|e| now >= e) {
            return Err(Refusal::Ended);
        }
        if self.max_uses.is_some_and(|m| self.uses >= m) {
            return Err(Refusal::UsedUp);
        }
        if self
            .max_uses_per_customer
            .is_some_and(|m| customer_uses >= i64::from(m))
        {
            return Err(Refusal::UsedUpByYou);
        }
        if eligible <= 0 {
            return Err(Refusal::NoEligibleItems);
        }
        if eligible < self.min_order_minor {
            return Err(Refusal::BelowMinimum(self.min_order_minor));
        }
        Ok(match (self.percent_off, self.amount_off_minor) {
            (Some(percent), _) => eligible * i64::from(percent) / 100,
            (None, Some(amount)) => amount.min(eligible),
            (None, None) => 0,
        })
    }
}

pub async fn by_code(conn: &mut PgConnection, code: &str) -> Result<Option<Coupon>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM coupons WHERE lower(code) = lower($1)"
    )))
    .bind(code)
    .fetch_optional(conn)
    .await
}

/// Paid orders of `user` that used the coupon.
pub async fn customer_uses(
    conn: &mut PgConnection,
    coupon: Uuid,
    user: Uuid,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM coupon_redemptions WHERE coupon_id = $1 AND user_id = $2",
    )
    .bind(coupon)
    .bind(user)
    .fetch_one(conn)
    .await
}

/// Orders not yet paid (nor dead) that carry the coupon: in all, and of
/// `user`. Checkout counts them as uses, so concurrent checkouts cannot all
/// take the last use; an order that dies frees its use by leaving these
/// statuses (one paid after it expired takes it back only if it is still
/// free: [`use_left_for`]), and a paid one is counted by [`redeem`] instead.
pub async fn in_flight(
    conn: &mut PgConnection,
    coupon: Uuid,
    user: Uuid,
) -> Result<(i64, i64), sqlx::Error> {
    in_flight_besides(conn, coupon, user, None).await
}

/// As [`in_flight`], leaving out `besides` (an order judged on its own).
async fn in_flight_besides(
    conn: &mut PgConnection,
    coupon: Uuid,
    user: Uuid,
    besides: Option<Uuid>,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE customer_id = $2) FROM orders
          WHERE coupon_id = $1 AND id IS DISTINCT FROM $3
            AND status IN ('pending', 'reserved', 'awaiting_payment', 'payment_failed')",
    )
    .bind(coupon)
    .bind(user)
    .bind(besides)
    .fetch_one(conn)
    .await
}

/// Whether the coupon still has a use for `order` of `user`, an order that
/// had stopped counting against its limits (its reservation ran out, so it
/// left the statuses [`in_flight`] counts) and is about to be paid after
/// all. Its use was freed when it expired and may have been taken since by
/// another order: checked as checkout checks, against the uses paid for plus
/// the other orders in flight (not this one), total and per customer. Only
/// the limits: the order was priced while the coupon was valid, so a coupon
/// disabled or ended since does not undo it, as it does not undo an order
/// paid in time.
///
/// Locks the coupon's row (`FOR NO KEY UPDATE`, as checkout does) until the
/// transaction ends, so no checkout can count the use as free while this
/// order takes it; the caller must then redeem it in the same transaction.
pub async fn use_left_for(
    tx: &mut PgConnection,
    coupon: Uuid,
    user: Uuid,
    order: Uuid,
) -> Result<Result<(), Refusal>, sqlx::Error> {
    let (max_uses, max_per_customer, uses): (Option<i32>, Option<i32>, i32) = sqlx::query_as(
        "SELECT max_uses, max_uses_per_customer, uses FROM coupons WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(coupon)
    .fetch_one(&mut *tx)
    .await?;
    let (held, held_by_user) = in_flight_besides(tx, coupon, user, Some(order)).await?;
    if max_uses.is_some_and(|m| i64::from(uses) + held >= i64::from(m)) {
        return Ok(Err(Refusal::UsedUp));
    }
    if let Some(m) = max_per_customer
        && customer_uses(tx, coupon, user).await? + held_by_user >= i64::from(m)
    {
        return Ok(Err(Refusal::UsedUpByYou));
    }
    Ok(Ok(()))
}

/// Counts one use of the coupon for a paid order, once however often it is
/// called for that order. `false` when the coupon's total limit is already
/// reached (the caller decides: the order was priced when it was valid).
pub async fn redeem(
    tx: &mut PgConnection,
    coupon: Uuid,
    user: Uuid,
    order: Uuid,
) -> Result<bool, sqlx::Error> {
    let first = sqlx::query(
        "INSERT INTO coupon_redemptions (coupon_id, order_id, user_id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(coupon)
    .bind(order)
    .bind(user)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !first {
        return Ok(true);
    }
    let counted = sqlx::query(
        "UPDATE coupons SET uses = uses + 1
          WHERE id = $1 AND (max_uses IS NULL OR uses < max_uses)",
    )
    .bind(coupon)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn coupon() -> Coupon {
        Coupon {
            id: Uuid::nil(),
            code: "SAVE10".into(),
            shop_id: None,
            percent_off: Some(10),
            amount_off_minor: None,
            min_order_minor: 0,
            starts_at: None,
            ends_at: None,
            max_uses: None,
            max_uses_per_customer: None,
            uses: 0,
            disabled_at: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn percent_rounds_down_and_fixed_never_exceeds_the_items() {
        let now = Utc::now();
        assert_eq!(coupon().discount(now, 0, 999), Ok(99));
        let fixed = Coupon {
            percent_off: None,
            amount_off_minor: Some(500),
            ..coupon()
        };
        assert_eq!(fixed.discount(now, 0, 300), Ok(300));
        assert_eq!(fixed.discount(now, 0, 3000), Ok(500));
    }

    #[test]
    fn every_rule_refuses() {
        let now = Utc::now();
        let hour = Duration::hours(1);
        let cases = [
            (
                Coupon {
                    disabled_at: Some(now),
                    ..coupon()
                },
                0,
                100,
                Refusal::Disabled,
            ),
            (
                Coupon {
                    starts_at: Some(now + hour),
                    ..coupon()
                },
                0,
                100,
                Refusal::NotStarted,
            ),
            (
                Coupon {
                    ends_at: Some(now),
                    ..coupon()
                },
                0,
                100,
                Refusal::Ended,
            ),
            (
                Coupon {
                    max_uses: Some(3),
                    uses: 3,
                    ..coupon()
                },
                0,
                100,
                Refusal::UsedUp,
            ),
            (
                Coupon {
                    max_uses_per_customer: Some(1),
                    ..coupon()
                },
                1,
                100,
                Refusal::UsedUpByYou,
            ),
            (
                Coupon {
                    min_order_minor: 5000,
                    ..coupon()
                },
                0,
                4999,
                Refusal::BelowMinimum(5000),
            ),
            (coupon(), 0, 0, Refusal::NoEligibleItems),
        ];
        for (c, uses, eligible, refusal) in cases {
            assert_eq!(c.discount(now, uses, eligible), Err(refusal));
        }
        let window = Coupon {
            starts_at: Some(now - hour),
            ends_at: Some(now + hour),
            ..coupon()
        };
        assert_eq!(window.discount(now, 0, 100), Ok(10));
    }
}
