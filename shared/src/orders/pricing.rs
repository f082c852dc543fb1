//! How an order's money splits per seller, in integer minor units.
//!
//! Rules (also in `docs/orders.md`):
//!
//! - A seller's **items** are its lines at their snapshot prices.
//! - A **shop coupon**'s whole discount is that shop's. A **platform
//!   coupon**'s discount, and a membership's percentage off, are shared in
//!   proportion to each seller's items (less a shop coupon's discount, where
//!   a shop coupon and a membership meet):
//!   each gets `floor(discount × items / all items)` and the units left over
//!   go one each to the largest remainders (ties to the shop first in id
//!   order), so the shares always add up to the discount exactly.
//! - **Shipping** is the shop's flat rate, once per seller order.
//! - **Commission** is `floor((items − discount) × rate / 10 000)`, the rate
//!   in basis points; shipping carries none, and fractions of a minor unit
//!   stay with the seller.
//! - A seller order's **total** (what the customer pays for it) is
//!   `items − discount + shipping`; the seller's **payout** is
//!   `total − commission`. The order's total is the sum of its parts.

use uuid::Uuid;

/// One shop's part of an order before the split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShopInput {
    pub shop_id: Uuid,
    pub items_minor: i64,
    pub shipping_minor: i64,
    pub commission_bps: i32,
}

/// The order's discounts, as checkout priced them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Discount {
    /// A shop coupon: all of it comes off that shop's items.
    pub shop: Option<(Uuid, i64)>,
    /// A platform coupon and a membership's percentage off: shared by every seller.
    pub platform_minor: i64,
}

/// One seller order's money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShopSplit {
    pub shop_id: Uuid,
    pub items_minor: i64,
    pub discount_minor: i64,
    pub shipping_minor: i64,
    pub total_minor: i64,
    pub commission_bps: i32,
    pub commission_minor: i64,
    pub payout_minor: i64,
}

/// Splits an order: one [`ShopSplit`] per shop, in shop id order.
pub fn split(mut shops: Vec<ShopInput>, discount: Discount) -> Vec<ShopSplit> {
    shops.sort_by_key(|s| s.shop_id);
    // The shop coupon first, then the platform's share of what is left.
    let after_shop: Vec<i64> = shops
        .iter()
        .map(|s| match discount.shop {
            Some((shop, amount)) if shop == s.shop_id => s.items_minor - amount.min(s.items_minor),
            _ => s.items_minor,
        })
        .collect();
    let platform = allocate(discount.platform_minor, &after_shop);
    let discounts: Vec<i64> = shops
        .iter()
        .zip(&after_shop)
        .zip(platform)
        .map(|((s, left), share)| s.items_minor - left + share)
        .collect();
    shops
        .into_iter()
        .zip(discounts)
        .map(|(shop, discount_minor)| {
            let net = shop.items_minor - discount_minor;
            let commission_minor = commission(net, shop.commission_bps);
            let total_minor = net + shop.shipping_minor;
            ShopSplit {
                shop_id: shop.shop_id,
                items_minor: shop.items_minor,
                discount_minor,
                shipping_minor: shop.shipping_minor,
                total_minor,
                commission_bps: shop.commission_bps,
                commission_minor,
                payout_minor: total_minor - commission_minor,
            }
        })
        .collect()
}

/// `floor(amount × bps / 10 000)`.
pub fn commission(amount_minor: i64, bps: i32) -> i64 {
    (i128::from(amount_minor) * i128::from(bps) / 10_000) as i64
}

/// Shares `amount` among `weights` in proportion, in whole units, by the
/// largest-remainder rule. The shares sum to `amount` (given a positive
/// total weight) and none exceeds its weight when `amount` does not exceed
/// the total.
pub fn allocate(amount: i64, weights: &[i64]) -> Vec<i64> {
    let total: i128 = weights.iter().map(|w| i128::from(*w)).sum();
    if total <= 0 {
        return vec![0; weights.len()];
    }
    let amount = i128::from(amount);
    let mut shares: Vec<i128> = weights
        .iter()
        .map(|w| amount * i128::from(*w) / total)
        .collect();
    let mut left = amount - shares.iter().sum::<i128>();
    // Largest remainder first; ties to the earlier entry.
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| {
        (
            std::cmp::Reverse(amount * i128::from(weights[i]) % total),
            i,
        )
    });
    for i in order {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    shares.into_iter().map(|s| s as i64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop(n: u128, items: i64) -> ShopInput {
        ShopInput {
            shop_id: Uuid::from_u128(n),
            items_minor: items,
            shipping_minor: 499,
            commission_bps: 1000,
        }
    }

    #[test]
    fn platform_discount_shares_add_up_exactly() {
        // 1000 over three equal thirds: 333 + 333 + 334 would favour the last;
        // the largest remainders (all equal) go to the first in order.
        assert_eq!(allocate(1000, &[1, 1, 1]), vec![334, 333, 333]);
        assert_eq!(allocate(1, &[5000, 1]), vec![1, 0]);
        assert_eq!(allocate(0, &[10, 20]), vec![0, 0]);
        for amount in [1, 7, 99, 1001, 123_456] {
            let weights = [1999, 3, 4500, 77];
            let shares = allocate(amount, &weights);
            assert_eq!(shares.iter().sum::<i64>(), amount, "{amount}");
        }
    }

    #[test]
    fn a_split_carries_shipping_commission_and_payout() {
        let parts = split(
            vec![shop(2, 3000), shop(1, 1000)],
            Discount {
                shop: None,
                platform_minor: 401,
            },
        );
        // 401 × 1000/4000 = 100.25 and × 3000/4000 = 300.75: the .75 gets the unit.
        assert_eq!(parts[0].shop_id, Uuid::from_u128(1));
        assert_eq!(parts[0].discount_minor, 100);
        assert_eq!(parts[1].discount_minor, 301);
        // (1000 − 100) × 10 % = 90; total 900 + 499; payout total − 90.
        assert_eq!(parts[0].commission_minor, 90);
        assert_eq!(parts[0].total_minor, 1399);
        assert_eq!(parts[0].payout_minor, 1309);
        // (3000 − 301) × 10 % = 269.9 → 269 (the fraction stays with the seller).
        assert_eq!(parts[1].commission_minor, 269);
    }

    #[test]
    fn a_shop_coupon_comes_off_its_own_shop_only() {
        let parts = split(
            vec![shop(1, 1000), shop(2, 3000)],
            Discount {
                shop: Some((Uuid::from_u128(2), 500)),
                platform_minor: 0,
            },
        );
        assert_eq!(
            parts.iter().map(|p| p.discount_minor).collect::<Vec<_>>(),
            vec![0, 500]
        );
    }

    #[test]
    fn a_membership_discount_is_shared_after_a_shop_coupon() {
        // 10 % off what is left after the shop coupon: (1000 + 2500) × 10 % = 350,
        // shared 100 / 250 by what each shop has left.
        let parts = split(
            vec![shop(1, 1000), shop(2, 3000)],
            Discount {
                shop: Some((Uuid::from_u128(2), 500)),
                platform_minor: 350,
            },
        );
        assert_eq!(
            parts.iter().map(|p| p.discount_minor).collect::<Vec<_>>(),
            vec![100, 750]
        );
    }
}
