//! A worker process killed with SIGKILL in the middle of the pipeline: after
//! a replacement starts, the order completes and nothing is applied twice.
//! The payments worker runs as the real binary; the rest of the pipeline
//! runs in the test.

mod common;

use std::{process::Stdio, time::Duration};

use common::{
    Pipeline, Workers,
    orders::{
        PIPELINE_WAIT, add_to_cart, checkout, customer, listing, pay, stock, stripe_for, wait_for,
    },
    spawn_app,
};
use souk_testkit::{
    amqp_url, bin_path, broker, count,
    proxy::Tarpit,
    stripe::{CARD_OK, SECRET_KEY},
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

#[tokio::test]
async fn a_payments_worker_killed_mid_call_loses_nothing_and_charges_once() {
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
