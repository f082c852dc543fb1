//! The payment hard cases: a webhook before the intent was stored, a
//! payment after the reservation expired, a second successful payment, and a
//! cancel racing a payment. Stripe is localstripe; where a case needs an
//! event at a moment localstripe would not send it, the test holds the
//! webhooks back and posts localstripe's own event later, signed.
//! Also: an unpaid order cancelled (its intent cancelled at Stripe), a
//! cancel fired together with its payment's webhook, and one webhook event
//! posted three times at once, and an event of a type Souk does not use.

mod common;

use common::{
    App, Pipeline, Workers, admin,
    catalog::{call, json_of},
    orders::{
        Market, PIPELINE_WAIT, add_to_cart, checkout, customer, listing, mails_about, mails_logged,
        of_order, order, pay, post_event, settle, stock, stripe_for, wait_for,
    },
    spawn_app,
    stripe_proxy::{StripeProxy, payments_through},
    token_for,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{
    amqp_url, count,
    stripe::{CARD_OK, LocalStripe, WEBHOOK_SECRET, now},
    wait_until,
};
use std::time::Duration;
use uuid::Uuid;

fn id(order: &Value) -> String {
    order["id"].as_str().unwrap().to_string()
}

/// The event localstripe made when `intent` was charged.
async fn charged_event(stripe: &LocalStripe, intent: &str) -> Value {
    let events = stripe.events("payment_intent.succeeded").await;
    events
        .into_iter()
        .find(|e| e["data"]["object"]["id"] == intent)
        .unwrap_or_else(|| panic!("no payment_intent.succeeded for {intent}"))
}

async fn deliver(app: &App, event: &Value) {
    let resp = post_event(app, event, WEBHOOK_SECRET, now()).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// How many in-app notices of `kind` the account `email` has.
async fn notices_of(app: &App, email: &str, kind: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM notifications n JOIN users u ON u.id = n.user_id
          WHERE u.email = $1 AND n.kind = $2",
    )
    .bind(email)
    .bind(kind)
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

/// An admin (their email) to be told, and a customer who has paid for a board.
async fn an_admin_and_a_paid_board(market: &Market) -> (String, common::orders::Customer, Value) {
    let root = admin(&market.app).await;
    let buyer = market.shopper(&[(&market.oak, 1)]).await;
    let paid = common::orders::checkout_and_pay(&market.app, &market.stripe, &buyer.token).await;
    (root, buyer, paid)
}

/// Moves the order's reservation into the past; the sweep expires it.
async fn run_out(app: &App, order: &str) {
    sqlx::query("UPDATE orders SET reserved_until = now() - interval '1 second' WHERE id = $1")
        .bind(Uuid::parse_str(order).unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
}

async fn order_column<T>(app: &App, column: &str, order: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {column} FROM orders WHERE id = $1"
    )))
    .bind(Uuid::parse_str(order).unwrap())
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_webhook_before_the_intent_was_stored_still_pays_the_order() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = stripe_for(&app).await;
    // No payments worker yet: the order stays reserved, no intent stored.
    let workers = Workers {
        payments: false,
        ..Workers::ALL
    };
    let mut pipeline = Pipeline::with(&app, &amqp_url(), Some(&stripe), workers);
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 1).await;
    let order_id = id(&checkout(&app, &buyer.token).await);
    let reserved = wait_for(&app, &buyer.token, &order_id, "reserved").await;

    // An intent for the order exists at Stripe and is paid before Souk's
    // worker has stored it (a crash after the Stripe call, say).
    let total = reserved["total_minor"].as_i64().unwrap();
    let intent = stripe.create_intent(&order_id, total).await;
    let intent = intent["id"].as_str().unwrap();
    stripe.pay(intent, CARD_OK).await.unwrap();
    wait_for(&app, &buyer.token, &order_id, "paid").await;
    assert_eq!(
        order_column::<Option<String>>(&app, "payment_intent_id", &order_id)
            .await
            .as_deref(),
        Some(intent)
    );
    assert_eq!(stock(&app, &oak.variant).await, (4, 0));

    // The worker comes back and finds nothing left to do.
    pipeline.run_payments(&app, &stripe);
    wait_until(
        "the stock.reserved message handled",
        PIPELINE_WAIT,
        || async {
            count(
                &app.db.pool,
                "SELECT count(*) FROM processed_messages WHERE consumer = 'payments'",
            )
            .await
                == 1
        },
    )
    .await;
    assert_eq!(
        stripe.intents_for(&order_id).await.len(),
        1,
        "no second intent"
    );
    assert_eq!(order(&app, &buyer.token, &order_id).await["status"], "paid");
    pipeline.stop().await;
}

