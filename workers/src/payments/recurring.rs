//! The payments worker's Stripe calls for recurring commerce: membership
//! plans, saving a card (customer, SetupIntent, attach), subscriptions and
//! their cancellation at period end. As for payments, each call is made in
//! `prepare` with an idempotency key and its answer recorded in `apply`.

use chrono::{DateTime, Utc};
use souk_shared::membership::{self, MembershipStatus, News};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    Answer, Payments, failure,
    stripe_api::{CallError, Interval, PaymentMethod, SetupIntent, Subscription},
};
use crate::runtime::Failure;

/// What a recurring-commerce call came back with.
#[derive(Clone)]
pub enum Recurring {
    PlanMade {
        plan: Uuid,
        stripe_plan: String,
    },
    SetupStarted {
        method: Uuid,
        user: Uuid,
        customer: String,
        setup_intent: String,
        client_secret: Option<String>,
    },
    CardKept {
        method: Uuid,
        card: PaymentMethod,
    },
    CardNotKept {
        method: Uuid,
        status: String,
    },
    /// `asked_at`: when the call was made. Stripe's events about what
    /// happened after that win over this answer.
    Subscribed {
        membership: Uuid,
        subscription: Subscription,
        asked_at: DateTime<Utc>,
    },
    SubscriptionRefused {
        membership: Uuid,
        message: String,
    },
    EndsAtPeriodEnd {
        membership: Uuid,
        subscription: Subscription,
        asked_at: DateTime<Utc>,
    },
    /// An incomplete membership's subscription, cancelled at once.
    EndedNow {
        membership: Uuid,
        subscription: Subscription,
        asked_at: DateTime<Utc>,
    },
    /// Stripe would not cancel: the member may ask again.
    CancelRefused {
        membership: Uuid,
        message: String,
    },
}

impl Payments {
    async fn customer_of(&self, user: Uuid) -> Result<Option<String>, Failure> {
        Ok(
            sqlx::query_scalar(
                "SELECT stripe_customer_id FROM stripe_customers WHERE user_id = $1",
            )
            .bind(user)
            .fetch_optional(&self.pool)
            .await?,
        )
    }

    pub(super) async fn make_plan(&self, plan: Uuid) -> Result<Answer, Failure> {
        let row: Option<(String, i64, String, String, String)> = sqlx::query_as(
            "SELECT name, amount_minor, currency, interval, status FROM membership_plans WHERE id = $1",
        )
        .bind(plan)
        .fetch_optional(&self.pool)
        .await?;
        let Some((name, amount, currency, interval, status)) = row else {
            return Err(Failure::permanent(anyhow::anyhow!(
                "no membership plan {plan}"
            )));
        };
        if status != "pending" {
            return Ok(Answer::Nothing);
        }
        let interval = if interval == "year" {
            Interval::Year
        } else {
            Interval::Month
        };
        let stripe_plan = self
            .stripe
            .create_plan(plan, &name, amount, &currency, interval)
            .await
            .map_err(failure)?;
        Ok(Answer::Recurring(Recurring::PlanMade { plan, stripe_plan }))
    }

    pub(super) async fn start_setup(&self, method: Uuid) -> Result<Answer, Failure> {
        let row: Option<(Uuid, String, String, String, Option<String>)> = sqlx::query_as(
            "SELECT u.id, u.email, u.name, m.status, m.setup_intent_id
               FROM payment_methods m JOIN users u ON u.id = m.user_id WHERE m.id = $1",
        )
        .bind(method)
        .fetch_optional(&self.pool)
        .await?;
        let Some((user, email, name, status, started)) = row else {
            return Err(Failure::permanent(anyhow::anyhow!(
                "no payment method {method}"
            )));
        };
        if status != "pending" || started.is_some() {
            return Ok(Answer::Nothing);
        }
        let customer = match self.customer_of(user).await? {
            Some(customer) => customer,
            None => self
                .stripe
                .create_customer(user, &email, &name)
                .await
                .map_err(failure)?,
        };
        let intent = self
            .stripe
            .create_setup_intent(method, &customer)
            .await
            .map_err(failure)?;
        Ok(Answer::Recurring(Recurring::SetupStarted {
            method,
            user,
            customer,
            setup_intent: intent.id,
            client_secret: intent.client_secret,
        }))
    }

