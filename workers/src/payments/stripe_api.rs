//! The Stripe calls Souk makes, through async-stripe: PaymentIntents (on
//! session, or off session with a saved card), cancels and refunds;
//! customers, SetupIntents and payment methods to save a card; plans and
//! subscriptions for memberships. Every write carries an idempotency key the
//! caller derives from what it is about, so a retry after a crash gets the
//! first answer back instead of a second charge, refund or subscription.
//!
//! Requests are built with async-stripe's typed parameters; answers are read
//! tolerantly (only the fields used here), because Stripe stand-ins such as
//! localstripe speak an older API version than async-stripe's typed
//! resources expect.

use std::{collections::HashMap, time::Duration};

use ::stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use serde::Deserialize;
use souk_shared::config::{ConfigError, Env};
use stripe_billing::{
    plan::{CreatePlan, CreatePlanInlineProductParams, CreatePlanProduct},
    subscription::{
        CancelSubscription, CreateSubscription, CreateSubscriptionItems, UpdateSubscription,
    },
};
use stripe_core::{
    customer::{CreateCustomer, UpdateCustomer, UpdateCustomerInvoiceSettings},
    payment_intent::{CancelPaymentIntent, CreatePaymentIntent, CreatePaymentIntentOffSession},
    refund::CreateRefund,
    setup_intent::{
        CancelSetupIntent, CreateSetupIntent, CreateSetupIntentUsage, RetrieveSetupIntent,
    },
};
use stripe_payment::payment_method::{
    AttachPaymentMethod, DetachPaymentMethod, RetrievePaymentMethod,
};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub secret_key: String,
    /// `https://api.stripe.com/`, or a stand-in such as localstripe.
    pub api_base: String,
    /// Per attempt.
    pub timeout: Duration,
}

impl StripeConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let secret_key: String = env.required("STRIPE_SECRET_KEY")?;
        if !(secret_key.starts_with("sk_") || secret_key.starts_with("rk_")) {
            return Err(ConfigError {
                var: "STRIPE_SECRET_KEY".into(),
                reason: "expected a secret key (sk_...) or a restricted key (rk_...)".into(),
            });
        }
        let mut api_base: String =
            env.or("STRIPE_API_BASE", "https://api.stripe.com/".to_string())?;
        if !(api_base.starts_with("https://") || api_base.starts_with("http://")) {
            return Err(ConfigError {
                var: "STRIPE_API_BASE".into(),
                reason: format!("{api_base:?} is not an http(s) URL"),
            });
        }
        if !api_base.ends_with('/') {
            api_base.push('/');
        }
        Ok(Self {
            secret_key,
            api_base,
            timeout: env.millis("STRIPE_TIMEOUT_MS", 10_000)?,
        })
    }
}

/// Why a call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Stripe refused the request (4xx other than conflict and rate limit):
    /// trying again with the same request cannot help.
    #[error("Stripe refused the request ({status}): {message}")]
    Refused {
        status: u16,
        message: String,
        /// About the card or payment method (a `card_error`, or a
        /// parameter `payment_method…` at fault), not the request as Souk
        /// made it.
        card: bool,
    },
    /// The network, a timeout, a 5xx, a rate limit: worth trying again.
    #[error("Stripe could not be reached or failed: {0}")]
    Unavailable(String),
}

impl From<StripeError> for CallError {
    fn from(e: StripeError) -> Self {
        match e {
            StripeError::Stripe(error, status)
                if (400..500).contains(&status) && status != 409 && status != 429 =>
            {
                Self::Refused {
                    status,
                    message: error.message.clone().unwrap_or_else(|| "no message".into()),
                    card: matches!(error.type_, ::stripe::ApiErrorsType::CardError)
                        || error
                            .param
                            .as_deref()
                            .is_some_and(|p| p.starts_with("payment_method")),
                }
            }
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// The fields of a PaymentIntent Souk uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Intent {
    pub id: String,
    pub client_secret: Option<String>,
    pub status: String,
    pub amount: i64,
}

#[derive(Debug, Clone, Deserialize)]
struct Created {
    id: String,
}

/// The fields of a SetupIntent Souk uses.
#[derive(Debug, Clone, Deserialize)]
pub struct SetupIntent {
    pub id: String,
    pub client_secret: Option<String>,
    pub status: String,
    /// The saved card's id once the customer confirmed.
    pub payment_method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Card {
    pub brand: Option<String>,
    pub last4: Option<String>,
    pub exp_month: Option<i32>,
    pub exp_year: Option<i32>,
}

/// A saved payment method: its card's brand and last digits.
#[derive(Debug, Clone, Deserialize)]
pub struct PaymentMethod {
    pub id: String,
    #[serde(default)]
    pub card: Option<Card>,
}

/// The fields of a subscription Souk uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub cancel_at_period_end: Option<bool>,
    #[serde(default)]
    pub current_period_end: Option<i64>,
    #[serde(default)]
    pub items: Option<SubscriptionItems>,
}

impl Subscription {
    pub fn period_end(&self) -> Option<i64> {
        period_end(self.current_period_end, self.items.as_ref())
    }
}

/// A subscription's items. Since API version 2025-03-31 Stripe keeps the
/// billing period on each item, not on the subscription; older versions
/// (and localstripe) keep it on the subscription.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SubscriptionItems {
    #[serde(default)]
    pub data: Vec<SubscriptionItem>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionItem {
    #[serde(default)]
    pub current_period_end: Option<i64>,
}

/// When a subscription's paid period ends: its items' (the latest, for a
/// subscription of several), else the subscription's own field.
pub fn period_end(subscription: Option<i64>, items: Option<&SubscriptionItems>) -> Option<i64> {
    items
        .and_then(|i| i.data.iter().filter_map(|i| i.current_period_end).max())
        .or(subscription)
}

/// How often a membership renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Month,
    Year,
}

/// An order's PaymentIntent request: its amount, and metadata naming the
/// order (how webhooks find it).
fn intent_for(order: Uuid, amount_minor: i64, currency: &str) -> CreatePaymentIntent {
    let metadata = HashMap::from([("order_id".to_string(), order.to_string())]);
    CreatePaymentIntent::new(
        amount_minor,
        currency
            .parse::<stripe_types::Currency>()
            .expect("infallible"),
    )
    .metadata(metadata)
}

#[derive(Clone)]
pub struct Stripe {
    client: ::stripe::Client,
}

impl Stripe {
    pub fn new(config: &StripeConfig) -> Result<Self, StripeError> {
        let client = ::stripe::ClientBuilder::new(config.secret_key.clone())
            .url(config.api_base.clone())
            .timeout(config.timeout)
            .app_info("souk", Some(env!("CARGO_PKG_VERSION").into()), None)
            .build()?;
        Ok(Self { client })
    }

