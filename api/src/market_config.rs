//! Settings for the marketplace's money and sellers: the currency, the
//! secret Stripe signs webhooks with, the key payout details are encrypted
//! with, the smallest withdrawal, and whether new sellers wait for approval.

use base64::{Engine, engine::general_purpose::STANDARD};
use souk_shared::config::{ConfigError, Env};

#[derive(Debug, Clone)]
pub struct MarketConfig {
    /// ISO 4217, lower case (`eur`): every price and order is in it.
    pub currency: String,
    /// The endpoint's signing secret (`whsec_...`).
    pub stripe_webhook_secret: String,
    /// AES-256-GCM key for sellers' bank details at rest.
    pub payout_details_key: [u8; 32],
    /// The smallest withdrawal, minor units.
    pub withdrawal_min_minor: i64,
    /// New sellers' shops wait for an admin's approval before they sell.
    pub seller_approval_manual: bool,
}

impl MarketConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let bad = |var: &str, reason: &str| ConfigError {
            var: var.into(),
            reason: reason.into(),
        };
        let currency: String = env.or("CURRENCY", "eur".to_string())?;
        if !(currency.len() == 3 && currency.chars().all(|c| c.is_ascii_lowercase())) {
            return Err(bad(
                "CURRENCY",
                &format!("{currency:?} is not a lower-case ISO 4217 code such as eur"),
            ));
        }
        let stripe_webhook_secret: String = env.required("STRIPE_WEBHOOK_SECRET")?;
        if stripe_webhook_secret.len() < 16 {
            return Err(bad(
                "STRIPE_WEBHOOK_SECRET",
                "must be the endpoint's signing secret (whsec_...)",
            ));
        }
        let key: String = env.required("PAYOUT_DETAILS_KEY")?;
        let payout_details_key = STANDARD
            .decode(key.trim())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| {
                bad(
                    "PAYOUT_DETAILS_KEY",
                    "must be 32 random bytes in base64 (openssl rand -base64 32)",
                )
            })?;
        let withdrawal_min_minor: i64 = env.or("WITHDRAWAL_MIN_MINOR", 1000)?;
        if withdrawal_min_minor < 1 {
            return Err(bad("WITHDRAWAL_MIN_MINOR", "must be at least 1"));
        }
        let approval: String = env.or("SELLER_APPROVAL", "manual".to_string())?;
        let seller_approval_manual = match approval.as_str() {
            "manual" => true,
            "auto" => false,
            _ => return Err(bad("SELLER_APPROVAL", "must be manual or auto")),
        };
        Ok(Self {
            currency,
            stripe_webhook_secret,
            payout_details_key,
            withdrawal_min_minor,
            seller_approval_manual,
        })
    }
}
