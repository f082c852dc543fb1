//! After payment: sellers fulfil their parts (tracked and mailed), cancel
//! their own part (a partial refund), customers cancel until a seller
//! ships, admins see and correct; nobody reaches what is not theirs.

mod common;

use common::{
    App,
    catalog::{call, json_of},
    fields,
    orders::{
        Customer, Market, PIPELINE_WAIT, add_to_cart, assert_ledger_balances, checkout,
        checkout_and_pay, customer, end_holds, mails_about, mails_logged, of_order, order, pay,
        posted, seller_email, settle, stock, wait_for,
    },
    problem, signed_in,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{count, stripe::CARD_OK, wait_until};
use uuid::Uuid;

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// The seller order of `slug` within `order`.
fn part(order: &Value, slug: &str) -> String {
    order["seller_orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["shop"]["slug"] == slug)
        .map(id)
        .unwrap_or_else(|| panic!("no part of {slug} in {order}"))
}

async fn set_status(app: &App, token: &str, part: &str, body: Value) -> reqwest::Response {
    call(
        app,
        token,
        Method::POST,
        &format!("/seller/orders/{part}/status"),
        body,
    )
    .await
}

#[tokio::test]
async fn a_seller_ships_and_delivers_and_the_customer_follows_it() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    let oak_part = part(&paid, "oak");

    // Delivered before shipping is refused; shipping needs carrier and number.
    let early = set_status(app, &oak.seller, &oak_part, json!({"status": "delivered"})).await;
    assert_eq!(
        fields(&problem(early, StatusCode::CONFLICT).await),
        ["status"]
    );
    let bare = set_status(app, &oak.seller, &oak_part, json!({"status": "shipped"})).await;
    assert_eq!(
        fields(&problem(bare, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["carrier", "tracking_number"]
    );

    json_of(
        set_status(app, &oak.seller, &oak_part, json!({"status": "processing"})).await,
        StatusCode::OK,
    )
    .await;
    let shipped = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM123456MA"});
    let shipped = json_of(
        set_status(app, &oak.seller, &oak_part, shipped).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(shipped["status"], "shipped");
    assert_eq!(shipped["tracking_number"], "AM123456MA");
    let mail = mails_about(&buyer.email, "on its way", 1).await;
    assert!(mail[0].text.contains("AM123456MA"), "{}", mail[0].text);
    // A blank carrier with the delivery keeps the one on record; the note
    // reaches the customer's in-app notification too.
    let delivered =
        json!({"status": "delivered", "carrier": "  ", "note": "left with the neighbour"});
    let delivered = json_of(
        set_status(app, &oak.seller, &oak_part, delivered).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(delivered["carrier"], "Amana");
    let why: Option<String> = sqlx::query_scalar(
        "SELECT data->>'reason' FROM notifications WHERE user_id = $1 AND kind = 'order_update'
          ORDER BY created_at DESC, id DESC LIMIT 1",
    )
    .bind(buyer.id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(why.as_deref(), Some("left with the neighbour"));
    mails_about(&buyer.email, "was delivered", 1).await;

    // The customer's timeline shows each step, with the tracking number.
    let path = format!("/orders/{}/tracking", id(&paid));
    let timeline = json_of(
        call(app, &buyer.token, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    let steps: Vec<(&str, &str)> = timeline
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == "seller_order")
        .map(|e| {
            (
                e["to_status"].as_str().unwrap(),
                e["actor_role"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("paid", "system"),
            ("processing", "seller"),
            ("shipped", "seller"),
            ("delivered", "seller")
        ]
    );
    let shipment = timeline
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["to_status"] == "shipped")
        .unwrap();
    assert_eq!(shipment["carrier"], "Amana");
    assert_eq!(shipment["shop"], "Shop");
    // Settlement hears of the delivery.
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM outbox WHERE routing_key = 'seller_order.delivered'"
        )
        .await,
        1
    );
    // Too late to cancel now.
    let path = format!("/orders/{}/cancel", id(&paid));
    let late = problem(
        call(app, &buyer.token, Method::POST, &path, json!({})).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(
        late["detail"].as_str().unwrap().contains("shipped"),
        "{late}"
    );
    market.close().await;
}

#[tokio::test]
async fn a_seller_sees_the_address_only_once_the_order_is_paid() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let order_id = id(&checkout(app, &buyer.token).await);
    let awaiting = wait_for(app, &buyer.token, &order_id, "awaiting_payment").await;
    let oak_part = part(&awaiting, "oak");
    let path = format!("/seller/orders/{oak_part}");

    let unpaid = json_of(
        call(app, &oak.seller, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(unpaid["status"], "pending");
    assert!(unpaid["shipping_address"].is_null(), "{unpaid}");

    pay(app, stripe, &buyer.token, &order_id, CARD_OK).await;
    wait_for(app, &buyer.token, &order_id, "paid").await;
    let paid = json_of(
        call(app, &oak.seller, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(paid["shipping_address"]["line1"], "1 Market Street");
    assert_eq!(
        paid["payout_minor"],
        paid["total_minor"].as_i64().unwrap() - paid["commission_minor"].as_i64().unwrap()
    );
    // Called off, there is nothing to ship: the address is gone again.
    let cancel = format!("{path}/cancel");
    let body = json!({"reason": "out of walnut"});
    json_of(
        call(app, &oak.seller, Method::POST, &cancel, body).await,
        StatusCode::OK,
    )
    .await;
    let cancelled = json_of(
        call(app, &oak.seller, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["shipping_address"].is_null(), "{cancelled}");
    market.close().await;
}

#[tokio::test]
async fn a_seller_cancelling_its_part_refunds_only_that_part() {
    let market = Market::open().await;
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 2).await;
    add_to_cart(app, &buyer.token, &tea.variant, 1).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    let order_id = id(&paid);
    let (oak_part, tea_part) = (part(&paid, "oak"), part(&paid, "tea"));
    let oak_total = paid["seller_orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == oak_part.as_str())
        .unwrap()["total_minor"]
        .as_i64()
        .unwrap();

    // Another shop's seller cannot cancel it.
    let path = format!("/seller/orders/{oak_part}/cancel");
    problem(
        call(
            app,
            &tea.seller,
            Method::POST,
            &path,
            json!({"reason": "no"}),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let missing = call(
        app,
        &oak.seller,
        Method::POST,
        &path,
        json!({"reason": " "}),
    )
    .await;
    assert_eq!(
        fields(&problem(missing, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["reason"]
    );

    let cancelled = json_of(
        call(
            app,
            &oak.seller,
            Method::POST,
            &path,
            json!({"reason": "the board cracked in the workshop"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cancelled["status"], "cancelled");

    // Oak's part comes back, refunded; the tea part and its stock are untouched.
    wait_until("oak's part refunded", PIPELINE_WAIT, || async {
        order(app, &buyer.token, &order_id).await["seller_orders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == oak_part.as_str() && p["status"] == "refunded")
    })
    .await;
    let after = order(app, &buyer.token, &order_id).await;
    assert_eq!(after["status"], "paid", "the rest of the order stands");
    assert_eq!(after["refunded_minor"], oak_total);
    let intent: String =
        sqlx::query_scalar("SELECT payment_intent_id FROM orders WHERE status = 'paid'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let refunds = stripe.refunds_of(&intent).await;
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["amount"], oak_total);
    let tea_now = after["seller_orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == tea_part.as_str())
        .unwrap()
        .clone();
    assert_eq!(tea_now["status"], "paid");
    assert_eq!(tea_now["refunded_minor"], 0);
    wait_until("oak's stock restored", PIPELINE_WAIT, || async {
        stock(app, &oak.variant).await == (5, 0)
    })
    .await;
    assert_eq!(stock(app, &tea.variant).await, (4, 0));
    let mail = mails_about(&buyer.email, "cancelled its part", 1).await;
    assert!(mail[0].text.contains("cracked"), "{}", mail[0].text);
    mails_about(&buyer.email, "Refund of", 1).await;
    market.close().await;
}

#[tokio::test]
async fn a_customer_cancelling_a_paid_order_gets_everything_back() {
    let market = Market::open().await;
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    add_to_cart(app, &buyer.token, &tea.variant, 2).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    let order_id = id(&paid);

    let path = format!("/orders/{order_id}/cancel");
    let cancelled = json_of(
        call(app, &buyer.token, Method::POST, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cancelled["status"], "cancelled");
    let refunded = wait_for(app, &buyer.token, &order_id, "refunded").await;
    assert_eq!(refunded["refunded_minor"], refunded["total_minor"]);
    assert!(
        refunded["seller_orders"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "refunded")
    );
    wait_until("the stock restored", PIPELINE_WAIT, || async {
        stock(app, &oak.variant).await == (5, 0) && stock(app, &tea.variant).await == (5, 0)
    })
    .await;
    // Each seller is told not to ship.
    for slug in ["oak", "tea"] {
        mails_about(&seller_email(app, slug).await, "was cancelled", 1).await;
    }
    // Twice is refused.
    let again = problem(
        call(app, &buyer.token, Method::POST, &path, json!({})).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&again), ["status"]);
    market.close().await;
}

#[tokio::test]
async fn another_customer_cannot_read_an_order_its_secret_or_its_tracking() {
    let market = Market::open().await;
    let Market { app, oak, .. } = &market;
    let (owner, other) = (customer(app).await, customer(app).await);
    add_to_cart(app, &owner.token, &oak.variant, 1).await;
    let order_id = id(&checkout(app, &owner.token).await);
    let awaiting = wait_for(app, &owner.token, &order_id, "awaiting_payment").await;
    assert!(awaiting["payment"]["client_secret"].is_string());

    for (method, path) in [
        (Method::GET, format!("/orders/{order_id}")),
        (Method::GET, format!("/orders/{order_id}/tracking")),
        (Method::POST, format!("/orders/{order_id}/cancel")),
    ] {
        problem(
            call(app, &other.token, method, &path, json!({})).await,
            StatusCode::NOT_FOUND,
        )
        .await;
    }
    let theirs = json_of(
        call(app, &other.token, Method::GET, "/orders", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(theirs["total"], 0);
    // Nor can a seller through the customer routes, even the order's own seller.
    problem(
        call(
            app,
            &oak.seller,
            Method::GET,
            &format!("/orders/{order_id}"),
            json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let mine = json_of(
        call(
            app,
            &owner.token,
            Method::GET,
            "/orders?status=awaiting_payment",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(mine["total"], 1);
    assert_eq!(
        order(app, &owner.token, &order_id).await["status"],
        "awaiting_payment",
        "nothing changed"
    );
    market.close().await;
}

#[tokio::test]
async fn a_seller_cannot_see_or_change_another_shops_seller_orders() {
    let market = Market::open().await;
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    let oak_part = part(&paid, "oak");

    for (method, path, body) in [
        (Method::GET, format!("/seller/orders/{oak_part}"), json!({})),
        (
            Method::POST,
            format!("/seller/orders/{oak_part}/status"),
            json!({"status": "processing"}),
        ),
        (
            Method::POST,
            format!("/seller/orders/{oak_part}/cancel"),
            json!({"reason": "mine now"}),
        ),
    ] {
        problem(
            call(app, &tea.seller, method, &path, body).await,
            StatusCode::NOT_FOUND,
        )
        .await;
    }
    let list = json_of(
        call(app, &tea.seller, Method::GET, "/seller/orders", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(list["total"], 0);
    let own = json_of(
        call(
            app,
            &oak.seller,
            Method::GET,
            "/seller/orders?status=paid",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(own["total"], 1);
    // Customers are not sellers.
    problem(
        call(app, &buyer.token, Method::GET, "/seller/orders", json!({})).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let untouched = json_of(
        call(
            app,
            &oak.seller,
            Method::GET,
            &format!("/seller/orders/{oak_part}"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(untouched["status"], "paid");
    market.close().await;
}

/// The order's latest event, as admins read it.
async fn last_event(app: &App, admin: &str, order_id: &str) -> Value {
    let order = json_of(
        call(
            app,
            admin,
            Method::GET,
            &format!("/admin/orders/{order_id}"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    order["events"].as_array().unwrap().last().unwrap().clone()
}

/// A customer's order of one oak item, paid, then shipped (Amana, AM1) and
/// delivered by its seller: the buyer, the order's id and the oak part's.
async fn delivered_oak(market: &Market) -> (Customer, String, String) {
    let Market {
        app, stripe, oak, ..
    } = market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    let (order_id, oak_part) = (id(&paid), part(&paid, "oak"));
    let shipped = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM1"});
    json_of(
        set_status(app, &oak.seller, &oak_part, shipped).await,
        StatusCode::OK,
    )
    .await;
    json_of(
        set_status(app, &oak.seller, &oak_part, json!({"status": "delivered"})).await,
        StatusCode::OK,
    )
    .await;
    (buyer, order_id, oak_part)
}

#[tokio::test]
async fn admins_see_every_order_and_correct_a_status_with_a_reason() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let (buyer, order_id, oak_part) = delivered_oak(&market).await;

    let list = json_of(
        call(app, &root, Method::GET, "/admin/orders?shop=oak", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(list["total"], 1);
    let full = json_of(
        call(
            app,
            &root,
            Method::GET,
            &format!("/admin/orders/{order_id}"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(full["customer"]["email"], buyer.email.as_str());
    assert_eq!(full["payments"].as_array().unwrap().len(), 1);
    assert!(
        full["order"]["payment"].is_null(),
        "admins never get the client secret"
    );

    // Marked delivered by mistake: back to shipped, with the reason kept.
    let path = format!("/admin/seller-orders/{oak_part}/status");
    let no_reason = call(
        app,
        &root,
        Method::POST,
        &path,
        json!({"status": "shipped", "reason": ""}),
    )
    .await;
    assert_eq!(
        fields(&problem(no_reason, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["reason"]
    );
    let body = json!({"status": "shipped", "reason": "the carrier lost the parcel; not delivered"});
    let corrected = json_of(
        call(app, &root, Method::POST, &path, body).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(corrected["status"], "shipped");
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM audit_log WHERE action = 'seller_order.status.shipped'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(reason.contains("lost the parcel"));
    let correction = last_event(app, &root, &order_id).await;
    assert_eq!(
        (
            correction["actor_role"].as_str(),
            correction["note"].as_str()
        ),
        (
            Some("admin"),
            Some("the carrier lost the parcel; not delivered")
        )
    );
    // The parcel on record is what the timeline shows again (none was given).
    assert_eq!(
        (
            correction["carrier"].as_str(),
            correction["tracking_number"].as_str()
        ),
        (Some("Amana"), Some("AM1")),
        "{correction}"
    );
    assert_eq!(corrected["tracking_number"], "AM1");

    // A correction moves between the fulfilment steps only: an unpaid part
    // is no admin's to call paid (that is the order's payment).
    let other = customer(app).await;
    add_to_cart(app, &other.token, &oak.variant, 1).await;
    let unpaid = id(&checkout(app, &other.token).await);
    let awaiting = wait_for(app, &other.token, &unpaid, "awaiting_payment").await;
    let pending = part(&awaiting, "oak");
    let refused = call(
        app,
        &root,
        Method::POST,
        &format!("/admin/seller-orders/{pending}/status"),
        json!({"status": "paid", "reason": "the customer says they paid"}),
    )
    .await;
    assert_eq!(
        fields(&problem(refused, StatusCode::CONFLICT).await),
        ["status"]
    );
    // Moved back, its earning (posted at delivery) is not released even
    // once its hold is over; delivered again, the hold starts over, and
    // once released the delivery cannot be moved back.
    posted(app, &format!("earning:{oak_part}"), 1).await;
    // It waits for the next delivery however old its first hold: no sweep
    // can take it between a re-delivery and that delivery's message.
    let waiting = "SELECT count(*) FROM seller_earnings WHERE available_at = 'infinity'";
    assert_eq!(count(&app.db.pool, waiting).await, 1);
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let released = "SELECT count(*) FROM seller_earnings WHERE released_at IS NOT NULL";
    assert_eq!(
        count(&app.db.pool, released).await,
        0,
        "not delivered: held"
    );
    json_of(
        set_status(app, &oak.seller, &oak_part, json!({"status": "delivered"})).await,
        StatusCode::OK,
    )
    .await;
    posted(app, &format!("earning:{oak_part}"), 1).await;
    wait_until("the hold to start over", PIPELINE_WAIT, || async {
        count(
            &app.db.pool,
            "SELECT count(*) FROM seller_earnings WHERE available_at > now() AND available_at < 'infinity'",
        )
        .await
            == 1
    })
    .await;
    end_holds(app).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM ledger_transactions WHERE kind = 'earning'"
        )
        .await,
        1
    );
    let late = json!({"status": "shipped", "reason": "lost after all"});
    let late = call(app, &root, Method::POST, &path, late).await;
    assert_eq!(
        fields(&problem(late, StatusCode::CONFLICT).await),
        ["status"]
    );
    assert_ledger_balances(app).await;

    // Shipped needs a carrier and tracking number, given or kept.
    let other = customer(app).await;
    add_to_cart(app, &other.token, &oak.variant, 1).await;
    let other_part = part(&checkout_and_pay(app, stripe, &other.token).await, "oak");
    let untracked = json!({"status": "shipped", "reason": "the seller forgot to mark it"});
    let untracked = call(
        app,
        &root,
        Method::POST,
        &format!("/admin/seller-orders/{other_part}/status"),
        untracked,
    )
    .await;
    assert_eq!(
        fields(&problem(untracked, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["carrier", "tracking_number"]
    );

    // A money status is not a correction.
    let refund = call(
        app,
        &root,
        Method::POST,
        &path,
        json!({"status": "refunded", "reason": "x"}),
    )
    .await;
    assert_eq!(
        fields(&problem(refund, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["status"]
    );

    // Nobody else may use any admin order route.
    let someone = signed_in(app, None).await;
    for (method, path) in [
        (Method::GET, "/admin/orders".to_string()),
        (Method::GET, format!("/admin/orders/{order_id}")),
        (Method::GET, format!("/admin/seller-orders/{oak_part}")),
        (
            Method::POST,
            format!("/admin/seller-orders/{oak_part}/status"),
        ),
        (Method::GET, "/admin/payments/flagged".to_string()),
        (Method::PUT, "/admin/shops/oak/commission".to_string()),
    ] {
        for token in [&someone, &oak.seller, &buyer.token] {
            let body = json!({"status": "paid", "reason": "x", "commission_bps": 0});
            problem(
                call(app, token, method.clone(), &path, body).await,
                StatusCode::FORBIDDEN,
            )
            .await;
        }
    }
    market.close().await;
}

#[tokio::test]
async fn a_shops_terms_set_its_shipping_and_commission() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let shop = json!({"shipping_flat_minor": 0});
    let updated = json_of(
        call(app, &oak.seller, Method::PATCH, "/shops/oak", shop).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(updated["shipping_flat_minor"], 0);
    let rate = json!({"commission_bps": 550, "reason": "launch partner"});
    let resp = call(app, &root, Method::PUT, "/admin/shops/oak/commission", rate).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let bad = call(
        app,
        &root,
        Method::PUT,
        "/admin/shops/oak/commission",
        json!({"commission_bps": 10001, "reason": "x"}),
    )
    .await;
    assert_eq!(
        fields(&problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["commission_bps"]
    );

    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    assert_eq!(paid["shipping_minor"], 0);
    assert_eq!(paid["total_minor"], 4500);
    let part = json_of(
        call(
            app,
            &oak.seller,
            Method::GET,
            &format!("/seller/orders/{}", part(&paid, "oak")),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    // 5.5 % of 4500 is 247.5: the half unit stays with the seller.
    assert_eq!(
        (
            part["commission_bps"].as_i64(),
            part["commission_minor"].as_i64()
        ),
        (Some(550), Some(247))
    );
    market.close().await;
}

/// Every mail `to` was sent, whatever the template.
async fn all_mails(app: &App, to: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM email_log WHERE recipient = $1")
        .bind(to)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

async fn intent_of(app: &App, order: &str) -> String {
    sqlx::query_scalar("SELECT payment_intent_id FROM orders WHERE id = $1")
        .bind(Uuid::parse_str(order).unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// The seller-order steps of the order's timeline, as `to_status by actor_role`.
async fn steps(app: &App, token: &str, order: &str) -> Vec<String> {
    let timeline = json_of(
        call(
            app,
            token,
            Method::GET,
            &format!("/orders/{order}/tracking"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    timeline
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == "seller_order")
        .map(|e| {
            format!(
                "{} by {}",
                e["to_status"].as_str().unwrap(),
                e["actor_role"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn a_customer_cancelling_while_the_seller_prepares_it_is_refunded_once_but_not_once_shipped()
{
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 2).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    let (order_id, oak_part) = (id(&paid), part(&paid, "oak"));
    let total = paid["total_minor"].as_i64().unwrap();
    assert_eq!(stock(app, &oak.variant).await, (3, 0), "sold");
    let processing = json_of(
        set_status(app, &oak.seller, &oak_part, json!({"status": "processing"})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(processing["status"], "processing");

    // Still allowed: nothing has shipped.
    let path = format!("/orders/{order_id}/cancel");
    let cancelled = json_of(
        call(
            app,
            &buyer.token,
            Method::POST,
            &path,
            json!({"reason": "ordered the wrong size"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cancelled["status"], "cancelled");
    let refunded = wait_for(app, &buyer.token, &order_id, "refunded").await;
    settle(app).await;
    let after = order(app, &buyer.token, &order_id).await;
    assert_eq!(after["status"], "refunded", "{refunded}");
    assert_eq!(after["refunded_minor"], total);
    assert_eq!(after["seller_orders"][0]["status"], "refunded");
    assert_eq!(after["seller_orders"][0]["refunded_minor"], total);
    // The money reached Stripe once, in full.
    let intent = intent_of(app, &order_id).await;
    let refunds = stripe.refunds_of(&intent).await;
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["amount"], total);
    let recorded = "SELECT count(*) FROM refunds WHERE order_id = $1";
    assert_eq!(of_order(app, recorded, &order_id).await, 1);
    // Both units back on the shelf, once.
    assert_eq!(stock(app, &oak.variant).await, (5, 0));
    let returned = "SELECT count(*) FROM stock_adjustments WHERE reason = 'returned: order ' || $1::text || ' cancelled'";
    assert_eq!(of_order(app, returned, &order_id).await, 1);
    assert_eq!(
        steps(app, &buyer.token, &order_id).await,
        [
            "paid by system",
            "processing by seller",
            "cancelled by customer",
            "refunded by system"
        ]
    );
    // The seller is told not to ship it; the customer of the refund, once.
    let seller = seller_email(app, "oak").await;
    assert_eq!(
        mails_logged(app, &seller, "seller_order_cancelled").await,
        1
    );
    assert_eq!(mails_logged(app, &buyer.email, "order_cancelled").await, 1);
    assert_eq!(mails_logged(app, &buyer.email, "refund_issued").await, 1);
    // Nor can the seller go on with it.
    let ship = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM9"});
    let ship = set_status(app, &oak.seller, &oak_part, ship).await;
    assert_eq!(
        fields(&problem(ship, StatusCode::CONFLICT).await),
        ["status"]
    );

    // Once shipped, a cancel is refused, naming the status, and changes nothing.
    let other = customer(app).await;
    add_to_cart(app, &other.token, &oak.variant, 1).await;
    let paid = checkout_and_pay(app, stripe, &other.token).await;
    let (other_order, other_part) = (id(&paid), part(&paid, "oak"));
    let shipped = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM10"});
    json_of(
        set_status(app, &oak.seller, &other_part, shipped).await,
        StatusCode::OK,
    )
    .await;
    let path = format!("/orders/{other_order}/cancel");
    let late = problem(
        call(app, &other.token, Method::POST, &path, json!({})).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&late), ["status"], "{late}");
    assert!(
        late["errors"][0]["message"]
            .as_str()
            .or(late["detail"].as_str())
            .is_some_and(|m| m.contains("shipped")),
        "{late}"
    );
    settle(app).await;
    let still = order(app, &other.token, &other_order).await;
    assert_eq!(still["status"], "paid");
    assert_eq!(still["refunded_minor"], 0);
    assert_eq!(still["seller_orders"][0]["status"], "shipped");
    let other_intent = intent_of(app, &other_order).await;
    assert!(stripe.refunds_of(&other_intent).await.is_empty());
    assert_eq!(of_order(app, recorded, &other_order).await, 0);
    let cancels = "SELECT count(*) FROM outbox WHERE routing_key = 'order.cancelled'
                    AND envelope #>> '{payload,order_id}' = $1::text";
    assert_eq!(of_order(app, cancels, &other_order).await, 0);
    assert_eq!(stock(app, &oak.variant).await, (4, 0), "still sold");
    assert_eq!(mails_logged(app, &other.email, "order_cancelled").await, 0);
    market.close().await;
}

#[tokio::test]
async fn the_customer_is_mailed_when_the_seller_starts_and_when_an_admin_corrects_the_status() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    let (order_id, oak_part) = (id(&paid), part(&paid, "oak"));

    json_of(
        set_status(app, &oak.seller, &oak_part, json!({"status": "processing"})).await,
        StatusCode::OK,
    )
    .await;
    let mail = mails_about(&buyer.email, "Your order from Shop: processing", 1).await;
    assert!(
        mail[0].text.contains("is preparing its part of your order")
            && mail[0].text.contains(&order_id),
        "{}",
        mail[0].text
    );
    let shipped = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM77"});
    json_of(
        set_status(app, &oak.seller, &oak_part, shipped).await,
        StatusCode::OK,
    )
    .await;
    mails_about(&buyer.email, "on its way", 1).await;

    // Marked shipped by mistake (the parcel never left): an admin puts it
    // back to processing, and the customer hears of it.
    let body =
        json!({"status": "processing", "reason": "marked shipped by mistake; still being packed"});
    let corrected = json_of(
        call(
            app,
            &root,
            Method::POST,
            &format!("/admin/seller-orders/{oak_part}/status"),
            body,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(corrected["status"], "processing");
    // The customer no longer sees a parcel to follow; the seller keeps its
    // record (to ship it again).
    let seen = common::orders::order(app, &buyer.token, &order_id).await;
    let seen_part = seen["seller_orders"][0].clone();
    assert_eq!(seen_part["carrier"], Value::Null, "{seen_part}");
    assert_eq!(seen_part["tracking_number"], Value::Null, "{seen_part}");
    assert_eq!(corrected["carrier"], "Amana");
    let mail = mails_about(&buyer.email, "Your order from Shop: processing", 2).await;
    assert!(
        mail.iter()
            .all(|m| m.text.contains("is preparing its part of your order")),
        "{mail:?}"
    );
    // The correction's reason is the platform's, not signed as the shop's.
    let signed: Vec<_> = mail
        .iter()
        .filter(|m| m.text.contains("still being packed"))
        .collect();
    assert_eq!(signed.len(), 1, "{mail:?}");
    assert!(
        signed[0]
            .text
            .contains("Note from the Souk team: marked shipped by mistake"),
        "{}",
        signed[0].text
    );

    // Exactly one mail per step: the receipt, processing, shipped, the
    // correction; nothing twice, nothing else.
    settle(app).await;
    assert_eq!(mails_logged(app, &buyer.email, "order_receipt").await, 1);
    assert_eq!(mails_logged(app, &buyer.email, "order_update").await, 3);
    assert_eq!(all_mails(app, &buyer.email).await, 4);
    let subjects: Vec<String> = sqlx::query_scalar(
        "SELECT subject FROM email_log WHERE recipient = $1 AND template = 'order_update' ORDER BY sent_at",
    )
    .bind(&buyer.email)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        subjects,
        [
            "Your order from Shop: processing",
            "Your order from Shop is on its way",
            "Your order from Shop: processing",
        ]
    );
    assert_eq!(
        steps(app, &buyer.token, &order_id).await,
        [
            "paid by system",
            "processing by seller",
            "shipped by seller",
            "processing by admin"
        ]
    );
    market.close().await;
}

#[tokio::test]
async fn a_parcel_is_only_taken_with_the_shipped_step() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    let (order_id, oak_part) = (id(&paid), part(&paid, "oak"));
    let seller_order = format!("/seller/orders/{oak_part}");

    // Processing with a parcel would keep it where no timeline entry shows
    // it: each one sent is refused by name, and nothing is moved or kept.
    for (body, named) in [
        (
            json!({"status": "processing", "carrier": "Amana"}),
            vec!["carrier"],
        ),
        (
            json!({"status": "processing", "tracking_number": "AM5"}),
            vec!["tracking_number"],
        ),
        (
            json!({"status": "processing", "carrier": "Amana", "tracking_number": "AM5"}),
            vec!["carrier", "tracking_number"],
        ),
    ] {
        let refused = set_status(app, &oak.seller, &oak_part, body).await;
        assert_eq!(
            fields(&problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await),
            named
        );
    }
    let untouched = json_of(
        call(app, &oak.seller, Method::GET, &seller_order, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(untouched["status"], "paid");
    assert_eq!(
        (&untouched["carrier"], &untouched["tracking_number"]),
        (&Value::Null, &Value::Null),
        "{untouched}"
    );
    // Blank is the same as absent: nothing sent, nothing refused.
    let blank = json!({"status": "processing", "carrier": " ", "tracking_number": ""});
    let processing = json_of(
        set_status(app, &oak.seller, &oak_part, blank).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(processing["status"], "processing");
    assert_eq!(processing["carrier"], Value::Null, "{processing}");

    // Shipped takes it, and its timeline entry records it.
    let shipped = json!({"status": "shipped", "carrier": " Amana ", "tracking_number": "AM5"});
    let shipped = json_of(
        set_status(app, &oak.seller, &oak_part, shipped).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(shipped["carrier"], "Amana", "trimmed");
    // Delivered cannot swap the parcel the customer followed.
    let swapped = json!({"status": "delivered", "tracking_number": "AM6"});
    let swapped = set_status(app, &oak.seller, &oak_part, swapped).await;
    assert_eq!(
        fields(&problem(swapped, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["tracking_number"]
    );
    // Nor can an admin's correction to another step bring one.
    let correction = json!({"status": "processing", "reason": "not packed yet", "carrier": "DHL"});
    let correction = call(
        app,
        &root,
        Method::POST,
        &format!("/admin/seller-orders/{oak_part}/status"),
        correction,
    )
    .await;
    assert_eq!(
        fields(&problem(correction, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["carrier"]
    );
    let now = json_of(
        call(app, &oak.seller, Method::GET, &seller_order, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (
            now["status"].as_str(),
            now["carrier"].as_str(),
            now["tracking_number"].as_str()
        ),
        (Some("shipped"), Some("Amana"), Some("AM5")),
        "{now}"
    );
    // Every parcel the seller order holds is one its timeline shows.
    let timeline = json_of(
        call(
            app,
            &buyer.token,
            Method::GET,
            &format!("/orders/{order_id}/tracking"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let parcels: Vec<(&str, &Value, &Value)> = timeline
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == "seller_order")
        .map(|e| {
            (
                e["to_status"].as_str().unwrap(),
                &e["carrier"],
                &e["tracking_number"],
            )
        })
        .collect();
    assert_eq!(
        parcels,
        [
            ("paid", &Value::Null, &Value::Null),
            ("processing", &Value::Null, &Value::Null),
            ("shipped", &json!("Amana"), &json!("AM5")),
        ]
    );
    market.close().await;
}

#[tokio::test]
async fn an_admin_shipping_with_a_blank_parcel_keeps_the_one_on_record() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let (_, order_id, oak_part) = delivered_oak(&market).await;

    // Not delivered after all: back to shipped, the admin's form sending
    // its empty parcel fields. Blank is absent, so the seller's parcel stands.
    let path = format!("/admin/seller-orders/{oak_part}/status");
    let body = json!({
        "status": "shipped", "reason": "the parcel is still with the carrier",
        "carrier": "  ", "tracking_number": "",
    });
    let corrected = json_of(
        call(app, &root, Method::POST, &path, body).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(corrected["status"], "shipped");
    assert_eq!(
        (
            corrected["carrier"].as_str(),
            corrected["tracking_number"].as_str()
        ),
        (Some("Amana"), Some("AM1")),
        "{corrected}"
    );
    let correction = last_event(app, &root, &order_id).await;
    assert_eq!(
        (
            correction["to_status"].as_str(),
            correction["carrier"].as_str(),
            correction["tracking_number"].as_str()
        ),
        (Some("shipped"), Some("Amana"), Some("AM1")),
        "{correction}"
    );

    // A part with no parcel on record: a blank one is still none, and the
    // problem names what is missing once the rest is given.
    let other = customer(app).await;
    add_to_cart(app, &other.token, &oak.variant, 1).await;
    let other_part = part(&checkout_and_pay(app, stripe, &other.token).await, "oak");
    let other_path = format!("/admin/seller-orders/{other_part}/status");
    let blank = json!({
        "status": "shipped", "reason": "the seller forgot to mark it",
        "carrier": " ", "tracking_number": "AM2",
    });
    let blank = call(app, &root, Method::POST, &other_path, blank).await;
    assert_eq!(
        fields(&problem(blank, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["carrier"]
    );
    let still = json_of(
        call(
            app,
            &root,
            Method::GET,
            &format!("/admin/seller-orders/{other_part}"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(still["status"], "paid");
    assert_eq!(still["tracking_number"], Value::Null, "{still}");
    market.close().await;
}
