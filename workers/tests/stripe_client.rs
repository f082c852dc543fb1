//! Every Stripe write carries an idempotency key derived from what it is
//! about, so a retry after a crash between the Stripe call and the database
//! write gets the first answer back instead of a second intent or refund.
//! (localstripe ignores the header, so this listens to what is sent.)

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::HeaderMap, routing::post};
use serde_json::{Value, json};
use souk_workers::payments::stripe_api::{CallError, Stripe, StripeConfig};
use uuid::Uuid;

type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A Stripe that records each request's path and idempotency key.
async fn listening_stripe(answer: Value, status: u16) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = |path: &'static str| {
        let answer = answer.clone();
        move |State(seen): State<Seen>, headers: HeaderMap| {
            let answer = answer.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                seen.lock().unwrap().push((path.to_string(), key));
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    Json(answer),
                )
            }
        }
    };
    let app = Router::new()
        .route("/v1/payment_intents", post(record("intents")))
        .route("/v1/refunds", post(record("refunds")))
        .route("/v1/customers", post(record("customers")))
        .route("/v1/customers/{id}", post(record("customer")))
        .route("/v1/setup_intents", post(record("setup_intents")))
        .route("/v1/payment_methods/{id}/attach", post(record("attach")))
        .route(
            "/v1/payment_methods/{id}",
            axum::routing::get(record("read")),
        )
        .route("/v1/plans", post(record("plans")))
        .route("/v1/subscriptions", post(record("subscriptions")))
        .route("/v1/subscriptions/{id}", post(record("subscription")))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/"), seen)
}

fn client(base: &str) -> Stripe {
    Stripe::new(&StripeConfig {
        secret_key: "sk_test_keys".into(),
        api_base: base.into(),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

#[tokio::test]
async fn an_intent_and_a_refund_are_asked_for_with_keys_of_their_own() {
    let intent = json!({"id": "pi_1", "client_secret": "pi_1_secret", "status": "requires_payment_method", "amount": 1299});
    let (base, seen) = listening_stripe(intent, 200).await;
    let stripe = client(&base);
    let order = Uuid::now_v7();
    // A crash after the call: the retry asks again, with the same key.
    for _ in 0..2 {
        let got = stripe.create_intent(order, 1299, "eur").await.unwrap();
        assert_eq!(got.id, "pi_1");
    }
    let refund = Uuid::now_v7();
    stripe.refund(refund, "pi_1", 500, order).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let key = Some(format!("pi-{order}"));
    assert_eq!(
        seen,
        [
            ("intents".to_string(), key.clone()),
            ("intents".to_string(), key),
            ("refunds".to_string(), Some(format!("refund-{refund}")))
        ]
    );
}

#[tokio::test]
async fn recurring_writes_are_keyed_by_what_they_are_for() {
    // One answer that reads as any of the objects asked for.
    let answer = json!({"id": "obj_1", "status": "active", "client_secret": "obj_1_secret",
                        "amount": 999, "cancel_at_period_end": true, "current_period_end": 1});
    let (base, seen) = listening_stripe(answer, 200).await;
    let stripe = client(&base);
    let (user, method, plan, membership, order) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    stripe.create_customer(user, "a@b.c", "Ann").await.unwrap();
    stripe.create_setup_intent(method, "cus_1").await.unwrap();
    stripe.keep_payment_method("cus_1", "pm_1").await.unwrap();
    stripe
        .create_plan(
            plan,
            "Plus",
            999,
            "eur",
            souk_workers::payments::stripe_api::Interval::Month,
        )
        .await
        .unwrap();
    stripe
        .make_default("cus_1", "pm_1", &format!("default-{membership}"))
        .await
        .unwrap();
    stripe
        .create_subscription(membership, "cus_1", "plan_1")
        .await
        .unwrap();
    stripe.cancel_at_period_end("sub_1").await.unwrap();
    stripe
        .charge_off_session(order, 999, "eur", "cus_1", "pm_1")
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    let expected = [
        ("customers", Some(format!("cus-{user}"))),
        ("setup_intents", Some(format!("seti-{method}"))),
        ("attach", Some("attach-pm_1".to_string())),
        ("read", None),
        ("plans", Some(format!("plan-{plan}"))),
        ("customer", Some(format!("default-{membership}"))),
        ("subscriptions", Some(format!("sub-{membership}"))),
        ("subscription", Some("cancel-at-end-sub_1".to_string())),
        ("intents", Some(format!("pi-{order}"))),
    ]
    .map(|(path, key)| (path.to_string(), key));
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_refusal_is_told_apart_from_an_outage() {
    let error = json!({"error": {"type": "invalid_request_error", "message": "amount too small"}});
    let (base, _) = listening_stripe(error, 400).await;
    match client(&base).create_intent(Uuid::now_v7(), 1, "eur").await {
        Err(CallError::Refused {
            status: 400,
            message,
            card: false,
        }) => assert_eq!(message, "amount too small"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (base, _) = listening_stripe(json!({"error": {"type": "api_error"}}), 503).await;
    assert!(matches!(
        client(&base)
            .create_intent(Uuid::now_v7(), 100, "eur")
            .await,
        Err(CallError::Unavailable(_))
    ));
    let nowhere = format!("http://127.0.0.1:{}/", souk_testkit::free_port());
    assert!(matches!(
        client(&nowhere)
            .create_intent(Uuid::now_v7(), 100, "eur")
            .await,
        Err(CallError::Unavailable(_))
    ));
}
