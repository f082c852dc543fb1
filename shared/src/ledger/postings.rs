//! What each business event posts. Each function runs in the caller's
//! transaction and posts at most once per event (its reference), so a
//! redelivered message or a second settlement process changes nothing.
//!
//! A seller order's row is locked before its earning or one of its refunds
//! is posted, so the two never interleave: a refund posted before the
//! earning comes out of the clearing account and the earning nets it; one
//! posted after comes back out of the seller's balance and the commission.
//!
//! A release also locks the seller's available account, after those rows,
//! as withdrawals lock it to check the balance ([`super::lock_available`]
//! says why and in which order).

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

use super::{Account, PartTerms, PostError, Posting, post, refund_shares, seller_and_commission};

/// A captured payment (including one later refunded as a duplicate): the
/// customer's money comes into clearing.
pub async fn payment(conn: &mut PgConnection, payment: Uuid) -> Result<bool, PostError> {
    let (order, amount, currency): (Uuid, i64, String) =
        sqlx::query_as("SELECT order_id, amount_minor, currency FROM payments WHERE id = $1")
            .bind(payment)
            .fetch_one(&mut *conn)
            .await?;
    let posting = Posting {
        kind: "payment",
        reference: format!("payment:{payment}"),
        description: format!("payment for order {order}"),
        order: Some(order),
        seller_order: None,
        currency,
        legs: vec![
            (Account::CustomerFunds, -amount),
            (Account::PaymentsClearing, amount),
        ],
    };
    post(conn, posting).await
}

#[derive(sqlx::FromRow)]
struct Part {
    order_id: Uuid,
    shop_id: Uuid,
    status: String,
    payout_minor: i64,
    items_minor: i64,
    discount_minor: i64,
    commission_bps: i32,
    commission_minor: i64,
    currency: String,
}

impl Part {
    fn terms(&self) -> PartTerms {
        PartTerms {
            net_minor: self.items_minor - self.discount_minor,
            commission_bps: self.commission_bps,
            commission_minor: self.commission_minor,
        }
    }
}

async fn lock_part(conn: &mut PgConnection, seller_order: Uuid) -> Result<Part, sqlx::Error> {
    sqlx::query_as(
        "SELECT so.order_id, so.shop_id, so.status, so.payout_minor, so.items_minor,
                so.discount_minor, so.commission_bps, so.commission_minor, o.currency
           FROM seller_orders so JOIN orders o ON o.id = so.order_id
          WHERE so.id = $1 FOR NO KEY UPDATE OF so",
    )
    .bind(seller_order)
    .fetch_one(conn)
    .await
}

/// A delivered seller order: the seller earns its payout (pending until
/// `hold` has passed) and the platform its commission, both less what was
/// refunded from this seller order before delivery.
pub async fn earning(
    conn: &mut PgConnection,
    seller_order: Uuid,
    hold: Duration,
) -> Result<bool, PostError> {
    let part = lock_part(conn, seller_order).await?;
    if part.status != "delivered" {
        // Moved back by an admin before settlement saw it: the next
        // delivery posts it.
        return Ok(false);
    }
    // Refunds of this seller order already posted came out of clearing.
    let refunded_before = refunded(conn, seller_order).await?;
    let (seller_back, platform_back) = seller_and_commission(refunded_before, part.terms());
    let seller = part.payout_minor - seller_back;
    let platform = part.commission_minor - platform_back;
    let posting = Posting {
        kind: "earning",
        reference: format!("earning:{seller_order}"),
        description: format!("delivered: seller order {seller_order}"),
        order: Some(part.order_id),
        seller_order: Some(seller_order),
        currency: part.currency.clone(),
        legs: vec![
            (Account::PaymentsClearing, -(seller + platform)),
            (Account::SellerPending(part.shop_id), seller),
            (Account::Commission, platform),
        ],
    };
    let posted = post(conn, posting).await?;
    // The hold runs from the delivery, not from when this message is handled,
    // so another copy of the same delivery cannot push the payout back.
    if !posted {
        // Delivered again after an admin moved it back (which left it
        // waiting, `infinity`): the hold starts over from that delivery
        // (the earning itself stands, once).
        sqlx::query(
            "UPDATE seller_earnings e
                SET available_at = CASE WHEN e.available_at = 'infinity' THEN d.at
                                        ELSE greatest(e.available_at, d.at) END
               FROM (SELECT coalesce(delivered_at, now()) + make_interval(secs => $2) AS at
                       FROM seller_orders WHERE id = $1) d
              WHERE e.seller_order_id = $1 AND e.released_at IS NULL",
        )
        .bind(seller_order)
        .bind(hold.as_secs_f64())
        .execute(&mut *conn)
        .await?;
    } else {
        sqlx::query(
            "INSERT INTO seller_earnings (seller_order_id, shop_id, currency, amount_minor, available_at)
             SELECT $1, $2, $3, $4, coalesce(so.delivered_at, now()) + make_interval(secs => $5)
               FROM seller_orders so WHERE so.id = $1",
        )
        .bind(seller_order)
        .bind(part.shop_id)
        .bind(&part.currency)
        .bind(seller)
        .bind(hold.as_secs_f64())
        .execute(&mut *conn)
        .await?;
    }
    Ok(posted)
}

