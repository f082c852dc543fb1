//! Applies stored Stripe webhook events to orders.
//!
//! Events are read tolerantly (id, type, the object's id, status, amount and
//! metadata): Stripe's schema changes by API version and stand-ins such as
//! localstripe send older shapes. An intent's order is found by the order id
//! in its metadata first, so an event that arrives before the intent was
//! stored still finds its order. Out-of-order events never move an order
//! backwards: each case checks the order's state under its row lock.
//!
//! Subscription and invoice events move memberships the same way: through
//! their state machine, ignoring news older than the last applied.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::json;
use souk_shared::{
    contracts::{PaymentMethodConfirmed, StripeEventReceived},
    envelope::Envelope,
    inventory,
    membership::{self, MembershipStatus, News},
    notify,
    orders::{Actor, Change, OrderStatus, notices, status},
    topology,
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{settle, stripe_api};
use crate::runtime::{Failure, Handler};

/// An event's envelope. Its object is read only for the types Souk uses:
/// Stripe sends others whose objects have no id (localstripe's
/// `balance.available`), and those must be acknowledged, not parked.
#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// When Stripe made the change, in seconds.
    #[serde(default)]
    pub created: Option<i64>,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

impl Event {
    fn object(&self) -> Result<Object, Failure> {
        Object::deserialize(&self.data.object).map_err(|e| {
            Failure::permanent(anyhow::anyhow!(
                "unreadable {} object in event {}: {e}",
                self.kind,
                self.id
            ))
        })
    }
}

/// The event's object: a PaymentIntent, refund, SetupIntent, subscription
/// or invoice.
#[derive(Debug, Deserialize)]
pub struct Object {
    pub id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub amount: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    #[serde(default)]
    pub last_payment_error: Option<serde_json::Value>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub cancel_at_period_end: Option<bool>,
    #[serde(default)]
    pub current_period_end: Option<i64>,
    #[serde(default)]
    pub items: Option<stripe_api::SubscriptionItems>,
    /// An invoice's subscription: top level in older API versions, under
    /// `parent.subscription_details` in newer ones.
    #[serde(default)]
    pub subscription: Option<String>,
    #[serde(default)]
    pub parent: Option<serde_json::Value>,
    #[serde(default)]
    pub billing_reason: Option<String>,
}

impl Object {
    fn metadata_id(&self, key: &str) -> Option<Uuid> {
        self.metadata.get(key).and_then(|id| id.parse().ok())
    }

    fn order_id(&self) -> Option<Uuid> {
        self.metadata_id("order_id")
    }

    fn invoice_subscription(&self) -> Option<&str> {
        self.subscription.as_deref().or_else(|| {
            self.parent
                .as_ref()?
                .pointer("/subscription_details/subscription")?
                .as_str()
        })
    }
}

pub struct StripeEvents;

impl Handler for StripeEvents {
    type Prepared = ();
    const GROUP: &'static str = topology::STRIPE_EVENTS.name;
    const BINDINGS: &'static [&'static str] = topology::STRIPE_EVENTS.bindings;
    const EMITS: &'static [&'static str] = &[
        "notify.email",
        "payment.refund_requested",
        "payment.intent_cancel_requested",
        "payment.captured",
        "payment_method.confirmed",
    ];

    async fn prepare(&self, _: &Envelope) -> Result<(), Failure> {
        Ok(())
    }

    /// A payment sells its order's stock: a batch of payment events locks
    /// all of it first (the orders named by the intents' metadata, or by
    /// their stored intent id).
    async fn lock_batch(&self, tx: &mut PgConnection, msgs: &[&Envelope]) -> Result<(), Failure> {
        let events: Vec<String> = msgs
            .iter()
            .filter_map(|m| m.payload::<StripeEventReceived>().ok())
            .map(|r| r.event_id)
            .collect();
        let orders: Vec<Uuid> = sqlx::query_scalar(
            "WITH e AS (
                 SELECT payload #>> '{data,object,metadata,order_id}' AS named,
                        payload #>> '{data,object,id}' AS intent
                   FROM stripe_events WHERE id = ANY($1) AND type LIKE 'payment_intent.%')
             SELECT o.id FROM e JOIN orders o
                 ON o.id = CASE WHEN e.named ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$'
                                THEN e.named::uuid END
             UNION
             SELECT o.id FROM e JOIN orders o ON o.payment_intent_id = e.intent",
        )
        .bind(&events)
        .fetch_all(&mut *tx)
        .await?;
        inventory::lock_for_orders(tx, &orders).await?;
        Ok(())
    }

    async fn apply(&self, tx: &mut PgConnection, msg: &Envelope, _: ()) -> Result<(), Failure> {
        let received: StripeEventReceived = msg.payload().map_err(Failure::permanent)?;
        let payload: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT payload FROM stripe_events WHERE id = $1")
                .bind(&received.event_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(payload) = payload else {
            return Err(Failure::permanent(anyhow::anyhow!(
                "no stored event {}",
                received.event_id
            )));
        };
        let event: Event = serde_json::from_value(payload).map_err(|e| {
            Failure::permanent(anyhow::anyhow!(
                "unreadable event {}: {e}",
                received.event_id
            ))
        })?;
        let corr = msg.correlation_id.as_str();
        match event.kind.as_str() {
            "payment_intent.succeeded" => succeeded(tx, &event.object()?, corr).await,
            "payment_intent.payment_failed" => failed(tx, &event.object()?, corr).await,
            "refund.failed" | "refund.updated" | "charge.refund.updated" => {
                refund_changed(tx, &event.object()?, corr).await
            }
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted" => subscription_changed(tx, &event, corr).await,
            "invoice.payment_succeeded" | "invoice.paid" | "invoice.payment_failed" => {
                invoice_settled(tx, &event, corr).await
            }
            "setup_intent.succeeded" => setup_succeeded(tx, &event.object()?, corr).await,
            other => {
                tracing::debug!(event = %event.id, kind = other, "event not used");
                Ok(())
            }
        }
    }
}

