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

use crate::orders::pricing::allocate;

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

/// Splits an amount taken back from a seller order between the seller's
/// share and the commission, in proportion to what each got from it
/// (largest remainder, so the two add up exactly).
pub fn seller_and_commission(amount: i64, payout: i64, commission: i64) -> (i64, i64) {
    match allocate(amount, &[payout, commission])[..] {
        [seller, platform] => (seller, platform),
        _ => unreachable!("two weights, two shares"),
    }
}

/// The seller's and the platform's shares of a refund of `amount` after
/// `before` was refunded from the same seller order: shared as the refunds
/// so far plus this one would be, less what the earlier ones took. So the
/// shares of all the refunds add up to the split of their total, however
/// many there were (no rounding piles up on one side).
pub fn refund_shares(before: i64, amount: i64, payout: i64, commission: i64) -> (i64, i64) {
    let (seller_after, platform_after) = seller_and_commission(before + amount, payout, commission);
    let (seller_before, platform_before) = seller_and_commission(before, payout, commission);
    (
        seller_after - seller_before,
        platform_after - platform_before,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_small_refunds_share_like_one_refund_of_their_total() {
        // Split one at a time, every 1-unit refund would go to the seller.
        assert_eq!(seller_and_commission(1, 4549, 450), (1, 0));
        let (mut seller, mut platform) = (0, 0);
        for before in 0..4999 {
            let (s, p) = refund_shares(before, 1, 4549, 450);
            assert_eq!(s + p, 1);
            seller += s;
            platform += p;
        }
        assert_eq!(
            (seller, platform),
            (4549, 450),
            "all of it, shared as earned"
        );
    }

    #[test]
    fn a_refund_is_shared_like_the_earning_was() {
        // 10 % commission on 4500 of items, 499 shipping: payout 4549, commission 450.
        assert_eq!(seller_and_commission(4999, 4549, 450), (4549, 450));
        assert_eq!(seller_and_commission(1000, 4549, 450), (910, 90));
        let (s, c) = seller_and_commission(333, 4549, 450);
        assert_eq!(s + c, 333);
    }
}