#[tokio::test]
async fn a_payment_after_expiry_is_kept_if_the_stock_is_there_and_refunded_if_not() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = LocalStripe::start().await; // webhooks held back
    let pipeline = Pipeline::checkout(&app, &stripe);
    let plenty = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let last = listing(&app, "tea", "Teapot", 3000, 1).await;
    let (kept, lost, rival) = (
        customer(&app).await,
        customer(&app).await,
        customer(&app).await,
    );
    add_to_cart(&app, &kept.token, &plenty.variant, 1).await;
    add_to_cart(&app, &lost.token, &last.variant, 1).await;
    add_to_cart(&app, &rival.token, &last.variant, 1).await;
    let kept_order = id(&checkout(&app, &kept.token).await);
    let lost_order = id(&checkout(&app, &lost.token).await);

    // Both are paid at Stripe, but the news arrives after their reservations ran out.
    let kept_intent = pay(&app, &stripe, &kept.token, &kept_order, CARD_OK).await;
    let lost_intent = pay(&app, &stripe, &lost.token, &lost_order, CARD_OK).await;
    run_out(&app, &kept_order).await;
    run_out(&app, &lost_order).await;
    wait_for(&app, &kept.token, &kept_order, "expired").await;
    wait_for(&app, &lost.token, &lost_order, "expired").await;
    assert_eq!(stock(&app, &last.variant).await, (1, 0), "released");
    // Meanwhile someone else takes the teapot.
    let rival_order = id(&checkout(&app, &rival.token).await);
    wait_for(&app, &rival.token, &rival_order, "awaiting_payment").await;

    deliver(&app, &charged_event(&stripe, &kept_intent).await).await;
    deliver(&app, &charged_event(&stripe, &lost_intent).await).await;

    // Still in stock: the sale stands.
    wait_for(&app, &kept.token, &kept_order, "paid").await;
    assert_eq!(stock(&app, &plenty.variant).await, (4, 0));
    // Sold out meanwhile: refunded in full, automatically.
    let refunded = wait_for(&app, &lost.token, &lost_order, "refunded").await;
    let total = refunded["total_minor"].as_i64().unwrap();
    assert_eq!(refunded["refunded_minor"], total);
    let refunds = stripe.refunds_of(&lost_intent).await;
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["amount"], total);
    assert_eq!(
        stock(&app, &last.variant).await,
        (1, 1),
        "the rival still holds the last one"
    );
    assert!(
        refunded["seller_orders"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "cancelled")
    );
    mails_about(&lost.email, "Refund of", 1).await;
    pipeline.stop().await;
}

/// Puts `variant` and the coupon `code` in the buyer's cart and checks it
/// out; returns the order's id.
async fn checkout_with_coupon(
    app: &App,
    buyer: &common::orders::Customer,
    variant: &str,
    code: &str,
) -> String {
    add_to_cart(app, &buyer.token, variant, 1).await;
    let body = json!({"code": code});
    let resp = call(app, &buyer.token, Method::PUT, "/cart/coupon", body).await;
    let cart = json_of(resp, StatusCode::OK).await;
    assert!(
        cart["coupon"]["discount_minor"].as_i64().unwrap() > 0,
        "{cart}"
    );
    id(&checkout(app, &buyer.token).await)
}

#[tokio::test]
async fn a_payment_after_expiry_is_refunded_if_its_coupon_was_used_up_meanwhile() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = LocalStripe::start().await; // webhooks held back
    let pipeline = Pipeline::checkout(&app, &stripe);
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    // One use in all; one use per customer.
    for body in [
        json!({"code": "ONCE", "percent_off": 20, "max_uses": 1}),
        json!({"code": "EACH", "amount_off_minor": 500, "max_uses_per_customer": 1}),
    ] {
        let resp = call(&app, &oak.seller, Method::POST, "/seller/coupons", body).await;
        json_of(resp, StatusCode::CREATED).await;
    }
    let (late, rival, again) = (
        customer(&app).await,
        customer(&app).await,
        customer(&app).await,
    );
    let late_order = checkout_with_coupon(&app, &late, &oak.variant, "ONCE").await;
    let first_order = checkout_with_coupon(&app, &again, &oak.variant, "EACH").await;

    // Both are paid at Stripe, but the news arrives after their
    // reservations ran out, which freed their coupons' uses.
    let late_intent = pay(&app, &stripe, &late.token, &late_order, CARD_OK).await;
    let first_intent = pay(&app, &stripe, &again.token, &first_order, CARD_OK).await;
    run_out(&app, &late_order).await;
    run_out(&app, &first_order).await;
    wait_for(&app, &late.token, &late_order, "expired").await;
    wait_for(&app, &again.token, &first_order, "expired").await;

    // Meanwhile the uses are taken and paid for: ONCE's only use by someone
    // else, EACH's by the same customer's second order.
    let rival_order = checkout_with_coupon(&app, &rival, &oak.variant, "ONCE").await;
    let second_order = checkout_with_coupon(&app, &again, &oak.variant, "EACH").await;
    for (buyer, order_id) in [(&rival, &rival_order), (&again, &second_order)] {
        let intent = pay(&app, &stripe, &buyer.token, order_id, CARD_OK).await;
        deliver(&app, &charged_event(&stripe, &intent).await).await;
        wait_for(&app, &buyer.token, order_id, "paid").await;
    }

    // The late payments come in. The boards are still there, but the
    // discounts they were priced with are not: refunded in full, saying why.
    deliver(&app, &charged_event(&stripe, &late_intent).await).await;
    deliver(&app, &charged_event(&stripe, &first_intent).await).await;
    for (buyer, order_id, intent) in [
        (&late, &late_order, &late_intent),
        (&again, &first_order, &first_intent),
    ] {
        let refunded = wait_for(&app, &buyer.token, order_id, "refunded").await;
        assert_eq!(refunded["paid_at"], Value::Null, "never paid");
        let total = refunded["total_minor"].as_i64().unwrap();
        assert_eq!(refunded["refunded_minor"], total);
        let reason = refunded["failure_reason"].as_str().unwrap();
        assert!(reason.contains("coupon"), "{reason}");
        let refunds = stripe.refunds_of(intent).await;
        assert_eq!(refunds.len(), 1);
        assert_eq!(refunds[0]["amount"], total);
    }
    mails_about(&late.email, "Refund of", 1).await;
    assert_eq!(
        stock(&app, &oak.variant).await,
        (3, 0),
        "two boards sold, the late orders' reservations not kept"
    );
    let uses: Vec<(String, i32)> = sqlx::query_as("SELECT code, uses FROM coupons ORDER BY code")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(uses, [("EACH".to_string(), 1), ("ONCE".to_string(), 1)]);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM coupon_redemptions").await,
        2
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM orders WHERE status = 'paid' AND coupon_id IS NOT NULL"
        )
        .await,
        2
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn a_second_successful_payment_is_refunded_and_flagged() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let order_id = id(&checkout(app, &buyer.token).await);
    let first = pay(app, stripe, &buyer.token, &order_id, CARD_OK).await;
    let paid = wait_for(app, &buyer.token, &order_id, "paid").await;
    let total = paid["total_minor"].as_i64().unwrap();

    // A second intent for the same order gets paid too (another tab, say).
    let second = stripe.create_intent(&order_id, total).await;
    let second = second["id"].as_str().unwrap();
    stripe.pay(second, CARD_OK).await.unwrap();

    wait_until("the second payment refunded", PIPELINE_WAIT, || async {
        stripe.refunds_of(second).await.len() == 1
    })
    .await;
    assert_eq!(stripe.refunds_of(second).await[0]["amount"], total);
    assert!(
        stripe.refunds_of(&first).await.is_empty(),
        "the first payment stands"
    );
    let still = order(app, &buyer.token, &order_id).await;
    assert_eq!(still["status"], "paid");
    assert_eq!(still["refunded_minor"], 0);
    assert_eq!(stock(app, &oak.variant).await, (4, 0), "sold once");

    let flagged = json_of(
        call(
            app,
            &root,
            Method::GET,
            "/admin/payments/flagged",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(flagged["total"], 1);
    assert_eq!(flagged["items"][0]["payment_intent_id"], second);
    assert_eq!(flagged["items"][0]["duplicate"], true);
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM notifications WHERE kind = 'payment_flagged'"
        )
        .await,
        1
    );
    wait_until("the refund recorded", PIPELINE_WAIT, || async {
        count(
            &app.db.pool,
            "SELECT count(*) FROM refunds WHERE status = 'succeeded'",
        )
        .await
            == 1
    })
    .await;
    market.close().await;
}

