//! Checkout to payment against the real pipeline: PostgreSQL, RabbitMQ, the
//! relay and every worker, maildev, and Stripe played by localstripe with
//! webhooks signed as Stripe signs them.

mod common;

use common::{
    COMMISSION_BPS, Pipeline, SHIPPING_FLAT_MINOR,
    catalog::{call, json_of},
    fields,
    orders::{
        Market, add_product, add_to_cart, assert_ledger_balances, checkout, checkout_request,
        customer, ledger_balance, listing, mails_about, order, pay, post_event, posted,
        seller_email, sent, sent_of, settled_mails, stock, stripe_for, wait_for,
    },
    problem, spawn_app,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{
    amqp_url, count,
    mail::mails_to,
    stripe::{CARD_DECLINED, CARD_OK, LocalStripe, WEBHOOK_SECRET, event, now},
    wait_until,
};
use uuid::Uuid;

use crate::common::orders::PIPELINE_WAIT;

fn id(order: &Value) -> String {
    order["id"].as_str().unwrap().to_string()
}

async fn count_where(app: &common::App, sql: &str, order: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(Uuid::parse_str(order).unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_full_path_pays_a_two_shop_order_once_and_mails_everyone() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = stripe_for(&app).await;
    let pipeline = Pipeline::checkout(&app, &stripe);
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let spoon = add_product(&app, &oak.seller, "oak", "Olive spoon", 1200, 9).await;
    let tea = listing(&app, "tea", "Teapot", 3000, 2).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 2).await;
    add_to_cart(&app, &buyer.token, &spoon.variant, 1).await;
    add_to_cart(&app, &buyer.token, &tea.variant, 1).await;

    let placed = checkout(&app, &buyer.token).await;
    assert_eq!(placed["status"], "pending");
    assert_eq!(placed["subtotal_minor"], 2 * 4500 + 1200 + 3000);
    assert_eq!(placed["lines"].as_array().unwrap().len(), 3);
    assert_eq!(placed["shipping_address"]["city"], "Fes");
    let cart = json_of(
        call(&app, &buyer.token, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["item_count"], 0, "the cart is emptied by checkout");

    let order_id = id(&placed);
    let intent = pay(&app, &stripe, &buyer.token, &order_id, CARD_OK).await;
    let paid = wait_for(&app, &buyer.token, &order_id, "paid").await;

    // The split: one seller order per shop, shipping per shop, 10 % commission.
    let total = 2 * 4500 + 1200 + 3000 + 2 * SHIPPING_FLAT_MINOR;
    assert_eq!(paid["total_minor"], total);
    assert_eq!(paid["shipping_minor"], 2 * SHIPPING_FLAT_MINOR);
    assert!(paid["payment"].is_null(), "no client secret once paid");
    let parts = paid["seller_orders"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert!(parts.iter().all(|p| p["status"] == "paid"));
    let (items, commission, payout): (i64, i64, i64) = sqlx::query_as(
        "SELECT items_minor, commission_minor, payout_minor FROM seller_orders so
           JOIN shops s ON s.id = so.shop_id WHERE s.slug = 'oak'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(items, 2 * 4500 + 1200);
    assert_eq!(commission, items * i64::from(COMMISSION_BPS) / 10_000);
    assert_eq!(payout, items + SHIPPING_FLAT_MINOR - commission);

    // Stock committed: on_hand and reserved both dropped.
    assert_eq!(stock(&app, &oak.variant).await, (3, 0));
    assert_eq!(stock(&app, &spoon.variant).await, (8, 0));
    assert_eq!(stock(&app, &tea.variant).await, (1, 0));
    let sold: i64 = sqlx::query_scalar("SELECT sum(sold_count)::bigint FROM products")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(sold, 4);

    // One intent at Stripe, for the whole amount, charged once.
    let intents = stripe.intents_for(&order_id).await;
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0]["id"], intent.as_str());
    assert_eq!(intents[0]["amount"], total);
    assert_eq!(
        count_where(
            &app,
            "SELECT count(*) FROM payments WHERE order_id = $1",
            &order_id
        )
        .await,
        1
    );

    // Mails: the receipt, and a new-order mail to each seller (with an in-app note).
    let receipt = mails_about(&buyer.email, "is paid", 1).await;
    assert!(
        receipt[0].text.contains("Walnut board"),
        "{}",
        receipt[0].text
    );
    for slug in ["oak", "tea"] {
        let mails = mails_about(&seller_email(&app, slug).await, "New paid order", 1).await;
        assert!(
            mails[0].text.contains("Casey Buyer"),
            "the seller gets the address"
        );
    }
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM notifications WHERE kind = 'new_order'"
        )
        .await,
        2
    );
    // Exactly those, once the pipeline is quiet: one receipt, one new-order
    // mail per seller, each sent once to the sink; no other mail about it.
    let mails = settled_mails(&app).await;
    assert_eq!(sent(&mails, &buyer.email, "order_receipt"), 1, "{mails:?}");
    for slug in ["oak", "tea"] {
        let to = seller_email(&app, slug).await;
        assert_eq!(
            sent(&mails, &to, "seller_new_order"),
            1,
            "{slug}: {mails:?}"
        );
    }
    assert_eq!(sent_of(&mails, "order_receipt"), 1, "{mails:?}");
    assert_eq!(sent_of(&mails, "seller_new_order"), 2, "{mails:?}");
    let about_orders: Vec<_> = mails
        .keys()
        .filter(|(_, template)| template != "verify_email")
        .collect();
    assert_eq!(about_orders.len(), 3, "no other mail: {mails:?}");
    assert_eq!(
        mails_to(&buyer.email).await.len(),
        1,
        "the buyer gets one mail"
    );

    // The timeline so far: placed, reserved, awaiting payment, paid.
    let timeline = json_of(
        call(
            &app,
            &buyer.token,
            Method::GET,
            &format!("/orders/{order_id}/tracking"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let steps: Vec<&str> = timeline
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == "order")
        .map(|e| e["to_status"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["pending", "reserved", "awaiting_payment", "paid"]);
    pipeline.stop().await;
}

/// An order of two shops' items whose second line (in the order the
/// reserver takes variants, by id) is short when the reserver gets to it:
/// the first line is reserved inside the savepoint, then rolled back, so
/// the order fails as out of stock with nothing held on either variant.
#[tokio::test]
async fn an_order_with_one_short_line_reserves_none_of_its_lines() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = stripe_for(&app).await;
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let tea = listing(&app, "tea", "Teapot", 3000, 5).await;
    // The reserver takes variants in id order: the teapot is the second
    // one, so the board is reserved before the teapot is found short.
    assert!(
        Uuid::parse_str(&oak.variant).unwrap() < Uuid::parse_str(&tea.variant).unwrap(),
        "the short variant must be reserved last for this test to mean anything"
    );
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 2).await;
    add_to_cart(&app, &buyer.token, &tea.variant, 3).await;
    // Placed while there is stock for both; no pipeline runs yet, so the
    // order waits in the outbox.
    let placed = checkout(&app, &buyer.token).await;
    let order_id = id(&placed);
    assert_eq!(placed["status"], "pending");

    // The tea shop sells three elsewhere before the reserver sees the order.
    sqlx::query("UPDATE variants SET on_hand = 2 WHERE id = $1")
        .bind(Uuid::parse_str(&tea.variant).unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    let pipeline = Pipeline::checkout(&app, &stripe);

    let failed = wait_for(&app, &buyer.token, &order_id, "out_of_stock").await;
    assert_eq!(failed["failure_reason"], "only 2 of Teapot (Default) left");
    assert!(failed["payment"].is_null());
    let parts = failed["seller_orders"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "split before the reservation: {failed}");
    assert!(parts.iter().all(|p| p["status"] == "cancelled"), "{failed}");

    // The customer is told why, once.
    let mail = mails_about(&buyer.email, "could not complete", 1).await;
    assert!(
        mail[0].text.contains("only 2 of Teapot (Default) left"),
        "{}",
        mail[0].text
    );
    assert!(
        mail[0].text.contains("not been charged"),
        "{}",
        mail[0].text
    );
    let mails = settled_mails(&app).await;
    assert_eq!(sent(&mails, &buyer.email, "order_failed"), 1, "{mails:?}");
    assert_eq!(mails_to(&buyer.email).await.len(), 1, "{mails:?}");
    for template in ["order_receipt", "seller_new_order", "low_stock"] {
        assert_eq!(sent_of(&mails, template), 0, "{template}: {mails:?}");
    }

    // Nothing held on either variant, nothing sold, nothing charged; checked
    // once the pipeline is quiet, so a late effect would have shown.
    assert_eq!(
        stock(&app, &oak.variant).await,
        (5, 0),
        "the board is not held"
    );
    assert_eq!(
        stock(&app, &tea.variant).await,
        (2, 0),
        "the teapots are not held"
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM stock_adjustments WHERE reason LIKE 'sold:%'"
        )
        .await,
        0
    );
    let (stock_state, reserved_until): (String, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT stock, reserved_until FROM orders WHERE id = $1")
            .bind(Uuid::parse_str(&order_id).unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!((stock_state.as_str(), reserved_until), ("none", None));
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM outbox WHERE routing_key = 'stock.reserved'"
        )
        .await,
        0
    );
    assert!(
        stripe.intents_for(&order_id).await.is_empty(),
        "no PaymentIntent"
    );
    let steps: Vec<String> = sqlx::query_scalar(
        "SELECT to_status FROM order_events WHERE order_id = $1 AND subject = 'order' ORDER BY created_at, id",
    )
    .bind(Uuid::parse_str(&order_id).unwrap())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(steps, ["pending", "out_of_stock"]);

    // All the stock is still on sale: another customer buys every unit.
    let next = customer(&app).await;
    add_to_cart(&app, &next.token, &oak.variant, 5).await;
    add_to_cart(&app, &next.token, &tea.variant, 2).await;
    let second = id(&checkout(&app, &next.token).await);
    wait_for(&app, &next.token, &second, "awaiting_payment").await;
    assert_eq!(stock(&app, &oak.variant).await, (5, 5));
    assert_eq!(stock(&app, &tea.variant).await, (2, 2));
    pipeline.stop().await;
}

/// A platform coupon on a two-shop cart, from the cart to the paid order:
/// the discount shared by the shops in proportion to their items (largest
/// remainder), every total following from it, one redemption once paid.
#[tokio::test]
async fn a_platform_coupon_is_shared_by_the_shops_and_redeemed_once_when_paid() {
    let market = Market::open().await;
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let root = common::token_for(app, &common::admin(app).await).await;
    let coupon = json_of(
        call(
            app,
            &root,
            Method::POST,
            "/admin/coupons",
            json!({"code": "SPRING", "amount_off_minor": 1001, "reason": "spring sale"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let coupon_id = Uuid::parse_str(coupon["id"].as_str().unwrap()).unwrap();
    // Oak's items 2 × 45.00, tea's 30.00: 120.00 in all.
    let buyer = market.shopper(&[(oak, 2), (tea, 1)]).await;
    let cart = json_of(
        call(
            app,
            &buyer.token,
            Method::PUT,
            "/cart/coupon",
            json!({"code": "spring"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["coupon"]["discount_minor"], 1001, "{cart}");
    assert_eq!(cart["total_minor"], 12000 - 1001);

    let placed = checkout(app, &buyer.token).await;
    let order_id = id(&placed);
    assert_eq!(placed["subtotal_minor"], 12000);
    assert_eq!(placed["discount_minor"], 1001);
    assert_eq!(placed["coupon_code"], "SPRING");
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM cart_coupons").await,
        0,
        "checkout takes the coupon off the cart"
    );
    let awaiting = wait_for(app, &buyer.token, &order_id, "awaiting_payment").await;
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM coupon_redemptions").await,
        0,
        "not counted before it is paid"
    );
    pay(app, stripe, &buyer.token, &order_id, CARD_OK).await;
    let paid = wait_for(app, &buyer.token, &order_id, "paid").await;

    // 1001 × 9000/12000 = 750.75 and × 3000/12000 = 250.25: oak's larger
    // remainder takes the unit left over.
    let (oak_share, tea_share) = (751, 250);
    let ship = SHIPPING_FLAT_MINOR;
    let total = 12000 - 1001 + 2 * ship;
    assert_eq!(awaiting["total_minor"], total, "priced before payment");
    assert_eq!(paid["total_minor"], total);
    assert_eq!(paid["discount_minor"], 1001);
    assert_eq!(paid["shipping_minor"], 2 * ship);
    let part = |slug: &str| {
        paid["seller_orders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["shop"]["slug"] == slug)
            .unwrap_or_else(|| panic!("no {slug} part: {paid}"))
            .clone()
    };
    let (oak_part, tea_part) = (part("oak"), part("tea"));
    for (p, items, share) in [(&oak_part, 9000, oak_share), (&tea_part, 3000, tea_share)] {
        assert_eq!(p["status"], "paid");
        assert_eq!(p["items_minor"], items);
        assert_eq!(p["discount_minor"], share, "{p}");
        assert_eq!(p["shipping_minor"], ship);
        assert_eq!(p["total_minor"], items - share + ship, "{p}");
    }
    assert_eq!(
        oak_part["discount_minor"].as_i64().unwrap() + tea_part["discount_minor"].as_i64().unwrap(),
        paid["discount_minor"].as_i64().unwrap(),
        "the shares add up to the order's discount"
    );
    assert_eq!(
        oak_part["total_minor"].as_i64().unwrap() + tea_part["total_minor"].as_i64().unwrap(),
        total,
        "the parts add up to what the customer pays"
    );
    // Commission on items less the share, rounded down; the seller keeps the rest.
    let money: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT s.slug, so.discount_minor, so.total_minor, so.commission_minor, so.payout_minor
           FROM seller_orders so JOIN shops s ON s.id = so.shop_id ORDER BY s.slug",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        money,
        [
            (
                "oak".to_string(),
                oak_share,
                9000 - oak_share + ship,
                824,
                9000 - oak_share + ship - 824
            ),
            (
                "tea".to_string(),
                tea_share,
                3000 - tea_share + ship,
                275,
                3000 - tea_share + ship - 275
            ),
        ]
    );

    // Stripe charged the discounted total, once; the ledger took it in.
    let intents = stripe.intents_for(&order_id).await;
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0]["amount"], total);
    let charged: i64 = sqlx::query_scalar("SELECT amount_minor FROM payments WHERE order_id = $1")
        .bind(Uuid::parse_str(&order_id).unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(charged, total);
    posted(app, "payment:%", 1).await;
    assert_ledger_balances(app).await;
    assert_eq!(ledger_balance(app, "customer_funds", None).await, -total);

    // The mails, exactly: the receipt shows the discount; each seller's
    // new-order mail its own total.
    let mails = settled_mails(app).await;
    assert_eq!(sent(&mails, &buyer.email, "order_receipt"), 1, "{mails:?}");
    assert_eq!(sent_of(&mails, "order_receipt"), 1, "{mails:?}");
    assert_eq!(sent_of(&mails, "seller_new_order"), 2, "{mails:?}");
    let receipt = mails_about(&buyer.email, "is paid", 1).await;
    assert!(
        receipt[0].subject.contains("119.97 EUR"),
        "{}",
        receipt[0].subject
    );
    assert!(
        receipt[0].text.contains("-10.01 EUR"),
        "{}",
        receipt[0].text
    );
    for (slug, amount) in [("oak", "87.48 EUR"), ("tea", "32.49 EUR")] {
        let to = seller_email(app, slug).await;
        assert_eq!(
            sent(&mails, &to, "seller_new_order"),
            1,
            "{slug}: {mails:?}"
        );
        let mail = mails_about(&to, "New paid order", 1).await;
        assert!(
            mail[0].subject.contains(amount),
            "{slug}: {}",
            mail[0].subject
        );
    }

    // One use counted, by this customer for this order, however often the
    // pipeline delivered the payment.
    let redemptions: Vec<(Uuid, Uuid, Uuid)> =
        sqlx::query_as("SELECT coupon_id, order_id, user_id FROM coupon_redemptions")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        redemptions,
        [(coupon_id, Uuid::parse_str(&order_id).unwrap(), buyer.id)]
    );
    let uses: i32 = sqlx::query_scalar("SELECT uses FROM coupons WHERE id = $1")
        .bind(coupon_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(uses, 1);
    market.close().await;
}

#[tokio::test]
async fn checkout_refuses_what_cannot_be_bought_and_writes_nothing() {
    let app = spawn_app(&amqp_url()).await;
    let oak = listing(&app, "oak", "Walnut board", 4500, 2).await;
    let buyer = customer(&app).await;

    let empty = problem(
        checkout_request(&app, &buyer.token, None, json!({})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&empty), ["cart"]);

    add_to_cart(&app, &buyer.token, &oak.variant, 2).await;
    // The seller sells one elsewhere: the line is now short.
    sqlx::query("UPDATE variants SET on_hand = 1 WHERE id = $1")
        .bind(Uuid::parse_str(&oak.variant).unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    let short = problem(
        checkout_request(&app, &buyer.token, None, json!({})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&short), [format!("cart.{}", oak.variant)]);
    assert!(
        short["detail"].as_str().unwrap().contains("only 1"),
        "{short}"
    );

    json_of(
        call(
            &app,
            &buyer.token,
            Method::PUT,
            &format!("/cart/items/{}", oak.variant),
            json!({"quantity": 1}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let bad_address = json!({"address_id": Uuid::now_v7()});
    let resp = checkout_request(&app, &buyer.token, None, bad_address).await;
    assert_eq!(
        fields(&problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["address_id"]
    );

    let seller = problem(
        checkout_request(&app, &oak.seller, None, json!({})).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(fields(&seller), ["role"]);
    sqlx::query("UPDATE users SET email_verified_at = NULL WHERE id = $1")
        .bind(buyer.id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let unverified = problem(
        checkout_request(&app, &buyer.token, None, json!({})).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(fields(&unverified), ["email"]);

    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM orders").await, 0);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM order_lines").await,
        0
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM outbox WHERE routing_key LIKE 'order.%'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM cart_items").await,
        1,
        "the cart is kept"
    );
}

#[tokio::test]
async fn a_placed_order_keeps_the_lines_it_was_placed_with() {
    let app = spawn_app(&amqp_url()).await;
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 2).await;
    let placed = checkout(&app, &buyer.token).await;
    let before = order(&app, &buyer.token, &id(&placed)).await["lines"].clone();

    // The seller renames the product and raises its price afterwards.
    let product: Uuid = sqlx::query_scalar("SELECT product_id FROM variants WHERE id = $1::uuid")
        .bind(&oak.variant)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let renamed = json!({"title": "Oak board"});
    let resp = call(
        &app,
        &oak.seller,
        Method::PATCH,
        &format!("/seller/products/{product}"),
        renamed,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let dearer = json!({"price_minor": 9900});
    let resp = call(
        &app,
        &oak.seller,
        Method::PATCH,
        &format!("/seller/variants/{}", oak.variant),
        dearer,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);

    let after = order(&app, &buyer.token, &id(&placed)).await["lines"].clone();
    assert_eq!(after, before);
    assert_eq!(after[0]["title"], "Walnut board");
    assert_eq!(after[0]["unit_price_minor"], 4500);
    // Nor can anything change or remove the snapshot underneath.
    for sql in [
        "UPDATE order_lines SET unit_price_minor = 1",
        "DELETE FROM order_lines",
        "UPDATE order_events SET note = 'rewritten'",
        "DELETE FROM order_events",
        // CASCADE, so that no foreign key refuses them first.
        "TRUNCATE order_lines CASCADE",
        "TRUNCATE order_events CASCADE",
    ] {
        let refused = sqlx::query(sql).execute(&app.db.pool).await.unwrap_err();
        assert!(
            refused.to_string().contains("append-only"),
            "{sql}: {refused}"
        );
    }
}

#[tokio::test]
async fn checkout_with_the_same_idempotency_key_makes_one_order() {
    let app = spawn_app(&amqp_url()).await;
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 1).await;

    // A double click: the same key twice at once, then a retry later.
    let (a, b) = tokio::join!(
        checkout_request(&app, &buyer.token, Some("click-1"), json!({})),
        checkout_request(&app, &buyer.token, Some("click-1"), json!({})),
    );
    let a = json_of(a, StatusCode::ACCEPTED).await;
    let b = json_of(b, StatusCode::ACCEPTED).await;
    assert_eq!(a["id"], b["id"]);
    let again = json_of(
        checkout_request(&app, &buyer.token, Some("click-1"), json!({})).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(again["id"], a["id"]);
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM orders").await, 1);
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM outbox WHERE routing_key = 'order.placed'"
        )
        .await,
        1
    );

    // The same key with another request is refused.
    let other = json!({"address_id": Uuid::now_v7()});
    let reused = problem(
        checkout_request(&app, &buyer.token, Some("click-1"), other).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&reused), ["Idempotency-Key"]);
    // Another customer's identical key is theirs alone.
    let other_buyer = customer(&app).await;
    add_to_cart(&app, &other_buyer.token, &oak.variant, 1).await;
    let theirs = json_of(
        checkout_request(&app, &other_buyer.token, Some("click-1"), json!({})).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_ne!(theirs["id"], a["id"]);
}

#[tokio::test]
async fn fifty_checkouts_for_the_last_unit_make_exactly_one_paid_order() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = stripe_for(&app).await;
    let pipeline = Pipeline::checkout(&app, &stripe);
    let last = listing(&app, "oak", "Last walnut board", 4500, 1).await;
    let mut buyers = vec![];
    for _ in 0..50 {
        let buyer = customer(&app).await;
        add_to_cart(&app, &buyer.token, &last.variant, 1).await;
        buyers.push(buyer);
    }
    let answers = futures_util::future::join_all(
        buyers
            .iter()
            .map(|b| checkout_request(&app, &b.token, None, json!({}))),
    )
    .await;
    // A checkout either places an order (202) or, once the unit is held
    // by another, is refused at once with the line at fault (422); which
    // depends on how the 50 interleave with the pipeline.
    let mut placed: Vec<(usize, String)> = vec![];
    for (i, resp) in answers.into_iter().enumerate() {
        match resp.status() {
            StatusCode::ACCEPTED => placed.push((i, id(&resp.json::<Value>().await.unwrap()))),
            StatusCode::UNPROCESSABLE_ENTITY => {
                let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
                let field = format!("cart.{}", last.variant);
                assert_eq!(fields(&body), vec![field], "{body}");
                assert!(
                    body.to_string()
                        .contains("only 0 of Last walnut board available"),
                    "{body}"
                );
            }
            other => panic!("checkout answered {other}"),
        }
    }
    assert!(!placed.is_empty());
    let n = placed.len() as i64;

    // Every order settles: one reserved, the rest out of stock.
    wait_until(
        "every order reserved or out of stock",
        PIPELINE_WAIT,
        || async {
            count(
                &app.db.pool,
                "SELECT count(*) FROM orders WHERE status IN ('awaiting_payment', 'out_of_stock')",
            )
            .await
                == n
        },
    )
    .await;
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM orders").await, n);
    let winners: Vec<(usize, String)> = futures_util::future::join_all(
        placed
            .iter()
            .map(|(i, o)| order(&app, &buyers[*i].token, o)),
    )
    .await
    .into_iter()
    .zip(&placed)
    .filter(|(o, _)| o["status"] == "awaiting_payment")
    .map(|(_, p)| p.clone())
    .collect();
    assert_eq!(winners.len(), 1, "exactly one order holds the last unit");
    assert_eq!(stock(&app, &last.variant).await, (1, 1));

    let (winner, winning_order) = &winners[0];
    pay(
        &app,
        &stripe,
        &buyers[*winner].token,
        winning_order,
        CARD_OK,
    )
    .await;
    wait_for(&app, &buyers[*winner].token, winning_order, "paid").await;
    assert_eq!(
        stock(&app, &last.variant).await,
        (0, 0),
        "on_hand and reserved end exact"
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM orders WHERE status = 'paid'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM payments").await,
        1
    );

    // The others whose order was placed are told clearly why.
    for (i, lost) in placed.iter().filter(|(i, _)| i != winner) {
        let lost = order(&app, &buyers[*i].token, lost).await;
        assert_eq!(lost["status"], "out_of_stock");
        assert_eq!(
            lost["failure_reason"],
            "Last walnut board (Default) is out of stock"
        );
        let mail = mails_about(&buyers[*i].email, "could not complete", 1).await;
        assert!(mail[0].text.contains("is out of stock"), "{}", mail[0].text);
    }
    // Each told once: one receipt, one new-order mail, one failure per loser.
    let mails = settled_mails(&app).await;
    assert_eq!(sent(&mails, &buyers[*winner].email, "order_receipt"), 1);
    assert_eq!(sent_of(&mails, "order_receipt"), 1, "{mails:?}");
    assert_eq!(sent_of(&mails, "seller_new_order"), 1, "{mails:?}");
    for (i, _) in placed.iter().filter(|(i, _)| i != winner) {
        assert_eq!(
            sent(&mails, &buyers[*i].email, "order_failed"),
            1,
            "{mails:?}"
        );
    }
    assert_eq!(sent_of(&mails, "order_failed"), n - 1, "{mails:?}");
    pipeline.stop().await;
}

/// A real event localstripe sent, fetched back to post it again.
async fn sent_event(stripe: &LocalStripe, kind: &str, intent: &str) -> Value {
    stripe
        .events(kind)
        .await
        .into_iter()
        .find(|e| e["data"]["object"]["id"] == intent)
        .unwrap_or_else(|| panic!("localstripe sent no {kind} for {intent}"))
}

#[tokio::test]
async fn the_same_webhook_three_times_applies_once() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 2).await;
    let order_id = id(&checkout(app, &buyer.token).await);
    let intent = pay(app, stripe, &buyer.token, &order_id, CARD_OK).await;
    wait_for(app, &buyer.token, &order_id, "paid").await;
    let succeeded = sent_event(stripe, "payment_intent.succeeded", &intent).await;

    // Stripe retries: the same event twice more, each answered 2xx.
    for _ in 0..2 {
        let resp = post_event(app, &succeeded, WEBHOOK_SECRET, now()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.json::<Value>().await.unwrap()["stored"], false);
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM stripe_events WHERE type = 'payment_intent.succeeded'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM payments").await,
        1
    );
    assert_eq!(stock(app, &oak.variant).await, (3, 0), "sold once");
    // Mailed once: the receipt, and the seller's new-order mail.
    let mails = settled_mails(app).await;
    assert_eq!(sent(&mails, &buyer.email, "order_receipt"), 1, "{mails:?}");
    assert_eq!(sent_of(&mails, "order_receipt"), 1, "{mails:?}");
    let seller = seller_email(app, "oak").await;
    assert_eq!(sent(&mails, &seller, "seller_new_order"), 1, "{mails:?}");
    assert_eq!(sent_of(&mails, "seller_new_order"), 1, "{mails:?}");
    market.close().await;
}

/// A PaymentIntent event as Stripe would send it.
fn intent_event(kind: &str, intent: &str, order: &str, amount: i64) -> Value {
    let status = if kind.ends_with("succeeded") {
        "succeeded"
    } else {
        "requires_payment_method"
    };
    event(
        &format!("evt_{}", Uuid::now_v7().simple()),
        kind,
        json!({
            "id": intent, "object": "payment_intent", "amount": amount, "currency": "eur",
            "status": status, "metadata": {"order_id": order},
            "last_payment_error": if status == "succeeded" { Value::Null } else { json!({"message": "Your card was declined."}) },
        }),
    )
}

#[tokio::test]
async fn events_out_of_order_never_move_an_order_backwards() {
    let app = spawn_app(&amqp_url()).await;
    let stripe = LocalStripe::start().await; // no webhooks: this test sends its own
    let pipeline = Pipeline::checkout(&app, &stripe);
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 1).await;
    let placed = checkout(&app, &buyer.token).await;
    let order_id = id(&placed);
    let awaiting = wait_for(&app, &buyer.token, &order_id, "awaiting_payment").await;
    let intent = awaiting["payment"]["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let total = awaiting["total_minor"].as_i64().unwrap();

    // Stripe delivers the success, then a failure from an earlier attempt.
    let ok = post_event(
        &app,
        &intent_event("payment_intent.succeeded", &intent, &order_id, total),
        WEBHOOK_SECRET,
        now(),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    wait_for(&app, &buyer.token, &order_id, "paid").await;
    let late = post_event(
        &app,
        &intent_event("payment_intent.payment_failed", &intent, &order_id, total),
        WEBHOOK_SECRET,
        now(),
    )
    .await;
    assert_eq!(late.status(), StatusCode::OK);
    wait_until("the late failure to be applied", PIPELINE_WAIT, || async {
        count(
            &app.db.pool,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'stripe-events'",
        )
        .await
            == 2
    })
    .await;
    let still = order(&app, &buyer.token, &order_id).await;
    assert_eq!(still["status"], "paid");
    assert_eq!(stock(&app, &oak.variant).await, (4, 0));
    let moves = count_where(
        &app,
        "SELECT count(*) FROM order_events WHERE order_id = $1 AND to_status = 'payment_failed'",
        &order_id,
    )
    .await;
    assert_eq!(moves, 0);
    pipeline.stop().await;
}

#[tokio::test]
async fn a_bad_signature_or_an_old_timestamp_is_refused_and_stores_nothing() {
    let app = spawn_app(&amqp_url()).await;
    let order = Uuid::now_v7().to_string();
    let event = intent_event("payment_intent.succeeded", "pi_forged", &order, 100);

    let forged = problem(
        post_event(&app, &event, "whsec_someone_elses_secret", now()).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(fields(&forged), ["Stripe-Signature"]);
    let old = problem(
        post_event(&app, &event, WEBHOOK_SECRET, now() - 301).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(
        old["detail"].as_str().unwrap().contains("tolerance"),
        "{old}"
    );
    // A body changed after signing.
    let body = serde_json::to_string(&event).unwrap();
    let signature = souk_testkit::stripe::signature(&body, WEBHOOK_SECRET, now());
    let tampered = body.replace("\"amount\":100", "\"amount\":1");
    let resp = app
        .http
        .post(format!("{}/api/v1/stripe/webhook", app.base))
        .header("Stripe-Signature", signature)
        .body(tampered)
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::BAD_REQUEST).await;
    let unsigned = app
        .http
        .post(format!("{}/api/v1/stripe/webhook", app.base))
        .body(body)
        .send()
        .await
        .unwrap();
    problem(unsigned, StatusCode::BAD_REQUEST).await;

    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM stripe_events").await,
        0
    );
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM outbox").await, 0);
    // Within the tolerance it is taken.
    let fresh = post_event(&app, &event, WEBHOOK_SECRET, now() - 250).await;
    assert_eq!(fresh.status(), StatusCode::OK);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM stripe_events").await,
        1
    );
}

#[tokio::test]
async fn a_declined_card_can_be_retried_with_another() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let order_id = id(&checkout(app, &buyer.token).await);

    let intent = pay(app, stripe, &buyer.token, &order_id, CARD_DECLINED).await;
    let failed = wait_for(app, &buyer.token, &order_id, "payment_failed").await;
    assert_eq!(
        failed["payment"]["payment_intent_id"],
        intent.as_str(),
        "still payable"
    );
    assert_eq!(
        stock(app, &oak.variant).await,
        (5, 1),
        "the items stay held"
    );
    mails_about(&buyer.email, "did not go through", 1).await;

    // The customer tries another card and Stripe charges it. (localstripe
    // cannot confirm an intent again after a declined charge, so the
    // success comes as Stripe would send it, signed.)
    let total = failed["total_minor"].as_i64().unwrap();
    let succeeded = intent_event("payment_intent.succeeded", &intent, &order_id, total);
    assert_eq!(
        post_event(app, &succeeded, WEBHOOK_SECRET, now())
            .await
            .status(),
        StatusCode::OK
    );
    wait_for(app, &buyer.token, &order_id, "paid").await;
    assert_eq!(stock(app, &oak.variant).await, (4, 0));
    let mails = settled_mails(app).await;
    assert_eq!(sent(&mails, &buyer.email, "payment_failed"), 1, "{mails:?}");
    assert_eq!(sent(&mails, &buyer.email, "order_receipt"), 1, "{mails:?}");
    market.close().await;
}

#[tokio::test]
async fn an_unpaid_reservation_expires_releases_stock_and_cancels_the_intent() {
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
    assert_eq!(stock(app, &oak.variant).await, (5, 2));

    // Time passes: the reservation runs out and the sweep finds it.
    sqlx::query("UPDATE orders SET reserved_until = now() - interval '1 second' WHERE id = $1")
        .bind(Uuid::parse_str(&order_id).unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    let expired = wait_for(app, &buyer.token, &order_id, "expired").await;
    assert!(expired["payment"].is_null());
    assert_eq!(stock(app, &oak.variant).await, (5, 0), "back on sale");
    wait_until(
        "the intent to be cancelled at Stripe",
        PIPELINE_WAIT,
        || async { stripe.intent(&intent).await["status"] == "canceled" },
    )
    .await;
    mails_about(&buyer.email, "expired", 1).await;
    let mails = settled_mails(app).await;
    assert_eq!(sent(&mails, &buyer.email, "order_failed"), 1, "{mails:?}");
    assert_eq!(mails_to(&buyer.email).await.len(), 1, "{mails:?}");
    market.close().await;
}

#[tokio::test]
async fn a_read_can_wait_until_the_order_moves() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let buyer = customer(app).await;
    add_to_cart(app, &buyer.token, &oak.variant, 1).await;
    let order_id = id(&checkout(app, &buyer.token).await);
    let (token, order) = (buyer.token.as_str(), order_id.as_str());
    let read = |query: String| {
        let path = format!("/orders/{order}{query}");
        async move { call(app, token, Method::GET, &path, json!({})).await }
    };
    // Held until the pipeline has made the PaymentIntent.
    let awaiting = json_of(
        read("?wait_for=awaiting_payment".into()).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(awaiting["status"], "awaiting_payment", "{awaiting}");
    // A wait that runs out answers the order as it is.
    let started = std::time::Instant::now();
    let still = json_of(
        read("?wait_for=paid&wait_ms=300".into()).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(still["status"], "awaiting_payment");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    // Held while the card is paid: answered once it is.
    let (paid, _) = tokio::join!(read("?wait_for=paid&wait_ms=20000".into()), async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        pay(app, stripe, &buyer.token, &order_id, CARD_OK).await
    });
    assert_eq!(json_of(paid, StatusCode::OK).await["status"], "paid");
    // A status it can no longer reach: answered at once.
    let started = std::time::Instant::now();
    let now = json_of(
        read("?wait_for=awaiting_payment&wait_ms=20000".into()).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(now["status"], "paid");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Bad waits are refused by field; another customer waits on nothing.
    let bad = read("?wait_for=paid&wait_ms=60000".into()).await;
    assert_eq!(
        fields(&problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["wait_ms"]
    );
    let other = customer(app).await;
    let theirs = call(
        app,
        &other.token,
        Method::GET,
        &format!("/orders/{order_id}?wait_for=paid"),
        json!({}),
    )
    .await;
    problem(theirs, StatusCode::NOT_FOUND).await;
    market.close().await;
}

/// Two batches of reservations, each reserving an order on variants A and B
/// and one on C and D, in opposite orders and slowly enough to interleave.
/// Taking every lock first (`lock_batch`, as the runtime does for a batch)
/// makes the second batch queue behind the first; without it they deadlock.
#[tokio::test]
async fn batches_of_reservations_sharing_stock_queue_instead_of_deadlocking() {
    use souk_shared::{contracts::OrderSplit, envelope::Envelope};
    use souk_workers::{
        reserver::{ReserverConfig, StockReserver},
        runtime::Handler,
    };
    let app = spawn_app(&amqp_url()).await;
    let mut variants = vec![];
    for (i, slug) in ["shop-a", "shop-b", "shop-c", "shop-d"]
        .into_iter()
        .enumerate()
    {
        variants.push(
            listing(&app, slug, &format!("Item {i}"), 1000, 100)
                .await
                .variant,
        );
    }
    // Orders on {A, B}, {C, D}, {C, D}, {A, B}.
    let mut orders = vec![];
    for pair in [[0, 1], [2, 3], [2, 3], [0, 1]] {
        let buyer = customer(&app).await;
        for v in pair {
            add_to_cart(&app, &buyer.token, &variants[v], 1).await;
        }
        let placed = checkout(&app, &buyer.token).await;
        orders.push(Uuid::parse_str(placed["id"].as_str().unwrap()).unwrap());
    }
    let reserver = std::sync::Arc::new(StockReserver {
        config: ReserverConfig {
            reservation_ttl: std::time::Duration::from_secs(900),
            expiry_poll: std::time::Duration::from_secs(60),
        },
    });
    let batch = |first: Uuid, second: Uuid, start_ms: u64, lock_first: bool| {
        let (pool, reserver) = (app.db.pool.clone(), reserver.clone());
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(start_ms)).await;
            let msgs = [first, second].map(|o| Envelope::new(&OrderSplit { order_id: o }, "t"));
            let mut tx = pool.begin().await.unwrap();
            if lock_first {
                reserver
                    .lock_batch(&mut tx, &[&msgs[0], &msgs[1]])
                    .await
                    .map_err(|e| format!("{e:?}"))?;
            }
            reserver
                .apply(&mut tx, &msgs[0], ())
                .await
                .map_err(|e| format!("{e:?}"))?;
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            reserver
                .apply(&mut tx, &msgs[1], ())
                .await
                .map_err(|e| format!("{e:?}"))?;
            tx.commit().await.map_err(|e| e.to_string())
        }
    };
    // Without taking the locks first: one of the two is a deadlock victim.
    let (x, y) = tokio::join!(
        batch(orders[0], orders[1], 0, false),
        batch(orders[2], orders[3], 100, false)
    );
    let failed = [&x, &y].into_iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 1, "{x:?} {y:?}");
    assert!(format!("{x:?}{y:?}").contains("deadlock"), "{x:?} {y:?}");
    sqlx::query("UPDATE orders SET status = 'pending', stock = 'none', reserved_until = NULL")
        .execute(&app.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE variants SET reserved = 0")
        .execute(&app.db.pool)
        .await
        .unwrap();

    // With them: the second batch waits for the first; both go through.
    let (x, y) = tokio::join!(
        batch(orders[0], orders[1], 0, true),
        batch(orders[2], orders[3], 100, true)
    );
    assert!(x.is_ok() && y.is_ok(), "{x:?} {y:?}");
    for v in &variants {
        assert_eq!(
            stock(&app, v).await,
            (100, 2),
            "each variant held by two orders"
        );
    }
}

/// Whether some session is waiting for a lock the session `holder` holds.
async fn blocked_by(app: &common::App, holder: i32) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))",
    )
    .bind(holder)
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

/// Waits until some statement starting with `sql` waits for a row lock.
async fn waiting_on_lock(app: &common::App, sql: &str) {
    let like = format!("{sql}%");
    wait_until(
        &format!("{sql} waits for a lock"),
        PIPELINE_WAIT,
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE wait_event_type = 'Lock' AND ltrim(query) LIKE $1)",
            )
            .bind(&like)
            .fetch_one(&app.db.pool)
            .await
            .unwrap()
        },
    )
    .await;
}

