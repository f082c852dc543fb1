//! Stripe played by `localstripe` (PyPI), one process per test on a free
//! port, plus what a storefront does with Stripe.js (attach a card and
//! confirm) and webhook events signed the way Stripe signs them.
//!
//! localstripe speaks API version 2017-08-15: `confirm` takes no
//! `payment_method` (it is attached with an update first), it sends each
//! event once about a second later, and it has no refund events.

use std::{process::Stdio, time::Duration};

use serde_json::Value;
use tokio::process::{Child, Command};

use crate::{free_port, wait_until};

/// The secret key tests configure the payments worker with.
pub const SECRET_KEY: &str = "sk_test_souk_localstripe";
/// The signing secret tests give the API and localstripe's webhook.
pub const WEBHOOK_SECRET: &str = "whsec_souk_test_signing_secret";

/// A test card that is charged without fuss.
pub const CARD_OK: &str = "4242424242424242";
/// A test card localstripe declines when charged.
pub const CARD_DECLINED: &str = "4000000000000341";

pub struct LocalStripe {
    /// Base URL with a trailing slash, as `STRIPE_API_BASE` wants it.
    pub url: String,
    http: reqwest::Client,
    _child: Child,
}

impl LocalStripe {
    /// Starts a fresh localstripe (`python3 -m localstripe`, or
    /// `LOCALSTRIPE` if set) and waits until it answers.
    pub async fn start() -> Self {
        let port = free_port();
        let program = std::env::var("LOCALSTRIPE").unwrap_or_else(|_| "python3".into());
        let mut command = Command::new(&program);
        if program == "python3" {
            command.args(["-m", "localstripe"]);
        }
        let child = command
            .args(["--port", &port.to_string(), "--from-scratch"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("localstripe starts; install it with `pip install localstripe`");
        let stripe = Self {
            url: format!("http://127.0.0.1:{port}/"),
            http: reqwest::Client::new(),
            _child: child,
        };
        wait_until("localstripe to answer", Duration::from_secs(30), || async {
            stripe
                .http
                .get(format!("{}v1/balance", stripe.url))
                .bearer_auth(SECRET_KEY)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        stripe
    }

    async fn call(&self, method: reqwest::Method, path: &str, form: &[(&str, &str)]) -> Value {
        self.try_call(method, path, form)
            .await
            .unwrap_or_else(|e| panic!("localstripe {path}: {e}"))
    }

    /// The answer, or the error body of a refusal (a declined card is a 402).
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, &str)],
    ) -> Result<Value, Value> {
        let resp = self
            .http
            .request(method, format!("{}v1/{path}", self.url))
            .bearer_auth(SECRET_KEY)
            .form(form)
            .send()
            .await
            .expect("localstripe answers");
        let status = resp.status();
        let body: Value = resp.json().await.expect("localstripe answers JSON");
        if status.is_success() {
            Ok(body)
        } else {
            Err(body)
        }
    }

    /// Sends every event to `url`, signed with `secret` (once, ~1 s later).
    pub async fn send_webhooks_to(&self, url: &str, secret: &str) {
        let resp = self
            .http
            .post(format!("{}_config/webhooks/souk", self.url))
            .form(&[("url", url), ("secret", secret)])
            .send()
            .await
            .expect("localstripe answers");
        assert!(resp.status().is_success(), "webhook configured");
    }

    /// What the storefront does with Stripe.js: a card payment method,
    /// attached to the intent, then the intent confirmed. Returns the
    /// intent, or Stripe's refusal (a declined card).
    pub async fn pay(&self, intent: &str, card: &str) -> Result<Value, Value> {
        let method = self.card(card).await;
        self.call(
            reqwest::Method::POST,
            &format!("payment_intents/{intent}"),
            &[("payment_method", &method)],
        )
        .await;
        self.try_call(
            reqwest::Method::POST,
            &format!("payment_intents/{intent}/confirm"),
            &[],
        )
        .await
    }

    /// What the storefront does with Stripe.js to save a card: a card
    /// payment method, and the SetupIntent behind `client_secret` confirmed
    /// with it. Returns the SetupIntent, or Stripe's refusal.
    pub async fn confirm_setup(&self, client_secret: &str, card: &str) -> Result<Value, Value> {
        let method = self.card(card).await;
        let intent = client_secret
            .split("_secret_")
            .next()
            .expect("a SetupIntent's client secret");
        self.try_call(
            reqwest::Method::POST,
            &format!("setup_intents/{intent}/confirm"),
            &[
                ("payment_method", &method),
                ("client_secret", client_secret),
            ],
        )
        .await
    }

    /// A card payment method, as Stripe.js makes it from the card form.
    async fn card(&self, number: &str) -> String {
        let method = self
            .call(
                reqwest::Method::POST,
                "payment_methods",
                &[
                    ("type", "card"),
                    ("card[number]", number),
                    ("card[exp_month]", "12"),
                    ("card[exp_year]", "2030"),
                    ("card[cvc]", "123"),
                ],
            )
            .await;
        method["id"]
            .as_str()
            .expect("payment method id")
            .to_string()
    }

    pub async fn subscription(&self, id: &str) -> Value {
        self.get(&format!("subscriptions/{id}")).await
    }

    /// Any object localstripe holds, e.g. `customers/cus_…`.
    pub async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, &[]).await
    }

    /// An intent made outside Souk's payments worker (a second tab, a
    /// stray retry) for `order`, as Stripe would hold it.
    pub async fn create_intent(&self, order: &str, amount: i64) -> Value {
        self.call(
            reqwest::Method::POST,
            "payment_intents",
            &[
                ("amount", &amount.to_string()),
                ("currency", "eur"),
                ("metadata[order_id]", order),
            ],
        )
        .await
    }

    pub async fn intent(&self, id: &str) -> Value {
        self.call(reqwest::Method::GET, &format!("payment_intents/{id}"), &[])
            .await
    }

    /// Every intent localstripe holds whose metadata names `order`.
    pub async fn intents_for(&self, order: &str) -> Vec<Value> {
        let list = self
            .call(reqwest::Method::GET, "payment_intents?limit=1000", &[])
            .await;
        list["data"]
            .as_array()
            .expect("a list")
            .iter()
            .filter(|pi| pi["metadata"]["order_id"] == order)
            .cloned()
            .collect()
    }

    /// Refunds of an intent, newest first.
    pub async fn refunds_of(&self, intent: &str) -> Vec<Value> {
        let list = self
            .call(
                reqwest::Method::GET,
                &format!("refunds?payment_intent={intent}&limit=100"),
                &[],
            )
            .await;
        list["data"].as_array().expect("a list").clone()
    }

    /// The events localstripe made of `kind`, newest first.
    pub async fn events(&self, kind: &str) -> Vec<Value> {
        let list = self
            .call(
                reqwest::Method::GET,
                &format!("events?type={kind}&limit=1000"),
                &[],
            )
            .await;
        list["data"].as_array().expect("a list").clone()
    }
}

/// The `Stripe-Signature` header Stripe would send for `payload` at `t`.
pub fn signature(payload: &str, secret: &str, t: i64) -> String {
    stripe_webhook::Webhook::generate_test_header(payload, secret, Some(t))
}

/// An event as Stripe (2017-08-15) shapes it, about `object`.
pub fn event(id: &str, kind: &str, object: Value) -> Value {
    serde_json::json!({
        "id": id,
        "object": "event",
        "api_version": "2017-08-15",
        "created": now(),
        "livemode": false,
        "type": kind,
        "data": { "object": object },
    })
}

/// Seconds since the epoch, for signatures.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}
