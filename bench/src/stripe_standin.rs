//! A small, fast Stripe stand-in for the checkout benchmark (W2).
//!
//! localstripe is what the tests use, for fidelity; under load it is the
//! bottleneck (it pickles its whole store to disk on every write), so the
//! benchmark brings this instead: the same endpoints the payments worker and
//! a storefront call (create, read, confirm and cancel a PaymentIntent;
//! refunds), idempotency keys honoured, and on confirm a
//! `payment_intent.succeeded` webhook signed exactly as Stripe signs it.
//!
//! ```text
//! souk-bench stripe --port 18420 --webhook http://127.0.0.1:18080/api/v1/stripe/webhook --secret whsec_...
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Form, Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use uuid::Uuid;

pub struct Options {
    pub port: u16,
    pub webhook: String,
    pub secret: String,
}

#[derive(Default)]
struct Store {
    intents: HashMap<String, Value>,
    /// Idempotency key -> the answer first given for it.
    answers: HashMap<String, Value>,
}

#[derive(Clone)]
struct StandIn {
    store: Arc<Mutex<Store>>,
    http: reqwest::Client,
    webhook: Arc<str>,
    secret: Arc<str>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn refused(message: &str) -> Response {
    let body = json!({"error": {"type": "invalid_request_error", "message": message}});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl StandIn {
    /// Runs `make` once per idempotency key; a repeat gets the first answer.
    fn once(&self, headers: &HeaderMap, make: impl FnOnce(&mut Store) -> Value) -> Json<Value> {
        let mut store = self.store.lock().expect("not poisoned");
        let key = key(headers);
        if let Some(answer) = key.as_ref().and_then(|k| store.answers.get(k)) {
            return Json(answer.clone());
        }
        let answer = make(&mut store);
        if let Some(key) = key {
            store.answers.insert(key, answer.clone());
        }
        Json(answer)
    }

    /// Posts the event to the webhook, signed; retried like Stripe does.
    async fn send(&self, kind: &str, object: Value) {
        let event = json!({
            "id": format!("evt_{}", Uuid::now_v7().simple()),
            "object": "event",
            "api_version": "2017-08-15",
            "created": now(),
            "livemode": false,
            "type": kind,
            "data": {"object": object},
        });
        let body = serde_json::to_string(&event).expect("serializes");
        for attempt in 0..5u32 {
            let signature =
                stripe_webhook::Webhook::generate_test_header(&body, &self.secret, Some(now()));
            let sent = self
                .http
                .post(&*self.webhook)
                .header("content-type", "application/json")
                .header("stripe-signature", signature)
                .body(body.clone())
                .send()
                .await;
            if sent.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        eprintln!("stand-in: webhook {kind} not delivered");
    }
}

async fn create_intent(
    State(s): State<StandIn>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let amount: i64 = match form.get("amount").and_then(|a| a.parse().ok()) {
        Some(a) if a > 0 => a,
        _ => return refused("amount must be a positive integer"),
    };
    let metadata: serde_json::Map<String, Value> = form
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((key.to_string(), json!(v)))
        })
        .collect();
    let currency = form
        .get("currency")
        .cloned()
        .unwrap_or_else(|| "eur".into());
    s.once(&headers, |store| {
        let id = format!("pi_{}", Uuid::now_v7().simple());
        let intent = json!({
            "id": id, "object": "payment_intent", "amount": amount, "currency": currency,
            "client_secret": format!("{id}_secret_{}", Uuid::new_v4().simple()),
            "status": "requires_payment_method", "metadata": metadata, "created": now(),
        });
        store.intents.insert(id, intent.clone());
        intent
    })
    .into_response()
}

async fn get_intent(State(s): State<StandIn>, Path(id): Path<String>) -> Response {
    match s.store.lock().expect("not poisoned").intents.get(&id) {
        Some(intent) => Json(intent.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"type": "invalid_request_error"}})),
        )
            .into_response(),
    }
}

/// A card, as Stripe.js makes one from what the customer typed.
async fn create_payment_method(Form(form): Form<HashMap<String, String>>) -> Response {
    let last4: String = form
        .get("card[number]")
        .map(|n| {
            n.chars()
                .rev()
                .take(4)
                .collect::<String>()
                .chars()
                .rev()
                .collect()
        })
        .unwrap_or_else(|| "4242".into());
    Json(json!({
        "id": format!("pm_{}", Uuid::now_v7().simple()), "object": "payment_method",
        "type": "card", "card": {"brand": "visa", "last4": last4, "exp_month": 12, "exp_year": 2034},
    }))
    .into_response()
}

/// An intent updated with the card to pay it with.
async fn update_intent(
    State(s): State<StandIn>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut store = s.store.lock().expect("not poisoned");
    let Some(intent) = store.intents.get_mut(&id) else {
        return refused("no such intent");
    };
    if let Some(pm) = form.get("payment_method") {
        intent["payment_method"] = json!(pm);
    }
    Json(intent.clone()).into_response()
}

/// What Stripe.js does when the customer pays: the charge succeeds and the
/// webhook follows.
async fn confirm(State(s): State<StandIn>, Path(id): Path<String>) -> Response {
    let intent = {
        let mut store = s.store.lock().expect("not poisoned");
        let Some(intent) = store.intents.get_mut(&id) else {
            return refused("no such intent");
        };
        if intent["status"] != "requires_payment_method" {
            return refused("the intent cannot be confirmed now");
        }
        intent["status"] = json!("succeeded");
        intent.clone()
    };
    let sender = s.clone();
    let event_object = intent.clone();
    tokio::spawn(async move { sender.send("payment_intent.succeeded", event_object).await });
    Json(intent).into_response()
}

async fn cancel(State(s): State<StandIn>, Path(id): Path<String>) -> Response {
    let mut store = s.store.lock().expect("not poisoned");
    let Some(intent) = store.intents.get_mut(&id) else {
        return refused("no such intent");
    };
    if intent["status"] == "succeeded" {
        return refused("a succeeded intent cannot be cancelled");
    }
    intent["status"] = json!("canceled");
    Json(intent.clone()).into_response()
}

async fn refund(
    State(s): State<StandIn>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let intent = form.get("payment_intent").cloned().unwrap_or_default();
    let amount: i64 = form.get("amount").and_then(|a| a.parse().ok()).unwrap_or(0);
    s.once(&headers, |_| {
        json!({
            "id": format!("re_{}", Uuid::now_v7().simple()), "object": "refund",
            "payment_intent": intent, "amount": amount, "status": "succeeded",
        })
    })
    .into_response()
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let state = StandIn {
        store: Arc::default(),
        http: reqwest::Client::new(),
        webhook: opts.webhook.into(),
        secret: opts.secret.into(),
    };
    let app = Router::new()
        .route("/v1/payment_intents", post(create_intent))
        .route(
            "/v1/payment_intents/{id}",
            get(get_intent).post(update_intent),
        )
        .route("/v1/payment_methods", post(create_payment_method))
        .route("/v1/payment_intents/{id}/confirm", post(confirm))
        .route("/v1/payment_intents/{id}/cancel", post(cancel))
        .route("/v1/refunds", post(refund))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port)).await?;
    eprintln!("Stripe stand-in on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
