//! What a successful payment or a finished refund does to an order. Every
//! function here runs in the caller's transaction with the order's row
//! locked, so the state checks and the changes they allow are one step.

use serde_json::json;
use souk_shared::{
    contracts::{IntentCancelRequested, PaymentCaptured, RefundSucceeded},
    coupons,
    envelope::Envelope,
    inventory, notify,
    orders::{
        Actor, Change, OrderStatus, SellerOrderStatus, cancel, notices,
        refunds::{self, Refund},
        status,
    },
    outbox,
};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::runtime::Failure;

/// The order as the payment rules need it, read under its row lock.
#[derive(Debug, sqlx::FromRow)]
pub struct LockedOrder {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub status: String,
    pub stock: String,
    pub payment_intent_id: Option<String>,
    pub total_minor: Option<i64>,
    pub currency: String,
    pub coupon_id: Option<Uuid>,
    /// A saved card charged off session: the replenisher tells the customer
    /// when it fails, not the payment flow.
    pub payment_method_id: Option<Uuid>,
}

impl LockedOrder {
    pub fn status(&self) -> OrderStatus {
        OrderStatus::parse(&self.status).expect("statuses are checked by the database")
    }
}

pub async fn lock(tx: &mut PgConnection, order: Uuid) -> Result<Option<LockedOrder>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, customer_id, status, stock, payment_intent_id, total_minor, currency, coupon_id,
                payment_method_id
           FROM orders WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(order)
    .fetch_optional(tx)
    .await
}

