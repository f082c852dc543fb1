//! The payments worker: two consumer groups in one process.
//!
//! - [`Payments`] (`payments`) makes the Stripe calls: a PaymentIntent once
//!   an order's stock is reserved, cancelling intents nobody will pay, and
//!   refunds. Each call runs in `prepare`, outside any transaction and under
//!   a lease, with an idempotency key derived from what it is about; `apply`
//!   then records the answer.
//! - [`events::StripeEvents`] (`stripe-events`) applies the webhook events
//!   the API stored to the payment state machine. No outside calls, so
//!   several events are applied per transaction when they queue up.

pub mod events;
pub mod recurring;
pub mod settle;
pub mod stripe_api;

use std::time::Duration;

use souk_shared::{
    config::{ConfigError, Env},
    contracts::{
        IntentCancelRequested, MembershipCancelRequested, MembershipPlanCreated,
        MembershipRequested, OrderCancelled, OrderExpired, PaymentMethodConfirmed,
        PaymentMethodRemoved, PaymentMethodSetupRequested, RefundRequested, StockReserved,
    },
    envelope::Envelope,
    orders::{Actor, Change, OrderStatus, status},
    topology,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::runtime::{Failure, Handler};
use stripe_api::{CallError, Intent, Stripe, StripeConfig};

#[derive(Debug, Clone)]
pub struct PaymentsConfig {
    pub stripe: StripeConfig,
    /// How long one process holds a message while it talks to Stripe.
    pub lease: Duration,
}

impl PaymentsConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            stripe: StripeConfig::from_env(env)?,
            lease: env.millis("PAYMENTS_LEASE_MS", 30_000)?,
        })
    }
}

pub struct Payments {
    stripe: Stripe,
    pool: PgPool,
    lease: Duration,
}

impl Payments {
    pub fn new(config: &PaymentsConfig, pool: PgPool) -> anyhow::Result<Self> {
        Ok(Self {
            stripe: Stripe::new(&config.stripe)?,
            pool,
            lease: config.lease,
        })
    }
}

/// What a Stripe call came back with, for `apply` to record.
#[derive(Clone)]
pub enum Answer {
    /// Nothing was called: the message found nothing to do.
    Nothing,
    Intent {
        order: Uuid,
        intent: Intent,
    },
    /// An order with nothing to pay.
    Free {
        order: Uuid,
    },
    /// Stripe's refund id, or why it refused.
    Refund {
        refund: Uuid,
        result: Result<String, String>,
    },
    /// A saved card charged off session was declined.
    Declined {
        order: Uuid,
        message: String,
    },
    /// Stripe refused to open a PaymentIntent for the order at all (an
    /// amount below its minimum, a currency the account does not take).
    Unpayable {
        order: Uuid,
        message: String,
    },
    Recurring(recurring::Recurring),
}

fn failure(e: CallError) -> Failure {
    match e {
        CallError::Refused { .. } => Failure::permanent(e),
        CallError::Unavailable(_) => Failure::transient(e),
    }
}

