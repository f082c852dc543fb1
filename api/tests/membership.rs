//! Memberships against localstripe: a plan made at Stripe, a card saved
//! through a SetupIntent, a subscription whose webhooks move the
//! membership through its states, and the benefit applying at checkout only
//! while it is active.

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{
    stripe::{CARD_OK, SECRET_KEY, now},
    wait_until,
};
use uuid::Uuid;

use common::{
    admin,
    catalog::{call, json_of},
    fields,
    orders::{Market, PIPELINE_WAIT, add_to_cart, checkout, customer, mails_about, pay, wait_for},
    problem,
    recurring::{
        applied, customer_with_card, notifications, pending_card, plan, poll, saved_card,
        stripe_event,
    },
    token_for,
};

/// `POST /me/membership`: `plan` with the saved card `card`.
async fn subscribe(app: &common::App, token: &str, plan: &Value, card: &str) -> reqwest::Response {
    let body = json!({"plan_id": plan, "payment_method_id": card});
    call(app, token, Method::POST, "/me/membership", body).await
}

/// `POST /me/membership` with an `Idempotency-Key`.
async fn subscribe_keyed(
    app: &common::App,
    token: &str,
    plan: &Value,
    card: &str,
    key: &str,
) -> reqwest::Response {
    app.http
        .post(format!("{}/api/v1/me/membership", app.base))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&json!({"plan_id": plan, "payment_method_id": card}))
        .send()
        .await
        .unwrap()
}

