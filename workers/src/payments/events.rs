//! Applies stored Stripe webhook events to orders.
//!
//! Events are read tolerantly (id, type, the object's id, status, amount and
//! metadata): Stripe's schema changes by API version and stand-ins such as
//! localstripe send older shapes. An intent's order is found by the order id
//! in its metadata first, so an event that arrives before the intent was
//! stored still finds its order. Out-of-order events never move an order
//! backwards: each case checks the order's state under its row lock.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::json;
use souk_shared::{
    contracts::StripeEventReceived,
    envelope::Envelope,
    notify,
    orders::{Actor, Change, OrderStatus, notices, status},
    topology,
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::settle;
use crate::runtime::{Failure, Handler};

#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: Object,
}

/// The event's object: a PaymentIntent or a refund here.
#[derive(Debug, Deserialize)]
pub struct Object {
    pub id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub amount: Option<i64>,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    #[serde(default)]
    pub last_payment_error: Option<serde_json::Value>,
    #[serde(default)]
    pub failure_reason: Option<String>,
}

impl Object {
    fn order_id(&self) -> Option<Uuid> {
        self.metadata.get("order_id").and_then(|id| id.parse().ok())
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
    ];

    async fn prepare(&self, _: &Envelope) -> Result<(), Failure> {
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
            "payment_intent.succeeded" => succeeded(tx, &event.data.object, corr).await,
            "payment_intent.payment_failed" => failed(tx, &event.data.object, corr).await,
            "refund.failed" | "refund.updated" | "charge.refund.updated" => {
                refund_changed(tx, &event.data.object).await
            }
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
    let amount = intent.amount.or(order.total_minor).unwrap_or(0);
    if amount <= 0 {
        return Err(Failure::permanent(anyhow::anyhow!(
            "intent {} carries no amount",
            intent.id
        )));
    }
    settle::payment_succeeded(tx, &order, &intent.id, amount, corr).await
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
/// money did not go back, so a person has to look.
async fn refund_changed(tx: &mut PgConnection, refund: &Object) -> Result<(), Failure> {
    if refund.status.as_deref() != Some("failed") {
        return Ok(());
    }
    let reason = refund
        .failure_reason
        .clone()
        .unwrap_or_else(|| "unknown".into());
    let found: Option<(Uuid, Uuid)> = sqlx::query_as(
        "UPDATE refunds SET failure = $2 WHERE stripe_refund_id = $1 RETURNING order_id, payment_id",
    )
    .bind(&refund.id)
    .bind(format!("failed at Stripe after it was accepted: {reason}"))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((order, payment)) = found else {
        return Ok(());
    };
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
