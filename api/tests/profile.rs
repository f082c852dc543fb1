//! Profile and shop updates, and that nobody changes what is not theirs.

mod common;

use common::{App, fields, problem, signed_in, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::amqp_url;

async fn call(
    app: &App,
    token: &str,
    method: Method,
    path: &str,
    body: Value,
) -> reqwest::Response {
    app.http
        .request(method, format!("{}/api/v1{path}", app.base))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_profile_update_changes_only_what_was_sent() {
    let app = spawn_app(&amqp_url()).await;
    let token = signed_in(&app, None).await;
    let resp = call(
        &app,
        &token,
        Method::PATCH,
        "/me",
        json!({"name": "  Samira "}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let me: Value = resp.json().await.unwrap();
    assert_eq!(me["name"], "Samira");
    let same: Value = call(&app, &token, Method::PATCH, "/me", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(same["name"], "Samira");
    let bad = problem(
        call(&app, &token, Method::PATCH, "/me", json!({"name": ""})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&bad), ["name"]);
    let role = problem(
        call(&app, &token, Method::PATCH, "/me", json!({"role": "admin"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        role.to_string().contains("role"),
        "an unknown field is refused: {role}"
    );
}

#[tokio::test]
async fn a_seller_changes_their_own_shop_and_not_anothers() {
    let app = spawn_app(&amqp_url()).await;
    let owner = signed_in(&app, Some("corner-shop")).await;
    let rival = signed_in(&app, Some("rival-shop")).await;
    let customer = signed_in(&app, None).await;

    let resp = call(
        &app,
        &owner,
        Method::PATCH,
        "/shops/corner-shop",
        json!({"description": "Fresh bread"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["description"],
        "Fresh bread"
    );

    for intruder in [&rival, &customer] {
        let attempt = json!({"name": "Taken over"});
        problem(
            call(&app, intruder, Method::PATCH, "/shops/corner-shop", attempt).await,
            StatusCode::FORBIDDEN,
        )
        .await;
    }
    // The public page shows the shop once an admin has approved it.
    problem(
        app.get("/api/v1/shops/corner-shop").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    sqlx::query("UPDATE shops SET approved_at = now() WHERE slug = 'corner-shop'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let public: Value = app
        .get("/api/v1/shops/corner-shop")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(public["name"], "Shop");
    assert_eq!(public["description"], "Fresh bread");
    problem(
        app.get("/api/v1/shops/no-such-shop").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let bad = json!({"contact_email": "nope"});
    let body = problem(
        call(&app, &owner, Method::PATCH, "/shops/corner-shop", bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["contact_email"]);
}
