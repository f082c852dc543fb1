//! Recurring-commerce helpers: saving a card the way a storefront does,
//! membership plans, Stripe events about subscriptions, and replenishment
//! schedules with the replenisher's test settings.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::stripe::{WEBHOOK_SECRET, event};
use souk_workers::replenisher::ReplenisherConfig;

use super::{
    App,
    catalog::{call, json_of},
    orders::{Customer, Market, PIPELINE_WAIT, customer, post_event},
};

/// GETs `path` until `done` holds for the answer; returns it.
pub async fn poll(app: &App, token: &str, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
    loop {
        let resp = call(app, token, Method::GET, path, json!({})).await;
        let got: Value = resp.json().await.unwrap_or(Value::Null);
        if done(&got) {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never got there; last seen: {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts saving a card as a storefront does, up to the card form: asks
/// Souk for a SetupIntent and waits for its client secret. Returns the
/// card's id (still `pending`) and the secret.
pub async fn pending_card(app: &App, token: &str) -> (String, String) {
    let started = json_of(
        call(app, token, Method::POST, "/me/payment-methods", json!({})).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let id = started["id"].as_str().unwrap().to_string();
    let path = format!("/me/payment-methods/{id}");
    let ready = poll(app, token, &path, |m| m["client_secret"].is_string()).await;
    assert_eq!(ready["status"], "pending");
    (id, ready["client_secret"].as_str().unwrap().to_string())
}

/// Saves `card` for the customer as a storefront does: asks Souk for a
/// SetupIntent, confirms it with Stripe, tells Souk; returns the saved
/// card's id once it is active.
pub async fn saved_card(m: &Market, token: &str, card: &str) -> String {
    let app = &m.app;
    let started = json_of(
        call(app, token, Method::POST, "/me/payment-methods", json!({})).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(started["status"], "pending");
    let id = started["id"].as_str().unwrap().to_string();
    let path = format!("/me/payment-methods/{id}");
    let ready = poll(app, token, &path, |m| m["client_secret"].is_string()).await;
    m.stripe
        .confirm_setup(ready["client_secret"].as_str().unwrap(), card)
        .await
        .expect("the card is accepted for saving");
    json_of(
        call(
            app,
            token,
            Method::POST,
            &format!("{path}/confirm"),
            json!({}),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let active = poll(app, token, &path, |m| m["status"] == "active").await;
    assert_eq!(active["last4"], card[card.len() - 4..]);
    assert!(
        active["client_secret"].is_null(),
        "the secret is gone once saved"
    );
    id
}

/// A verified customer with a saved `card`; returns them, the card's id and
/// their default address's.
pub async fn customer_with_card(m: &Market, card: &str) -> (Customer, String, String) {
    let buyer = customer(&m.app).await;
    let saved = saved_card(m, &buyer.token, card).await;
    let address = address_of(&m.app, buyer.id).await;
    (buyer, saved, address)
}

/// An admin's membership plan, once it exists at Stripe (`active`).
pub async fn plan(app: &App, admin: &str, body: Value) -> Value {
    let created = json_of(
        call(app, admin, Method::POST, "/admin/membership-plans", body).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(created["status"], "pending");
    let id = created["id"].clone();
    let plans = poll(app, admin, "/membership-plans", |plans| {
        plans
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["id"] == id))
    })
    .await;
    plans
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap()
        .clone()
}

/// Posts a Stripe event about `object`, signed, made `created` (seconds);
/// returns its id once the stripe-events worker applied it.
pub async fn stripe_event(app: &App, kind: &str, object: Value, created: i64) -> String {
    let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
    let mut event = event(&id, kind, object);
    event["created"] = json!(created);
    let resp = post_event(app, &event, WEBHOOK_SECRET, souk_testkit::stripe::now()).await;
    assert!(
        resp.status().is_success(),
        "{kind} accepted: {}",
        resp.status()
    );
    applied(app, &id).await;
    id
}

/// Waits until the stripe-events worker has applied event `id`.
pub async fn applied(app: &App, id: &str) {
    let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM processed_messages p JOIN outbox o ON o.id = p.message_id
              WHERE p.consumer = 'stripe-events' AND o.envelope->'payload'->>'event_id' = $1",
        )
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        if done > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "event {id} never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replenisher polling fast, retrying after `retry_after`.
pub fn replenisher(retry_after: Duration, max_attempts: i32) -> ReplenisherConfig {
    ReplenisherConfig {
        poll: Duration::from_millis(100),
        retry_after,
        max_attempts,
    }
}

/// `POST /me/replenishments` with `body`, answered 201; the schedule.
pub async fn schedule(app: &App, token: &str, body: Value) -> Value {
    json_of(
        call(app, token, Method::POST, "/me/replenishments", body).await,
        StatusCode::CREATED,
    )
    .await
}

/// The id of a schedule made with `body`.
pub async fn schedule_id(app: &App, token: &str, body: Value) -> String {
    let made = schedule(app, token, body).await;
    made["id"].as_str().unwrap().to_string()
}

/// The customer's default address.
pub async fn address_of(app: &App, customer: uuid::Uuid) -> String {
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM addresses WHERE user_id = $1 AND is_default")
            .bind(customer)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    id.to_string()
}

/// A schedule's runs as (due_at, status, attempt, reason), oldest first.
pub async fn runs(
    app: &App,
    schedule: &str,
) -> Vec<(chrono::DateTime<chrono::Utc>, String, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT due_at, status, attempt, reason FROM replenishment_runs WHERE schedule_id = $1::uuid ORDER BY due_at",
    )
    .bind(schedule)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

/// Makes the schedule due now (as time passing would).
pub async fn make_due(app: &App, schedule: &str) {
    make_due_on(&app.db.pool, schedule).await;
}

/// [`make_due`] on `db`: in a transaction, the replenisher sees it only
/// together with the test's other changes.
pub async fn make_due_on<'e>(db: impl sqlx::PgExecutor<'e>, schedule: &str) {
    sqlx::query(
        "UPDATE replenishment_schedules SET next_run_at = now() - interval '1 second' WHERE id = $1::uuid",
    )
    .bind(schedule)
    .execute(db)
    .await
    .unwrap();
}

/// The caller's in-app notifications of `kind` (`GET /me/notifications`),
/// newest first, once there are at least `n`.
pub async fn notifications(app: &App, token: &str, kind: &str, n: usize) -> Vec<Value> {
    let of_kind = |page: &Value| -> Vec<Value> {
        page["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|i| i["kind"] == kind)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    let page = poll(app, token, "/me/notifications?per_page=100", |page| {
        of_kind(page).len() >= n
    })
    .await;
    of_kind(&page)
}