#[tokio::test]
async fn a_payment_for_less_than_the_order_never_pays_it_and_goes_back() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let order_id = id(&checkout(app, &buyer.token).await);
    let placed = wait_for(app, &buyer.token, &order_id, "awaiting_payment").await;
    let total = placed["total_minor"].as_i64().unwrap();

    // An intent made outside Souk, naming this order, for one unit.
    let cheap = stripe.create_intent(&order_id, 100).await;
    let cheap = cheap["id"].as_str().unwrap();
    stripe.pay(cheap, CARD_OK).await.unwrap();
    wait_until("the cheap payment refunded", PIPELINE_WAIT, || async {
        stripe.refunds_of(cheap).await.len() == 1
    })
    .await;
    assert_eq!(stripe.refunds_of(cheap).await[0]["amount"], 100);
    let still = order(app, &buyer.token, &order_id).await;
    assert_eq!(still["status"], "awaiting_payment", "{still}");
    assert_eq!(stock(app, &oak.variant).await, (5, 1), "still only held");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM payments WHERE flagged_reason LIKE '%amount or currency%'"
        )
        .await,
        1
    );

    // The real payment still pays it.
    pay(app, stripe, &buyer.token, &order_id, CARD_OK).await;
    let paid = wait_for(app, &buyer.token, &order_id, "paid").await;
    assert_eq!(paid["total_minor"], total);
    assert_eq!(stock(app, &oak.variant).await, (4, 0));
    market.close().await;
}

#[tokio::test]
async fn a_cancel_racing_a_payment_ends_with_one_of_them_undone() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = LocalStripe::start().await; // webhooks held back
    let pipeline = Pipeline::checkout(&app, &stripe);
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let (early, late) = (customer(&app).await, customer(&app).await);
    add_to_cart(&app, &early.token, &oak.variant, 1).await;
    add_to_cart(&app, &late.token, &oak.variant, 1).await;
    let early_order = id(&checkout(&app, &early.token).await);
    let late_order = id(&checkout(&app, &late.token).await);
    let early_intent = pay(&app, &stripe, &early.token, &early_order, CARD_OK).await;
    let late_intent = pay(&app, &stripe, &late.token, &late_order, CARD_OK).await;

    // The cancel wins: the payment that lands after it is refunded.
    let cancel = |token: String, order: String| {
        let app = &app;
        async move {
            let path = format!("/orders/{order}/cancel");
            json_of(
                call(
                    app,
                    &token,
                    Method::POST,
                    &path,
                    json!({"reason": "changed my mind"}),
                )
                .await,
                StatusCode::OK,
            )
            .await
        }
    };
    let cancelled = cancel(early.token.clone(), early_order.clone()).await;
    assert_eq!(cancelled["status"], "cancelled");
    deliver(&app, &charged_event(&stripe, &early_intent).await).await;
    let undone = wait_for(&app, &early.token, &early_order, "refunded").await;
    assert_eq!(undone["refunded_minor"], undone["total_minor"]);
    assert_eq!(stripe.refunds_of(&early_intent).await.len(), 1);

    // The payment wins: the cancel that comes after it refunds the sale.
    deliver(&app, &charged_event(&stripe, &late_intent).await).await;
    wait_for(&app, &late.token, &late_order, "paid").await;
    wait_until(
        "one sold, the cancelled one's unit released",
        PIPELINE_WAIT,
        || async { stock(&app, &oak.variant).await == (4, 0) },
    )
    .await;
    cancel(late.token.clone(), late_order.clone()).await;
    let back = wait_for(&app, &late.token, &late_order, "refunded").await;
    assert_eq!(back["refunded_minor"], back["total_minor"]);
    assert_eq!(stripe.refunds_of(&late_intent).await.len(), 1);

    // Neither sale stands; the stock is exactly as before.
    wait_until("the stock restored", PIPELINE_WAIT, || async {
        stock(&app, &oak.variant).await == (5, 0)
    })
    .await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM refunds WHERE status = 'succeeded'"
        )
        .await,
        2
    );
    pipeline.stop().await;
}

