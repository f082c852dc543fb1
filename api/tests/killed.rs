//! A worker process killed with SIGKILL in the middle of the pipeline: after
//! a replacement starts, the order completes and nothing is applied twice.
//! The payments worker runs as the real binary; the rest of the pipeline
//! runs in the test.

mod common;

use std::{process::Stdio, time::Duration};

use common::{
    Pipeline, Workers,
    orders::{
        Customer, Listing, PIPELINE_WAIT, add_to_cart, checkout, customer, listing, pay, stock,
        stripe_for, wait_for,
    },
    spawn_app,
    stripe_proxy::StripeProxy,
};
use reqwest::Method;
use souk_testkit::{
    amqp_url, bin_path, broker, count,
    proxy::Tarpit,
    stripe::{CARD_OK, LocalStripe, SECRET_KEY},
    wait_until,
};
use tokio::process::{Child, Command};

const DELAYS: &str = "500,1000,2000,4000";

fn payments(app: &common::App, pipeline: &Pipeline, stripe_base: &str) -> Child {
    Command::new(bin_path("payments"))
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env("DATABASE_URL", &app.db.url)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_PREFIX", &pipeline.prefix)
        .env("OPS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .env("STRIPE_SECRET_KEY", SECRET_KEY)
        .env("STRIPE_API_BASE", stripe_base)
        .env("STRIPE_TIMEOUT_MS", "60000")
        .env("PAYMENTS_LEASE_MS", "1000")
        .env("RETRY_DELAYS_MS", DELAYS)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the payments binary starts")
}

async fn kill9(child: &mut Child) {
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reaped");
}

/// The API and the pipeline without its payments worker (each test runs
/// the real binary itself), and a customer with a walnut board in the cart.
async fn a_board_in_a_cart() -> (common::App, LocalStripe, Pipeline, Listing, Customer) {
    let app = spawn_app(&amqp_url()).await;
    let stripe = stripe_for(&app).await;
    let pipeline = Pipeline::with(
        &app,
        &amqp_url(),
        Some(&stripe),
        Workers {
            payments: false,
            ..Workers::ALL
        },
    );
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 1).await;
    (app, stripe, pipeline, oak, buyer)
}

#[tokio::test]
async fn a_payments_worker_killed_mid_call_loses_nothing_and_charges_once() {
    let (app, stripe, pipeline, oak, buyer) = a_board_in_a_cart().await;

    // The first payments process takes the order's stock.reserved message and
    // hangs calling a Stripe that never answers; then it is killed.
    let tarpit = Tarpit::start().await;
    let mut first = payments(&app, &pipeline, &format!("http://{}/", tarpit.addr));
    let order_id = checkout(&app, &buyer.token).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until(
        "the first worker to be calling Stripe",
        PIPELINE_WAIT,
        || async {
            count(
                &app.db.pool,
                "SELECT count(*) FROM message_claims WHERE consumer = 'payments'",
            )
            .await
                == 1
        },
    )
    .await;
    kill9(&mut first).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'payments'"
        )
        .await,
        0
    );

    // A replacement gets the redelivery once the dead one's lease runs out.
    let mut second = payments(&app, &pipeline, &stripe.url);
    pay(&app, &stripe, &buyer.token, &order_id, CARD_OK).await;
    wait_for(&app, &buyer.token, &order_id, "paid").await;

    assert_eq!(
        stripe.intents_for(&order_id).await.len(),
        1,
        "one PaymentIntent"
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM payments").await,
        1
    );
    assert_eq!(stock(&app, &oak.variant).await, (4, 0), "sold once");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'payments'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM message_claims WHERE consumer = 'payments'"
        )
        .await,
        0
    );
    let conn = souk_shared::amqp::connect(&amqp_url(), "killed-test")
        .await
        .unwrap();
    assert_eq!(
        broker::ready_count(&conn, &pipeline.names.parking_queue("payments")).await,
        0
    );

    kill9(&mut second).await;
    let delays: Vec<u64> = DELAYS.split(',').map(|d| d.parse().unwrap()).collect();
    broker::delete_group(&conn, &pipeline.names, "payments", &delays).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    pipeline.stop().await;
}