/// A saved card charged off session (a replenishment order) was declined:
/// the order fails and keeps why. Its customer is not asked to pay again:
/// the replenisher cancels it, tells them, and follows the schedule's policy.
pub async fn declined_off_session(
    tx: &mut PgConnection,
    order: Uuid,
    message: &str,
) -> Result<(), Failure> {
    let change = Change::note(message);
    status::move_order(tx, order, OrderStatus::PaymentFailed, Actor::System, change).await?;
    sqlx::query("UPDATE orders SET failure_reason = $2 WHERE id = $1")
        .bind(order)
        .bind(format!("the saved card was declined: {message}"))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Stripe would not open a PaymentIntent for the order: it is cancelled
/// with Stripe's reason (its stock released, the customer told why), and
/// the admins hear of it, since it is usually the platform's to fix (a
/// minimum amount, a currency).
pub async fn unpayable(
    tx: &mut PgConnection,
    order: Uuid,
    message: &str,
    corr: &str,
) -> Result<(), Failure> {
    tracing::warn!(%order, message, "Stripe refused the order's PaymentIntent; cancelling it");
    let reason = format!("the payment could not be set up: {message}");
    cancel::cancel_order(tx, order, None, Actor::System, &reason, corr).await?;
    let data = json!({ "order_id": order, "reason": reason });
    notify::admins(tx, "payment_refused", &data).await?;
    Ok(())
}

async fn record_payment(
    tx: &mut PgConnection,
    order: &LockedOrder,
    intent: &str,
    (amount, currency): (i64, &str),
    flagged: Option<&str>,
    corr: &str,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO payments (id, order_id, payment_intent_id, amount_minor, currency, duplicate, flagged_reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(order.id)
    .bind(intent)
    .bind(amount)
    .bind(currency.to_ascii_lowercase())
    .bind(flagged.is_some())
    .bind(flagged)
    .execute(&mut *tx)
    .await?;
    let captured = PaymentCaptured { payment_id: id };
    outbox::enqueue(tx, &Envelope::new(&captured, corr)).await?;
    Ok(id)
}

/// A successful charge of `intent` for `order`, whatever state the order is
/// in: paid if it still can be, otherwise recorded and refunded. `paid` is
/// the amount and currency charged (the currency when Stripe says it).
pub async fn payment_succeeded(
    tx: &mut PgConnection,
    order: &LockedOrder,
    intent: &str,
    (amount, currency): (i64, Option<&str>),
    corr: &str,
) -> Result<(), Failure> {
    let seen: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM payments WHERE payment_intent_id = $1)")
            .bind(intent)
            .fetch_one(&mut *tx)
            .await?;
    if seen {
        // Another event about the same charge.
        return Ok(());
    }
    if refunds::order_payment(tx, order.id).await?.is_some() {
        let reason = "a second successful payment for an order already paid";
        let paid = (amount, currency.unwrap_or(&order.currency));
        return flagged(tx, order, intent, paid, reason, corr).await;
    }
    let wrong_currency = currency.is_some_and(|c| !c.eq_ignore_ascii_case(&order.currency));
    if wrong_currency || order.total_minor.is_some_and(|total| total != amount) {
        // Not what the order costs (an intent made elsewhere carrying this
        // order's id): it never pays the order, and goes back.
        let reason = "a payment whose amount or currency is not the order's";
        let paid = (amount, currency.unwrap_or(&order.currency));
        return flagged(tx, order, intent, paid, reason, corr).await;
    }
    use OrderStatus::*;
    match order.status() {
        Reserved | AwaitingPayment | PaymentFailed if order.stock == "reserved" => {
            if let Some(other) = order
                .payment_intent_id
                .as_deref()
                .filter(|id| *id != intent)
            {
                // Paid through another intent than the stored one: that one
                // will not be needed.
                let cancel = IntentCancelRequested {
                    order_id: order.id,
                    payment_intent_id: other.to_string(),
                };
                outbox::enqueue(tx, &Envelope::new(&cancel, corr)).await?;
            }
            paid(tx, order, Some((intent, amount)), corr).await
        }
        Expired => {
            // Paid after the reservation ran out: keep the sale if every
            // item is still there and its coupon (if any) still has a use
            // for it, otherwise give the money back.
            //
            // The coupon is checked again because an expired order no
            // longer counts against its limits (`coupons::in_flight`): its
            // use may have gone to another order meanwhile, and paying this
            // one anyway would make two discounted orders of a single use
            // (`redeem` would refuse to count it, but the discount would
            // stand). Its row stays locked until the sale is recorded, as at
            // checkout, so no checkout takes the use in between.
            //
            // Locks: the order (the caller's), then its stock, then the
            // coupon, the order `paid` takes them in (it sells the stock,
            // then redeems the coupon): the coupon taken before the stock
            // would close a circle with a payment in time holding the stock
            // and waiting to redeem the same coupon. So the stock is reserved
            // first, in a savepoint, and a used-up coupon rolls it back (its
            // low-stock alerts too) before the refund.
            let wanted = inventory::of_order(tx, order.id).await?;
            let mut revival = tx.begin().await?;
            let refused = match inventory::reserve(&mut revival, &wanted, corr).await? {
                Err(_) => Some(
                    "the payment arrived after the reservation ran out and the items had sold \
                     out meanwhile; it has been refunded",
                ),
                Ok(()) => match order.coupon_id {
                    None => None,
                    Some(coupon) => {
                        let left = coupons::use_left_for(
                            &mut revival,
                            coupon,
                            order.customer_id,
                            order.id,
                        )
                        .await?;
                        match left {
                            Ok(()) => None,
                            Err(coupons::Refusal::UsedUpByYou) => Some(
                                "the payment arrived after the reservation ran out, and meanwhile \
                                 you had used the order's coupon as often as it allows on another \
                                 order; it has been refunded",
                            ),
                            Err(_) => Some(
                                "the payment arrived after the reservation ran out, and the \
                                 order's coupon had been used up by other orders meanwhile; it \
                                 has been refunded",
                            ),
                        }
                    }
                },
            };
            match refused {
                None => {
                    revival.commit().await?;
                    sqlx::query(
                        "UPDATE orders SET stock = 'reserved', failure_reason = NULL WHERE id = $1",
                    )
                    .bind(order.id)
                    .execute(&mut *tx)
                    .await?;
                    paid(tx, order, Some((intent, amount)), corr).await
                }
                Some(reason) => {
                    revival.rollback().await?;
                    unbuyable(tx, order, intent, amount, reason, corr).await
                }
            }
        }
        _ => {
            let reason = "the order had been cancelled or could not be fulfilled; the payment has been refunded";
            unbuyable(tx, order, intent, amount, reason, corr).await
        }
    }
}

/// Marks a reserved order paid: its stock sold, the payment recorded, its
/// seller orders paid, the coupon counted, everyone told. `payment` is
/// `None` for an order with nothing to pay (a total of zero).
pub async fn paid(
    tx: &mut PgConnection,
    order: &LockedOrder,
    payment: Option<(&str, i64)>,
    corr: &str,
) -> Result<(), Failure> {
    let sold = inventory::of_order(tx, order.id).await?;
    let committed = sqlx::query(
        "UPDATE orders SET stock = 'committed', paid_at = now(),
                payment_intent_id = coalesce(payment_intent_id, $2)
          WHERE id = $1 AND stock = 'reserved'",
    )
    .bind(order.id)
    .bind(payment.map(|(intent, _)| intent))
    .execute(&mut *tx)
    .await?;
    if committed.rows_affected() != 1 {
        return Err(Failure::permanent(anyhow::anyhow!(
            "order {} holds no reserved stock to sell",
            order.id
        )));
    }
    inventory::sell(tx, &sold, &format!("sold: order {}", order.id)).await?;
    if let Some((intent, amount)) = payment {
        record_payment(tx, order, intent, (amount, &order.currency), None, corr).await?;
    }
    let data = json!({ "payment_intent_id": payment.map(|(intent, _)| intent) });
    let change = Change {
        data: Some(data),
        ..Change::default()
    };
    status::move_order(tx, order.id, OrderStatus::Paid, Actor::System, change).await?;
    let parts = status::move_pending_parts(
        tx,
        order.id,
        SellerOrderStatus::Paid,
        Actor::System,
        Change::default(),
    )
    .await?;
    for part in parts {
        notices::to_seller(tx, part, "seller_new_order", "new_order", json!({}), corr).await?;
    }
    if let Some(coupon) = order.coupon_id
        && !coupons::redeem(tx, coupon, order.customer_id, order.id).await?
    {
        // Not meant to happen: checkout counts the orders in flight against
        // the limit, and a payment after expiry checks it again (above).
        // Reaching it means a use was counted some other way (a limit
        // changed by hand, say). The order keeps its discount (priced while
        // the coupon was valid, and paid for), but the coupon gave more than
        // it had: admins are told.
        tracing::warn!(order = %order.id, %coupon, "a paid order's coupon was already used up");
        let data = json!({
            "order_id": order.id, "coupon_id": coupon,
            "reason": "the order was paid with a coupon whose uses had all been counted",
        });
        notify::admins(tx, "coupon_over_limit", &data).await?;
    }
    notices::to_customer(tx, order.id, "order_receipt", None, json!({}), corr).await?;
    Ok(())
}

/// A payment for an order that can no longer be fulfilled: it counts as
/// the order's payment and all of it goes back.
async fn unbuyable(
    tx: &mut PgConnection,
    order: &LockedOrder,
    intent: &str,
    amount: i64,
    reason: &str,
    corr: &str,
) -> Result<(), Failure> {
    let payment = record_payment(tx, order, intent, (amount, &order.currency), None, corr).await?;
    refund(tx, order.id, payment, None, amount, reason, corr).await?;
    sqlx::query("UPDATE orders SET failure_reason = $2, payment_intent_id = coalesce(payment_intent_id, $3) WHERE id = $1")
        .bind(order.id)
        .bind(reason)
        .bind(intent)
        .execute(&mut *tx)
        .await?;
    let change = Change::note(reason);
    status::move_pending_parts(
        tx,
        order.id,
        SellerOrderStatus::Cancelled,
        Actor::System,
        change,
    )
    .await?;
    let extra = json!({ "status": order.status, "reason": reason });
    notices::to_customer(
        tx,
        order.id,
        "order_failed",
        Some("order_failed"),
        extra,
        corr,
    )
    .await?;
    Ok(())
}

/// A payment that does not pay the order (a second one, or not the
/// order's amount): recorded with the reason, refunded in full, flagged for
/// admins.
async fn flagged(
    tx: &mut PgConnection,
    order: &LockedOrder,
    intent: &str,
    (amount, currency): (i64, &str),
    reason: &str,
    corr: &str,
) -> Result<(), Failure> {
    tracing::warn!(order = %order.id, intent, reason, "payment not taken; refunding it");
    let payment = record_payment(tx, order, intent, (amount, currency), Some(reason), corr).await?;
    refund(tx, order.id, payment, None, amount, reason, corr).await?;
    let data = json!({ "order_id": order.id, "payment_intent_id": intent, "reason": reason });
    notify::admins(tx, "payment_flagged", &data).await?;
    Ok(())
}

/// Decides a refund (the order's row is locked by the caller).
pub async fn refund(
    tx: &mut PgConnection,
    order: Uuid,
    payment: Uuid,
    seller_order: Option<Uuid>,
    amount: i64,
    reason: &str,
    corr: &str,
) -> Result<(), Failure> {
    let request = Refund {
        order,
        payment,
        seller_order,
        amount_minor: amount,
        reason,
    };
    match refunds::request(tx, request, corr).await? {
        Some(_) => Ok(()),
        None => Err(Failure::permanent(anyhow::anyhow!(
            "refund of {amount} would exceed what is left of payment {payment}"
        ))),
    }
}

/// Stripe answered a refund: record it, and move the seller order and the
/// order to refunded once all their money is back.
pub async fn refund_answered(
    tx: &mut PgConnection,
    refund: Uuid,
    answer: Result<String, String>,
    corr: &str,
) -> Result<(), Failure> {
    let order: Option<Uuid> = sqlx::query_scalar("SELECT order_id FROM refunds WHERE id = $1")
        .bind(refund)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(order) = order else {
        return Err(Failure::permanent(anyhow::anyhow!("no refund {refund}")));
    };
    // The order first, as everywhere: refunds are decided under its lock.
    let order = lock(tx, order).await?.expect("a refund's order exists");
    #[derive(sqlx::FromRow)]
    struct Row {
        payment_id: Uuid,
        seller_order_id: Option<Uuid>,
        amount_minor: i64,
        reason: String,
        status: String,
        duplicate: bool,
    }
    let r: Row = sqlx::query_as(
        "SELECT r.payment_id, r.seller_order_id, r.amount_minor, r.reason, r.status, p.duplicate
           FROM refunds r JOIN payments p ON p.id = r.payment_id
          WHERE r.id = $1 FOR NO KEY UPDATE OF r",
    )
    .bind(refund)
    .fetch_one(&mut *tx)
    .await?;
    if r.status != "requested" {
        return Ok(());
    }
    let stripe_id = match answer {
        Ok(id) => id,
        Err(failure) => {
            sqlx::query("UPDATE refunds SET status = 'failed', failure = $2, completed_at = now() WHERE id = $1")
                .bind(refund)
                .bind(&failure)
                .execute(&mut *tx)
                .await?;
            // A cancel counted this refund as on its way and asked only for
            // the rest: the money is still owed, so it is asked for again
            // (once). The customer and seller hear of it when it goes
            // through, as of any refund; admins only for the record.
            if let Some(replacement) = refunds::replace_failed(tx, refund, corr).await? {
                tracing::warn!(%refund, %replacement, failure, "Stripe refused a refund of a cancelled part; asked again");
                let data = json!({
                    "order_id": order.id, "refund_id": refund, "replaced_by": replacement,
                    "reason": format!("refund {refund} refused by Stripe: {failure}"),
                });
                notify::admins(tx, "refund_replaced", &data).await?;
                return Ok(());
            }
            let flag = format!("refund {refund} refused by Stripe: {failure}");
            sqlx::query("UPDATE payments SET flagged_reason = $2 WHERE id = $1")
                .bind(r.payment_id)
                .bind(&flag)
                .execute(&mut *tx)
                .await?;
            let data = json!({ "order_id": order.id, "refund_id": refund, "reason": flag });
            notify::admins(tx, "refund_failed", &data).await?;
            // The customer waits for that money: say it is delayed and an
            // admin has it in hand.
            let extra = json!({ "amount_minor": r.amount_minor, "reason": r.reason });
            notices::to_customer(
                tx,
                order.id,
                "refund_failed",
                Some("refund_failed"),
                extra.clone(),
                corr,
            )
            .await?;
            // The seller whose part it was hears too: the customer may come
            // to them, and nothing has left their balance.
            if let Some(part) = r.seller_order_id {
                notices::to_seller(
                    tx,
                    part,
                    "seller_refund_failed",
                    "refund_failed",
                    extra,
                    corr,
                )
                .await?;
            }
            return Ok(());
        }
    };
    sqlx::query(
        "UPDATE refunds SET status = 'succeeded', stripe_refund_id = $2, completed_at = now() WHERE id = $1",
    )
    .bind(refund)
    .bind(&stripe_id)
    .execute(&mut *tx)
    .await?;
    let succeeded = RefundSucceeded { refund_id: refund };
    outbox::enqueue(tx, &Envelope::new(&succeeded, corr)).await?;
    if !r.duplicate {
        sqlx::query(
            "UPDATE orders SET refunded_minor = refunded_minor + $2, updated_at = now()
              WHERE id = $1",
        )
        .bind(order.id)
        .bind(r.amount_minor)
        .execute(&mut *tx)
        .await?;
        if let Some(part) = r.seller_order_id {
            sqlx::query(
                "UPDATE seller_orders SET refunded_minor = refunded_minor + $2, updated_at = now()
                  WHERE id = $1",
            )
            .bind(part)
            .bind(r.amount_minor)
            .execute(&mut *tx)
            .await?;
        }
        // A cancelled part with all its money back is refunded; the order
        // only once all of its money is back and no part is still to be
        // fulfilled: a part refunded in full while shipping keeps the
        // order `paid` (its earning nets the refund, so its seller is not
        // paid for it), and that part's cancel finishes the order instead.
        let change = Change::note(&r.reason);
        refunds::settle(tx, order.id, r.seller_order_id, Actor::System, change).await?;
    }
    let extra = json!({ "amount_minor": r.amount_minor, "reason": r.reason });
    if let Some(part) = r.seller_order_id.filter(|_| !r.duplicate) {
        // The seller's share of it comes out of their balance: they hear of it.
        let template = "seller_refund_issued";
        notices::to_seller(tx, part, template, "refund_issued", extra.clone(), corr).await?;
    }
    notices::to_customer(tx, order.id, "refund_issued", None, extra, corr).await?;
    Ok(())
}