/// The event localstripe made when `intent` was charged, once it has.
async fn charged_event_soon(stripe: &LocalStripe, intent: &str) -> Value {
    wait_until("localstripe's payment event", PIPELINE_WAIT, || async {
        stripe
            .events("payment_intent.succeeded")
            .await
            .iter()
            .any(|e| e["data"]["object"]["id"] == intent)
    })
    .await;
    charged_event(stripe, intent).await
}

async fn cancel_order(app: &App, token: &str, order: &str) -> reqwest::Response {
    call(
        app,
        token,
        Method::POST,
        &format!("/orders/{order}/cancel"),
        json!({"reason": "changed my mind"}),
    )
    .await
}

#[tokio::test]
async fn cancelling_an_unpaid_order_releases_its_stock_and_cancels_its_intent() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 2).await;
    let order_id = id(&checkout(app, &buyer.token).await);
    let awaiting = wait_for(app, &buyer.token, &order_id, "awaiting_payment").await;
    let intent = awaiting["payment"]["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        stripe.intent(&intent).await["status"],
        "requires_payment_method"
    );
    assert_eq!(stock(app, &oak.variant).await, (5, 2), "held for the order");

    let cancelled = json_of(
        cancel_order(app, &buyer.token, &order_id).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cancelled["status"], "cancelled");
    assert!(
        cancelled["payment"].is_null(),
        "no client secret for a cancelled order: {cancelled}"
    );
    wait_until("the intent cancelled at Stripe", PIPELINE_WAIT, || async {
        stripe.intent(&intent).await["status"] == "canceled"
    })
    .await;
    wait_until("the stock released", PIPELINE_WAIT, || async {
        stock(app, &oak.variant).await == (5, 0)
    })
    .await;
    // The storefront's Stripe.js can no longer charge it.
    assert!(stripe.pay(&intent, CARD_OK).await.is_err());

    settle(app).await;
    let after = order(app, &buyer.token, &order_id).await;
    assert_eq!(after["status"], "cancelled");
    assert_eq!(after["refunded_minor"], 0);
    assert!(
        after["seller_orders"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "cancelled"),
        "{after}"
    );
    assert_eq!(stock(app, &oak.variant).await, (5, 0));
    assert_eq!(
        stripe.intents_for(&order_id).await.len(),
        1,
        "no new intent"
    );
    let payments = "SELECT count(*) FROM payments WHERE order_id = $1";
    assert_eq!(of_order(app, payments, &order_id).await, 0);
    let refunds = "SELECT count(*) FROM refunds WHERE order_id = $1";
    assert_eq!(of_order(app, refunds, &order_id).await, 0);
    assert_eq!(mails_logged(app, &buyer.email, "order_cancelled").await, 1);
    assert_eq!(mails_logged(app, &buyer.email, "order_receipt").await, 0);
    market.close().await;
}

