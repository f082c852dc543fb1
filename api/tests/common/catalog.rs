//! Catalog helpers: sellers with products, a searchable shelf, cart calls.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{App, admin, token_for, verified_seller};

pub async fn call(
    app: &App,
    token: &str,
    method: Method,
    path: &str,
    body: Value,
) -> reqwest::Response {
    let req = app
        .http
        .request(method.clone(), format!("{}/api/v1{path}", app.base))
        .bearer_auth(token);
    let req = if method == Method::GET {
        req
    } else {
        req.json(&body)
    };
    req.send().await.unwrap()
}

pub async fn json_of(resp: reqwest::Response, status: StatusCode) -> Value {
    let got = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

/// Creates a product with one variant per (sku, price, stock) and returns it.
pub async fn product(app: &App, token: &str, body: Value) -> Value {
    let resp = call(app, token, Method::POST, "/seller/products", body).await;
    json_of(resp, StatusCode::CREATED).await
}

pub fn simple(title: &str, sku: &str, price: i64, stock: i32) -> Value {
    json!({"title": title, "variants": [{"sku": sku, "price_minor": price, "on_hand": stock}]})
}

pub async fn publish(app: &App, token: &str, id: &str) {
    let resp = call(
        app,
        token,
        Method::PATCH,
        &format!("/seller/products/{id}"),
        json!({"status": "active"}),
    )
    .await;
    json_of(resp, StatusCode::OK).await;
}

pub async fn storefront(app: &App, path: &str) -> Value {
    json_of(app.get(&format!("/api/v1{path}")).await, StatusCode::OK).await
}

pub fn titles(page: &Value) -> Vec<&str> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect()
}

/// Two shops, a category tree and five products to search.
pub async fn shelf(app: &App) -> (String, String, Value) {
    let root = admin(app).await;
    let root = token_for(app, &root).await;
    for (name, slug, parent) in [("Home", "home", None), ("Kitchen", "kitchen", Some("home"))] {
        let body = json!({"name": name, "slug": slug, "parent": parent, "reason": "new range"});
        json_of(
            call(app, &root, Method::POST, "/admin/categories", body).await,
            StatusCode::CREATED,
        )
        .await;
    }
    let a = verified_seller(app, "shop-a").await;
    let b = verified_seller(app, "shop-b").await;
    let mut ids = serde_json::Map::new();
    for (seller, title, description, tags, category, price, stock) in [
        (
            &a,
            "Walnut cutting board",
            "End grain, oiled",
            vec!["kitchen", "wood"],
            "kitchen",
            4500,
            3,
        ),
        (
            &b,
            "Olive wood spoon set",
            "Three hand carved spoons",
            vec!["kitchen"],
            "kitchen",
            1500,
            10,
        ),
        (
            &a,
            "Wool blanket",
            "Warm; pairs well with a wood stove",
            vec!["bedroom"],
            "home",
            9000,
            0,
        ),
        (
            &b,
            "Ceramic teapot",
            "Glazed stoneware",
            vec!["tea"],
            "kitchen",
            3500,
            2,
        ),
        (
            &a,
            "Draft wood lamp",
            "Never published",
            vec!["wood"],
            "home",
            100,
            1,
        ),
    ] {
        let body = json!({"title": title, "description": description, "tags": tags, "category": category,
                          "variants": [{"sku": title.replace(' ', "-"), "price_minor": price, "on_hand": stock}]});
        let created = product(app, seller, body).await;
        let id = created["id"].as_str().unwrap().to_string();
        if !title.starts_with("Draft") {
            publish(app, seller, &id).await;
        }
        ids.insert(title.into(), json!(id));
    }
    (root, a, Value::Object(ids))
}

pub async fn add(app: &App, token: &str, variant: &str, quantity: i32) -> reqwest::Response {
    let body = json!({"variant_id": variant, "quantity": quantity});
    call(app, token, Method::POST, "/cart/items", body).await
}