    /// Sends `request` once, with `key` for a write, and reads the answer as `T`.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: &impl StripeRequest,
        key: &str,
    ) -> Result<T, CallError> {
        let key = IdempotencyKey::new(key).map_err(|e| CallError::Unavailable(e.to_string()))?;
        self.call(request, RequestStrategy::Idempotent(key)).await
    }

    /// A read: no idempotency key.
    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        request: &impl StripeRequest,
    ) -> Result<T, CallError> {
        self.call(request, RequestStrategy::Once).await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: &impl StripeRequest,
        strategy: RequestStrategy,
    ) -> Result<T, CallError> {
        let value: miniserde::json::Value = request
            .build()
            .customize()
            .request_strategy(strategy)
            .send(&self.client)
            .await?;
        serde_json::from_str(&miniserde::json::to_string(&value))
            .map_err(|e| CallError::Unavailable(format!("unexpected answer from Stripe: {e}")))
    }

    /// The order's one PaymentIntent: the key is the order's, so however
    /// often this runs for an order, Stripe makes one intent.
    pub async fn create_intent(
        &self,
        order: Uuid,
        amount_minor: i64,
        currency: &str,
    ) -> Result<Intent, CallError> {
        let request = intent_for(order, amount_minor, currency);
        self.send(&request, &format!("pi-{order}")).await
    }

    /// Cancels an intent nobody will pay any more. One that already
    /// succeeded or was cancelled is refused by Stripe, which the caller
    /// treats as done: a late success is handled from its webhook.
    pub async fn cancel_intent(&self, intent: &str) -> Result<Intent, CallError> {
        let request = CancelPaymentIntent::new(intent);
        self.send(&request, &format!("cancel-{intent}")).await
    }

    /// Refunds `amount_minor` of `intent`; the key is the refund's own id.
    pub async fn refund(
        &self,
        refund: Uuid,
        intent: &str,
        amount_minor: i64,
        order: Uuid,
    ) -> Result<String, CallError> {
        let metadata = HashMap::from([
            ("order_id".to_string(), order.to_string()),
            ("refund_id".to_string(), refund.to_string()),
        ]);
        let request = CreateRefund::new()
            .payment_intent(intent)
            .amount(amount_minor)
            .metadata(metadata);
        let created: Created = self.send(&request, &format!("refund-{refund}")).await?;
        Ok(created.id)
    }

    /// Charges a saved card for an order, off session (a replenishment): the
    /// intent is created and confirmed at once. A declined card comes back as
    /// [`CallError::Refused`] with status 402; a card Stripe no longer has for
    /// the customer (detached) with 400 or 404: the caller treats all three
    /// as a decline.
    pub async fn charge_off_session(
        &self,
        order: Uuid,
        amount_minor: i64,
        currency: &str,
        customer: &str,
        payment_method: &str,
    ) -> Result<Intent, CallError> {
        // The same key as `create_intent`: an order is paid one way or the other.
        let request = intent_for(order, amount_minor, currency)
            .customer(customer)
            .payment_method(payment_method)
            .confirm(true)
            .off_session(CreatePaymentIntentOffSession::Bool(true));
        self.send(&request, &format!("pi-{order}")).await
    }

    /// The account's Stripe customer; the key is the account's.
    pub async fn create_customer(
        &self,
        user: Uuid,
        email: &str,
        name: &str,
    ) -> Result<String, CallError> {
        let metadata = HashMap::from([("user_id".to_string(), user.to_string())]);
        let request = CreateCustomer::new()
            .email(email)
            .name(name)
            .metadata(metadata);
        let created: Created = self.send(&request, &format!("cus-{user}")).await?;
        Ok(created.id)
    }

    /// A SetupIntent to save a card for later, off-session charges.
    pub async fn create_setup_intent(
        &self,
        method: Uuid,
        customer: &str,
    ) -> Result<SetupIntent, CallError> {
        let metadata = HashMap::from([("payment_method_id".to_string(), method.to_string())]);
        let request = CreateSetupIntent::new()
            .customer(customer)
            .usage(CreateSetupIntentUsage::OffSession)
            .metadata(metadata);
        self.send(&request, &format!("seti-{method}")).await
    }

    pub async fn setup_intent(&self, id: &str) -> Result<SetupIntent, CallError> {
        self.read(&RetrieveSetupIntent::new(id)).await
    }

    /// Cancels the SetupIntent of a card removed before it was kept, so the
    /// card form can no longer save a card through it. One that succeeded
    /// already is refused by Stripe: the caller detaches its card instead.
    pub async fn cancel_setup_intent(&self, id: &str) -> Result<SetupIntent, CallError> {
        let request = CancelSetupIntent::new(id);
        self.send(&request, &format!("cancel-{id}")).await
    }

    /// Attaches a confirmed card to the customer; returns the card's
    /// details. It does not become the invoice default: only the card a
    /// membership was taken out with is (see `make_default`).
    pub async fn keep_payment_method(
        &self,
        customer: &str,
        payment_method: &str,
    ) -> Result<PaymentMethod, CallError> {
        let attach = AttachPaymentMethod::new(payment_method).customer(customer);
        let _: Created = self
            .send(&attach, &format!("attach-{payment_method}"))
            .await?;
        self.read(&RetrievePaymentMethod::new(payment_method)).await
    }

    /// Detaches a removed card from its customer: Stripe charges it no more.
    /// `key` names what it follows: a detach keyed like an earlier one is
    /// answered from that one and does nothing, so one that must undo a
    /// later attach carries a key of its own.
    pub async fn detach_payment_method(
        &self,
        payment_method: &str,
        key: &str,
    ) -> Result<(), CallError> {
        let detach = DetachPaymentMethod::new(payment_method);
        let _: Created = self.send(&detach, key).await?;
        Ok(())
    }

    /// Makes a card the customer's default for invoices. `key` names what
    /// it is done for: a customer may switch back and forth between cards.
    pub async fn make_default(
        &self,
        customer: &str,
        payment_method: &str,
        key: &str,
    ) -> Result<(), CallError> {
        let mut settings = UpdateCustomerInvoiceSettings::new();
        settings.default_payment_method = Some(payment_method.to_string());
        let default = UpdateCustomer::new(customer).invoice_settings(settings);
        let _: Created = self.send(&default, key).await?;
        Ok(())
    }

    /// A recurring plan (with its product) for a membership plan.
    pub async fn create_plan(
        &self,
        plan: Uuid,
        name: &str,
        amount_minor: i64,
        currency: &str,
        interval: Interval,
    ) -> Result<String, CallError> {
        let interval = match interval {
            Interval::Month => stripe_shared::PlanInterval::Month,
            Interval::Year => stripe_shared::PlanInterval::Year,
        };
        let metadata = HashMap::from([("membership_plan_id".to_string(), plan.to_string())]);
        let request = CreatePlan::new(
            currency
                .parse::<stripe_types::Currency>()
                .expect("infallible"),
            interval,
        )
        .amount(amount_minor)
        .product(CreatePlanProduct::InlineProductParams(
            CreatePlanInlineProductParams::new(name),
        ))
        .metadata(metadata);
        let created: Created = self.send(&request, &format!("plan-{plan}")).await?;
        Ok(created.id)
    }

    /// Subscribes the customer to a plan, charged to its default card (set
    /// just before: localstripe knows no `default_payment_method` here).
    pub async fn create_subscription(
        &self,
        membership: Uuid,
        customer: &str,
        plan: &str,
    ) -> Result<Subscription, CallError> {
        let mut item = CreateSubscriptionItems::new();
        item.plan = Some(plan.to_string());
        let metadata = HashMap::from([("membership_id".to_string(), membership.to_string())]);
        let request = CreateSubscription::new()
            .customer(customer)
            .items(vec![item])
            .metadata(metadata);
        self.send(&request, &format!("sub-{membership}")).await
    }

    /// Ends the subscription when the period paid for is over.
    pub async fn cancel_at_period_end(
        &self,
        subscription: &str,
    ) -> Result<Subscription, CallError> {
        let request = UpdateSubscription::new(subscription).cancel_at_period_end(true);
        self.send(&request, &format!("cancel-at-end-{subscription}"))
            .await
    }

    /// Ends the subscription now: for one whose first payment never went
    /// through, there is no period paid for to wait for.
    pub async fn cancel_subscription(&self, subscription: &str) -> Result<Subscription, CallError> {
        let request = CancelSubscription::new(subscription);
        self.send(&request, &format!("cancel-now-{subscription}"))
            .await
    }
}