/// An awaiting-payment order whose card was charged at Stripe; the
/// customer's cancel and the signed `payment_intent.succeeded` are fired
/// together (the cancel `delay` after the webhook, to cover both orders of
/// arrival at the worker). Whichever wins, exactly one coherent outcome:
/// the money comes back once, in full, and the stock is exactly as before.
#[tokio::test]
async fn a_cancel_and_its_payment_webhook_fired_together_end_in_one_coherent_outcome() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = LocalStripe::start().await; // webhooks held back
    let pipeline = Pipeline::checkout(&app, &stripe);
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let mut outcomes = vec![];
    for delay_ms in [0, 0, 5, 15, 30, 60, 120] {
        let buyer = customer(&app).await;
        add_to_cart(&app, &buyer.token, &oak.variant, 1).await;
        let order_id = id(&checkout(&app, &buyer.token).await);
        let intent = pay(&app, &stripe, &buyer.token, &order_id, CARD_OK).await;
        let event = charged_event_soon(&stripe, &intent).await;
        assert_eq!(stock(&app, &oak.variant).await, (5, 1));

        let (cancelled, hook) = tokio::join!(
            async {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                cancel_order(&app, &buyer.token, &order_id).await
            },
            post_event(&app, &event, WEBHOOK_SECRET, now()),
        );
        // A paid order not yet shipped may be cancelled too: the cancel is
        // accepted whichever came first.
        let cancelled = json_of(cancelled, StatusCode::OK).await;
        assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
        assert_eq!(json_of(hook, StatusCode::OK).await["stored"], true);

        let done = wait_for(&app, &buyer.token, &order_id, "refunded").await;
        settle(&app).await;
        let done_now = order(&app, &buyer.token, &order_id).await;
        assert_eq!(done_now["status"], "refunded", "stays refunded: {done_now}");
        let total = done["total_minor"].as_i64().unwrap();
        assert_eq!(done_now["refunded_minor"], total);

        // Money: charged once, given back once, in full.
        let intent_now = stripe.intent(&intent).await;
        assert_eq!(intent_now["status"], "succeeded", "the charge stands");
        let refunds = stripe.refunds_of(&intent).await;
        assert_eq!(refunds.len(), 1, "one refund at Stripe: {refunds:?}");
        assert_eq!(refunds[0]["amount"], total);
        let recorded = "SELECT count(*) FROM refunds WHERE order_id = $1 AND status = 'succeeded'";
        assert_eq!(of_order(&app, recorded, &order_id).await, 1);
        let all_refunds = "SELECT count(*) FROM refunds WHERE order_id = $1";
        assert_eq!(of_order(&app, all_refunds, &order_id).await, 1);
        let payments = "SELECT count(*) FROM payments WHERE order_id = $1 AND NOT duplicate";
        assert_eq!(of_order(&app, payments, &order_id).await, 1);
        let flagged = "SELECT count(*) FROM payments WHERE order_id = $1 AND duplicate";
        assert_eq!(of_order(&app, flagged, &order_id).await, 0);
        assert_eq!(stripe.intents_for(&order_id).await.len(), 1);

        // Stock: exactly as before the order, nothing held.
        assert_eq!(stock(&app, &oak.variant).await, (5, 0));

        // Which one won, and everything else agrees with it.
        let paid_first = of_order(
            &app,
            "SELECT count(*) FROM order_events WHERE order_id = $1 AND subject = 'order' AND to_status = 'paid'",
            &order_id,
        )
        .await
            == 1;
        let sold = of_order(
            &app,
            "SELECT count(*) FROM stock_adjustments WHERE reason = 'sold: order ' || $1::text",
            &order_id,
        )
        .await;
        let part = done_now["seller_orders"][0]["status"].clone();
        if paid_first {
            // Paid, then cancelled: the sale was made and undone.
            assert_eq!(sold, 1, "sold once");
            assert_eq!(part, "refunded", "{done_now}");
            assert_eq!(mails_logged(&app, &buyer.email, "order_receipt").await, 1);
            assert_eq!(mails_logged(&app, &buyer.email, "order_failed").await, 0);
        } else {
            // Cancelled first: the late payment never sold anything.
            assert_eq!(sold, 0, "never sold");
            assert_eq!(part, "cancelled", "{done_now}");
            assert_eq!(mails_logged(&app, &buyer.email, "order_receipt").await, 0);
            assert_eq!(mails_logged(&app, &buyer.email, "order_failed").await, 1);
        }
        assert_eq!(mails_logged(&app, &buyer.email, "order_cancelled").await, 1);
        assert_eq!(mails_logged(&app, &buyer.email, "refund_issued").await, 1);
        outcomes.push((delay_ms, paid_first));
    }
    eprintln!("(cancel delay ms, paid before the cancel): {outcomes:?}");
    common::orders::assert_ledger_balances(&app).await;
    pipeline.stop().await;
}

#[tokio::test]
async fn one_webhook_event_posted_three_times_at_once_pays_the_order_once() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = LocalStripe::start().await; // webhooks held back
    let pipeline = Pipeline::checkout(&app, &stripe);
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 2).await;
    let order_id = id(&checkout(&app, &buyer.token).await);
    let intent = pay(&app, &stripe, &buyer.token, &order_id, CARD_OK).await;
    let event = charged_event_soon(&stripe, &intent).await;
    // Nothing has told Souk yet.
    assert_eq!(
        order(&app, &buyer.token, &order_id).await["status"],
        "awaiting_payment"
    );

    let t = now();
    let (a, b, c) = tokio::join!(
        post_event(&app, &event, WEBHOOK_SECRET, t),
        post_event(&app, &event, WEBHOOK_SECRET, t),
        post_event(&app, &event, WEBHOOK_SECRET, t),
    );
    let mut stored = vec![];
    for resp in [a, b, c] {
        stored.push(
            json_of(resp, StatusCode::OK).await["stored"]
                .as_bool()
                .unwrap(),
        );
    }
    stored.sort();
    assert_eq!(stored, [false, false, true], "stored once");

    wait_for(&app, &buyer.token, &order_id, "paid").await;
    settle(&app).await;
    let event_id = event["id"].as_str().unwrap();
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE id = $1")
        .bind(event_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(kept, 1);
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM outbox WHERE routing_key = 'stripe.event'"
        )
        .await,
        1,
        "announced once"
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'stripe-events'"
        )
        .await,
        1,
        "applied once"
    );
    let payments = "SELECT count(*) FROM payments WHERE order_id = $1";
    assert_eq!(of_order(&app, payments, &order_id).await, 1, "one payment");
    let events = "SELECT count(*) FROM order_events WHERE order_id = $1 AND subject = 'order' AND to_status = 'paid'";
    assert_eq!(of_order(&app, events, &order_id).await, 1);
    assert_eq!(
        mails_logged(&app, &buyer.email, "order_receipt").await,
        1,
        "one receipt"
    );
    let seller = common::orders::seller_email(&app, "oak").await;
    assert_eq!(mails_logged(&app, &seller, "seller_new_order").await, 1);
    // Stock committed once: two units sold, nothing still held.
    assert_eq!(stock(&app, &oak.variant).await, (3, 0));
    let sold = "SELECT count(*) FROM stock_adjustments WHERE reason = 'sold: order ' || $1::text";
    assert_eq!(of_order(&app, sold, &order_id).await, 1);
    assert!(
        stripe.refunds_of(&intent).await.is_empty(),
        "nothing refunded"
    );
    let paid = order(&app, &buyer.token, &order_id).await;
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["refunded_minor"], 0);
    pipeline.stop().await;
}

