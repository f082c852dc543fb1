//! The address book: one default, and no access to another account's addresses.

mod common;

use common::{App, fields, problem, signed_in, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{amqp_url, count};

async fn call(
    app: &App,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = app
        .http
        .request(method, format!("{}/api/v1{path}", app.base))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.unwrap()
}

fn address(city: &str) -> Value {
    json!({"full_name": "Ann Example", "line1": "1 Main St", "city": city, "postal_code": "10115", "country": "DE"})
}

#[tokio::test]
async fn the_first_address_is_the_default_and_there_is_only_ever_one() {
    let app = spawn_app(&amqp_url()).await;
    let ann = signed_in(&app, None).await;
    let first: Value = call(
        &app,
        &ann,
        Method::POST,
        "/me/addresses",
        Some(address("Berlin")),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(first["default"], true);
    let second: Value = call(
        &app,
        &ann,
        Method::POST,
        "/me/addresses",
        Some(address("Hamburg")),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(second["default"], false);

    let path = format!("/me/addresses/{}/default", second["id"].as_str().unwrap());
    let resp = call(&app, &ann, Method::POST, &path, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let book: Vec<Value> = call(&app, &ann, Method::GET, "/me/addresses", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(book.len(), 2);
    assert_eq!(book[0]["city"], "Hamburg", "the default comes first");
    assert_eq!(book.iter().filter(|a| a["default"] == true).count(), 1);

    // Deleting the default hands it to the remaining address.
    let path = format!("/me/addresses/{}", second["id"].as_str().unwrap());
    assert_eq!(
        call(&app, &ann, Method::DELETE, &path, None).await.status(),
        StatusCode::NO_CONTENT
    );
    let book: Vec<Value> = call(&app, &ann, Method::GET, "/me/addresses", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(book.len(), 1);
    assert_eq!(book[0]["default"], true);
}

/// Two tabs making different addresses the default at once: both answer,
/// and exactly one address is the default after every round.
#[tokio::test]
async fn concurrent_default_changes_leave_exactly_one_default() {
    let app = spawn_app(&amqp_url()).await;
    let ann = signed_in(&app, None).await;
    let mut ids = Vec::new();
    for city in ["Berlin", "Hamburg", "Munich"] {
        let made: Value = call(
            &app,
            &ann,
            Method::POST,
            "/me/addresses",
            Some(address(city)),
        )
        .await
        .json()
        .await
        .unwrap();
        ids.push(made["id"].as_str().unwrap().to_string());
    }
    for round in 0..10 {
        let (a, b, gone) = (
            &ids[(round + 1) % 3],
            &ids[(round + 2) % 3],
            &ids[round % 3],
        );
        let set = format!("/me/addresses/{a}/default");
        let edit = format!("/me/addresses/{b}");
        let delete = format!("/me/addresses/{gone}");
        let mut moved = address("Hamburg");
        moved["default"] = json!(true);
        let (one, two, three) = tokio::join!(
            call(&app, &ann, Method::POST, &set, None),
            call(&app, &ann, Method::PUT, &edit, Some(moved)),
            call(&app, &ann, Method::DELETE, &delete, None),
        );
        assert_eq!(one.status(), StatusCode::OK, "round {round}");
        assert_eq!(two.status(), StatusCode::OK, "round {round}");
        assert_eq!(three.status(), StatusCode::NO_CONTENT, "round {round}");
        let defaults = count(
            &app.db.pool,
            "SELECT count(*) FROM addresses WHERE is_default",
        )
        .await;
        assert_eq!(defaults, 1, "round {round}");
        // The deleted one comes back, so the next round has three again.
        let made: Value = call(
            &app,
            &ann,
            Method::POST,
            "/me/addresses",
            Some(address("Köln")),
        )
        .await
        .json()
        .await
        .unwrap();
        ids[round % 3] = made["id"].as_str().unwrap().to_string();
    }
}

#[tokio::test]
async fn another_customers_address_is_not_found_and_left_untouched() {
    let app = spawn_app(&amqp_url()).await;
    let ann = signed_in(&app, None).await;
    let bob = signed_in(&app, None).await;
    let anns: Value = call(
        &app,
        &ann,
        Method::POST,
        "/me/addresses",
        Some(address("Berlin")),
    )
    .await
    .json()
    .await
    .unwrap();
    let path = format!("/me/addresses/{}", anns["id"].as_str().unwrap());

    for (method, path, body) in [
        (Method::GET, path.clone(), None),
        (Method::PUT, path.clone(), Some(address("Stolen"))),
        (Method::DELETE, path.clone(), None),
        (Method::POST, format!("{path}/default"), None),
    ] {
        let resp = call(&app, &bob, method.clone(), &path, body).await;
        let body = problem(resp, StatusCode::NOT_FOUND).await;
        assert!(
            !body.to_string().contains("Berlin"),
            "{method} leaked: {body}"
        );
    }
    let bobs: Vec<Value> = call(&app, &bob, Method::GET, "/me/addresses", None)
        .await
        .json()
        .await
        .unwrap();
    assert!(bobs.is_empty());
    let still: Value = call(&app, &ann, Method::GET, &path, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(still["city"], "Berlin");
    assert_eq!(still["default"], true);

    problem(
        app.get("/api/v1/me/addresses").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[tokio::test]
async fn an_invalid_address_names_its_fields_and_writes_nothing() {
    let app = spawn_app(&amqp_url()).await;
    let ann = signed_in(&app, None).await;
    let mut bad = address("");
    bad["country"] = json!("Germany");
    let body = problem(
        call(&app, &ann, Method::POST, "/me/addresses", Some(bad)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["city", "country"]);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM addresses").await,
        0
    );
}