/// The order an intent is for: by its metadata, else by the stored intent id.
async fn order_of(
    tx: &mut PgConnection,
    intent: &Object,
) -> Result<Option<settle::LockedOrder>, sqlx::Error> {
    let id = match intent.order_id() {
        Some(id) => Some(id),
        None => {
            sqlx::query_scalar("SELECT id FROM orders WHERE payment_intent_id = $1")
                .bind(&intent.id)
                .fetch_optional(&mut *tx)
                .await?
        }
    };
    match id {
        Some(id) => settle::lock(tx, id).await,
        None => Ok(None),
    }
}

async fn succeeded(tx: &mut PgConnection, intent: &Object, corr: &str) -> Result<(), Failure> {
    let Some(order) = order_of(tx, intent).await? else {
        tracing::warn!(intent = %intent.id, "a payment for no order of ours");
        return Ok(());
    };
    // What Stripe says was paid, never what we expected: an event without it
    // is parked for an admin rather than taken as the order's total.
    let Some(amount) = intent.amount.filter(|a| *a > 0) else {
        return Err(Failure::permanent(anyhow::anyhow!(
            "intent {} carries no amount",
            intent.id
        )));
    };
    let currency = intent.currency.as_deref();
    settle::payment_succeeded(tx, &order, &intent.id, (amount, currency), corr).await
}

async fn failed(tx: &mut PgConnection, intent: &Object, corr: &str) -> Result<(), Failure> {
    let Some(order) = order_of(tx, intent).await? else {
        return Ok(());
    };
    let ours = order
        .payment_intent_id
        .as_deref()
        .is_none_or(|id| id == intent.id);
    let from = order.status();
    if !ours || !matches!(from, OrderStatus::Reserved | OrderStatus::AwaitingPayment) {
        // Paid meanwhile, failed before, expired or cancelled: nothing moves back.
        return Ok(());
    }
    let reason = intent
        .last_payment_error
        .as_ref()
        .and_then(|e| e.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or("the payment was declined")
        .to_string();
    if order.payment_method_id.is_some() {
        return settle::declined_off_session(tx, order.id, &reason).await;
    }
    let change = Change {
        note: Some(&reason),
        data: Some(json!({ "payment_intent_id": intent.id })),
        ..Change::default()
    };
    status::move_order(
        tx,
        order.id,
        OrderStatus::PaymentFailed,
        Actor::System,
        change,
    )
    .await?;
    let until: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT reserved_until FROM orders WHERE id = $1")
            .bind(order.id)
            .fetch_one(&mut *tx)
            .await?;
    let extra = json!({ "reason": reason, "pay_until": until });
    notices::to_customer(
        tx,
        order.id,
        "payment_failed",
        Some("payment_failed"),
        extra,
        corr,
    )
    .await?;
    Ok(())
}

/// A refund Stripe accepted and later failed (a closed card, say): the
/// money did not go back to the card. It is still owed to the customer, so
/// the refund and its ledger posting stand (the seller's share was rightly
/// taken back); the payment is flagged for an admin to pay it another way,
/// and the customer is told it is delayed. Stripe says so in more than one
/// event (`refund.failed`, `refund.updated`): the first one does this.
async fn refund_changed(tx: &mut PgConnection, refund: &Object, corr: &str) -> Result<(), Failure> {
    if refund.status.as_deref() != Some("failed") {
        return Ok(());
    }
    let reason = refund
        .failure_reason
        .clone()
        .unwrap_or_else(|| "unknown".into());
    let found: Option<(Uuid, Uuid, i64, String)> = sqlx::query_as(
        "UPDATE refunds SET failure = $2 WHERE stripe_refund_id = $1 AND failure IS NULL
         RETURNING order_id, payment_id, amount_minor, reason",
    )
    .bind(&refund.id)
    .bind(format!("failed at Stripe after it was accepted: {reason}"))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((order, payment, amount, why)) = found else {
        // Stripe's news may come before the payments worker recorded its
        // answer (it retries, or waits out a crashed peer's lease): a
        // refund of ours (by its metadata) with no Stripe id yet is tried
        // again later rather than its failure dropped.
        let unanswered: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM refunds WHERE id = $1 AND status = 'requested')",
        )
        .bind(refund.metadata_id("refund_id"))
        .fetch_one(&mut *tx)
        .await?;
        if unanswered {
            return Err(Failure::transient(anyhow::anyhow!(
                "refund {} failed at Stripe before its answer was recorded; trying again",
                refund.id
            )));
        }
        return Ok(());
    };
    let extra = json!({ "amount_minor": amount, "reason": why });
    notices::to_customer(
        tx,
        order,
        "refund_failed",
        Some("refund_failed"),
        extra,
        corr,
    )
    .await?;
    let flag = format!("refund {} failed at Stripe: {reason}", refund.id);
    sqlx::query("UPDATE payments SET flagged_reason = $2 WHERE id = $1")
        .bind(payment)
        .bind(&flag)
        .execute(&mut *tx)
        .await?;
    notify::admins(
        tx,
        "refund_failed",
        &json!({ "order_id": order, "reason": flag }),
    )
    .await?;
    Ok(())
}