/// Checkout locks the cart's coupon and prices the order with it; a switch
/// to another coupon from a second tab while it runs must never put that
/// other coupon on the order, whose lock (the one that keeps concurrent
/// checkouts within its limits) checkout does not hold. Made to happen
/// every time: the first coupon's row is held, so checkout stops waiting
/// for it after reading the cart's coupon, and the switch is sent then.
#[tokio::test]
async fn a_coupon_switched_during_checkout_never_reaches_the_order_unlocked() {
    let app = spawn_app(&amqp_url()).await;
    let root = common::token_for(&app, &common::admin(&app).await).await;
    let mut coupons = vec![];
    for (code, off) in [("FIRST", 100), ("SECOND", 200)] {
        let body = json!({"code": code, "amount_off_minor": off, "reason": "launch"});
        let coupon = json_of(
            call(&app, &root, Method::POST, "/admin/coupons", body).await,
            StatusCode::CREATED,
        )
        .await;
        coupons.push(Uuid::parse_str(coupon["id"].as_str().unwrap()).unwrap());
    }
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 1).await;
    let first = json!({"code": "FIRST"});
    json_of(
        call(&app, &buyer.token, Method::PUT, "/cart/coupon", first).await,
        StatusCode::OK,
    )
    .await;

    // Another checkout with FIRST, as far as this one is concerned.
    let mut holder = app.db.pool.begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM coupons WHERE id = $1 FOR NO KEY UPDATE")
        .bind(coupons[0])
        .execute(&mut *holder)
        .await
        .unwrap();
    let placing = checkout_request(&app, &buyer.token, None, json!({}));
    let other_tab = async {
        wait_until("checkout waits for FIRST", PIPELINE_WAIT, || {
            blocked_by(&app, holder_pid)
        })
        .await;
        let second = json!({"code": "SECOND"});
        let switch = call(&app, &buyer.token, Method::PUT, "/cart/coupon", second);
        tokio::pin!(switch);
        // The switch either lands now, or waits for the checkout holding
        // the cart's coupon; then FIRST is let go.
        let early = tokio::select! {
            answer = &mut switch => Some(answer),
            () = waiting_on_lock(&app, "INSERT INTO cart_coupons") => None,
        };
        holder.rollback().await.unwrap();
        match early {
            Some(answer) => answer,
            None => switch.await,
        }
    };
    let (placed, switched) = tokio::join!(placing, other_tab);
    let placed = json_of(placed, StatusCode::ACCEPTED).await;
    assert_eq!(placed["coupon_code"], "FIRST", "{placed}");
    assert_eq!(placed["discount_minor"], 100, "{placed}");
    // The switch waited for the order, and stays on the cart for the next.
    json_of(switched, StatusCode::OK).await;
    let left: Vec<Uuid> =
        sqlx::query_scalar("SELECT coupon_id FROM cart_coupons WHERE user_id = $1")
            .bind(buyer.id)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(left, [coupons[1]]);
}