/// Money of `seller_order` refunded so far, as posted (a refund's legs
/// always credit the refunds account with the whole amount).
async fn refunded(conn: &mut PgConnection, seller_order: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(e.amount_minor), 0)::bigint
           FROM ledger_transactions t
           JOIN ledger_entries e ON e.transaction_id = t.id
           JOIN ledger_accounts a ON a.id = e.account_id
          WHERE t.kind = 'refund' AND t.seller_order_id = $1 AND a.kind = 'refunds'",
    )
    .bind(seller_order)
    .fetch_one(conn)
    .await
}

/// An earning whose hold has passed: pending becomes available. What is
/// released is what the seller-pending account holds for this seller order
/// (the earning less refunds since), summed from its entries.
pub async fn release(conn: &mut PgConnection, seller_order: Uuid) -> Result<bool, PostError> {
    let earning: Option<(Uuid, String, bool)> = sqlx::query_as(
        "SELECT shop_id, currency, released_at IS NOT NULL
           FROM seller_earnings WHERE seller_order_id = $1 FOR NO KEY UPDATE",
    )
    .bind(seller_order)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((shop, currency, released)) = earning else {
        return Ok(false);
    };
    if released {
        return Ok(false);
    }
    // From here this seller order's waiting refunds count as owed out of
    // the available balance, and (below) its money is added to it: a
    // withdrawal checking the two, under this lock, must see both or
    // neither. Without it nothing here would wait on the withdrawal (the
    // entries' foreign key takes only KEY SHARE), and a release committed
    // between its read of what is owed and its read of the balance would
    // let it pay out money the seller owes to those refunds. Taken after
    // the earning's row (and the seller order's, which the sweep holds).
    super::lock_available(conn, shop, &currency).await?;
    sqlx::query("UPDATE seller_earnings SET released_at = now() WHERE seller_order_id = $1")
        .bind(seller_order)
        .execute(&mut *conn)
        .await?;
    let amount: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(e.amount_minor), 0)::bigint
           FROM ledger_transactions t
           JOIN ledger_entries e ON e.transaction_id = t.id
           JOIN ledger_accounts a ON a.id = e.account_id
          WHERE t.seller_order_id = $1 AND a.kind = 'seller_pending' AND a.shop_id = $2",
    )
    .bind(seller_order)
    .bind(shop)
    .fetch_one(&mut *conn)
    .await?;
    if amount == 0 {
        // Refunded in full while held: nothing is left to release.
        return Ok(true);
    }
    let posting = Posting {
        kind: "release",
        reference: format!("release:{seller_order}"),
        description: format!("hold period over: seller order {seller_order}"),
        order: None,
        seller_order: Some(seller_order),
        currency,
        legs: vec![
            (Account::SellerPending(shop), -amount),
            (Account::SellerAvailable(shop), amount),
        ],
    };
    post(conn, posting).await
}