impl Payments {
    async fn create_intent(&self, order: Uuid) -> Result<Answer, Failure> {
        #[derive(sqlx::FromRow)]
        struct Row {
            status: String,
            total_minor: Option<i64>,
            currency: String,
            payment_intent_id: Option<String>,
            customer: Option<String>,
            card: Option<String>,
            /// The order names a saved card (charged off session).
            saved_card: bool,
        }
        // Only a card still active is charged: one removed after the order
        // was placed (the schedule moved to another card meanwhile) was
        // detached at Stripe or is about to be, and the customer asked for
        // it to be charged no more.
        let row: Option<Row> = sqlx::query_as(
            "SELECT o.status, o.total_minor, o.currency, o.payment_intent_id,
                    c.stripe_customer_id AS customer, pm.stripe_payment_method_id AS card,
                    o.payment_method_id IS NOT NULL AS saved_card
               FROM orders o
               LEFT JOIN payment_methods pm ON pm.id = o.payment_method_id AND pm.status = 'active'
               LEFT JOIN stripe_customers c ON c.user_id = o.customer_id
              WHERE o.id = $1",
        )
        .bind(order)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(Failure::permanent(anyhow::anyhow!("no order {order}")));
        };
        if row.status != OrderStatus::Reserved.as_str() || row.payment_intent_id.is_some() {
            return Ok(Answer::Nothing);
        }
        match (row.total_minor, row.customer, row.card) {
            (Some(0), ..) => Ok(Answer::Free { order }),
            // Its saved card was removed: declined as Stripe would decline
            // it, so the order ends and the run follows its policy.
            (Some(_), _, None) if row.saved_card => Ok(Answer::Declined {
                order,
                message: "it was removed from the account".into(),
            }),
            // A saved card: charged at once, off session.
            (Some(amount), Some(customer), Some(card)) => {
                match self
                    .stripe
                    .charge_off_session(order, amount, &row.currency, &customer, &card)
                    .await
                {
                    Ok(intent) => Ok(Answer::Intent { order, intent }),
                    // Declined (402), or a card Stripe no longer has for
                    // the customer (404, or a 400 about the payment method:
                    // "No such PaymentMethod", say detached at Stripe):
                    // nothing was charged and no retry of this request can
                    // help, so it is a decline the customer hears of. A 400
                    // about the request itself is Souk's to fix: parked.
                    Err(CallError::Refused {
                        status,
                        message,
                        card,
                    }) if matches!(status, 402 | 404) || (status == 400 && card) => {
                        Ok(Answer::Declined { order, message })
                    }
                    Err(e) => Err(failure(e)),
                }
            }
            (Some(amount), ..) => {
                match self
                    .stripe
                    .create_intent(order, amount, &row.currency)
                    .await
                {
                    Ok(intent) => Ok(Answer::Intent { order, intent }),
                    // The request itself is refused: no retry can help, so
                    // the order ends now, its stock released, instead of
                    // holding it until the reservation expires. (Other 4xx,
                    // such as a bad key, are Souk's to fix: parked.)
                    Err(CallError::Refused {
                        status: 400 | 402,
                        message,
                        ..
                    }) => Ok(Answer::Unpayable { order, message }),
                    Err(e) => Err(failure(e)),
                }
            }
            (None, ..) => Err(Failure::permanent(anyhow::anyhow!(
                "order {order} was never split"
            ))),
        }
    }

    /// Cancels an intent; Stripe refusing (already paid or cancelled) is fine.
    async fn cancel_intent(&self, intent: &str) -> Result<Answer, Failure> {
        match self.stripe.cancel_intent(intent).await {
            Ok(_) => Ok(Answer::Nothing),
            Err(CallError::Refused { message, .. }) => {
                tracing::info!(intent, %message, "intent not cancelled; a late payment is handled from its webhook");
                Ok(Answer::Nothing)
            }
            Err(e) => Err(failure(e)),
        }
    }

    async fn cancel_unpaid_intent(&self, order: Uuid) -> Result<Answer, Failure> {
        let intent: Option<String> = sqlx::query_scalar(
            "SELECT payment_intent_id FROM orders WHERE id = $1 AND paid_at IS NULL",
        )
        .bind(order)
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        match intent {
            Some(intent) => self.cancel_intent(&intent).await,
            None => Ok(Answer::Nothing),
        }
    }

    async fn refund(&self, refund: Uuid) -> Result<Answer, Failure> {
        let row: Option<(String, i64, String, Uuid)> = sqlx::query_as(
            "SELECT r.status, r.amount_minor, p.payment_intent_id, r.order_id
               FROM refunds r JOIN payments p ON p.id = r.payment_id WHERE r.id = $1",
        )
        .bind(refund)
        .fetch_optional(&self.pool)
        .await?;
        let Some((status, amount, intent, order)) = row else {
            return Err(Failure::permanent(anyhow::anyhow!("no refund {refund}")));
        };
        if status != "requested" {
            return Ok(Answer::Nothing);
        }
        let result = match self.stripe.refund(refund, &intent, amount, order).await {
            Ok(id) => Ok(id),
            Err(CallError::Refused { message, .. }) => Err(message),
            Err(e) => return Err(failure(e)),
        };
        Ok(Answer::Refund { refund, result })
    }
}

