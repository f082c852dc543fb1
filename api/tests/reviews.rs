//! Reviews: only after a delivered purchase, once; one seller reply; admin
//! removal; product and shop averages kept current; the rating filter.

mod common;

use common::{
    App,
    catalog::{call, json_of, shelf, storefront, titles},
    fields, problem, signed_in, spawn_app, verified_seller,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{amqp_url, count};
use uuid::Uuid;

async fn me(app: &App, token: &str) -> Uuid {
    let me = json_of(
        call(app, token, Method::GET, "/me", json!({})).await,
        StatusCode::OK,
    )
    .await;
    Uuid::parse_str(me["id"].as_str().unwrap()).unwrap()
}

/// Records that `customer` bought `product`, and how far that shop's part
/// got (the Checkout issue's workers write these rows in real life).
async fn purchase(app: &App, customer: Uuid, product: &str, status: &str) {
    let product = Uuid::parse_str(product).unwrap();
    let order = Uuid::now_v7();
    let mut tx = app.db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO orders (id, customer_id, status, currency, subtotal_minor, shipping_address)
         VALUES ($1, $2, 'paid', 'eur', 0, '{}')",
    )
    .bind(order)
    .bind(customer)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO seller_orders (id, order_id, shop_id, status, items_minor, discount_minor,
                                    shipping_minor, total_minor, commission_bps, commission_minor, payout_minor)
         SELECT $1, $2, shop_id, $3, 0, 0, 0, 0, 0, 0, 0 FROM products WHERE id = $4",
    )
    .bind(Uuid::now_v7())
    .bind(order)
    .bind(status)
    .bind(product)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO order_lines (id, order_id, shop_id, product_id, variant_id, title, variant_title,
                                  sku, unit_price_minor, quantity)
         SELECT $1, $2, p.shop_id, p.id, v.id, p.title, v.title, v.sku, v.price_minor, 1
           FROM products p JOIN variants v ON v.product_id = p.id WHERE p.id = $3",
    )
    .bind(Uuid::now_v7())
    .bind(order)
    .bind(product)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn review(app: &App, token: &str, product: &str, rating: i32) -> reqwest::Response {
    let body = json!({"rating": rating, "body": "As described."});
    call(
        app,
        token,
        Method::POST,
        &format!("/products/{product}/reviews"),
        body,
    )
    .await
}