    pub(super) async fn keep_card(&self, method: Uuid) -> Result<Answer, Failure> {
        let row: Option<(String, Option<String>, Uuid, Option<String>)> = sqlx::query_as(
            "SELECT status, setup_intent_id, user_id, stripe_payment_method_id
               FROM payment_methods WHERE id = $1",
        )
        .bind(method)
        .fetch_optional(&self.pool)
        .await?;
        let Some((status, Some(setup_intent), user, kept)) = row else {
            return Err(Failure::permanent(anyhow::anyhow!(
                "payment method {method} was never set up"
            )));
        };
        if status == "removed" && kept.is_none() {
            // Removed before it was kept, yet its SetupIntent succeeded (the
            // card form was completed anyway, or confirmed just before the
            // cancel): Stripe attached the card to the customer, where
            // nobody sees it; it is detached, not kept.
            let intent = self
                .stripe
                .setup_intent(&setup_intent)
                .await
                .map_err(failure)?;
            return self.detach_setup_card(&intent).await;
        }
        if status != "pending" {
            return Ok(Answer::Nothing);
        }
        let intent = self
            .stripe
            .setup_intent(&setup_intent)
            .await
            .map_err(failure)?;
        let (Some(card), "succeeded") = (intent.payment_method.as_deref(), intent.status.as_str())
        else {
            return Ok(Answer::Recurring(Recurring::CardNotKept {
                method,
                status: intent.status,
            }));
        };
        let customer = self
            .customer_of(user)
            .await?
            .ok_or_else(|| Failure::permanent(anyhow::anyhow!("no Stripe customer for {user}")))?;
        let card = self
            .stripe
            .keep_payment_method(&customer, card)
            .await
            .map_err(failure)?;
        // Removed while this attach was on its way: the removal's detach
        // may have come before it, so the card is detached again, after it
        // (under a key of its own). A removal committed after this read
        // sends its detach after this attach.
        let now: Option<String> =
            sqlx::query_scalar("SELECT status FROM payment_methods WHERE id = $1")
                .bind(method)
                .fetch_optional(&self.pool)
                .await?;
        if now.as_deref() == Some("removed") {
            self.detach(&card.id, &format!("detach-kept-{}", card.id))
                .await?;
            return Ok(Answer::Nothing);
        }
        Ok(Answer::Recurring(Recurring::CardKept { method, card }))
    }