/// Stripe sends event types Souk does not use, some with objects unlike any
/// it reads (localstripe's `balance.available` has no id): they are
/// acknowledged, not parked. A used type whose object cannot be read is
/// parked, named by its type, for an admin to look at.
#[tokio::test]
async fn an_event_of_an_unused_type_is_acknowledged_whatever_its_object() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = LocalStripe::start().await;
    let pipeline = Pipeline::checkout(&app, &stripe);
    let root = token_for(&app, &admin(&app).await).await;
    let unused = json!({
        "id": "evt_balance_1", "object": "event", "type": "balance.available",
        "created": now(), "data": { "object": { "object": "balance", "available": [] } },
    });
    let garbled = json!({
        "id": "evt_garbled_1", "object": "event", "type": "payment_intent.succeeded",
        "created": now(), "data": { "object": { "object": "payment_intent" } },
    });
    deliver(&app, &unused).await;
    deliver(&app, &garbled).await;

    let applied = "SELECT count(*) FROM processed_messages WHERE consumer = 'stripe-events'";
    wait_until("the unused event to be applied", PIPELINE_WAIT, || async {
        count(&app.db.pool, applied).await == 1
    })
    .await;
    let parked = || async {
        json_of(
            call(
                &app,
                &root,
                Method::GET,
                "/admin/parked/stripe-events",
                json!({}),
            )
            .await,
            StatusCode::OK,
        )
        .await
    };
    wait_until("the garbled event to be parked", PIPELINE_WAIT, || async {
        parked().await.as_array().is_some_and(|p| !p.is_empty())
    })
    .await;
    let parked = parked().await;
    assert_eq!(parked.as_array().unwrap().len(), 1, "{parked}");
    let error = parked[0]["error"].as_str().unwrap();
    assert!(
        error.contains("payment_intent.succeeded object in event evt_garbled_1"),
        "{error}"
    );
    pipeline.stop().await;
}

/// A refund Stripe accepted and then failed (the card was closed): the
/// customer hears it is delayed, the payment is flagged for an admin, and
/// Stripe's two events saying so (`refund.failed`, `refund.updated`) do it
/// once. The refund stands in the books: the money is still owed to them.
#[tokio::test]
async fn a_refund_that_fails_after_stripe_accepted_it_is_flagged_and_told_once() {
    let market = Market::open().await;
    let app = &market.app;
    let (root, buyer, paid) = an_admin_and_a_paid_board(&market).await;
    let order_id = id(&paid);
    assert_eq!(
        cancel_order(app, &buyer.token, &order_id).await.status(),
        StatusCode::OK
    );
    let done = "SELECT count(*) FROM refunds WHERE order_id = $1 AND status = 'succeeded'";
    wait_until("the refund at Stripe", PIPELINE_WAIT, || async {
        of_order(app, done, &order_id).await == 1
    })
    .await;
    let stripe_refund: String = sqlx::query_scalar("SELECT stripe_refund_id FROM refunds")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();

    let failed = json!({"id": stripe_refund, "object": "refund", "status": "failed",
                        "failure_reason": "expired_or_canceled_card", "amount": 4500});
    for (n, kind) in ["refund.failed", "refund.updated"].into_iter().enumerate() {
        let event = souk_testkit::stripe::event(&format!("evt_refund_{n}"), kind, failed.clone());
        deliver(app, &event).await;
    }
    let told = mails_about(&buyer.email, "is delayed", 1).await;
    assert!(told[0].text.contains("49.99 EUR"), "{}", told[0].text);
    settle(app).await;
    assert_eq!(
        mails_about(&buyer.email, "is delayed", 1).await.len(),
        1,
        "told once"
    );
    let flag: Option<String> = sqlx::query_scalar("SELECT flagged_reason FROM payments")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(flag.unwrap().contains("expired_or_canceled_card"));
    assert_eq!(notices_of(app, &root, "refund_failed").await, 1);
    let failure: Option<String> = sqlx::query_scalar("SELECT failure FROM refunds")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(failure.unwrap().contains("after it was accepted"));
    market.close().await;
}