impl Handler for Payments {
    type Prepared = Answer;
    const GROUP: &'static str = topology::PAYMENTS.name;
    const BINDINGS: &'static [&'static str] = topology::PAYMENTS.bindings;
    const EMITS: &'static [&'static str] = &[
        "notify.email",
        "order.cancelled",
        "payment.intent_cancel_requested",
        "payment.captured",
        "refund.succeeded",
    ];

    fn prepare_lease(&self) -> Option<Duration> {
        Some(self.lease)
    }

    /// Stripe's answer is kept for the in-place retry of its write: Stripe
    /// would give the same answer again (idempotency keys), at the cost of
    /// another round trip to it.
    fn copy_prepared(&self, answer: &Answer) -> Option<Answer> {
        Some(answer.clone())
    }

    async fn prepare(&self, msg: &Envelope) -> Result<Answer, Failure> {
        let bad = |e| Failure::permanent(e);
        match msg.kind.as_str() {
            "stock.reserved" => {
                let StockReserved { order_id } = msg.payload().map_err(bad)?;
                self.create_intent(order_id).await
            }
            "order.expired" => {
                let OrderExpired { order_id } = msg.payload().map_err(bad)?;
                self.cancel_unpaid_intent(order_id).await
            }
            "order.cancelled" => {
                let OrderCancelled { order_id } = msg.payload().map_err(bad)?;
                self.cancel_unpaid_intent(order_id).await
            }
            "payment.intent_cancel_requested" => {
                let req: IntentCancelRequested = msg.payload().map_err(bad)?;
                self.cancel_intent(&req.payment_intent_id).await
            }
            "payment.refund_requested" => {
                let RefundRequested { refund_id } = msg.payload().map_err(bad)?;
                self.refund(refund_id).await
            }
            "membership_plan.created" => {
                let MembershipPlanCreated { plan_id } = msg.payload().map_err(bad)?;
                self.make_plan(plan_id).await
            }
            "payment_method.setup_requested" => {
                let PaymentMethodSetupRequested { payment_method_id } =
                    msg.payload().map_err(bad)?;
                self.start_setup(payment_method_id).await
            }
            "payment_method.removed" => {
                let PaymentMethodRemoved { payment_method_id } = msg.payload().map_err(bad)?;
                self.detach_card(payment_method_id).await
            }
            "payment_method.confirmed" => {
                let PaymentMethodConfirmed { payment_method_id } = msg.payload().map_err(bad)?;
                self.keep_card(payment_method_id).await
            }
            "membership.requested" => {
                let MembershipRequested { membership_id } = msg.payload().map_err(bad)?;
                self.subscribe(membership_id).await
            }
            "membership.cancel_requested" => {
                let MembershipCancelRequested { membership_id } = msg.payload().map_err(bad)?;
                self.end_at_period_end(membership_id).await
            }
            other => Err(Failure::permanent(anyhow::anyhow!(
                "payments does not handle {other}"
            ))),
        }
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        msg: &Envelope,
        answer: Answer,
    ) -> Result<(), Failure> {
        let corr = msg.correlation_id.as_str();
        match answer {
            Answer::Nothing => Ok(()),
            Answer::Intent { order, intent } => store_intent(tx, order, intent, corr).await,
            Answer::Free { order } => {
                let Some(locked) = settle::lock(tx, order).await? else {
                    return Ok(());
                };
                if locked.status() == OrderStatus::Reserved && locked.stock == "reserved" {
                    settle::paid(tx, &locked, None, corr).await?;
                }
                Ok(())
            }
            Answer::Refund { refund, result } => {
                settle::refund_answered(tx, refund, result, corr).await
            }
            Answer::Declined { order, message } => {
                let Some(locked) = settle::lock(tx, order).await? else {
                    return Ok(());
                };
                if locked.status() == OrderStatus::Reserved {
                    settle::declined_off_session(tx, order, &message).await?;
                }
                Ok(())
            }
            Answer::Unpayable { order, message } => {
                let Some(locked) = settle::lock(tx, order).await? else {
                    return Ok(());
                };
                if locked.status() == OrderStatus::Reserved {
                    settle::unpayable(tx, order, &message, corr).await?;
                }
                Ok(())
            }
            Answer::Recurring(answer) => recurring::record(tx, answer, corr).await,
        }
    }
}

/// Keeps the order's intent and opens it for payment; an intent made for an
/// order that died meanwhile is cancelled again.
async fn store_intent(
    tx: &mut PgConnection,
    order: Uuid,
    intent: Intent,
    corr: &str,
) -> Result<(), Failure> {
    let Some(locked) = settle::lock(tx, order).await? else {
        return Ok(());
    };
    match locked.payment_intent_id.as_deref() {
        None => {
            sqlx::query(
                "UPDATE orders SET payment_intent_id = $2, client_secret = $3 WHERE id = $1",
            )
            .bind(order)
            .bind(&intent.id)
            .bind(&intent.client_secret)
            .execute(&mut *tx)
            .await?;
        }
        Some(stored) if stored == intent.id => {
            // Stored from the webhook that beat us here; keep the secret too.
            sqlx::query(
                "UPDATE orders SET client_secret = coalesce(client_secret, $2) WHERE id = $1",
            )
            .bind(order)
            .bind(&intent.client_secret)
            .execute(&mut *tx)
            .await?;
        }
        Some(_) => {
            cancel_later(tx, order, &intent.id, corr).await?;
            return Ok(());
        }
    }
    match locked.status() {
        OrderStatus::Reserved => {
            let change = Change {
                data: Some(serde_json::json!({ "payment_intent_id": intent.id })),
                ..Change::default()
            };
            status::move_order(
                tx,
                order,
                OrderStatus::AwaitingPayment,
                Actor::System,
                change,
            )
            .await?;
        }
        OrderStatus::Expired | OrderStatus::Cancelled | OrderStatus::OutOfStock => {
            cancel_later(tx, order, &intent.id, corr).await?;
        }
        _ => {}
    }
    Ok(())
}

async fn cancel_later(
    tx: &mut PgConnection,
    order: Uuid,
    intent: &str,
    corr: &str,
) -> Result<(), sqlx::Error> {
    let cancel = IntentCancelRequested {
        order_id: order,
        payment_intent_id: intent.to_string(),
    };
    souk_shared::outbox::enqueue(tx, &Envelope::new(&cancel, corr)).await
}