fn event_time(event: &Event) -> Option<chrono::DateTime<chrono::Utc>> {
    event
        .created
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
}

async fn membership_of(
    tx: &mut PgConnection,
    metadata_id: Option<Uuid>,
    subscription: Option<&str>,
) -> Result<Option<Uuid>, sqlx::Error> {
    if metadata_id.is_some() {
        return Ok(metadata_id);
    }
    let Some(subscription) = subscription else {
        return Ok(None);
    };
    sqlx::query_scalar("SELECT id FROM memberships WHERE stripe_subscription_id = $1")
        .bind(subscription)
        .fetch_optional(&mut *tx)
        .await
}

/// A subscription created, changed or ended: its status, whether it ends at
/// the period's end, and when the period ends.
async fn subscription_changed(
    tx: &mut PgConnection,
    event: &Event,
    corr: &str,
) -> Result<(), Failure> {
    let sub = &event.object()?;
    let Some(membership) =
        membership_of(tx, sub.metadata_id("membership_id"), Some(&sub.id)).await?
    else {
        tracing::warn!(subscription = %sub.id, "a subscription for no membership of ours");
        return Ok(());
    };
    sqlx::query(
        "UPDATE memberships SET stripe_subscription_id = coalesce(stripe_subscription_id, $2) WHERE id = $1",
    )
    .bind(membership)
    .bind(&sub.id)
    .execute(&mut *tx)
    .await?;
    let status = if event.kind == "customer.subscription.deleted" {
        Some(MembershipStatus::Canceled)
    } else {
        sub.status
            .as_deref()
            .and_then(MembershipStatus::from_stripe)
    };
    let news = News {
        status,
        cancel_at_period_end: sub.cancel_at_period_end,
        current_period_end: stripe_api::period_end(sub.current_period_end, sub.items.as_ref())
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0)),
        at: event_time(event),
    };
    membership::apply(tx, membership, news, corr).await?;
    Ok(())
}

/// An invoice of a subscription paid (the membership is active) or not: a
/// first payment leaves it incomplete, a renewal makes it past due while
/// Stripe retries.
async fn invoice_settled(tx: &mut PgConnection, event: &Event, corr: &str) -> Result<(), Failure> {
    let invoice = &event.object()?;
    let Some(membership) = membership_of(tx, None, invoice.invoice_subscription()).await? else {
        // Not a membership's, or the subscription is not stored yet: its
        // creation answer and `customer.subscription.*` carry the status.
        tracing::debug!(invoice = %invoice.id, "an invoice for no membership of ours");
        return Ok(());
    };
    let status = match (event.kind.as_str(), invoice.billing_reason.as_deref()) {
        ("invoice.payment_failed", Some("subscription_create")) => MembershipStatus::Incomplete,
        ("invoice.payment_failed", _) => MembershipStatus::PastDue,
        _ => MembershipStatus::Active,
    };
    let news = News {
        status: Some(status),
        at: event_time(event),
        ..News::default()
    };
    membership::apply(tx, membership, news, corr).await?;
    Ok(())
}

/// The customer confirmed a SetupIntent: the payments worker fetches the
/// card and keeps it (the API's confirm call does the same; whichever comes
/// first wins, the other finds nothing to do).
async fn setup_succeeded(
    tx: &mut PgConnection,
    intent: &Object,
    corr: &str,
) -> Result<(), Failure> {
    let Some(method) = intent.metadata_id("payment_method_id") else {
        return Ok(());
    };
    let confirmed = PaymentMethodConfirmed {
        payment_method_id: method,
    };
    souk_shared::outbox::enqueue(tx, &Envelope::new(&confirmed, corr)).await?;
    Ok(())
}