/// Stripe refuses to open a PaymentIntent for the order (here: an amount
/// below its minimum). No retry can help, so the order is cancelled at once
/// with Stripe's reason, its stock released and the customer told, instead
/// of holding the stock until the reservation expires; the admins hear of
/// it, the platform's to fix.
#[tokio::test]
async fn an_order_stripe_will_not_open_a_payment_for_is_cancelled_at_once_and_says_why() {
    const REFUSED: &str = "Amount must be at least 0.50 eur";
    let app = spawn_app(&amqp_url()).await;
    let stripe = stripe_for(&app).await;
    let workers = Workers {
        payments: false,
        ..Workers::ALL
    };
    let pipeline = Pipeline::with(&app, &amqp_url(), Some(&stripe), workers);
    let proxy = StripeProxy::start(&stripe.url).await;
    proxy.refuse(Method::POST, "/v1/payment_intents", REFUSED);
    let payments = payments_through(&app, &pipeline, &proxy.url);
    let root = admin(&app).await;
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 2).await;
    let order_id = id(&checkout(&app, &buyer.token).await);

    let cancelled = wait_for(&app, &buyer.token, &order_id, "cancelled").await;
    assert!(
        cancelled["failure_reason"]
            .as_str()
            .unwrap()
            .contains(REFUSED),
        "{cancelled}"
    );
    wait_until("the stock released", PIPELINE_WAIT, || async {
        stock(&app, &oak.variant).await == (5, 0)
    })
    .await;
    let told = mails_about(&buyer.email, "is cancelled", 1).await;
    assert!(told[0].text.contains(REFUSED), "{}", told[0].text);
    assert_eq!(notices_of(&app, &root, "payment_refused").await, 1);
    assert!(stripe.intents_for(&order_id).await.is_empty());
    payments.stop().await;
    pipeline.stop().await;
}

/// Stripe's word that a refund failed can come before the payments worker
/// recorded Stripe's answer to it (a retry, a crashed peer's lease): the
/// event is tried again, not dropped, and applies once the answer is in.
#[tokio::test]
async fn a_refund_failure_before_its_answer_is_recorded_is_applied_once_it_is() {
    let market = Market::open().await;
    let app = &market.app;
    let (root, buyer, paid) = an_admin_and_a_paid_board(&market).await;
    let order_id = Uuid::parse_str(&id(&paid)).unwrap();
    // An approved refund whose Stripe answer is not recorded yet (written
    // as the API would, but without the message: nothing calls Stripe).
    let refund = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO refunds (id, order_id, payment_id, amount_minor, reason)
         SELECT $1, $2, id, 1000, 'arrived damaged' FROM payments WHERE order_id = $2",
    )
    .bind(refund)
    .bind(order_id)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let failed = json!({"id": "re_early", "object": "refund", "status": "failed",
                        "failure_reason": "lost_or_stolen_card", "amount": 1000,
                        "metadata": {"refund_id": refund, "order_id": order_id}});
    deliver(
        app,
        &souk_testkit::stripe::event("evt_early", "refund.failed", failed),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let flagged = "SELECT count(*) FROM payments WHERE flagged_reason IS NOT NULL";
    assert_eq!(count(&app.db.pool, flagged).await, 0, "nothing to flag yet");

    // The answer is recorded: the event's next try applies it.
    sqlx::query(
        "UPDATE refunds SET status = 'succeeded', stripe_refund_id = 're_early' WHERE id = $1",
    )
    .bind(refund)
    .execute(&app.db.pool)
    .await
    .unwrap();
    wait_until("the failure applied", PIPELINE_WAIT, || async {
        count(&app.db.pool, flagged).await == 1
    })
    .await;
    mails_about(&buyer.email, "is delayed", 1).await;
    assert_eq!(notices_of(app, &root, "refund_failed").await, 1);
    market.close().await;
}

/// The seller order `part` of `order`, as its customer reads it.
fn seller_order_in(order: &Value, part: &str) -> Value {
    order["seller_orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == part)
        .unwrap_or_else(|| panic!("no seller order {part} in {order}"))
        .clone()
}

/// An admin refunds all of seller order `part` (200), and Stripe's answer
/// and its ledger posting are in.
async fn refund_in_full(app: &App, root: &str, part: &str, amount: i64, postings: i64) {
    let path = format!("/admin/seller-orders/{part}/refund");
    let body = json!({"amount_minor": amount, "reason": "a goodwill refund"});
    json_of(
        call(app, root, Method::POST, &path, body).await,
        StatusCode::OK,
    )
    .await;
    common::orders::posted(app, "refund:%", postings).await;
    settle(app).await;
}

/// An admin gives back all of an order's only seller order while its
/// parcel is on the way. The money is all back, but the part is still
/// being fulfilled: the order stays `paid` (it used to become `refunded`,
/// an end, with the part still shipping); the delivery earns its seller
/// and the platform nothing, the refund taken back once.
#[tokio::test]
async fn a_part_refunded_in_full_while_shipping_keeps_the_order_paid_and_earns_nothing() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 1)]).await;
    let order_id = id(&paid);
    let part = common::orders::part_of(&paid, "oak");
    let total = paid["total_minor"].as_i64().unwrap();
    let status = format!("/seller/orders/{part}/status");
    let shipped = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM1"});
    json_of(
        call(app, &oak.seller, Method::POST, &status, shipped).await,
        StatusCode::OK,
    )
    .await;

    refund_in_full(app, &root, &part, total, 1).await;
    let now = order(app, &buyer.token, &order_id).await;
    assert_eq!(now["refunded_minor"], total, "{now}");
    assert_eq!(now["status"], "paid", "a part is still shipping: {now}");
    assert_eq!(seller_order_in(&now, &part)["status"], "shipped", "{now}");

    // Delivered: an earning of nothing, since all of it came back.
    let delivered = json!({"status": "delivered"});
    json_of(
        call(app, &oak.seller, Method::POST, &status, delivered).await,
        StatusCode::OK,
    )
    .await;
    common::orders::posted(app, "earning:%", 1).await;
    common::orders::end_holds(app).await;
    settle(app).await;
    let balance = |kind: &'static str, shop: Option<&'static str>| {
        common::orders::ledger_balance(app, kind, shop)
    };
    assert_eq!(balance("seller_pending", Some("oak")).await, 0);
    assert_eq!(balance("seller_available", Some("oak")).await, 0);
    assert_eq!(balance("commission", None).await, 0);
    assert_eq!(balance("payments_clearing", None).await, 0);
    refunded_once(app, stripe, &order_id, 1, total).await;
    let now = order(app, &buyer.token, &order_id).await;
    assert_eq!(now["status"], "paid", "{now}");
    assert_eq!(seller_order_in(&now, &part)["status"], "delivered", "{now}");
    market.close().await;
}