    pub(super) async fn detach_card(&self, method: Uuid) -> Result<Answer, Failure> {
        let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT stripe_payment_method_id, setup_intent_id FROM payment_methods
              WHERE id = $1 AND status = 'removed'",
        )
        .bind(method)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((Some(card), _)) => self.detach(&card, &format!("detach-{card}")).await?,
            // Removed before it was kept: its SetupIntent is cancelled, so the
            // card form can no longer save a card through it.
            Some((None, Some(setup_intent))) => {
                let intent = match self.stripe.cancel_setup_intent(&setup_intent).await {
                    Ok(intent) => intent,
                    // Refused: it succeeded (the confirm came first) or was
                    // cancelled already.
                    Err(CallError::Refused { .. }) => self
                        .stripe
                        .setup_intent(&setup_intent)
                        .await
                        .map_err(failure)?,
                    Err(e) => return Err(failure(e)),
                };
                return self.detach_setup_card(&intent).await;
            }
            // Never set up, or not removed.
            _ => {}
        }
        Ok(Answer::Nothing)
    }

    /// Detaches the card a SetupIntent of a removed row was confirmed with,
    /// if any: Stripe attached it to the customer when the intent succeeded.
    async fn detach_setup_card(&self, intent: &SetupIntent) -> Result<Answer, Failure> {
        if let Some(card) = &intent.payment_method {
            self.detach(card, &format!("detach-{card}")).await?;
        }
        Ok(Answer::Nothing)
    }

    async fn detach(&self, card: &str, key: &str) -> Result<(), Failure> {
        match self.stripe.detach_payment_method(card, key).await {
            // Refused: it is detached already (or was never attached).
            Ok(()) | Err(CallError::Refused { .. }) => Ok(()),
            Err(e) => Err(failure(e)),
        }
    }

    pub(super) async fn subscribe(&self, membership: Uuid) -> Result<Answer, Failure> {
        #[derive(sqlx::FromRow)]
        struct Row {
            status: String,
            plan: Option<String>,
            customer: Option<String>,
            card: Option<String>,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT m.status, p.stripe_plan_id AS plan, c.stripe_customer_id AS customer,
                    pm.stripe_payment_method_id AS card
               FROM memberships m JOIN membership_plans p ON p.id = m.plan_id
               JOIN payment_methods pm ON pm.id = m.payment_method_id AND pm.status = 'active'
               LEFT JOIN stripe_customers c ON c.user_id = m.user_id
              WHERE m.id = $1",
        )
        .bind(membership)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            let message = "the card chosen for the membership is no longer saved".to_string();
            return Ok(Answer::Recurring(Recurring::SubscriptionRefused {
                membership,
                message,
            }));
        };
        if row.status != MembershipStatus::Requested.as_str() {
            return Ok(Answer::Nothing);
        }
        let (Some(plan), Some(customer), Some(card)) = (row.plan, row.customer, row.card) else {
            let message = "the plan or the card is not ready at Stripe".to_string();
            return Ok(Answer::Recurring(Recurring::SubscriptionRefused {
                membership,
                message,
            }));
        };
        let key = format!("default-{membership}");
        let asked_at = asked_now();
        let made = match self.stripe.make_default(&customer, &card, &key).await {
            Ok(()) => {
                self.stripe
                    .create_subscription(membership, &customer, &plan)
                    .await
            }
            Err(e) => Err(e),
        };
        match made {
            Ok(subscription) => Ok(Answer::Recurring(Recurring::Subscribed {
                membership,
                subscription,
                asked_at,
            })),
            Err(CallError::Refused { message, .. }) => {
                Ok(Answer::Recurring(Recurring::SubscriptionRefused {
                    membership,
                    message,
                }))
            }
            Err(e) => Err(failure(e)),
        }
    }

    /// Cancels at the end of the period paid for; a membership whose first
    /// payment never went through (incomplete) has none, so it ends now and
    /// the customer may subscribe again at once.
    pub(super) async fn end_at_period_end(&self, membership: Uuid) -> Result<Answer, Failure> {
        let row: Option<(Option<String>, String)> =
            sqlx::query_as("SELECT stripe_subscription_id, status FROM memberships WHERE id = $1")
                .bind(membership)
                .fetch_optional(&self.pool)
                .await?;
        let Some((Some(subscription), status)) = row else {
            return Ok(Answer::Nothing);
        };
        let now = status == MembershipStatus::Incomplete.as_str();
        let asked_at = asked_now();
        let answer = if now {
            self.stripe.cancel_subscription(&subscription).await
        } else {
            self.stripe.cancel_at_period_end(&subscription).await
        };
        match answer {
            Ok(subscription) if now => Ok(Answer::Recurring(Recurring::EndedNow {
                membership,
                subscription,
                asked_at,
            })),
            Ok(subscription) => Ok(Answer::Recurring(Recurring::EndsAtPeriodEnd {
                membership,
                subscription,
                asked_at,
            })),
            Err(CallError::Refused { message, .. }) => {
                Ok(Answer::Recurring(Recurring::CancelRefused {
                    membership,
                    message,
                }))
            }
            Err(e) => Err(failure(e)),
        }
    }
}

fn asked_now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now)
}

fn news(subscription: &Subscription, asked_at: DateTime<Utc>) -> News {
    News {
        status: MembershipStatus::from_stripe(&subscription.status),
        cancel_at_period_end: subscription.cancel_at_period_end,
        current_period_end: subscription
            .period_end()
            .and_then(|t| DateTime::from_timestamp(t, 0)),
        at: Some(asked_at),
    }
}

