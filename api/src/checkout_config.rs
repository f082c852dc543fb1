//! Settings for taking money: the currency prices are in and the secret
//! Stripe signs webhooks with.

use souk_shared::config::{ConfigError, Env};

#[derive(Debug, Clone)]
pub struct CheckoutConfig {
    /// ISO 4217, lower case (`eur`): every price and order is in it.
    pub currency: String,
    /// The endpoint's signing secret (`whsec_...`).
    pub stripe_webhook_secret: String,
}

impl CheckoutConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let currency: String = env.or("CURRENCY", "eur".to_string())?;
        if !(currency.len() == 3 && currency.chars().all(|c| c.is_ascii_lowercase())) {
            return Err(ConfigError {
                var: "CURRENCY".into(),
                reason: format!("{currency:?} is not a lower-case ISO 4217 code such as eur"),
            });
        }
        let stripe_webhook_secret: String = env.required("STRIPE_WEBHOOK_SECRET")?;
        if stripe_webhook_secret.len() < 16 {
            return Err(ConfigError {
                var: "STRIPE_WEBHOOK_SECRET".into(),
                reason: "must be the endpoint's signing secret (whsec_...)".into(),
            });
        }
        Ok(Self {
            currency,
            stripe_webhook_secret,
        })
    }
}