/// A paid order refunded in full by an admin, then cancelled by its
/// customer before anything shipped: nothing is left to give back, so no
/// refund is asked for and none will land to finish the order; the cancel
/// moves the part and the order to `refunded` itself (they used to stay
/// `cancelled` for good).
#[tokio::test]
async fn a_paid_order_refunded_in_full_then_cancelled_by_its_customer_is_refunded_at_once() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 1)]).await;
    let order_id = id(&paid);
    let part = common::orders::part_of(&paid, "oak");
    let total = paid["total_minor"].as_i64().unwrap();
    refund_in_full(app, &root, &part, total, 1).await;
    let now = order(app, &buyer.token, &order_id).await;
    assert_eq!(now["status"], "paid", "its part is still to ship: {now}");

    let cancelled = json_of(
        cancel_order(app, &buyer.token, &order_id).await,
        StatusCode::OK,
    )
    .await;
    // At once, in the cancel's own answer: no refund is on its way.
    assert_eq!(cancelled["status"], "refunded", "{cancelled}");
    assert_eq!(
        seller_order_in(&cancelled, &part)["status"],
        "refunded",
        "{cancelled}"
    );
    assert_eq!(cancelled["refunded_minor"], total);
    settle(app).await;
    refunded_once(app, stripe, &order_id, 1, total).await;
    wait_until("the stock restored", PIPELINE_WAIT, || async {
        stock(app, &oak.variant).await == (5, 0)
    })
    .await;
    let events: Vec<(Option<Uuid>, String, String)> = sqlx::query_as(
        "SELECT seller_order_id, from_status, to_status FROM order_events
          WHERE order_id = $1 AND to_status = 'refunded' ORDER BY id",
    )
    .bind(Uuid::parse_str(&order_id).unwrap())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let part = Uuid::parse_str(&part).unwrap();
    assert_eq!(
        events,
        vec![
            (Some(part), "cancelled".into(), "refunded".into()),
            (None, "cancelled".into(), "refunded".into()),
        ],
        "each moved once"
    );
    market.close().await;
}

/// The same through the sellers: each part refunded in full by an admin,
/// then cancelled by its seller. The first is refunded at its cancel while
/// the other part keeps the order `paid`; the second's cancel finishes the
/// order, all of it back. No refund is asked for twice.
#[tokio::test]
async fn a_part_refunded_in_full_then_cancelled_by_its_seller_is_refunded_at_once() {
    let market = Market::open().await;
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 1), (tea, 1)]).await;
    let order_id = id(&paid);
    let seller_cancel = |seller: &str, part: &str| {
        let path = format!("/seller/orders/{part}/cancel");
        let (seller, body) = (seller.to_string(), json!({"reason": "cannot make it"}));
        async move {
            json_of(
                call(app, &seller, Method::POST, &path, body).await,
                StatusCode::OK,
            )
            .await
        }
    };
    let (oak_part, tea_part) = (
        common::orders::part_of(&paid, "oak"),
        common::orders::part_of(&paid, "tea"),
    );
    let total_of = |part: &str| {
        seller_order_in(&paid, part)["total_minor"]
            .as_i64()
            .unwrap()
    };

    refund_in_full(app, &root, &oak_part, total_of(&oak_part), 1).await;
    let cancelled = seller_cancel(&oak.seller, &oak_part).await;
    assert_eq!(cancelled["status"], "refunded", "at once: {cancelled}");
    let now = order(app, &buyer.token, &order_id).await;
    assert_eq!(now["status"], "paid", "tea's part stands: {now}");

    refund_in_full(app, &root, &tea_part, total_of(&tea_part), 2).await;
    let now = order(app, &buyer.token, &order_id).await;
    assert_eq!(now["status"], "paid", "tea's part is still to ship: {now}");
    assert_eq!(now["refunded_minor"], paid["total_minor"]);
    let cancelled = seller_cancel(&tea.seller, &tea_part).await;
    assert_eq!(cancelled["status"], "refunded", "at once: {cancelled}");
    let now = order(app, &buyer.token, &order_id).await;
    assert_eq!(now["status"], "refunded", "all of it back: {now}");
    settle(app).await;
    let total = paid["total_minor"].as_i64().unwrap();
    refunded_once(app, stripe, &order_id, 2, total).await;
    market.close().await;
}

/// The order's money went back in `refunds` refunds, each asked for once
/// (as many rows as localstripe has), `total` in all on the ledger, which
/// balances.
async fn refunded_once(app: &App, stripe: &LocalStripe, order_id: &str, refunds: i64, total: i64) {
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM refunds").await,
        refunds,
        "nothing asked for twice"
    );
    let intent: String = order_column(app, "payment_intent_id", order_id).await;
    assert_eq!(stripe.refunds_of(&intent).await.len() as i64, refunds);
    assert_eq!(
        common::orders::ledger_balance(app, "refunds", None).await,
        total,
        "taken back once"
    );
    common::orders::assert_ledger_balances(app).await;
}