#[tokio::test]
async fn only_a_delivered_purchase_may_be_reviewed_and_only_once() {
    let app = spawn_app(&amqp_url()).await;
    let (_, _, ids) = shelf(&app).await;
    let board = ids["Walnut cutting board"].as_str().unwrap();
    let ann = signed_in(&app, None).await;
    let ann_id = me(&app, &ann).await;

    let body = problem(review(&app, &ann, board, 5).await, StatusCode::FORBIDDEN).await;
    assert_eq!(fields(&body), ["product_id"]);
    purchase(&app, ann_id, board, "shipped").await;
    problem(review(&app, &ann, board, 5).await, StatusCode::FORBIDDEN).await;
    // Someone else's delivery does not count for Ann.
    let bob = signed_in(&app, None).await;
    purchase(&app, me(&app, &bob).await, board, "delivered").await;
    problem(review(&app, &ann, board, 5).await, StatusCode::FORBIDDEN).await;

    purchase(&app, ann_id, board, "delivered").await;
    let bad = call(
        &app,
        &ann,
        Method::POST,
        &format!("/products/{board}/reviews"),
        json!({"rating": 6}),
    )
    .await;
    assert_eq!(
        fields(&problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["rating"]
    );
    let written = json_of(review(&app, &ann, board, 5).await, StatusCode::CREATED).await;
    assert_eq!(written["author"], "Ann");
    let again = problem(review(&app, &ann, board, 1).await, StatusCode::CONFLICT).await;
    assert_eq!(fields(&again), ["product_id"]);
    json_of(review(&app, &bob, board, 2).await, StatusCode::CREATED).await;

    let page = storefront(&app, &format!("/products/{board}")).await;
    assert_eq!(page["rating"], json!({"average": 3.5, "count": 2}));
    let shop = storefront(&app, "/shops/shop-a").await;
    assert_eq!(shop["rating"]["count"], 2);
    let listed = storefront(&app, &format!("/products/{board}/reviews")).await;
    assert_eq!(listed["total"], 2);
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM reviews").await, 2);
}

#[tokio::test]
async fn the_seller_replies_once_and_an_admin_can_remove_a_review() {
    let app = spawn_app(&amqp_url()).await;
    let (root, a, ids) = shelf(&app).await;
    let board = ids["Walnut cutting board"].as_str().unwrap();
    let ann = signed_in(&app, None).await;
    purchase(&app, me(&app, &ann).await, board, "delivered").await;
    let written = json_of(review(&app, &ann, board, 4).await, StatusCode::CREATED).await;
    let id = written["id"].as_str().unwrap();

    let reply = json!({"body": "Thank you!"});
    let other = verified_seller(&app, "shop-z").await;
    let path = format!("/seller/reviews/{id}/reply");
    problem(
        call(&app, &other, Method::POST, &path, reply.clone()).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let replied = json_of(
        call(&app, &a, Method::POST, &path, reply.clone()).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(replied["reply"], "Thank you!");
    problem(
        call(&app, &a, Method::POST, &path, reply).await,
        StatusCode::CONFLICT,
    )
    .await;

    // Photos: the author's own review only, re-encoded like every image.
    let png = {
        let img = image::RgbImage::from_pixel(40, 30, image::Rgb([200, 10, 10]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let upload = |token: &str| {
        let part = reqwest::multipart::Part::bytes(png.clone()).file_name("r.png");
        app.http
            .post(format!("{}/api/v1/reviews/{id}/images", app.base))
            .bearer_auth(token)
            .multipart(reqwest::multipart::Form::new().part("image", part))
            .send()
    };
    let bob = signed_in(&app, None).await;
    problem(upload(&bob).await.unwrap(), StatusCode::NOT_FOUND).await;
    let with_photo = json_of(upload(&ann).await.unwrap(), StatusCode::CREATED).await;
    let photo = with_photo["images"][0].as_str().unwrap();
    let served = app
        .http
        .get(format!("{}{photo}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(served.headers()["content-type"], "image/png");
    let photo_status = || async {
        app.http
            .get(format!("{}{photo}", app.base))
            .send()
            .await
            .unwrap()
            .status()
    };
    // While its product is off the storefront, so are its reviews' photos.
    let moderate = async |action: &str| {
        let path = format!("/admin/products/{board}/{action}");
        let reason = json!({"reason": "checking the listing"});
        call(&app, &root, Method::POST, &path, reason).await
    };
    assert_eq!(moderate("hide").await.status(), StatusCode::NO_CONTENT);
    assert_eq!(photo_status().await, StatusCode::NOT_FOUND);
    assert_eq!(moderate("unhide").await.status(), StatusCode::NO_CONTENT);
    assert_eq!(photo_status().await, StatusCode::OK);

    let reason = json!({"reason": "abusive language"});
    let remove = format!("/admin/reviews/{id}/remove");
    problem(
        call(&app, &a, Method::POST, &remove, reason.clone()).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let resp = call(&app, &root, Method::POST, &remove, reason.clone()).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // Twice changes nothing more.
    let resp = call(&app, &root, Method::POST, &remove, reason).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let page = storefront(&app, &format!("/products/{board}")).await;
    assert_eq!(page["rating"], json!({"average": null, "count": 0}));
    assert_eq!(
        storefront(&app, &format!("/products/{board}/reviews")).await["total"],
        0
    );
    assert_eq!(
        storefront(&app, "/shops/shop-a").await["rating"]["count"],
        0
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'review.remove'"
        )
        .await,
        1
    );
    // Its photo is taken down with it.
    assert_eq!(photo_status().await, StatusCode::NOT_FOUND);
    // Still Ann's one review of it.
    problem(review(&app, &ann, board, 5).await, StatusCode::CONFLICT).await;
}

#[tokio::test]
async fn the_catalog_filters_and_sorts_by_rating() {
    let app = spawn_app(&amqp_url()).await;
    let (_, _, ids) = shelf(&app).await;
    let ann = signed_in(&app, None).await;
    let ann_id = me(&app, &ann).await;
    for (title, stars) in [
        ("Walnut cutting board", 5),
        ("Olive wood spoon set", 2),
        ("Ceramic teapot", 4),
    ] {
        let id = ids[title].as_str().unwrap();
        purchase(&app, ann_id, id, "delivered").await;
        json_of(review(&app, &ann, id, stars).await, StatusCode::CREATED).await;
    }
    let good = storefront(&app, "/products?min_rating=4&sort=rating").await;
    assert_eq!(titles(&good), ["Walnut cutting board", "Ceramic teapot"]);
    let all: Value = storefront(&app, "/products?sort=rating").await;
    assert_eq!(titles(&all).last(), Some(&"Wool blanket"), "unrated last");
}

/// Only what the storefront shows takes reviews: a product hidden by
/// moderation, withdrawn by its seller or in a suspended shop is a 404,
/// even to a customer whose delivery of it would otherwise let them.
#[tokio::test]
async fn a_product_off_the_storefront_takes_no_reviews() {
    let app = spawn_app(&amqp_url()).await;
    let (root, a, ids) = shelf(&app).await;
    let board = ids["Walnut cutting board"].as_str().unwrap();
    let blanket = ids["Wool blanket"].as_str().unwrap();
    let spoons = ids["Olive wood spoon set"].as_str().unwrap();
    let ann = signed_in(&app, None).await;
    let ann_id = me(&app, &ann).await;
    for product in [board, blanket, spoons] {
        purchase(&app, ann_id, product, "delivered").await;
    }
    let reason = json!({"reason": "under review"});
    let resp = call(
        &app,
        &root,
        Method::POST,
        &format!("/admin/products/{board}/hide"),
        reason.clone(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    json_of(
        call(
            &app,
            &a,
            Method::PATCH,
            &format!("/seller/products/{blanket}"),
            json!({"status": "archived"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    json_of(
        call(
            &app,
            &root,
            Method::POST,
            "/admin/shops/shop-b/suspend",
            reason.clone(),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    for product in [board, blanket, spoons] {
        problem(review(&app, &ann, product, 1).await, StatusCode::NOT_FOUND).await;
    }
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM reviews").await, 0);

    // Back on the storefront, the delivery counts again.
    let resp = call(
        &app,
        &root,
        Method::POST,
        &format!("/admin/products/{board}/unhide"),
        reason,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    json_of(review(&app, &ann, board, 4).await, StatusCode::CREATED).await;
}
