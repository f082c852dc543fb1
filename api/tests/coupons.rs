//! Coupons: shop and platform scope, percent and fixed, minimum order,
//! validity window, total and per-customer limits (orders in flight count),
//! counted once when paid.

mod common;

use chrono::{Duration, Utc};
use common::{
    App,
    catalog::{add, call, json_of, shelf, storefront},
    fields, problem, signed_in, spawn_app, verified_seller,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_shared::coupons;
use souk_testkit::{amqp_url, count};
use uuid::Uuid;

async fn variant(app: &App, ids: &Value, title: &str) -> String {
    let id = ids[title].as_str().unwrap();
    storefront(app, &format!("/products/{id}")).await["variants"][0]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn apply(app: &App, token: &str, code: &str) -> reqwest::Response {
    call(
        app,
        token,
        Method::PUT,
        "/cart/coupon",
        json!({"code": code}),
    )
    .await
}

async fn refused(app: &App, token: &str, code: &str) -> String {
    let body = problem(
        apply(app, token, code).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["code"]);
    body["errors"][0]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn shop_and_platform_coupons_follow_every_rule() {
    let app = spawn_app(&amqp_url()).await;
    let (root, a, ids) = shelf(&app).await;
    let b = verified_seller(&app, "shop-c").await;
    let board = variant(&app, &ids, "Walnut cutting board").await; // shop-a, 4500
    let spoons = variant(&app, &ids, "Olive wood spoon set").await; // shop-b, 1500
    let ann = signed_in(&app, None).await;
    json_of(add(&app, &ann, &board, 1).await, StatusCode::OK).await;
    json_of(add(&app, &ann, &spoons, 2).await, StatusCode::OK).await;

    let hour = Duration::hours(1);
    let make = |token: &str, path: &'static str, body: Value| {
        let token = token.to_string();
        let app = &app;
        async move {
            json_of(
                call(app, &token, Method::POST, path, body).await,
                StatusCode::CREATED,
            )
            .await
        }
    };
    // Shop A: 15% off its own items over 4000; 3% rounds down.
    make(
        &a,
        "/seller/coupons",
        json!({"code": "ATEN", "percent_off": 15, "min_order_minor": 4000}),
    )
    .await;
    make(
        &a,
        "/seller/coupons",
        json!({"code": "ABIG", "percent_off": 3, "min_order_minor": 9000}),
    )
    .await;
    make(
        &a,
        "/seller/coupons",
        json!({"code": "ALATER", "amount_off_minor": 100, "starts_at": Utc::now() + hour}),
    )
    .await;
    make(
        &a,
        "/seller/coupons",
        json!({"code": "AGONE", "amount_off_minor": 100,
        "starts_at": Utc::now() - hour * 2, "ends_at": Utc::now() - hour}),
    )
    .await;
    let once = make(
        &a,
        "/seller/coupons",
        json!({"code": "AONCE", "amount_off_minor": 700, "max_uses_per_customer": 1}),
    )
    .await;
    make(
        &b,
        "/seller/coupons",
        json!({"code": "CSHOP", "percent_off": 50}),
    )
    .await;
    let welcome = make(
        &root,
        "/admin/coupons",
        json!({"code": "WELCOME", "amount_off_minor": 10000, "reason": "launch week"}),
    )
    .await;

    // Shop A's items come to 4500, the cart to 7500.
    let cart = json_of(apply(&app, &ann, "aten").await, StatusCode::OK).await;
    assert_eq!(cart["coupon"]["shop"], "shop-a");
    assert_eq!(cart["coupon"]["discount_minor"], 675);
    assert_eq!(
        (
            cart["subtotal_minor"].as_i64(),
            cart["total_minor"].as_i64()
        ),
        (Some(7500), Some(6825))
    );

    assert!(
        refused(&app, &ann, "ABIG")
            .await
            .contains("minimum order of 9000")
    );
    assert!(
        refused(&app, &ann, "ALATER")
            .await
            .contains("not valid yet")
    );
    assert!(refused(&app, &ann, "AGONE").await.contains("expired"));
    assert!(
        refused(&app, &ann, "CSHOP")
            .await
            .contains("nothing in the cart")
    );
    assert!(refused(&app, &ann, "NOPE").await.contains("no such coupon"));
    // Refusals changed nothing: the first coupon is still on the cart.
    let cart = json_of(
        call(&app, &ann, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["coupon"]["code"], "ATEN");

    // A platform coupon covers the whole cart; a fixed amount never exceeds it.
    let cart = json_of(apply(&app, &ann, "WELCOME").await, StatusCode::OK).await;
    assert_eq!(cart["coupon"]["shop"], Value::Null);
    assert_eq!(cart["coupon"]["discount_minor"], 7500);
    assert_eq!(cart["total_minor"], 0);

    // Per-customer limit: once Ann has paid an order with it, it is spent for her.
    json_of(apply(&app, &ann, "AONCE").await, StatusCode::OK).await;
    let coupon = Uuid::parse_str(once["id"].as_str().unwrap()).unwrap();
    let ann_id: Uuid = sqlx::query_scalar("SELECT user_id FROM cart_items LIMIT 1")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let mut tx = app.db.pool.begin().await.unwrap();
    assert!(
        coupons::redeem(&mut tx, coupon, ann_id, Uuid::now_v7())
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    let cart = json_of(
        call(&app, &ann, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        cart["coupon"]["discount_minor"], 0,
        "kept on the cart, flagged"
    );
    assert!(
        cart["coupon"]["problem"]
            .as_str()
            .unwrap()
            .contains("as often as allowed")
    );
    assert_eq!(cart["total_minor"], 7500);

    // A disabled coupon stops applying; another shop cannot disable it.
    let aten: Uuid = sqlx::query_scalar("SELECT id FROM coupons WHERE code = 'ATEN'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let resp = call(
        &app,
        &b,
        Method::POST,
        &format!("/seller/coupons/{aten}/disable"),
        json!({}),
    )
    .await;
    problem(resp, StatusCode::NOT_FOUND).await;
    let resp = call(
        &app,
        &a,
        Method::POST,
        &format!("/seller/coupons/{aten}/disable"),
        json!({}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(
        refused(&app, &ann, "ATEN")
            .await
            .contains("no longer valid")
    );
    let listed = json_of(
        call(&app, &a, Method::GET, "/seller/coupons", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(listed.as_array().unwrap().len(), 5, "shop A's own only");

    // An admin may disable any shop's coupon, saying why.
    let root = common::token_for(&app, &common::admin(&app).await).await;
    let theirs: Uuid = sqlx::query_scalar(
        "SELECT id FROM coupons WHERE shop_id IS NOT NULL AND disabled_at IS NULL LIMIT 1",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let path = format!("/admin/coupons/{theirs}/disable");
    let silent = call(&app, &root, Method::POST, &path, json!({"reason": " "})).await;
    assert_eq!(
        fields(&problem(silent, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["reason"]
    );
    let why = json!({"reason": "misleading: 90% off nothing"});
    let resp = call(&app, &root, Method::POST, &path, why).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM audit_log WHERE action = 'coupon.disable' AND target_id = $1",
    )
    .bind(theirs)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(reason, "misleading: 90% off nothing");
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM audit_log WHERE action = 'coupon.create' AND target_id = $1",
    )
    .bind(Uuid::parse_str(welcome["id"].as_str().unwrap()).unwrap())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(reason, "launch week", "the admin's own words");
    // An admin's coupon says why; a shop's is no admin action.
    for (token, path, body) in [
        (
            &root,
            "/admin/coupons",
            json!({"code": "NOWHY", "percent_off": 5}),
        ),
        (
            &b,
            "/seller/coupons",
            json!({"code": "BWHY", "percent_off": 5, "reason": "because"}),
        ),
    ] {
        let resp = call(&app, token, Method::POST, path, body).await;
        let refused = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&refused), ["reason"], "{path}");
    }

    // Codes are unique regardless of case; bad coupons are refused by field.
    let resp = call(
        &app,
        &b,
        Method::POST,
        "/seller/coupons",
        json!({"code": "welcome", "percent_off": 5}),
    )
    .await;
    assert_eq!(fields(&problem(resp, StatusCode::CONFLICT).await), ["code"]);
    let resp = call(
        &app,
        &b,
        Method::POST,
        "/seller/coupons",
        json!({"code": "X1", "percent_off": 5, "amount_off_minor": 5, "max_uses": 0}),
    )
    .await;
    let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&body), ["code", "percent_off", "max_uses"]);
    // Only admins make platform coupons.
    let resp = call(
        &app,
        &a,
        Method::POST,
        "/admin/coupons",
        json!({"code": "MINE", "percent_off": 90}),
    )
    .await;
    problem(resp, StatusCode::FORBIDDEN).await;
    let resp = call(&app, &ann, Method::DELETE, "/cart/coupon", json!({})).await;
    let cart = json_of(resp, StatusCode::OK).await;
    assert!(cart.get("coupon").is_none());
}

#[tokio::test]
async fn a_use_is_counted_once_per_paid_order_up_to_the_total_limit() {
    let app = spawn_app(&amqp_url()).await;
    let a = verified_seller(&app, "shop-a").await;
    let created = json_of(
        call(
            &app,
            &a,
            Method::POST,
            "/seller/coupons",
            json!({"code": "TWICE", "percent_off": 10, "max_uses": 2}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let coupon = Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    let user: Uuid = sqlx::query_scalar("SELECT id FROM users LIMIT 1")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let (first, second, third) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for order in [first, first, second, second] {
        let mut tx = app.db.pool.begin().await.unwrap();
        assert!(coupons::redeem(&mut tx, coupon, user, order).await.unwrap());
        tx.commit().await.unwrap();
    }
    let mut tx = app.db.pool.begin().await.unwrap();
    assert!(
        !coupons::redeem(&mut tx, coupon, user, third).await.unwrap(),
        "limit reached"
    );
    drop(tx);
    let uses: i32 = sqlx::query_scalar("SELECT uses FROM coupons")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(uses, 2);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM coupon_redemptions").await,
        2
    );
}

#[tokio::test]
async fn concurrent_checkouts_cannot_take_more_uses_than_a_coupon_has() {
    use common::orders::{add_to_cart, checkout_request, customer, listing};
    let app = spawn_app(&amqp_url()).await;
    let oak = listing(&app, "oak", "Walnut board", 4500, 50).await;
    let created = json_of(
        call(
            &app,
            &oak.seller,
            Method::POST,
            "/seller/coupons",
            json!({"code": "LASTONE", "percent_off": 20, "max_uses": 1}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(created["max_uses"], 1);
    let mut buyers = vec![];
    for _ in 0..8 {
        let buyer = customer(&app).await;
        add_to_cart(&app, &buyer.token, &oak.variant, 1).await;
        json_of(apply(&app, &buyer.token, "LASTONE").await, StatusCode::OK).await;
        buyers.push(buyer);
    }
    // All at once, while no order is paid yet: one gets the coupon, the
    // others are told it is used up (their carts are kept).
    let answers = futures_util::future::join_all(
        buyers
            .iter()
            .map(|b| checkout_request(&app, &b.token, None, json!({}))),
    )
    .await;
    let mut placed = vec![];
    for (i, resp) in answers.into_iter().enumerate() {
        match resp.status() {
            StatusCode::ACCEPTED => placed.push((i, resp.json::<Value>().await.unwrap())),
            _ => {
                let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
                assert_eq!(fields(&body), ["coupon"], "{body}");
            }
        }
    }
    assert_eq!(placed.len(), 1, "one order holds the coupon's only use");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM orders WHERE coupon_id IS NOT NULL"
        )
        .await,
        1
    );

    // That order is cancelled unpaid: its use is free again.
    let (winner, order) = &placed[0];
    let cancel = format!("/orders/{}/cancel", order["id"].as_str().unwrap());
    let resp = call(
        &app,
        &buyers[*winner].token,
        Method::POST,
        &cancel,
        json!({"reason": "changed my mind"}),
    )
    .await;
    assert!(resp.status().is_success(), "{}", resp.status());
    let next = buyers
        .iter()
        .enumerate()
        .find(|(i, _)| i != winner)
        .unwrap()
        .1;
    let resp = checkout_request(&app, &next.token, None, json!({})).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}
