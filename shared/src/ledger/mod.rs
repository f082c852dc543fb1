//! The double-entry ledger: every movement of money is one transaction
//! whose entries sum to zero (checked here and by a deferred constraint
//! trigger), posted at most once per `reference`, never changed afterwards.
//!
//! An account's balance is the sum of its entries: what the account holds.
//! Money moves from one account to others, so a transaction takes from some
//! (negative entries) and gives to others (positive). `customer_funds`
//! stands for the customers' cards: it goes negative as payments come in.
//! The postings, and the rules behind each amount, are in docs/ledger.md.

use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::orders::pricing::commission;

pub mod postings;

/// An account: a seller's three, or one of the platform's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    /// Earned on delivered orders, waiting for the hold period.
    SellerPending(Uuid),
    /// The seller may withdraw it.
    SellerAvailable(Uuid),
    /// Asked for in a withdrawal not yet paid.
    SellerWithdrawing(Uuid),
    /// Paid by customers, not yet earned by anyone or given back.
    PaymentsClearing,
    /// The platform's commission.
    Commission,
    /// Given back to customers.
    Refunds,
    /// Paid out to sellers' banks.
    Payouts,
    /// Where payments come from: the customers' cards.
    CustomerFunds,
}

impl Account {
    fn parts(self) -> (&'static str, Option<Uuid>) {
        match self {
            Self::SellerPending(shop) => ("seller_pending", Some(shop)),
            Self::SellerAvailable(shop) => ("seller_available", Some(shop)),
            Self::SellerWithdrawing(shop) => ("seller_withdrawing", Some(shop)),
            Self::PaymentsClearing => ("payments_clearing", None),
            Self::Commission => ("commission", None),
            Self::Refunds => ("refunds", None),
            Self::Payouts => ("payouts", None),
            Self::CustomerFunds => ("customer_funds", None),
        }
    }
}

/// The account's id, made on first use.
pub async fn account_id(
    conn: &mut PgConnection,
    account: Account,
    currency: &str,
) -> Result<Uuid, sqlx::Error> {
    let (kind, shop) = account.parts();
    sqlx::query(
        "INSERT INTO ledger_accounts (id, kind, shop_id, currency) VALUES ($1, $2, $3, $4)
         ON CONFLICT (kind, coalesce(shop_id, '00000000-0000-0000-0000-000000000000'), currency) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(kind)
    .bind(shop)
    .bind(currency)
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar(
        "SELECT id FROM ledger_accounts
          WHERE kind = $1 AND shop_id IS NOT DISTINCT FROM $2 AND currency = $3",
    )
    .bind(kind)
    .bind(shop)
    .bind(currency)
    .fetch_one(conn)
    .await
}

/// Locks the seller's available account (made on first use) for the rest
/// of the caller's transaction, `FOR NO KEY UPDATE` (an entry's foreign key
/// check takes only `KEY SHARE`, so posting to the account never waits on
/// it, and waiting here never blocks a posting that does not take it).
///
/// A withdrawal's request and its payment take it first, then read what
/// [`waiting_refunds_owed`] and then the balance, in two statements: each
/// its own snapshot. So everything that could make those two reads
/// disagree takes it too, and lands before both or after both: the
/// withdrawal steps (posted by the request and the decision, under it),
/// and a release, which at once adds to the balance and brings its seller
/// order's waiting refunds into what is owed (read between the two, the
/// payout would count the money but not the refunds it goes back to). A refund posted out of the balance needs no lock: it
/// is counted once (owed if it is read before, in the balance if after) or
/// twice (on the safe side), never missed; see [`waiting_refunds_owed`].
///
/// Lock order: a withdrawal takes this first (before its own row and the
/// shop's); a release takes it after the seller order's and the earning's
/// rows, and a transaction taking several shops' takes them in order of
/// (shop, currency), as the release sweep does. Nothing that holds it
/// then waits for a seller order's or an earning's row held by another
/// (the sweep locked its own before).
pub async fn lock_available(
    conn: &mut PgConnection,
    shop: Uuid,
    currency: &str,
) -> Result<(), sqlx::Error> {
    let available = account_id(&mut *conn, Account::SellerAvailable(shop), currency).await?;
    sqlx::query("SELECT 1 FROM ledger_accounts WHERE id = $1 FOR NO KEY UPDATE")
        .bind(available)
        .execute(conn)
        .await?;
    Ok(())
}

/// One business event's movement of money.
#[derive(Debug, Clone)]
pub struct Posting {
    /// `payment`, `earning`, `release`, `refund`, `withdrawal_hold`,
    /// `withdrawal_paid` or `withdrawal_returned`.
    pub kind: &'static str,
    /// What it records, e.g. `earning:<seller order>`: posted once.
    pub reference: String,
    pub description: String,
    pub order: Option<Uuid>,
    pub seller_order: Option<Uuid>,
    pub currency: String,
    /// Amounts by account; they must sum to zero. Zero amounts are left out.
    pub legs: Vec<(Account, i64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("posting {0} does not balance (off by {1})")]
    Unbalanced(String, i64),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Posts `posting` in the caller's transaction; `false` (and nothing
/// written) if its reference was posted before.
pub async fn post(conn: &mut PgConnection, posting: Posting) -> Result<bool, PostError> {
    let off: i64 = posting.legs.iter().map(|(_, amount)| amount).sum();
    if off != 0 {
        return Err(PostError::Unbalanced(posting.reference, off));
    }
    let id = Uuid::now_v7();
    let fresh = sqlx::query(
        "INSERT INTO ledger_transactions (id, kind, reference, description, order_id, seller_order_id)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (reference) DO NOTHING",
    )
    .bind(id)
    .bind(posting.kind)
    .bind(&posting.reference)
    .bind(&posting.description)
    .bind(posting.order)
    .bind(posting.seller_order)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        return Ok(false);
    }
    for (account, amount) in posting.legs.into_iter().filter(|(_, amount)| *amount != 0) {
        let account = account_id(conn, account, &posting.currency).await?;
        sqlx::query(
            "INSERT INTO ledger_entries (id, transaction_id, account_id, amount_minor) VALUES ($1, $2, $3, $4)",
        )
        .bind(Uuid::now_v7())
        .bind(id)
        .bind(account)
        .bind(amount)
        .execute(&mut *conn)
        .await?;
    }
    Ok(true)
}

/// A seller's money, from the ledger's entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SellerBalance {
    /// Earned on delivered orders, inside the hold period.
    pub pending_minor: i64,
    /// May be withdrawn (negative after refunds larger than what was left:
    /// later earnings make up for it).
    pub available_minor: i64,
    /// Asked for, waiting for an admin to pay it.
    pub withdrawing_minor: i64,
}