/// Records a recurring-commerce answer.
pub async fn record(tx: &mut PgConnection, answer: Recurring, corr: &str) -> Result<(), Failure> {
    match answer {
        Recurring::PlanMade { plan, stripe_plan } => {
            sqlx::query(
                "UPDATE membership_plans SET stripe_plan_id = $2, status = 'active'
                  WHERE id = $1 AND status = 'pending'",
            )
            .bind(plan)
            .bind(stripe_plan)
            .execute(&mut *tx)
            .await?;
        }
        Recurring::SetupStarted {
            method,
            user,
            customer,
            setup_intent,
            client_secret,
        } => {
            sqlx::query(
                "INSERT INTO stripe_customers (user_id, stripe_customer_id) VALUES ($1, $2)
                 ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(user)
            .bind(&customer)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE payment_methods SET setup_intent_id = $2, client_secret = $3
                  WHERE id = $1 AND setup_intent_id IS NULL",
            )
            .bind(method)
            .bind(setup_intent)
            .bind(client_secret)
            .execute(&mut *tx)
            .await?;
        }
        Recurring::CardKept { method, card } => {
            let details = card.card.unwrap_or_default();
            sqlx::query(
                "UPDATE payment_methods SET status = 'active', stripe_payment_method_id = $2, brand = $3,
                        last4 = $4, exp_month = $5, exp_year = $6, client_secret = NULL, activated_at = now()
                  WHERE id = $1 AND status = 'pending'",
            )
            .bind(method)
            .bind(card.id)
            .bind(details.brand)
            .bind(details.last4)
            .bind(details.exp_month)
            .bind(details.exp_year)
            .execute(&mut *tx)
            .await?;
        }
        Recurring::CardNotKept { method, status } => {
            // Still waiting for the customer, or Stripe gave up on it.
            if status == "canceled" {
                sqlx::query(
                    "UPDATE payment_methods SET status = 'failed', failure = 'the card was not confirmed'
                      WHERE id = $1 AND status = 'pending'",
                )
                .bind(method)
                .execute(&mut *tx)
                .await?;
            }
        }
        Recurring::Subscribed {
            membership,
            subscription,
            asked_at,
        } => {
            sqlx::query(
                "UPDATE memberships SET stripe_subscription_id = coalesce(stripe_subscription_id, $2) WHERE id = $1",
            )
            .bind(membership)
            .bind(&subscription.id)
            .execute(&mut *tx)
            .await?;
            membership::apply(tx, membership, news(&subscription, asked_at), corr).await?;
        }
        Recurring::SubscriptionRefused {
            membership,
            message,
        } => {
            sqlx::query("UPDATE memberships SET failure = $2 WHERE id = $1")
                .bind(membership)
                .bind(&message)
                .execute(&mut *tx)
                .await?;
            let failed = News {
                status: Some(MembershipStatus::Failed),
                ..News::default()
            };
            membership::apply(tx, membership, failed, corr).await?;
        }
        Recurring::EndsAtPeriodEnd {
            membership,
            subscription,
            asked_at,
        } => {
            sqlx::query("UPDATE memberships SET failure = NULL WHERE id = $1")
                .bind(membership)
                .execute(&mut *tx)
                .await?;
            membership::apply(tx, membership, news(&subscription, asked_at), corr).await?;
            // Confirmed whatever else Stripe said since: it only ever ends.
            membership::confirm_ending(tx, membership, corr).await?;
        }
        Recurring::EndedNow {
            membership,
            subscription,
            asked_at,
        } => {
            sqlx::query("UPDATE memberships SET failure = NULL WHERE id = $1")
                .bind(membership)
                .execute(&mut *tx)
                .await?;
            membership::apply(tx, membership, news(&subscription, asked_at), corr).await?;
        }
        Recurring::CancelRefused {
            membership,
            message,
        } => {
            sqlx::query(
                "UPDATE memberships SET cancel_requested_at = NULL, failure = $2, updated_at = now() WHERE id = $1",
            )
            .bind(membership)
            .bind(format!("Stripe did not cancel the membership: {message}"))
            .execute(&mut *tx)
            .await?;
            membership::tell_cancel_refused(tx, membership, &message, corr).await?;
        }
    }
    Ok(())
}