/// The seller orders of `order` once split: (shop, shipping, commission
/// rate, commission).
async fn split_terms(app: &common::App, order: &str) -> Vec<(String, i64, i32, i64)> {
    let order = Uuid::parse_str(order).unwrap();
    wait_until("the order is split", PIPELINE_WAIT, || async {
        sqlx::query_scalar::<_, bool>("SELECT split_at IS NOT NULL FROM orders WHERE id = $1")
            .bind(order)
            .fetch_one(&app.db.pool)
            .await
            .unwrap()
    })
    .await;
    sqlx::query_as(
        "SELECT s.slug, so.shipping_minor, so.commission_bps, so.commission_minor
           FROM seller_orders so JOIN shops s ON s.id = so.shop_id
          WHERE so.order_id = $1 ORDER BY s.slug",
    )
    .bind(order)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

/// A placed order keeps its terms: the shipping and commission rates in
/// force at checkout, whatever the seller or an admin sets before the
/// order is split.
#[tokio::test]
async fn shipping_and_commission_are_the_rates_in_force_at_checkout() {
    let app = spawn_app(&amqp_url()).await;
    let root = common::token_for(&app, &common::admin(&app).await).await;
    let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let tea = listing(&app, "tea", "Teapot", 3000, 5).await;
    let set_terms = |listing: &common::orders::Listing, shipping: i64, bps: i32| {
        let (app, root) = (&app, &root);
        let (seller, slug) = (listing.seller.clone(), listing.shop.clone());
        async move {
            let body = json!({"shipping_flat_minor": shipping});
            let path = format!("/shops/{slug}");
            json_of(
                call(app, &seller, Method::PATCH, &path, body).await,
                StatusCode::OK,
            )
            .await;
            let body = json!({"commission_bps": bps, "reason": "new terms"});
            let path = format!("/admin/shops/{slug}/commission");
            let resp = call(app, root, Method::PUT, &path, body).await;
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        }
    };
    // Oak has rates of its own at checkout; tea the platform's.
    set_terms(&oak, 700, 1500).await;
    let buyer = customer(&app).await;
    add_to_cart(&app, &buyer.token, &oak.variant, 2).await;
    add_to_cart(&app, &buyer.token, &tea.variant, 1).await;
    // No splitter yet: the order waits, placed but unsplit, while both
    // shops change their terms.
    let placed = checkout(&app, &buyer.token).await;
    set_terms(&oak, 900, 2500).await;
    set_terms(&tea, 100, 0).await;

    let pipeline = Pipeline::with(
        &app,
        &amqp_url(),
        None,
        common::Workers {
            splitter: true,
            ..common::Workers::MAIL_ONLY
        },
    );
    let parts = split_terms(&app, &id(&placed)).await;
    assert_eq!(
        parts,
        [
            ("oak".to_string(), 700, 1500, 9000 * 1500 / 10_000),
            (
                "tea".to_string(),
                SHIPPING_FLAT_MINOR,
                COMMISSION_BPS,
                3000 * i64::from(COMMISSION_BPS) / 10_000
            ),
        ]
    );
    let split = order(&app, &buyer.token, &id(&placed)).await;
    assert_eq!(split["shipping_minor"], 700 + SHIPPING_FLAT_MINOR);
    assert_eq!(
        split["total_minor"],
        9000 + 700 + 3000 + SHIPPING_FLAT_MINOR
    );

    // The new terms are the next order's.
    add_to_cart(&app, &buyer.token, &oak.variant, 1).await;
    let next = checkout(&app, &buyer.token).await;
    assert_eq!(
        split_terms(&app, &id(&next)).await,
        [("oak".to_string(), 900, 2500, 4500 * 2500 / 10_000)]
    );
    pipeline.stop().await;
}

/// Checkout reads the catalog unlocked and the split may wait: what left
/// the storefront in between (hidden by moderation, withdrawn by its
/// seller, its shop suspended) is never reserved. The order fails as a
/// short one does, the customer told which item and why; the stock is
/// untouched. An order for what is still on sale is reserved as ever.
#[tokio::test]
async fn an_order_for_what_left_the_storefront_before_its_reservation_fails_and_says_why() {
    let app = spawn_app(&amqp_url()).await;
    let root = common::token_for(&app, &common::admin(&app).await).await;
    let hidden = listing(&app, "oak", "Walnut board", 4500, 5).await;
    let withdrawn = listing(&app, "elm", "Elm bowl", 2000, 5).await;
    let closed = listing(&app, "tea", "Teapot", 3000, 5).await;
    let kept = listing(&app, "fig", "Fig jam", 800, 5).await;
    let mut orders = vec![];
    for listing in [&hidden, &withdrawn, &closed, &kept] {
        let buyer = customer(&app).await;
        add_to_cart(&app, &buyer.token, &listing.variant, 1).await;
        let placed = checkout(&app, &buyer.token).await;
        orders.push((buyer, id(&placed)));
    }
    let product = |listing: &common::orders::Listing| {
        let variant = Uuid::parse_str(&listing.variant).unwrap();
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>("SELECT product_id FROM variants WHERE id = $1")
                .bind(variant)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let reason = json!({"reason": "counterfeit goods"});
    let path = format!("/admin/products/{}/hide", product(&hidden).await);
    let resp = call(&app, &root, Method::POST, &path, reason.clone()).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let path = format!("/seller/products/{}", product(&withdrawn).await);
    let archived = json!({"status": "archived"});
    json_of(
        call(&app, &withdrawn.seller, Method::PATCH, &path, archived).await,
        StatusCode::OK,
    )
    .await;
    json_of(
        call(
            &app,
            &root,
            Method::POST,
            "/admin/shops/tea/suspend",
            reason,
        )
        .await,
        StatusCode::OK,
    )
    .await;

    let pipeline = Pipeline::with(
        &app,
        &amqp_url(),
        None,
        common::Workers {
            splitter: true,
            reserver: true,
            ..common::Workers::MAIL_ONLY
        },
    );
    for ((buyer, order_id), (listing, title)) in orders.iter().zip([
        (&hidden, "Walnut board"),
        (&withdrawn, "Elm bowl"),
        (&closed, "Teapot"),
    ]) {
        let failed = wait_for(&app, &buyer.token, order_id, "out_of_stock").await;
        let why = failed["failure_reason"].as_str().unwrap();
        assert!(
            why.starts_with(&format!("{title} (")) && why.ends_with("is no longer for sale"),
            "{failed}"
        );
        assert_eq!(stock(&app, &listing.variant).await, (5, 0), "{title}");
        let mail = mails_about(&buyer.email, "could not complete", 1).await;
        assert!(
            mail[0].text.contains("no longer for sale"),
            "{}",
            mail[0].text
        );
    }
    let (buyer, order_id) = &orders[3];
    wait_for(&app, &buyer.token, order_id, "reserved").await;
    assert_eq!(stock(&app, &kept.variant).await, (5, 1));
    pipeline.stop().await;
}