/// The dangerous moment: Stripe HAS made the PaymentIntent, but the worker
/// is killed before it hears back (a proxy forwards the create and holds
/// the answer). The replacement asks again with the same idempotency key;
/// real Stripe would answer with the first intent, localstripe (which
/// ignores keys) makes a second. Either way the order must be paid once,
/// one payment counted, and only the stored intent offered to the customer.
#[tokio::test]
async fn a_payments_worker_killed_after_stripe_made_the_intent_charges_once() {
    let (app, stripe, pipeline, oak, buyer) = a_board_in_a_cart().await;

    let proxy = StripeProxy::start(&stripe.url).await;
    proxy.hold(Method::POST, "/v1/payment_intents");
    let mut first = payments(&app, &pipeline, &proxy.url);
    let order_id = checkout(&app, &buyer.token).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Stripe has made the intent; the worker waits for an answer that never comes.
    let held = proxy.wait_held(1, PIPELINE_WAIT).await;
    let orphan = held[0]["id"].as_str().expect("an intent id").to_string();
    assert_eq!(stripe.intents_for(&order_id).await.len(), 1);
    kill9(&mut first).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'payments'"
        )
        .await,
        0
    );

    proxy.pass_through();
    let mut second = payments(&app, &pipeline, &proxy.url);
    let paid_with = pay(&app, &stripe, &buyer.token, &order_id, CARD_OK).await;
    wait_for(&app, &buyer.token, &order_id, "paid").await;

    // The retry carried the same key as the first create.
    let creates = proxy.seen_to(Method::POST, "/v1/payment_intents");
    let keys: Vec<_> = creates.iter().map(|s| s.idempotency_key.clone()).collect();
    assert!(creates.len() >= 2, "{creates:?}");
    assert!(
        keys.iter()
            .all(|k| k.as_deref() == Some(&*format!("pi-{order_id}"))),
        "{keys:?}"
    );

    // Once in the database.
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM payments").await,
        1
    );
    let stored: String = sqlx::query_scalar("SELECT payment_intent_id FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, paid_with);
    let counted: String = sqlx::query_scalar("SELECT payment_intent_id FROM payments")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(counted, stored);
    assert_eq!(stock(&app, &oak.variant).await, (4, 0), "sold once");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM order_events WHERE subject = 'order' AND to_status = 'paid'"
        )
        .await,
        1,
        "paid once"
    );

    // At Stripe: exactly the stored intent succeeded. localstripe ignores
    // idempotency keys, so the retry made a second intent where real Stripe
    // would have answered with the first; that first one (its answer lost)
    // was never shown to the customer, so it cannot be paid from the
    // storefront, and were it paid some other way the second-payment path
    // refunds it (test `a_second_successful_payment_is_refunded_and_flagged`).
    let intents = stripe.intents_for(&order_id).await;
    let succeeded: Vec<_> = intents
        .iter()
        .filter(|pi| pi["status"] == "succeeded")
        .map(|pi| pi["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(succeeded, std::slice::from_ref(&stored), "{intents:?}");
    let secret: String = sqlx::query_scalar("SELECT client_secret FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(
        secret.starts_with(&format!("{stored}_")),
        "the customer is only ever given the stored intent's secret, not {orphan}'s: {secret}"
    );

    kill9(&mut second).await;
    let conn = souk_shared::amqp::connect(&amqp_url(), "killed-test")
        .await
        .unwrap();
    let delays: Vec<u64> = DELAYS.split(',').map(|d| d.parse().unwrap()).collect();
    broker::delete_group(&conn, &pipeline.names, "payments", &delays).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    pipeline.stop().await;
}