pub async fn seller_balance(
    conn: &mut PgConnection,
    shop: Uuid,
    currency: &str,
) -> Result<SellerBalance, sqlx::Error> {
    let sums: Vec<(String, i64)> = sqlx::query_as(
        "SELECT a.kind, coalesce(sum(e.amount_minor), 0)::bigint
           FROM ledger_accounts a LEFT JOIN ledger_entries e ON e.account_id = a.id
          WHERE a.shop_id = $1 AND a.currency = $2
          GROUP BY a.kind",
    )
    .bind(shop)
    .bind(currency)
    .fetch_all(conn)
    .await?;
    let mut balance = SellerBalance::default();
    for (kind, sum) in sums {
        match kind.as_str() {
            "seller_pending" => balance.pending_minor = sum,
            "seller_available" => balance.available_minor = sum,
            "seller_withdrawing" => balance.withdrawing_minor = sum,
            _ => {}
        }
    }
    Ok(balance)
}

/// What the seller's available balance will lose to refunds already
/// decided but not yet posted (waiting for Stripe, or for settlement), on
/// seller orders whose earning was released: their seller's share, as
/// [`refund_shares`] will post it (exact whichever posts first, as the
/// shares are cumulative). Read it before the balance, both under
/// [`lock_available`]: a release (which brings a seller order into this
/// sum as it adds to the balance) then cannot commit between the two
/// reads, and a refund posted in between (refunds do not take the lock) is
/// counted twice (a withdrawal refused that could have gone), never missed.
/// It reads the shop's seller orders, by the shop's index, as the balance
/// reads the shop's entries.
pub async fn waiting_refunds_owed(
    conn: &mut PgConnection,
    shop: Uuid,
    currency: &str,
) -> Result<i64, sqlx::Error> {
    let parts: Vec<(i64, i32, i64, i64, i64)> = sqlx::query_as(
        "SELECT so.items_minor - so.discount_minor, so.commission_bps, so.commission_minor,
                coalesce(sum(r.amount_minor) FILTER (WHERE t.id IS NOT NULL), 0)::bigint,
                coalesce(sum(r.amount_minor) FILTER (WHERE t.id IS NULL), 0)::bigint
           FROM seller_orders so
           JOIN orders o ON o.id = so.order_id
           JOIN seller_earnings e ON e.seller_order_id = so.id AND e.released_at IS NOT NULL
           JOIN refunds r ON r.order_id = so.order_id AND r.seller_order_id = so.id
           JOIN payments p ON p.id = r.payment_id AND NOT p.duplicate
           LEFT JOIN ledger_transactions t ON t.reference = 'refund:' || r.id::text
          WHERE so.shop_id = $1 AND o.currency = $2
            AND (t.id IS NOT NULL OR r.status <> 'failed')
          GROUP BY so.id
         HAVING count(*) FILTER (WHERE t.id IS NULL) > 0",
    )
    .bind(shop)
    .bind(currency)
    .fetch_all(conn)
    .await?;
    Ok(parts
        .into_iter()
        .map(
            |(net_minor, commission_bps, commission_minor, posted, waiting)| {
                let terms = PartTerms {
                    net_minor,
                    commission_bps,
                    commission_minor,
                };
                refund_shares(posted, waiting, terms).0
            },
        )
        .sum())
}

