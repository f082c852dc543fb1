//! Products, stock, sales, search and the storefront's conditional GETs.

mod common;

use chrono::Utc;
use common::{
    Pipeline, WAIT,
    catalog::{add, call, json_of, product, publish, shelf, simple, storefront, titles},
    fields, problem, signed_in, spawn_app, verified_seller,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{amqp_url, count, mail::mails_to, wait_until};

use common::App;

#[tokio::test]
async fn a_seller_runs_only_its_own_products_and_drafts_stay_private() {
    let app = spawn_app(&amqp_url()).await;
    let a = verified_seller(&app, "shop-a").await;
    let b = verified_seller(&app, "shop-b").await;
    let body = json!({
        "title": "Linen apron", "description": "Stone-washed linen", "tags": ["Kitchen", "linen", "kitchen"],
        "variants": [
            {"sku": "APRON-S", "title": "Small", "price_minor": 2500, "compare_at_minor": 3000, "on_hand": 4},
            {"sku": "APRON-L", "title": "Large", "price_minor": 2700, "on_hand": 2}
        ]
    });
    let created = product(&app, &a, body).await;
    let id = created["id"].as_str().unwrap();
    assert_eq!(created["status"], "draft");
    assert_eq!(created["tags"], json!(["kitchen", "linen"]));
    assert_eq!(created["variants"][0]["available"], 4);
    let variant = created["variants"][0]["id"].as_str().unwrap();

    // Another seller: every route answers as if the product did not exist.
    let path = format!("/seller/products/{id}");
    problem(
        call(&app, &b, Method::GET, &path, json!({})).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let change = json!({"title": "Mine now"});
    problem(
        call(&app, &b, Method::PATCH, &path, change).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let extra = json!({"sku": "X", "price_minor": 1});
    let resp = call(&app, &b, Method::POST, &format!("{path}/variants"), extra).await;
    problem(resp, StatusCode::NOT_FOUND).await;
    let adjust = json!({"delta": -4, "reason": "theft"});
    let resp = call(
        &app,
        &b,
        Method::POST,
        &format!("/seller/variants/{variant}/stock-adjustments"),
        adjust,
    )
    .await;
    problem(resp, StatusCode::NOT_FOUND).await;
    let resp = call(
        &app,
        &b,
        Method::PATCH,
        &format!("/seller/variants/{variant}"),
        json!({"price_minor": 1}),
    )
    .await;
    problem(resp, StatusCode::NOT_FOUND).await;
    let theirs = json_of(
        call(&app, &b, Method::GET, "/seller/products", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(theirs["total"], 0);
    // A customer is not a seller at all.
    let customer = signed_in(&app, None).await;
    let resp = call(
        &app,
        &customer,
        Method::POST,
        "/seller/products",
        simple("T", "T-1", 1, 0),
    )
    .await;
    problem(resp, StatusCode::FORBIDDEN).await;
    // Nothing of theirs changed it.
    let mine = json_of(
        call(&app, &a, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(mine["title"], "Linen apron");
    assert_eq!(mine["variants"][0]["on_hand"], 4);
    assert_eq!(mine["variants"][0]["price_minor"], 2500);

    // A draft is invisible to the storefront until published.
    problem(
        app.get(&format!("/api/v1/products/{id}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(storefront(&app, "/products").await["total"], 0);
    publish(&app, &a, id).await;
    let page = storefront(&app, &format!("/products/{id}")).await;
    assert_eq!(page["shop"]["slug"], "shop-a");
    assert_eq!(page["variants"][1]["price_now_minor"], 2700);
}

#[tokio::test]
async fn bad_products_are_refused_by_field_and_leave_nothing_behind() {
    let app = spawn_app(&amqp_url()).await;
    let a = verified_seller(&app, "shop-a").await;
    let bad = json!({
        "title": "",
        "variants": [
            {"sku": "has space", "price_minor": -1},
            {"sku": "OK-1", "price_minor": 500, "compare_at_minor": 400}
        ]
    });
    let body = problem(
        call(&app, &a, Method::POST, "/seller/products", bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let mut got = fields(&body);
    got.sort();
    assert_eq!(
        got,
        [
            "title",
            "variants[0].price_minor",
            "variants[0].sku",
            "variants[1].compare_at_minor"
        ]
    );
    let unknown =
        json!({"title": "T", "category": "nope", "variants": [{"sku": "A", "price_minor": 1}]});
    let body = problem(
        call(&app, &a, Method::POST, "/seller/products", unknown).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["category"]);

    // A SKU is unique within a shop: the second product is not half-made.
    product(&app, &a, simple("First", "SKU-1", 100, 3)).await;
    let resp = call(
        &app,
        &a,
        Method::POST,
        "/seller/products",
        simple("Second", "SKU-1", 100, 3),
    )
    .await;
    let body = problem(resp, StatusCode::CONFLICT).await;
    assert_eq!(fields(&body), ["sku"]);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM products").await,
        1
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM stock_adjustments").await,
        1
    );
    // Another shop may use the same SKU.
    let b = verified_seller(&app, "shop-b").await;
    product(&app, &b, simple("Theirs", "SKU-1", 100, 0)).await;
}

#[tokio::test]
async fn an_unverified_seller_cannot_publish() {
    let app = spawn_app(&amqp_url()).await;
    let seller = signed_in(&app, Some("fresh-shop")).await;
    let created = product(&app, &seller, simple("Jam", "JAM", 700, 5)).await;
    let id = created["id"].as_str().unwrap();
    let resp = call(
        &app,
        &seller,
        Method::PATCH,
        &format!("/seller/products/{id}"),
        json!({"status": "active"}),
    )
    .await;
    let body = problem(resp, StatusCode::FORBIDDEN).await;
    assert_eq!(fields(&body), ["email"]);
    let status: String = sqlx::query_scalar("SELECT status FROM products")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "draft");
}

#[tokio::test]
async fn concurrent_stock_changes_never_break_on_hand_above_reserved() {
    let app = spawn_app(&amqp_url()).await;
    let a = verified_seller(&app, "shop-a").await;
    let created = product(&app, &a, simple("Mug", "MUG", 1200, 20)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let variant = created["variants"][0]["id"].as_str().unwrap().to_string();
    publish(&app, &a, &id).await;
    // Five units are held for an unpaid order.
    sqlx::query("UPDATE variants SET reserved = 5")
        .execute(&app.db.pool)
        .await
        .unwrap();

    let path = format!("/seller/variants/{variant}/stock-adjustments");
    let removals = (0..40).map(|_| {
        call(
            &app,
            &a,
            Method::POST,
            &path,
            json!({"delta": -1, "reason": "breakage"}),
        )
    });
    let page_path = format!("/api/v1/products/{id}");
    let reads = (0..20).map(|_| app.get(&page_path));
    let (removals, reads) = tokio::join!(
        futures_util::future::join_all(removals),
        futures_util::future::join_all(reads)
    );
    let ok = removals
        .iter()
        .filter(|r| r.status() == StatusCode::CREATED)
        .count();
    let refused = removals
        .iter()
        .filter(|r| r.status() == StatusCode::CONFLICT)
        .count();
    assert_eq!((ok, refused), (15, 25));
    for read in reads {
        let page: Value = read.json().await.unwrap();
        let available = page["variants"][0]["available"].as_i64().unwrap();
        assert!((0..=15).contains(&available), "{available}");
    }
    let (on_hand, reserved): (i32, i32) = sqlx::query_as("SELECT on_hand, reserved FROM variants")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!((on_hand, reserved), (5, 5));
    let history = json_of(
        call(&app, &a, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(history["total"], 16, "the initial stock and 15 removals");
    assert_eq!(history["items"][0]["on_hand_after"], 5);
    let page = storefront(&app, &format!("/products/{id}")).await;
    assert_eq!(page["sold_out"], true);

    // Adding is capped as well: near the ceiling the next addition is a 409
    // naming `delta` (it had overflowed the column as a 500), nothing written.
    sqlx::query("UPDATE variants SET on_hand = 999999990")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let add = |delta: i32| {
        call(
            &app,
            &a,
            Method::POST,
            &path,
            json!({"delta": delta, "reason": "restock"}),
        )
    };
    json_of(add(10).await, StatusCode::CREATED).await;
    let over = problem(add(1).await, StatusCode::CONFLICT).await;
    assert_eq!(fields(&over), ["delta"]);
    let on_hand: i32 = sqlx::query_scalar("SELECT on_hand FROM variants")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(on_hand, 1_000_000_000);
}

#[tokio::test]
async fn low_stock_tells_the_seller_once_each_time_it_falls_below() {
    let app = spawn_app(&amqp_url()).await;
    let pipeline = Pipeline::start(&app, &amqp_url());
    let a = verified_seller(&app, "shop-a").await;
    let seller_email: String = sqlx::query_scalar(
        "SELECT u.email FROM users u JOIN shops s ON s.owner_id = u.id WHERE s.slug = 'shop-a'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let body = json!({"title": "Candle", "variants": [
        {"sku": "CANDLE", "price_minor": 900, "on_hand": 10, "low_stock_threshold": 5}
    ]});
    let variant = product(&app, &a, body).await["variants"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/seller/variants/{variant}/stock-adjustments");
    for delta in [-3, -3, -1, 10, -10] {
        let resp = call(
            &app,
            &a,
            Method::POST,
            &path,
            json!({"delta": delta, "reason": "count"}),
        )
        .await;
        json_of(resp, StatusCode::CREATED).await;
    }
    // 10 → 7 → 4 (below 5: alert) → 3 (still below: quiet) → 13 (re-armed) → 3 (alert).
    let notes = json_of(
        call(&app, &a, Method::GET, "/me/notifications", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(notes["total"], 2);
    assert_eq!(notes["items"][0]["kind"], "low_stock");
    assert_eq!(notes["items"][0]["data"]["available"], 3);
    assert_eq!(notes["items"][1]["data"]["available"], 4);
    let low_stock_mails = || async {
        let mails = mails_to(&seller_email).await;
        mails
            .into_iter()
            .filter(|m| m.subject.starts_with("Low stock"))
            .collect::<Vec<_>>()
    };
    wait_until("two low-stock mails", WAIT, || async {
        low_stock_mails().await.len() == 2
    })
    .await;
    let mail = &low_stock_mails().await[0];
    assert!(mail.subject.contains("CANDLE"), "{}", mail.subject);
    assert!(
        mail.text.contains("below your threshold of 5"),
        "{}",
        mail.text
    );

    let first = notes["items"][1]["id"].as_str().unwrap();
    let resp = call(
        &app,
        &a,
        Method::POST,
        &format!("/me/notifications/{first}/read"),
        json!({}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let unread = json_of(
        call(
            &app,
            &a,
            Method::GET,
            "/me/notifications?unread=true",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(unread["total"], 1);
    // Someone else's notification is not theirs to mark.
    let other = signed_in(&app, None).await;
    let resp = call(
        &app,
        &other,
        Method::POST,
        &format!("/me/notifications/{first}/read"),
        json!({}),
    )
    .await;
    problem(resp, StatusCode::NOT_FOUND).await;
    pipeline.stop().await;
}

#[tokio::test]
async fn search_ranks_by_field_and_filters_combine() {
    let app = spawn_app(&amqp_url()).await;
    let (_, _, _) = shelf(&app).await;

    // Title beats tags beats description; the unpublished one never shows.
    let found = storefront(&app, "/products?q=wood").await;
    assert_eq!(
        titles(&found),
        [
            "Olive wood spoon set",
            "Walnut cutting board",
            "Wool blanket"
        ]
    );
    assert_eq!(found["total"], 3);
    // Stemming: "spoons" finds "spoon".
    assert_eq!(
        titles(&storefront(&app, "/products?q=carved%20spoons").await),
        ["Olive wood spoon set"]
    );

    let only_a = storefront(&app, "/products?q=wood&shop=shop-a").await;
    assert_eq!(titles(&only_a), ["Walnut cutting board", "Wool blanket"]);
    let priced = storefront(&app, "/products?q=wood&min_price=2000&max_price=5000").await;
    assert_eq!(titles(&priced), ["Walnut cutting board"]);
    let in_stock = storefront(&app, "/products?q=wood&in_stock=true").await;
    assert_eq!(
        titles(&in_stock),
        ["Olive wood spoon set", "Walnut cutting board"]
    );
    // A parent category includes its children.
    let home = storefront(&app, "/products?category=home&sort=price_asc").await;
    assert_eq!(
        titles(&home),
        [
            "Olive wood spoon set",
            "Ceramic teapot",
            "Walnut cutting board",
            "Wool blanket"
        ]
    );
    let kitchen = storefront(
        &app,
        "/products?category=kitchen&sort=price_desc&per_page=2&page=2",
    )
    .await;
    assert_eq!(titles(&kitchen), ["Olive wood spoon set"]);
    assert_eq!(kitchen["total"], 3);
    let blanket = &storefront(&app, "/products?q=blanket").await["items"][0];
    assert_eq!(blanket["sold_out"], true);
    // The shop page is the same list, for one shop.
    let shop = storefront(&app, "/shops/shop-b/products?sort=price_asc").await;
    assert_eq!(titles(&shop), ["Olive wood spoon set", "Ceramic teapot"]);
    problem(
        app.get("/api/v1/shops/no-such-shop/products").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let tree = storefront(&app, "/categories").await;
    assert_eq!(tree[0]["slug"], "home");
    assert_eq!(tree[0]["children"][0]["slug"], "kitchen");
    // Each category is an admin's action, kept with the admin's reason.
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'category.create' AND reason = 'new range'"
        )
        .await,
        2
    );
    let root = common::token_for(&app, &common::admin(&app).await).await;
    let body = json!({"name": "Garden", "slug": "garden"});
    let resp = call(&app, &root, Method::POST, "/admin/categories", body).await;
    assert_eq!(
        fields(&problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["reason"]
    );

    for (query, field) in [
        ("per_page=1000", "per_page"),
        ("min_price=abc", "min_price"),
        ("min_price=500&max_price=100", "max_price"),
        ("sort=cheapest", "sort"),
        ("min_rating=9", "min_rating"),
    ] {
        let resp = app.get(&format!("/api/v1/products?{query}")).await;
        let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&body), [field], "{query}");
    }
}

#[tokio::test]
async fn a_hidden_product_disappears_from_the_storefront_and_its_seller_sees_why() {
    let app = spawn_app(&amqp_url()).await;
    let (root, a, ids) = shelf(&app).await;
    let board = ids["Walnut cutting board"].as_str().unwrap();
    let reason = json!({"reason": "counterfeit brand"});
    let resp = call(
        &app,
        &a,
        Method::POST,
        &format!("/admin/products/{board}/hide"),
        reason.clone(),
    )
    .await;
    problem(resp, StatusCode::FORBIDDEN).await;
    let resp = call(
        &app,
        &root,
        Method::POST,
        &format!("/admin/products/{board}/hide"),
        reason,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    assert_eq!(
        titles(&storefront(&app, "/products?q=wood").await),
        ["Olive wood spoon set", "Wool blanket"]
    );
    problem(
        app.get(&format!("/api/v1/products/{board}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let own = json_of(
        call(
            &app,
            &a,
            Method::GET,
            &format!("/seller/products/{board}"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(own["hidden"]["reason"], "counterfeit brand");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'product.hide'"
        )
        .await,
        1
    );
    // Admins find it among every product, hidden ones and drafts included.
    let admin_list = |query: &'static str| {
        let root = root.clone();
        let app = &app;
        async move {
            json_of(
                call(
                    app,
                    &root,
                    Method::GET,
                    &format!("/admin/products{query}"),
                    json!({}),
                )
                .await,
                StatusCode::OK,
            )
            .await
        }
    };
    let hidden = admin_list("?hidden=true").await;
    assert_eq!(hidden["total"], 1);
    assert_eq!(hidden["items"][0]["id"], board);
    assert_eq!(hidden["items"][0]["hidden_reason"], "counterfeit brand");
    let found = admin_list("?q=walnut&hidden=true&status=active").await;
    assert_eq!(found["total"], 1);
    // Past the last page: no items, the total still counted.
    let beyond = admin_list("?hidden=true&page=3").await;
    assert_eq!(beyond["items"], json!([]));
    assert_eq!(beyond["total"], 1);
    let all = admin_list("?per_page=100").await;
    assert!(all["total"].as_i64().unwrap() >= 3, "{all}");
    problem(
        call(&app, &a, Method::GET, "/admin/products", json!({})).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let back = json!({"reason": "brand owner confirmed"});
    let resp = call(
        &app,
        &root,
        Method::POST,
        &format!("/admin/products/{board}/unhide"),
        back,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    storefront(&app, &format!("/products/{board}")).await;
}

#[tokio::test]
async fn public_reads_answer_304_until_something_changes() {
    let app = spawn_app(&amqp_url()).await;
    let a = verified_seller(&app, "shop-a").await;
    let created = product(&app, &a, simple("Soap", "SOAP", 400, 9)).await;
    let id = created["id"].as_str().unwrap();
    let variant = created["variants"][0]["id"].as_str().unwrap();
    publish(&app, &a, id).await;
    let url = format!("{}/api/v1/products/{id}", app.base);

    let first = app.http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(
        first.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age")
    );
    let etag = first.headers()["etag"].to_str().unwrap().to_string();
    let again = app
        .http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(again.headers()["etag"], etag.as_str());

    let resp = call(
        &app,
        &a,
        Method::PATCH,
        &format!("/seller/variants/{variant}"),
        json!({"price_minor": 450}),
    )
    .await;
    json_of(resp, StatusCode::OK).await;
    let changed = app
        .http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    assert_ne!(changed.headers()["etag"], etag.as_str());
    let list = app
        .http
        .get(format!("{}/api/v1/products", app.base))
        .send()
        .await
        .unwrap();
    let list_tag = list.headers()["etag"].to_str().unwrap().to_string();
    let list_again = app
        .http
        .get(format!("{}/api/v1/products", app.base))
        .header("if-none-match", &list_tag)
        .send()
        .await
        .unwrap();
    assert_eq!(list_again.status(), StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn a_sale_price_applies_only_inside_its_window() {
    let app = spawn_app(&amqp_url()).await;
    let a = verified_seller(&app, "shop-a").await;
    let created = product(&app, &a, simple("Tea", "TEA", 1000, 50)).await;
    let id = created["id"].as_str().unwrap();
    let variant = created["variants"][0]["id"].as_str().unwrap();
    publish(&app, &a, id).await;
    let sales = format!("/seller/variants/{variant}/sale-prices");
    let now = Utc::now();
    let hours = |h: i64| now + chrono::Duration::hours(h);

    // Not below the regular price, or already over: refused.
    let resp = call(
        &app,
        &a,
        Method::POST,
        &sales,
        json!({"price_minor": 1000, "starts_at": hours(-1), "ends_at": hours(1)}),
    )
    .await;
    assert_eq!(
        fields(&problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["price_minor"]
    );
    let resp = call(
        &app,
        &a,
        Method::POST,
        &sales,
        json!({"price_minor": 500, "starts_at": hours(-3), "ends_at": hours(-2)}),
    )
    .await;
    assert_eq!(
        fields(&problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["ends_at"]
    );
    // Another shop's seller cannot put it on sale.
    let b = verified_seller(&app, "shop-b").await;
    let resp = call(
        &app,
        &b,
        Method::POST,
        &sales,
        json!({"price_minor": 1, "starts_at": hours(-1), "ends_at": hours(1)}),
    )
    .await;
    problem(resp, StatusCode::NOT_FOUND).await;

    // Scheduled for tomorrow: not yet.
    let resp = call(
        &app,
        &a,
        Method::POST,
        &sales,
        json!({"price_minor": 600, "starts_at": hours(24), "ends_at": hours(48)}),
    )
    .await;
    json_of(resp, StatusCode::CREATED).await;
    let page = storefront(&app, &format!("/products/{id}")).await;
    assert_eq!(page["variants"][0]["price_now_minor"], 1000);

    // Running now: the catalog and the cart both use it.
    let resp = call(
        &app,
        &a,
        Method::POST,
        &sales,
        json!({"price_minor": 800, "starts_at": hours(-1), "ends_at": hours(1)}),
    )
    .await;
    let running = json_of(resp, StatusCode::CREATED).await;
    let page = storefront(&app, &format!("/products/{id}")).await;
    assert_eq!(page["variants"][0]["price_now_minor"], 800);
    assert_eq!(page["variants"][0]["price_minor"], 1000);
    let listed = storefront(&app, "/products").await;
    assert_eq!(listed["items"][0]["price_from_minor"], 800);
    assert_eq!(listed["items"][0]["on_sale"], true);
    let customer = signed_in(&app, None).await;
    let cart = json_of(
        call(
            &app,
            &customer,
            Method::POST,
            "/cart/items",
            json!({"variant_id": variant, "quantity": 2}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["total_minor"], 1600);

    // The regular price cut below the running sale: the lower one applies,
    // and it is no longer a sale (a sale never charges above the price).
    let variant_path = format!("/seller/variants/{variant}");
    let regular = |price: i64| {
        call(
            &app,
            &a,
            Method::PATCH,
            &variant_path,
            json!({ "price_minor": price }),
        )
    };
    json_of(regular(500).await, StatusCode::OK).await;
    let page = storefront(&app, &format!("/products/{id}")).await;
    assert_eq!(page["variants"][0]["price_now_minor"], 500);
    let listed = storefront(&app, "/products").await;
    assert_eq!(listed["items"][0]["on_sale"], false);
    let cart = json_of(
        call(&app, &customer, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["total_minor"], 1000);
    json_of(regular(1000).await, StatusCode::OK).await;

    // Ended (moved into the past): back to the regular price.
    sqlx::query("UPDATE sale_prices SET starts_at = now() - interval '2 hours', ends_at = now() - interval '1 second' WHERE id = $1")
        .bind(uuid::Uuid::parse_str(running["id"].as_str().unwrap()).unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    let cart = json_of(
        call(&app, &customer, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["total_minor"], 2000);
    let listed = json_of(
        call(&app, &a, Method::GET, &sales, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "only tomorrow's remains"
    );
}

#[tokio::test]
async fn the_cart_merges_groups_by_shop_and_takes_every_price_from_the_database() {
    let app = spawn_app(&amqp_url()).await;
    let (_, a, ids) = shelf(&app).await;
    let ann = signed_in(&app, None).await;
    let bob = signed_in(&app, None).await;
    let variant_of = |title: &str| {
        let id = ids[title].as_str().unwrap().to_string();
        let app = &app;
        async move {
            storefront(app, &format!("/products/{id}")).await["variants"][0]["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let board = variant_of("Walnut cutting board").await;
    let spoons = variant_of("Olive wood spoon set").await;

    json_of(add(&app, &ann, &board, 1).await, StatusCode::OK).await;
    json_of(add(&app, &ann, &spoons, 4).await, StatusCode::OK).await;
    let cart = json_of(add(&app, &ann, &board, 2).await, StatusCode::OK).await;
    assert_eq!(cart["shops"].as_array().unwrap().len(), 2);
    let shop_a = &cart["shops"][0];
    assert_eq!(shop_a["shop"]["slug"], "shop-a");
    assert_eq!(shop_a["lines"].as_array().unwrap().len(), 1, "merged");
    assert_eq!(shop_a["lines"][0]["quantity"], 3);
    assert_eq!(shop_a["subtotal_minor"], 13_500);
    assert_eq!(cart["shops"][1]["subtotal_minor"], 6_000);
    assert_eq!(cart["total_minor"], 19_500);
    assert_eq!(cart["ready_for_checkout"], true);

    // A price from the client is refused by name, and changes nothing.
    let resp = call(
        &app,
        &ann,
        Method::POST,
        "/cart/items",
        json!({"variant_id": spoons, "quantity": 1, "unit_price_minor": 1}),
    )
    .await;
    assert_eq!(
        fields(&problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["unit_price_minor"]
    );
    // More than is in stock: refused, and the line keeps its quantity.
    let body = problem(add(&app, &ann, &board, 1).await, StatusCode::CONFLICT).await;
    assert_eq!(fields(&body), ["quantity"]);
    let cart = json_of(
        call(&app, &ann, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["total_minor"], 19_500);

    // Bob sees his own (empty) cart and cannot touch Ann's lines.
    let his = json_of(
        call(&app, &bob, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(his["shops"], json!([]));
    assert_eq!(his["ready_for_checkout"], false);
    let resp = call(
        &app,
        &bob,
        Method::DELETE,
        &format!("/cart/items/{board}"),
        json!({}),
    )
    .await;
    problem(resp, StatusCode::NOT_FOUND).await;
    let resp = call(
        &app,
        &bob,
        Method::PUT,
        &format!("/cart/items/{board}"),
        json!({"quantity": 1}),
    )
    .await;
    problem(resp, StatusCode::NOT_FOUND).await;
    problem(app.get("/api/v1/cart").await, StatusCode::UNAUTHORIZED).await;

    // The seller withdraws the board: the line stays, flagged, out of the totals.
    let board_product = ids["Walnut cutting board"].as_str().unwrap();
    let resp = call(
        &app,
        &a,
        Method::PATCH,
        &format!("/seller/products/{board_product}"),
        json!({"status": "archived"}),
    )
    .await;
    json_of(resp, StatusCode::OK).await;
    let cart = json_of(
        call(&app, &ann, Method::GET, "/cart", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["shops"][0]["lines"][0]["problem"], "unavailable");
    assert_eq!(cart["shops"][0]["subtotal_minor"], 0);
    assert_eq!(cart["total_minor"], 6_000);
    assert_eq!(cart["ready_for_checkout"], false);
    // It can be lowered but not raised, and removed.
    let resp = call(
        &app,
        &ann,
        Method::PUT,
        &format!("/cart/items/{board}"),
        json!({"quantity": 2}),
    )
    .await;
    assert_eq!(
        json_of(resp, StatusCode::OK).await["shops"][0]["lines"][0]["quantity"],
        2
    );
    let resp = call(
        &app,
        &ann,
        Method::PUT,
        &format!("/cart/items/{board}"),
        json!({"quantity": 3}),
    )
    .await;
    assert_eq!(
        fields(&problem(resp, StatusCode::CONFLICT).await),
        ["quantity"]
    );
    let resp = call(
        &app,
        &ann,
        Method::DELETE,
        &format!("/cart/items/{board}"),
        json!({}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let cart = json_of(
        call(
            &app,
            &ann,
            Method::PUT,
            &format!("/cart/items/{spoons}"),
            json!({"quantity": 2}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cart["total_minor"], 3_000);
    assert_eq!(cart["ready_for_checkout"], true);
}

fn photo(format: image::ImageFormat, width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 120])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

async fn upload_photo(
    app: &App,
    token: &str,
    product: &str,
    bytes: Vec<u8>,
    name: &str,
) -> reqwest::Response {
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(name.to_string())
        .mime_str("image/png")
        .unwrap();
    app.http
        .post(format!(
            "{}/api/v1/seller/products/{product}/images",
            app.base
        ))
        .bearer_auth(token)
        .multipart(reqwest::multipart::Form::new().part("image", part))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn product_photos_are_sniffed_re_encoded_ordered_and_served() {
    let app = spawn_app(&amqp_url()).await;
    let a = verified_seller(&app, "shop-a").await;
    let b = verified_seller(&app, "shop-b").await;
    let created = product(&app, &a, simple("Vase", "VASE", 5000, 1)).await;
    let id = created["id"].as_str().unwrap();
    publish(&app, &a, id).await;

    let first = upload_photo(
        &app,
        &a,
        id,
        photo(image::ImageFormat::Jpeg, 2400, 1200),
        "front.jpg",
    )
    .await;
    json_of(first, StatusCode::CREATED).await;
    let second = upload_photo(
        &app,
        &a,
        id,
        photo(image::ImageFormat::Png, 300, 300),
        "side.png",
    )
    .await;
    let with_two = json_of(second, StatusCode::CREATED).await;
    assert_eq!(with_two["images"].as_array().unwrap().len(), 2);

    // A text file named .png is refused; so is another shop's seller.
    let text = b"#!/bin/sh\necho not an image\n".to_vec();
    let body = problem(
        upload_photo(&app, &a, id, text, "evil.png").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["image"]);
    let theirs = upload_photo(
        &app,
        &b,
        id,
        photo(image::ImageFormat::Png, 10, 10),
        "x.png",
    )
    .await;
    problem(theirs, StatusCode::NOT_FOUND).await;
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM product_images").await,
        2
    );

    // Reordered: the side view becomes the main photo.
    let ids: Vec<&str> = with_two["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    let order = json!({"image_ids": [ids[1], ids[0]]});
    let resp = call(
        &app,
        &a,
        Method::PUT,
        &format!("/seller/products/{id}/images/order"),
        order,
    )
    .await;
    json_of(resp, StatusCode::OK).await;
    let wrong = json!({"image_ids": [ids[1]]});
    let resp = call(
        &app,
        &a,
        Method::PUT,
        &format!("/seller/products/{id}/images/order"),
        wrong,
    )
    .await;
    assert_eq!(
        fields(&problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["image_ids"]
    );

    let page = storefront(&app, &format!("/products/{id}")).await;
    assert_eq!(page["images"][0]["id"], ids[1]);
    let listed = storefront(&app, "/products").await;
    let main = page["images"][0]["url"].as_str().unwrap();
    assert_eq!(listed["items"][0]["image_url"], main);

    // Served as a PNG we made: the big JPEG came back re-encoded and shrunk.
    let big = page["images"][1]["url"].as_str().unwrap();
    let resp = app
        .http
        .get(format!("{}{big}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let served = resp.bytes().await.unwrap();
    let decoded = image::load_from_memory_with_format(&served, image::ImageFormat::Png).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (1600, 800));

    let resp = call(
        &app,
        &a,
        Method::DELETE,
        &format!("/seller/products/{id}/images/{}", ids[0]),
        json!({}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = app
        .http
        .get(format!("{}{big}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        storefront(&app, &format!("/products/{id}")).await["images"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The small photo was kept at its size, not enlarged to the box.
    let side = format!("{}{main}", app.base);
    let small = app
        .http
        .get(&side)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let decoded = image::load_from_memory_with_format(&small, image::ImageFormat::Png).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (300, 300));

    // A product hidden by moderation stops serving its photos too.
    let root = common::token_for(&app, &common::admin(&app).await).await;
    let hide = json!({"reason": "counterfeit brand"});
    let resp = call(
        &app,
        &root,
        Method::POST,
        &format!("/admin/products/{id}/hide"),
        hide,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.http.get(&side).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn public_answers_are_kept_for_the_configured_time_then_made_afresh() {
    let app =
        common::spawn_app_with_public_cache(&amqp_url(), std::time::Duration::from_millis(500))
            .await;
    let seller = verified_seller(&app, "shop-a").await;
    let created = product(&app, &seller, simple("Oak bowl", "BOWL-1", 1000, 3)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let variant = created["variants"][0]["id"].as_str().unwrap().to_string();
    publish(&app, &seller, &id).await;
    let price = |page: &Value| page["items"][0]["price_from_minor"].as_i64().unwrap();
    let first = app.get("/api/v1/products").await;
    let tag = first.headers()["etag"].to_str().unwrap().to_string();
    let first: Value = first.json().await.unwrap();
    assert_eq!(price(&first), 1000);

    // A new price: answers made before it are served for a while ...
    let change = json!({"price_minor": 1500});
    let resp = call(
        &app,
        &seller,
        Method::PATCH,
        &format!("/seller/variants/{variant}"),
        change,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(price(&storefront(&app, "/products").await), 1000);
    let again = app
        .http
        .get(format!("{}/api/v1/products", app.base))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    // ... a request not asked before is made afresh ...
    assert_eq!(
        price(&storefront(&app, "/products?per_page=10").await),
        1500
    );
    // ... and the first one is made again once its time is up.
    wait_until("the kept answer to be renewed", WAIT, || async {
        price(&storefront(&app, "/products").await) == 1500
    })
    .await;
    let renewed = storefront(&app, &format!("/products/{id}")).await;
    assert_eq!(renewed["variants"][0]["price_now_minor"], 1500);
}

#[tokio::test]
async fn the_list_shows_products_from_their_first_variant_and_counts_past_its_last_page() {
    let app = spawn_app(&amqp_url()).await;
    let (_, _, _) = shelf(&app).await;
    let listed = storefront(&app, "/products").await["total"]
        .as_i64()
        .unwrap();

    // An active product with no variant yet (written as an import would,
    // straight to the table) has nothing to sell: not listed.
    let bare: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO products (id, shop_id, title, description, status, published_at)
         SELECT gen_random_uuid(), shop_id, 'Bare shelf', '', 'active', now()
           FROM products LIMIT 1 RETURNING id",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let page = storefront(&app, "/products?per_page=100").await;
    assert_eq!(page["total"], listed, "{page}");
    assert!(!titles(&page).contains(&"Bare shelf"));

    // Its first variant lists it.
    sqlx::query(
        "INSERT INTO variants (id, product_id, shop_id, sku, title, price_minor, on_hand)
         SELECT gen_random_uuid(), id, shop_id, 'BARE-1', 'Default', 900, 3 FROM products WHERE id = $1",
    )
    .bind(bare)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let page = storefront(&app, "/products?per_page=100").await;
    assert_eq!(page["total"], listed + 1, "{page}");
    assert_eq!(titles(&page)[0], "Bare shelf", "newest first");
    assert_eq!(page["items"][0]["price_from_minor"], 900);

    // A page past the end is empty but still says how many there are, and
    // each page holds the next rows in the list's order.
    let past = storefront(&app, "/products?per_page=2&page=50").await;
    assert_eq!(past["items"], json!([]));
    assert_eq!(past["total"], listed + 1);
    let past = storefront(&app, "/products?per_page=2&page=50&max_price=900").await;
    assert_eq!(past["items"], json!([]));
    let cheap = storefront(&app, "/products?per_page=100&max_price=900").await;
    assert_eq!(past["total"], cheap["total"]);
    assert!(titles(&cheap).contains(&"Bare shelf"));
    let mut walked = Vec::new();
    for n in 1..=(listed + 2) / 2 {
        let page = storefront(&app, &format!("/products?per_page=2&page={n}")).await;
        assert_eq!(page["total"], listed + 1);
        walked.extend(titles(&page).into_iter().map(str::to_owned));
    }
    let all = storefront(&app, "/products?per_page=100").await;
    assert_eq!(walked, titles(&all));

    // Every sort, with and without words and filters, lists the same set.
    for sort in [
        "relevance",
        "price_asc",
        "price_desc",
        "newest",
        "rating",
        "best_selling",
    ] {
        for extra in ["", "&q=wood", "&min_rating=1", "&in_stock=true"] {
            let page =
                storefront(&app, &format!("/products?per_page=100&sort={sort}{extra}")).await;
            let mut got = titles(&page);
            let same = storefront(&app, &format!("/products?per_page=100{extra}")).await;
            let mut want = titles(&same);
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "sort={sort}{extra}");
        }
    }
}

/// (status, Cache-Control) of a GET of `url`, as `token` if given.
async fn photo_answer(app: &App, url: &str, token: Option<&str>) -> (StatusCode, Option<String>) {
    let mut req = app.http.get(url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let cache = resp
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status(), cache)
}

/// Photos follow the storefront: a product off it (a draft, withdrawn,
/// hidden by moderation, its shop or its seller suspended) has its photos
/// 404 to the public, as its page does; its seller and admins still see
/// them, never from a shared cache.
#[tokio::test]
async fn photos_of_a_product_off_the_storefront_are_served_only_to_its_seller_and_admins() {
    let app = spawn_app(&amqp_url()).await;
    let root = common::token_for(&app, &common::admin(&app).await).await;
    let a = verified_seller(&app, "shop-a").await;
    let b = verified_seller(&app, "shop-b").await;
    let buyer = signed_in(&app, None).await;
    let created = product(&app, &a, simple("Vase", "VASE", 5000, 1)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let uploaded = json_of(
        upload_photo(
            &app,
            &a,
            &id,
            photo(image::ImageFormat::Png, 20, 20),
            "v.png",
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let url = format!(
        "{}{}",
        app.base,
        uploaded["images"][0]["url"].as_str().unwrap()
    );
    let public = Some("public, max-age=3600".to_string());
    let private = Some("private, max-age=3600".to_string());
    let off = |what: &'static str| {
        let (app, url, root, a, b, buyer, private) = (&app, &url, &root, &a, &b, &buyer, &private);
        async move {
            for (who, token) in [
                ("anyone", None),
                ("a customer", Some(buyer.as_str())),
                ("another seller", Some(b.as_str())),
            ] {
                assert_eq!(
                    photo_answer(app, url, token).await.0,
                    StatusCode::NOT_FOUND,
                    "{what}: {who}"
                );
            }
            for (who, token) in [("its seller", a), ("an admin", root)] {
                let (status, cache) = photo_answer(app, url, Some(token)).await;
                assert_eq!(status, StatusCode::OK, "{what}: {who}");
                assert_eq!(&cache, private, "{what}: {who}");
            }
        }
    };
    let on = || async {
        assert_eq!(
            photo_answer(&app, &url, None).await,
            (StatusCode::OK, public.clone())
        )
    };

    off("a draft").await;
    publish(&app, &a, &id).await;
    on().await;

    let path = format!("/seller/products/{id}");
    let archived = json!({"status": "archived"});
    json_of(
        call(&app, &a, Method::PATCH, &path, archived).await,
        StatusCode::OK,
    )
    .await;
    off("withdrawn").await;
    publish(&app, &a, &id).await;
    on().await;

    let reason = json!({"reason": "checking the listing"});
    for (off_path, on_path, what, ok) in [
        (
            format!("/admin/products/{id}/hide"),
            format!("/admin/products/{id}/unhide"),
            "hidden",
            StatusCode::NO_CONTENT,
        ),
        (
            "/admin/shops/shop-a/suspend".to_string(),
            "/admin/shops/shop-a/unsuspend".to_string(),
            "its shop suspended",
            StatusCode::OK,
        ),
    ] {
        let resp = call(&app, &root, Method::POST, &off_path, reason.clone()).await;
        assert_eq!(resp.status(), ok, "{what}");
        off(what).await;
        let resp = call(&app, &root, Method::POST, &on_path, reason.clone()).await;
        assert_eq!(resp.status(), ok, "{what}");
        on().await;
    }

    // Its seller suspended (who then cannot sign in either).
    sqlx::query(
        "UPDATE users SET suspended_at = now(), suspended_reason = 'fraud'
          WHERE id = (SELECT owner_id FROM shops WHERE slug = 'shop-a')",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        photo_answer(&app, &url, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        photo_answer(&app, &url, Some(&root)).await.0,
        StatusCode::OK
    );
}

/// The files stored for `product`'s photos.
fn stored_photos(app: &App, product: &str) -> usize {
    let dir = std::env::temp_dir()
        .join(format!("souk-uploads-{}", app.db.name))
        .join("products")
        .join(product);
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => panic!("{e}"),
    }
}

/// A photo is stored before its row goes in; when the row does not (past
/// the limit, or any failure after the file was written: here the
/// database refuses it), the file goes too, leaving no orphan.
#[tokio::test]
async fn a_photo_upload_that_fails_after_storing_leaves_no_file() {
    let app = spawn_app(&amqp_url()).await;
    let a = verified_seller(&app, "shop-a").await;
    let created = product(&app, &a, simple("Vase", "VASE", 5000, 1)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let png = || photo(image::ImageFormat::Png, 8, 8);

    for sql in [
        "CREATE FUNCTION refuse_image() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'refused for the test'; END $$",
        "CREATE TRIGGER refuse_image BEFORE INSERT ON product_images
             FOR EACH ROW EXECUTE FUNCTION refuse_image()",
    ] {
        sqlx::query(sql).execute(&app.db.pool).await.unwrap();
    }
    let failed = upload_photo(&app, &a, &id, png(), "v.png").await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        stored_photos(&app, &id),
        0,
        "the failed upload's file is gone"
    );
    sqlx::query("DROP TRIGGER refuse_image ON product_images")
        .execute(&app.db.pool)
        .await
        .unwrap();

    for _ in 0..10 {
        json_of(
            upload_photo(&app, &a, &id, png(), "v.png").await,
            StatusCode::CREATED,
        )
        .await;
    }
    let over = upload_photo(&app, &a, &id, png(), "v.png").await;
    assert_eq!(
        fields(&problem(over, StatusCode::CONFLICT).await),
        ["image"]
    );
    assert_eq!(stored_photos(&app, &id), 10);
}