/// A refund that went through. Money that no seller had earned yet comes
/// out of clearing; money a seller had earned comes back out of the
/// seller's pending balance (or available, once released; it may go
/// negative) and the commission: items first, the platform giving back the
/// commission on the items refunded, shipping last and all the seller's.
pub async fn refund(conn: &mut PgConnection, refund: Uuid) -> Result<bool, PostError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        order_id: Uuid,
        seller_order_id: Option<Uuid>,
        amount_minor: i64,
        status: String,
        duplicate: bool,
        currency: String,
    }
    let r: Row = sqlx::query_as(
        "SELECT r.order_id, r.seller_order_id, r.amount_minor, r.status, p.duplicate, p.currency
           FROM refunds r JOIN payments p ON p.id = r.payment_id WHERE r.id = $1",
    )
    .bind(refund)
    .fetch_one(&mut *conn)
    .await?;
    if r.status != "succeeded" {
        return Ok(false);
    }
    let mut posting = Posting {
        kind: "refund",
        reference: format!("refund:{refund}"),
        description: format!("refund {refund} of order {}", r.order_id),
        order: Some(r.order_id),
        seller_order: r.seller_order_id,
        currency: r.currency,
        legs: vec![
            (Account::PaymentsClearing, -r.amount_minor),
            (Account::Refunds, r.amount_minor),
        ],
    };
    let part = match r.seller_order_id.filter(|_| !r.duplicate) {
        Some(id) => Some((id, lock_part(conn, id).await?)),
        None => None,
    };
    let Some((seller_order, part)) = part else {
        return post(conn, posting).await;
    };
    let earned: Option<bool> = sqlx::query_scalar(
        "SELECT released_at IS NOT NULL FROM seller_earnings WHERE seller_order_id = $1 FOR NO KEY UPDATE",
    )
    .bind(seller_order)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(released) = earned else {
        return post(conn, posting).await;
    };
    let before = refunded(conn, seller_order).await?;
    let (seller, platform) = refund_shares(before, r.amount_minor, part.terms());
    // Out of the available balance without its lock: a withdrawal checking
    // it meanwhile counts this refund once or twice, never not at all (see
    // `waiting_refunds_owed`), and settlement posts several shops' refunds
    // in one transaction, in message order, where taking their locks could
    // leave two batches waiting on each other.
    let from = if released {
        Account::SellerAvailable(part.shop_id)
    } else {
        Account::SellerPending(part.shop_id)
    };
    posting.legs = vec![
        (from, -seller),
        (Account::Commission, -platform),
        (Account::Refunds, r.amount_minor),
    ];
    post(conn, posting).await
}

/// A withdrawal's steps: asked for, paid out, or turned down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithdrawalStep {
    /// Available money is set aside.
    Hold,
    /// It leaves the platform for the seller's bank.
    Paid,
    /// Turned down: it is available again.
    Returned,
}

pub async fn withdrawal(
    conn: &mut PgConnection,
    withdrawal: Uuid,
    step: WithdrawalStep,
) -> Result<bool, PostError> {
    let (shop, amount, currency): (Uuid, i64, String) =
        sqlx::query_as("SELECT shop_id, amount_minor, currency FROM withdrawals WHERE id = $1")
            .bind(withdrawal)
            .fetch_one(&mut *conn)
            .await?;
    let (kind, name, legs) = match step {
        WithdrawalStep::Hold => (
            "withdrawal_hold",
            "hold",
            vec![
                (Account::SellerAvailable(shop), -amount),
                (Account::SellerWithdrawing(shop), amount),
            ],
        ),
        WithdrawalStep::Paid => (
            "withdrawal_paid",
            "paid",
            vec![
                (Account::SellerWithdrawing(shop), -amount),
                (Account::Payouts, amount),
            ],
        ),
        WithdrawalStep::Returned => (
            "withdrawal_returned",
            "returned",
            vec![
                (Account::SellerWithdrawing(shop), -amount),
                (Account::SellerAvailable(shop), amount),
            ],
        ),
    };
    let posting = Posting {
        kind,
        reference: format!("withdrawal:{withdrawal}:{name}"),
        description: format!("withdrawal {withdrawal}: {name}"),
        order: None,
        seller_order: None,
        currency,
        legs,
    };
    post(conn, posting).await
}