/// What a seller order's money was made of, as far as sharing a refund of
/// it goes: commission is charged on the items less the discount, never on
/// shipping (docs/orders.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartTerms {
    /// Items less discount: what the commission was charged on.
    pub net_minor: i64,
    pub commission_bps: i32,
    /// The commission the seller order was charged (its stored figure).
    pub commission_minor: i64,
}

/// The seller's and the platform's shares of `refunded`, the total taken
/// back from a seller order so far. A refund comes out of the items first
/// (shipping last, all of it the seller's): the platform gives back what it
/// would not have charged on the items left, `C − commission(net − B)`, so
/// what it keeps is always the commission on what the customer kept. The
/// shares add up to `refunded`, and the whole total to (payout, commission).
pub fn seller_and_commission(refunded: i64, terms: PartTerms) -> (i64, i64) {
    let kept = (terms.net_minor - refunded).max(0);
    // Clamped so that a stored commission off the formula (it should never
    // be) can neither give back more than was charged nor take any from a
    // refund of nothing.
    let platform = (terms.commission_minor - commission(kept, terms.commission_bps))
        .clamp(0, terms.commission_minor)
        .min(refunded.max(0));
    (refunded - platform, platform)
}

/// The seller's and the platform's shares of a refund of `amount` after
/// `before` was refunded from the same seller order: the shares of the
/// total so far plus this one, less what the earlier ones took. So however
/// many refunds there are, their shares add up to those of their total, and
/// neither share is ever negative (the commission on what is left only
/// falls, by at most the refund, as the rate is at most 100 %).
pub fn refund_shares(before: i64, amount: i64, terms: PartTerms) -> (i64, i64) {
    let (seller_after, platform_after) = seller_and_commission(before + amount, terms);
    let (seller_before, platform_before) = seller_and_commission(before, terms);
    (
        seller_after - seller_before,
        platform_after - platform_before,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 % commission on 4500 of items, 499 shipping: payout 4549,
    /// commission 450.
    const BOARD: PartTerms = PartTerms {
        net_minor: 4500,
        commission_bps: 1000,
        commission_minor: 450,
    };

    #[test]
    fn many_small_refunds_share_like_one_refund_of_their_total() {
        let (mut seller, mut platform) = (0, 0);
        for before in 0..4999 {
            let (s, p) = refund_shares(before, 1, BOARD);
            assert_eq!(s + p, 1);
            assert!(s >= 0 && p >= 0, "never negative: {s} {p} at {before}");
            seller += s;
            platform += p;
            assert_eq!((seller, platform), seller_and_commission(before + 1, BOARD));
        }
        assert_eq!(
            (seller, platform),
            (4549, 450),
            "all of it, shared as earned"
        );
    }

    #[test]
    fn a_refund_gives_back_the_commission_on_the_items_it_takes_back() {
        assert_eq!(seller_and_commission(0, BOARD), (0, 0));
        assert_eq!(seller_and_commission(4999, BOARD), (4549, 450));
        // 3500 of items kept: commission 350 on them, 100 given back.
        assert_eq!(seller_and_commission(1000, BOARD), (900, 100));
        // 4167 kept: commission 416, so 34 back.
        assert_eq!(seller_and_commission(333, BOARD), (299, 34));
        // The items in full, then shipping: all of shipping is the seller's.
        assert_eq!(seller_and_commission(4500, BOARD), (4050, 450));
        assert_eq!(refund_shares(4500, 499, BOARD), (499, 0));

        // Two boards of 4500 at 10 %, shipping 499: commission 900, payout
        // 8599. One board back: 450 of commission on the 4500 left.
        let two = PartTerms {
            net_minor: 9000,
            commission_bps: 1000,
            commission_minor: 900,
        };
        assert_eq!(refund_shares(0, 4500, two), (4050, 450));
        assert_eq!(refund_shares(4500, 4500, two), (4050, 450));
        assert_eq!(refund_shares(9000, 499, two), (499, 0));
    }

    #[test]
    fn a_shipping_only_refund_takes_no_commission() {
        // Refunds come out of items first, so shipping alone is only ever
        // refunded once the items are; and a part with no items to charge
        // (all discounted) gives no commission back at all.
        let free_items = PartTerms {
            net_minor: 0,
            commission_bps: 1000,
            commission_minor: 0,
        };
        assert_eq!(refund_shares(0, 499, free_items), (499, 0));
    }

    #[test]
    fn a_commission_off_the_formula_never_gives_back_more_than_it_took() {
        let odd = PartTerms {
            net_minor: 1000,
            commission_bps: 1000,
            commission_minor: 50,
        };
        assert_eq!(seller_and_commission(0, odd), (0, 0));
        assert_eq!(seller_and_commission(1000, odd), (950, 50));
    }
}