/// The Stripe id of a saved card.
async fn stripe_card(app: &common::App, card: &str) -> String {
    sqlx::query_scalar("SELECT stripe_payment_method_id FROM payment_methods WHERE id = $1::uuid")
        .bind(card)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// `POST /me/membership/cancel`, answered 202.
async fn cancel_membership(app: &common::App, token: &str) -> Value {
    let resp = call(app, token, Method::POST, "/me/membership/cancel", json!({})).await;
    json_of(resp, StatusCode::ACCEPTED).await
}

async fn membership(m: &Market, token: &str) -> Value {
    json_of(
        call(&m.app, token, Method::GET, "/me/membership", json!({})).await,
        StatusCode::OK,
    )
    .await
}

async fn wait_status(m: &Market, token: &str, status: &str) -> Value {
    poll(&m.app, token, "/me/membership", |v| v["status"] == status).await
}

/// The cart's membership discount and whether it ships free.
async fn cart_benefit(m: &Market, token: &str) -> (i64, bool) {
    let cart = json_of(
        call(&m.app, token, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    (
        cart["membership_discount_minor"].as_i64().unwrap(),
        cart["free_shipping"].as_bool().unwrap(),
    )
}

/// Buys one walnut board (45.00); returns the order as it awaits payment.
async fn buy_board(m: &Market, token: &str) -> Value {
    add_to_cart(&m.app, token, &m.oak.variant, 1).await;
    let placed = checkout(&m.app, token).await;
    wait_for(
        &m.app,
        token,
        placed["id"].as_str().unwrap(),
        "awaiting_payment",
    )
    .await
}

fn money(order: &Value) -> (i64, i64, i64, i64) {
    (
        order["discount_minor"].as_i64().unwrap(),
        order["membership_discount_minor"].as_i64().unwrap(),
        order["shipping_minor"].as_i64().unwrap(),
        order["total_minor"].as_i64().unwrap(),
    )
}

/// An admin's token and the plan they made with `body`, once at Stripe.
async fn admin_plan(app: &common::App, body: Value) -> (String, Value) {
    let admin = token_for(app, &admin(app).await).await;
    let plan = plan(app, &admin, body).await;
    (admin, plan)
}

/// Souk Plus as most tests have it: monthly at 9.99, 10% off and free shipping.
async fn souk_plus(app: &common::App) -> Value {
    let body = json!({"name": "Souk Plus", "amount_minor": 999, "interval": "month", "reason": "launch",
                      "free_shipping": true, "percent_off": 10});
    admin_plan(app, body).await.1
}

/// `POST /me/membership` answered 202: the membership, requested.
async fn join(app: &common::App, token: &str, plan: &Value, card: &str) -> Value {
    json_of(
        subscribe(app, token, plan, card).await,
        StatusCode::ACCEPTED,
    )
    .await
}

/// The Stripe id of a membership's subscription.
async fn stripe_subscription(app: &common::App, membership: &Value) -> String {
    sqlx::query_scalar("SELECT stripe_subscription_id FROM memberships WHERE id = $1::uuid")
        .bind(membership["id"].as_str().unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// Moves every membership's `column` to `ago` before now ("-1 hour" is an
/// hour ahead), as time passing would.
async fn set_ago(app: &common::App, column: &str, ago: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE memberships SET {column} = now() - interval '{ago}'"
    )))
    .execute(&app.db.pool)
    .await
    .unwrap();
}

/// The paid period ended `ago` (ends, for a negative one).
async fn period_end_ago(app: &common::App, ago: &str) {
    set_ago(app, "current_period_end", ago).await;
}

/// The cancel was asked `ago`, and not answered since.
async fn cancel_asked_ago(app: &common::App, ago: &str) {
    set_ago(app, "cancel_requested_at", ago).await;
}

/// Waits until Stripe confirmed the cancel at the period's end: the
/// membership stays active, with its benefit, until then.
async fn wait_ending(app: &common::App, token: &str) -> Value {
    let ending = poll(app, token, "/me/membership", |v| {
        v["cancel_at_period_end"] == true
    })
    .await;
    assert_eq!(ending["status"], "active");
    assert_eq!(ending["benefits_active"], true);
    ending
}

/// `POST /admin/membership-plans` by `token`, refused with `status`; the
/// fields the problem names.
async fn plan_refused(
    app: &common::App,
    token: &str,
    body: Value,
    status: StatusCode,
) -> Vec<String> {
    let resp = call(app, token, Method::POST, "/admin/membership-plans", body).await;
    fields(&problem(resp, status).await)
}

/// `DELETE /me/payment-methods/{card}`.
async fn remove_card(app: &common::App, token: &str, card: &str) -> reqwest::Response {
    let path = format!("/me/payment-methods/{card}");
    call(app, token, Method::DELETE, &path, json!({})).await
}

/// Waits until Stripe holds `card` (its id there) for no customer: it
/// can be charged no more.
async fn wait_detached(m: &Market, card: &str) {
    wait_until("the card to be detached", PIPELINE_WAIT, || async {
        m.stripe.get(&format!("payment_methods/{card}")).await["customer"].is_null()
    })
    .await;
}

#[tokio::test]
async fn a_subscriptions_webhooks_move_the_membership_and_the_benefit_applies_only_while_active() {
    let m = Market::open().await;
    let app = &m.app;
    let plus = souk_plus(app).await;
    let (buyer, card, _) = customer_with_card(&m, CARD_OK).await;

    // Not a member: full price and shipping.
    let before = buy_board(&m, &buyer.token).await;
    assert_eq!(money(&before), (0, 0, 499, 4999));

    let requested = join(app, &buyer.token, &plus["id"], &card).await;
    assert_eq!(requested["status"], "requested");
    assert_eq!(requested["benefits_active"], false);
    let active = wait_status(&m, &buyer.token, "active").await;
    assert_eq!(active["benefits_active"], true);
    assert!(active["current_period_end"].is_string(), "{active}");
    mails_about(&buyer.email, "Souk Plus membership is active", 1).await;
    let subscription = stripe_subscription(app, &active).await;
    let at_stripe = m.stripe.subscription(&subscription).await;
    assert_eq!(at_stripe["status"], "active");
    assert_eq!(at_stripe["metadata"]["membership_id"], active["id"]);
    // Another card saved later does not take over the renewals.
    saved_card(&m, &buyer.token, CARD_OK).await;
    let customer = m
        .stripe
        .get(&format!(
            "customers/{}",
            at_stripe["customer"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        customer["invoice_settings"]["default_payment_method"],
        stripe_card(app, &card).await.as_str()
    );

    // A member: 10% off and free shipping, in the cart and in the order.
    add_to_cart(app, &buyer.token, &m.oak.variant, 1).await;
    assert_eq!(cart_benefit(&m, &buyer.token).await, (450, true));
    let placed = checkout(app, &buyer.token).await;
    let id = placed["id"].as_str().unwrap();
    let member_order = wait_for(app, &buyer.token, id, "awaiting_payment").await;
    assert_eq!(money(&member_order), (450, 450, 0, 4050));
    pay(app, &m.stripe, &buyer.token, id, CARD_OK).await;
    let paid = wait_for(app, &buyer.token, id, "paid").await;
    assert_eq!(paid["total_minor"], 4050);

    // Events are dated after localstripe's own (sent about a second after
    // the subscription was made), so theirs are older news when late.
    let t = now() + 60;

    // A renewal fails: past due, and no benefit while Stripe retries.
    let invoice = json!({"id": "in_renewal", "object": "invoice", "subscription": subscription,
                         "billing_reason": "subscription_cycle", "status": "open"});
    stripe_event(app, "invoice.payment_failed", invoice.clone(), t).await;
    let past_due = wait_status(&m, &buyer.token, "past_due").await;
    assert_eq!(past_due["benefits_active"], false);
    mails_about(&buyer.email, "Souk Plus membership payment failed", 1).await;
    add_to_cart(app, &buyer.token, &m.oak.variant, 1).await;
    assert_eq!(cart_benefit(&m, &buyer.token).await, (0, false));
    let unbenefited = checkout(app, &buyer.token).await;
    let unbenefited = wait_for(
        app,
        &buyer.token,
        unbenefited["id"].as_str().unwrap(),
        "awaiting_payment",
    )
    .await;
    assert_eq!(money(&unbenefited), (0, 0, 499, 4999));

    // Older news arriving late changes nothing.
    let stale = json!({"id": subscription, "object": "subscription", "status": "canceled",
                       "metadata": {"membership_id": active["id"]}});
    stripe_event(app, "customer.subscription.updated", stale, t - 3600).await;
    assert_eq!(membership(&m, &buyer.token).await["status"], "past_due");

    // Stripe's retry goes through: active again.
    stripe_event(app, "invoice.payment_succeeded", invoice, t + 1).await;
    wait_status(&m, &buyer.token, "active").await;
    add_to_cart(app, &buyer.token, &m.tea.variant, 1).await;
    assert_eq!(cart_benefit(&m, &buyer.token).await, (300, true));
    // Still "active" but past its paid period by more than the three days'
    // grace (the ending's webhook lost; localstripe's own events are older news
    // by now, so none rewrites the period): no benefit; inside the grace, it holds.
    period_end_ago(app, "4 days").await;
    assert_eq!(cart_benefit(&m, &buyer.token).await, (0, false));
    assert_eq!(membership(&m, &buyer.token).await["benefits_active"], false);
    period_end_ago(app, "2 days").await;
    assert_eq!(cart_benefit(&m, &buyer.token).await, (300, true));
    assert_eq!(membership(&m, &buyer.token).await["benefits_active"], true);
    // A renewal's subscription event arriving after its invoice's: older
    // news of the status, but its new period end still counts, or a member
    // who paid would lose the benefit.
    period_end_ago(app, "4 days").await;
    let renewed = json!({"id": subscription, "object": "subscription", "status": "active",
                         "current_period_end": now() + 30 * 86_400,
                         "metadata": {"membership_id": active["id"]}});
    stripe_event(app, "customer.subscription.updated", renewed, t).await;
    wait_until("the renewed period to count", PIPELINE_WAIT, || async {
        membership(&m, &buyer.token).await["benefits_active"] == true
    })
    .await;
    assert_eq!(membership(&m, &buyer.token).await["status"], "active");
    period_end_ago(app, "-30 days").await;

    // Cancelled at the period's end: Stripe confirms, the benefit lasts.
    let asked = cancel_membership(app, &buyer.token).await;
    assert!(asked["cancel_requested_at"].is_string());
    wait_ending(app, &buyer.token).await;
    // The member hears that it is cancelled and until when it lasts (once,
    // though Stripe's answer and its webhook both say so).
    let told = mails_about(&buyer.email, "Souk Plus membership ends with its period", 1).await;
    assert!(told[0].text.contains("will not renew"), "{}", told[0].text);
    assert_eq!(
        m.stripe.subscription(&subscription).await["cancel_at_period_end"],
        true
    );
    // Asking again is answered with the same.
    let again = cancel_membership(app, &buyer.token).await;
    assert_eq!(again["cancel_at_period_end"], true);
    common::orders::settle(app).await;
    let ends = "Souk Plus membership ends with its period";
    assert_eq!(
        mails_about(&buyer.email, ends, 1).await.len(),
        1,
        "told once"
    );

    // The period ends: Stripe deletes the subscription.
    let ended = json!({"id": subscription, "object": "subscription", "status": "canceled",
                       "cancel_at_period_end": true, "metadata": {"membership_id": active["id"]}});
    let deleted = stripe_event(app, "customer.subscription.deleted", ended.clone(), t + 2).await;
    let canceled = wait_status(&m, &buyer.token, "canceled").await;
    assert_eq!(canceled["benefits_active"], false);
    assert_eq!(cart_benefit(&m, &buyer.token).await, (0, false));
    mails_about(&buyer.email, "Souk Plus membership has ended", 1).await;

    // The same event delivered again is taken once.
    let mut event = souk_testkit::stripe::event(&deleted, "customer.subscription.deleted", ended);
    event["created"] = json!(t + 2);
    let resp =
        common::orders::post_event(app, &event, souk_testkit::stripe::WEBHOOK_SECRET, now()).await;
    assert!(resp.status().is_success());
    applied(app, &deleted).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE id = $1")
        .bind(&deleted)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    assert_eq!(membership(&m, &buyer.token).await["status"], "canceled");

    // Ended, the customer may join again.
    let rejoined = subscribe(app, &buyer.token, &plus["id"], &card).await;
    assert_eq!(rejoined.status(), StatusCode::ACCEPTED);
    m.close().await;
}

#[tokio::test]
async fn a_declined_first_payment_leaves_the_membership_without_benefits() {
    let m = Market::open().await;
    let app = &m.app;
    let (_, plus) = admin_plan(
        app,
        json!({"name": "Souk Plus", "amount_minor": 999, "interval": "month", "percent_off": 5, "reason": "launch"}),
    )
    .await;
    // Saved fine; declined when charged.
    let (buyer, card, _) = customer_with_card(&m, souk_testkit::stripe::CARD_DECLINED).await;
    join(app, &buyer.token, &plus["id"], &card).await;
    let settled = poll(app, &buyer.token, "/me/membership", |v| {
        v["status"] != "requested"
    })
    .await;
    assert_eq!(settled["status"], "incomplete", "{settled}");
    assert_eq!(settled["benefits_active"], false);
    add_to_cart(app, &buyer.token, &m.oak.variant, 1).await;
    assert_eq!(cart_benefit(&m, &buyer.token).await, (0, false));

    // While incomplete, joining again is refused; cancelling ends it at
    // once (nothing was paid for) and frees the customer to join again
    // with another card.
    let again = subscribe(app, &buyer.token, &plus["id"], &card).await;
    problem(again, StatusCode::CONFLICT).await;
    cancel_membership(app, &buyer.token).await;
    let ended = wait_status(&m, &buyer.token, "canceled").await;
    assert_eq!(ended["cancel_at_period_end"], false);
    let subscription = stripe_subscription(app, &settled).await;
    assert_eq!(
        m.stripe.subscription(&subscription).await["status"],
        "canceled"
    );
    let good = saved_card(&m, &buyer.token, CARD_OK).await;
    join(app, &buyer.token, &plus["id"], &good).await;
    wait_status(&m, &buyer.token, "active").await;
    m.close().await;
}

#[tokio::test]
async fn signed_subscription_and_invoice_webhooks_alone_move_a_membership_through_its_states() {
    let m = Market::open().await;
    let app = &m.app;
    let plus = souk_plus(app).await;
    let (buyer, card, _) = customer_with_card(&m, CARD_OK).await;
    add_to_cart(app, &buyer.token, &m.oak.variant, 1).await;

    // A membership whose subscription Stripe has made (its id is known)
    // but whose status nothing has said yet. It is written as the API
    // would, without the message that asks the payments worker to
    // subscribe: nothing calls Stripe for it, so only the webhooks below
    // can move it.
    let id = Uuid::now_v7();
    let subscription = format!("sub_{}", id.simple());
    sqlx::query(
        "INSERT INTO memberships (id, user_id, plan_id, payment_method_id, stripe_subscription_id)
         VALUES ($1, $2, $3::uuid, $4::uuid, $5)",
    )
    .bind(id)
    .bind(buyer.id)
    .bind(plus["id"].as_str().unwrap())
    .bind(&card)
    .bind(&subscription)
    .execute(&app.db.pool)
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let requested = membership(&m, &buyer.token).await;
    assert_eq!(requested["id"], id.to_string());
    assert_eq!(requested["status"], "requested", "nothing moved it yet");
    let t = now() + 60;

    // The first invoice fails: incomplete, no benefit.
    let first = json!({"id": format!("in_{}", id.simple()), "object": "invoice",
                       "subscription": subscription, "billing_reason": "subscription_create",
                       "status": "open"});
    stripe_event(app, "invoice.payment_failed", first.clone(), t).await;
    let incomplete = membership(&m, &buyer.token).await;
    assert_eq!(incomplete["status"], "incomplete", "{incomplete}");
    assert_eq!(incomplete["benefits_active"], false);
    assert_eq!(cart_benefit(&m, &buyer.token).await, (0, false));
    mails_about(
        &buyer.email,
        "Souk Plus membership is waiting for payment",
        1,
    )
    .await;

    // Stripe's subscription update says it is paid now: active.
    let period_end = t + 30 * 86400;
    let sub = |status: &str| {
        json!({"id": subscription, "object": "subscription", "status": status,
               "cancel_at_period_end": false, "current_period_end": period_end,
               "metadata": {"membership_id": id}})
    };
    stripe_event(app, "customer.subscription.updated", sub("active"), t + 1).await;
    let active = membership(&m, &buyer.token).await;
    assert_eq!(active["status"], "active", "{active}");
    assert_eq!(active["benefits_active"], true);
    let end: chrono::DateTime<chrono::Utc> = active["current_period_end"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(end.timestamp(), period_end, "{active}");
    assert_eq!(cart_benefit(&m, &buyer.token).await, (450, true));
    mails_about(&buyer.email, "Souk Plus membership is active", 1).await;

    // A first-invoice failure delivered after that never takes an active
    // membership back to incomplete (nor past due).
    stripe_event(app, "invoice.payment_failed", first, t + 2).await;
    assert_eq!(membership(&m, &buyer.token).await["status"], "active");

    // The subscription update says a renewal is past due: no benefit. Found
    // by the subscription's id alone this time (no metadata).
    let mut overdue = sub("past_due");
    overdue["metadata"] = json!({});
    stripe_event(app, "customer.subscription.updated", overdue, t + 3).await;
    let past_due = membership(&m, &buyer.token).await;
    assert_eq!(past_due["status"], "past_due", "{past_due}");
    assert_eq!(past_due["benefits_active"], false);
    assert_eq!(cart_benefit(&m, &buyer.token).await, (0, false));
    mails_about(&buyer.email, "Souk Plus membership payment failed", 1).await;

    // Paid after all: active again, for a new period. This update comes in
    // Stripe's current shape (API 2025-03-31 on): the period is on the
    // subscription's items, not on the subscription.
    let next_end = period_end + 30 * 86400;
    let mut renewed = sub("active");
    renewed
        .as_object_mut()
        .unwrap()
        .remove("current_period_end");
    renewed["items"] = json!({"object": "list", "data": [
        {"id": "si_1", "object": "subscription_item", "current_period_end": next_end}]});
    stripe_event(app, "customer.subscription.updated", renewed, t + 4).await;
    let renewed = membership(&m, &buyer.token).await;
    assert_eq!(renewed["status"], "active");
    let end: chrono::DateTime<chrono::Utc> = renewed["current_period_end"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(end.timestamp(), next_end, "{renewed}");
    assert_eq!(cart_benefit(&m, &buyer.token).await, (450, true));

    // Each move told the member in the app, in order; the ignored event
    // told nothing.
    let told = notifications(app, &buyer.token, "membership_update", 4).await;
    let moves: Vec<_> = told
        .iter()
        .rev()
        .map(|n| n["data"]["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        moves,
        ["incomplete", "active", "past_due", "active"],
        "{told:?}"
    );
    assert!(
        told.iter()
            .all(|n| n["data"]["membership_id"] == id.to_string())
    );
    m.close().await;
}

#[tokio::test]
async fn memberships_refuse_what_is_not_the_callers_or_not_open() {
    let m = Market::open().await;
    let app = &m.app;
    let (admin, plus) = admin_plan(
        app,
        json!({"name": "Souk Plus", "amount_minor": 999, "interval": "year", "free_shipping": true, "reason": "launch"}),
    )
    .await;
    let (ann, anns_card, _) = customer_with_card(&m, CARD_OK).await;
    let bob = customer(app).await;

    // Bob cannot see, confirm or use Ann's card.
    let path = format!("/me/payment-methods/{anns_card}");
    problem(
        call(app, &bob.token, Method::GET, &path, json!({})).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        call(
            app,
            &bob.token,
            Method::POST,
            &format!("{path}/confirm"),
            json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        remove_card(app, &bob.token, &anns_card).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let p = problem(
        subscribe(app, &bob.token, &plus["id"], &anns_card).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["payment_method_id"]);
    problem(
        call(app, &bob.token, Method::GET, "/me/membership", json!({})).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // No such plan; a plan with nothing to give.
    let p = problem(
        subscribe(app, &ann.token, &json!(Uuid::now_v7()), &anns_card).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["plan_id"]);
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let nothing =
        json!({"name": "Nothing", "amount_minor": 100, "interval": "month", "reason": "test"});
    assert_eq!(
        plan_refused(app, &admin, nothing, unprocessable).await,
        ["percent_off"]
    );
    // An admin's action says why (the audit log keeps it).
    let why = json!({"name": "Why", "amount_minor": 100, "interval": "month", "percent_off": 5, "reason": " "});
    assert_eq!(
        plan_refused(app, &admin, why, unprocessable).await,
        ["reason"]
    );
    let weekly = json!({"name": "", "amount_minor": 0, "interval": "week", "percent_off": 5, "reason": "test"});
    assert_eq!(
        plan_refused(app, &admin, weekly, unprocessable).await,
        ["interval"],
        "the body is read before it is checked"
    );

    // Only customers; only admins define plans.
    let seller = &m.oak.seller;
    let p = problem(
        call(app, seller, Method::POST, "/me/payment-methods", json!({})).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(fields(&p), ["role"]);
    let mine = json!({"name": "Mine", "amount_minor": 100, "interval": "month", "percent_off": 5});
    plan_refused(app, &ann.token, mine, StatusCode::FORBIDDEN).await;

    // One membership at a time; a retry with the same key answers the same
    // one (and asks Stripe for nothing more), the key with another request
    // is refused; the card it charges cannot be removed.
    let first = json_of(
        subscribe_keyed(app, &ann.token, &plus["id"], &anns_card, "join-1").await,
        StatusCode::ACCEPTED,
    )
    .await;
    let retried = json_of(
        subscribe_keyed(app, &ann.token, &plus["id"], &anns_card, "join-1").await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(retried["id"], first["id"]);
    let p = problem(
        subscribe_keyed(
            app,
            &ann.token,
            &json!(Uuid::now_v7()),
            &anns_card,
            "join-1",
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["Idempotency-Key"]);
    let made: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE envelope->>'type' = 'membership.requested'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(made, 1, "one subscription asked of Stripe");
    let p = problem(
        subscribe(app, &ann.token, &plus["id"], &anns_card).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&p), ["plan_id"]);
    let p = problem(
        remove_card(app, &ann.token, &anns_card).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&p), ["id"]);

    // Stripe refusing the cancellation: the member is told why and may ask again.
    let theirs = poll(app, &ann.token, "/me/membership", |v| {
        v["status"] == "active"
    })
    .await;
    sqlx::query("UPDATE memberships SET stripe_subscription_id = 'sub_gone' WHERE id = $1::uuid")
        .bind(theirs["id"].as_str().unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    cancel_membership(app, &ann.token).await;
    let refused = poll(app, &ann.token, "/me/membership", |v| {
        v["failure"].is_string()
    })
    .await;
    assert!(refused["cancel_requested_at"].is_null(), "{refused}");
    assert_eq!(refused["cancel_at_period_end"], false);
    let told = mails_about(&ann.email, "membership was not cancelled", 1).await;
    assert!(
        told[0].text.contains("Please ask again"),
        "{}",
        told[0].text
    );
    let again = cancel_membership(app, &ann.token).await;
    assert!(again["cancel_requested_at"].is_string(), "{again}");

    // A retired plan takes no new members.
    json_of(
        call(
            app,
            &admin,
            Method::POST,
            &format!(
                "/admin/membership-plans/{}/retire",
                plus["id"].as_str().unwrap()
            ),
            json!({"reason": "replaced by Plus 2"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let bobs_card = saved_card(&m, &bob.token, CARD_OK).await;
    let p = problem(
        subscribe(app, &bob.token, &plus["id"], &bobs_card).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["plan_id"]);
    let open: Value = json_of(
        call(app, &bob.token, Method::GET, "/membership-plans", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(open, json!([]));

    // A card nothing uses can be removed, and is gone from the list.
    assert_eq!(
        remove_card(app, &bob.token, &bobs_card).await.status(),
        StatusCode::NO_CONTENT
    );
    let listed = json_of(
        call(
            app,
            &bob.token,
            Method::GET,
            "/me/payment-methods",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(listed, json!([]));
    // ... and detached at Stripe, which can charge it no more.
    wait_detached(&m, &stripe_card(app, &bobs_card).await).await;
    m.close().await;
}

/// The cancel requests (`membership.cancel_requested`) sent so far.
async fn cancel_requests(app: &common::App) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE routing_key = 'membership.cancel_requested'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_stuck_cancel_is_sent_again_and_a_cancelled_membership_has_no_grace_after_its_period() {
    let m = Market::open().await;
    let app = &m.app;
    let plus = souk_plus(app).await;
    let (buyer, card, _) = customer_with_card(&m, CARD_OK).await;
    join(app, &buyer.token, &plus["id"], &card).await;
    wait_status(&m, &buyer.token, "active").await;
    common::orders::settle(app).await;

    // A cancel whose request never reached Stripe (its message parked while
    // Stripe was down): asked moments ago, asking again waits for it ...
    cancel_asked_ago(app, "1 minute").await;
    let waiting = cancel_membership(app, &buyer.token).await;
    assert_eq!(waiting["cancel_at_period_end"], false);
    assert_eq!(
        cancel_requests(app).await,
        0,
        "a request in flight is not sent twice"
    );
    // ... but one unanswered for long is sent again, and Stripe confirms it.
    cancel_asked_ago(app, "10 minutes").await;
    let again = cancel_membership(app, &buyer.token).await;
    let asked: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(again["cancel_requested_at"].clone()).unwrap();
    assert!(
        asked > chrono::Utc::now() - chrono::Duration::minutes(1),
        "{again}"
    );
    assert_eq!(cancel_requests(app).await, 1);
    wait_ending(app, &buyer.token).await;
    mails_about(&buyer.email, "Souk Plus membership ends with its period", 1).await;
    common::orders::settle(app).await;

    // No renewal is coming, so no grace waits for one: the benefit ends
    // with the period paid for, though the deletion's webhook is not in.
    add_to_cart(app, &buyer.token, &m.oak.variant, 1).await;
    period_end_ago(app, "-1 hour").await;
    assert_eq!(cart_benefit(&m, &buyer.token).await, (450, true));
    period_end_ago(app, "1 hour").await;
    assert_eq!(cart_benefit(&m, &buyer.token).await, (0, false));
    let after = membership(&m, &buyer.token).await;
    assert_eq!(
        (after["status"].as_str(), after["benefits_active"].as_bool()),
        (Some("active"), Some(false)),
        "{after}"
    );
    m.close().await;
}

/// What Stripe does when a SetupIntent with a customer succeeds, and
/// localstripe does not: attaches its card to that customer.
async fn attach_as_stripe_does(m: &Market, buyer: uuid::Uuid, card: &str) {
    let customer: String =
        sqlx::query_scalar("SELECT stripe_customer_id FROM stripe_customers WHERE user_id = $1")
            .bind(buyer)
            .fetch_one(&m.app.db.pool)
            .await
            .unwrap();
    let resp = m
        .app
        .http
        .post(format!("{}v1/payment_methods/{card}/attach", m.stripe.url))
        .bearer_auth(SECRET_KEY)
        .form(&[("customer", customer.as_str())])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "attached: {}", resp.status());
    let attached = m.stripe.get(&format!("payment_methods/{card}")).await;
    assert_eq!(attached["customer"], customer.as_str());
}

/// The card form completed with `CARD_OK` behind `secret`, as a
/// storefront does, and attached as Stripe does; the card's id at Stripe.
async fn complete_card_form(m: &Market, buyer: uuid::Uuid, secret: &str) -> String {
    let confirmed = m
        .stripe
        .confirm_setup(secret, CARD_OK)
        .await
        .expect("the card is accepted for saving");
    assert_eq!(confirmed["status"], "succeeded");
    let card = confirmed["payment_method"].as_str().unwrap().to_string();
    attach_as_stripe_does(m, buyer, &card).await;
    card
}

#[tokio::test]
async fn a_card_removed_before_it_was_kept_is_not_left_on_the_customer_at_stripe() {
    let m = Market::open().await;
    let app = &m.app;
    let buyer = customer(app).await;

    // Removed while its card form is open: its SetupIntent is cancelled,
    // so the form can no longer save a card through it.
    let (removed, secret) = pending_card(app, &buyer.token).await;
    let intent = secret.split("_secret_").next().unwrap().to_string();
    assert_eq!(
        remove_card(app, &buyer.token, &removed).await.status(),
        StatusCode::NO_CONTENT
    );
    wait_until("the SetupIntent to be cancelled", PIPELINE_WAIT, || async {
        m.stripe.get(&format!("setup_intents/{intent}")).await["status"] == "canceled"
    })
    .await;

    // The form is completed anyway. localstripe, unlike Stripe, confirms a
    // cancelled intent: this stands for a confirm that reached Stripe just
    // before the cancel. Stripe's word that the intent succeeded comes
    // after the removal: the card is detached, not kept.
    let late = complete_card_form(&m, buyer.id, &secret).await;
    let succeeded = json!({"id": intent, "object": "setup_intent", "status": "succeeded",
                           "payment_method": late, "metadata": {"payment_method_id": removed}});
    stripe_event(app, "setup_intent.succeeded", succeeded, now()).await;
    wait_detached(&m, &late).await;

    // Confirmed with Stripe, then removed before Souk kept it (its
    // confirm not in yet): the removal detaches the card the intent saved.
    let (raced, secret) = pending_card(app, &buyer.token).await;
    let saved = complete_card_form(&m, buyer.id, &secret).await;
    assert_eq!(
        remove_card(app, &buyer.token, &raced).await.status(),
        StatusCode::NO_CONTENT
    );
    wait_detached(&m, &saved).await;

    // Neither is shown to the customer, nor kept.
    common::orders::settle(app).await;
    let listed = call(
        app,
        &buyer.token,
        Method::GET,
        "/me/payment-methods",
        json!({}),
    )
    .await;
    assert_eq!(json_of(listed, StatusCode::OK).await, json!([]));
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payment_methods
          WHERE user_id = $1 AND (status <> 'removed' OR stripe_payment_method_id IS NOT NULL)",
    )
    .bind(buyer.id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(kept, 0);
    for card in [&late, &saved] {
        let at_stripe = m.stripe.get(&format!("payment_methods/{card}")).await;
        assert!(at_stripe["customer"].is_null(), "{at_stripe}");
    }
    m.close().await;
}
