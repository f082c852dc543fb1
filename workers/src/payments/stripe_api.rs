//! The Stripe calls Souk makes, through async-stripe: create and cancel a
//! PaymentIntent, refund one. Every write carries an idempotency key the
//! caller derives from what it is about, so a retry after a crash gets the
//! first answer back instead of a second charge or refund.
//!
//! Requests are built with async-stripe's typed parameters; answers are read
//! tolerantly (only the fields used here), because Stripe stand-ins such as
//! localstripe speak an older API version than async-stripe's typed
//! resources expect.

use std::{collections::HashMap, time::Duration};

use ::stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use serde::Deserialize;
use souk_shared::config::{ConfigError, Env};
use stripe_core::{
    payment_intent::{CancelPaymentIntent, CreatePaymentIntent},
    refund::CreateRefund,
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
    Refused { status: u16, message: String },
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

    /// Sends `request` once with `key` and reads the answer as `T`.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: &impl StripeRequest,
        key: &str,
    ) -> Result<T, CallError> {
        let key = IdempotencyKey::new(key).map_err(|e| CallError::Unavailable(e.to_string()))?;
        let value: miniserde::json::Value = request
            .build()
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
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
        let metadata = HashMap::from([("order_id".to_string(), order.to_string())]);
        let request = CreatePaymentIntent::new(
            amount_minor,
            currency
                .parse::<stripe_types::Currency>()
                .expect("infallible"),
        )
        .metadata(metadata);
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
}
