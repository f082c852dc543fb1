//! The HTTP API against real PostgreSQL and RabbitMQ, and end to end through
//! the relay and the mailer to the SMTP sink.

mod common;

use std::time::Duration;

use common::{App, Pipeline, WAIT, problem, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};
use souk_testkit::{
    amqp_url, count,
    mail::{mails_to, unique_address},
    proxy::Proxy,
    wait_until,
};

async fn written(app: &App) -> (i64, i64) {
    (
        count(&app.db.pool, "SELECT count(*) FROM support_requests").await,
        count(&app.db.pool, "SELECT count(*) FROM outbox").await,
    )
}

fn request(email: &str) -> Value {
    json!({"email": email, "name": "Ann", "subject": "Late parcel", "message": "Where is my order?"})
}

#[tokio::test]
async fn readiness_reports_the_database_and_the_broker() {
    let app = spawn_app(&amqp_url()).await;
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), 200);
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"database": true, "broker": true})
    );

    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap(), false).await;
    let cut_off = spawn_app(&proxy.amqp_url()).await;
    let ready = cut_off.get("/health/ready").await;
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"database": true, "broker": false})
    );
}

#[tokio::test]
async fn invalid_input_is_a_problem_naming_the_field_and_writes_nothing() {
    let app = spawn_app(&amqp_url()).await;

    let mut bad = request("not-an-email");
    bad["subject"] = json!("   ");
    let body = problem(
        app.post("/api/v1/support-requests", &bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body["type"], "/problems/validation");
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "subject"]);

    let body = problem(
        app.post(
            "/api/v1/support-requests",
            &json!({"email": "a@b.co", "name": 5}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "name", "{body}");

    let mut extra = request("a@b.co");
    extra["price"] = json!(1);
    let body = problem(
        app.post("/api/v1/support-requests", &extra).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("price"),
        "{body}"
    );

    let resp = app
        .http
        .post(format!("{}/api/v1/support-requests", app.base))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::BAD_REQUEST).await;

    let resp = app
        .http
        .post(format!("{}/api/v1/support-requests", app.base))
        .body("email=a@b.co")
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    let mut huge = request("a@b.co");
    huge["message"] = json!("x".repeat(100 * 1024));
    problem(
        app.post("/api/v1/support-requests", &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;

    let body = problem(app.get("/api/v1/nothing-here").await, StatusCode::NOT_FOUND).await;
    assert_eq!(body["type"], "/problems/not-found");

    assert_eq!(
        written(&app).await,
        (0, 0),
        "nothing half-written stays behind"
    );
}

#[tokio::test]
async fn the_request_id_is_echoed_and_carried_into_the_message_it_causes() {
    let app = spawn_app(&amqp_url()).await;
    let resp = app
        .http
        .post(format!("{}/api/v1/support-requests", app.base))
        .header("x-request-id", "req-abc-123")
        .json(&request(&unique_address()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["x-request-id"], "req-abc-123");
    let created: Value = resp.json().await.unwrap();

    let (corr, envelope_corr, kind): (String, String, String) = sqlx::query_as(
        "SELECT o.correlation_id, o.envelope->>'correlation_id', o.envelope->>'type' FROM outbox o",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (corr.as_str(), envelope_corr.as_str(), kind.as_str()),
        ("req-abc-123", "req-abc-123", "notify.email")
    );
    let stored: String =
        sqlx::query_scalar("SELECT correlation_id FROM support_requests WHERE id = $1::uuid")
            .bind(created["id"].as_str().unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(stored, "req-abc-123");

    // Without one, the API makes one and still echoes it.
    let resp = app
        .post("/api/v1/support-requests", &request(&unique_address()))
        .await;
    let made = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&made).is_ok(), "{made}");
}

#[tokio::test]
async fn openapi_docs_and_metrics_are_served() {
    let app = spawn_app(&amqp_url()).await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert!(doc["paths"]["/api/v1/support-requests"]["post"].is_object());
    assert!(doc["paths"]["/health/ready"]["get"].is_object());
    assert!(doc["components"]["schemas"]["Problem"].is_object());

    let docs = app.get("/docs").await;
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(
        html.contains("<html") && html.contains("Souk API"),
        "{html}"
    );

    app.get("/health/live").await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("souk_http_requests_total"), "{metrics}");
}

#[tokio::test]
async fn writes_succeed_while_the_broker_is_down_and_every_mail_goes_out_once_it_is_back() {
    let app = spawn_app(&amqp_url()).await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap(), false).await;
    let pipeline = Pipeline::start(&app, &proxy.amqp_url());

    let customers: Vec<String> = (0..6).map(|_| unique_address()).collect();
    for c in &customers {
        let resp = app.post("/api/v1/support-requests", &request(c)).await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "writes succeed with the broker down"
        );
    }
    let waiting = "SELECT count(*) FROM outbox WHERE published_at IS NULL";
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(count(&app.db.pool, waiting).await, 6, "the outbox grows");

    proxy.set_up(true);
    for c in &customers {
        wait_until("each customer's mail", WAIT, || async {
            !mails_to(c).await.is_empty()
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for c in &customers {
        let mails = mails_to(c).await;
        assert_eq!(mails.len(), 1, "exactly one mail to {c}");
        assert_eq!(mails[0].subject, "We received your request: Late parcel");
    }
    assert_eq!(count(&app.db.pool, waiting).await, 0);

    pipeline.stop().await;
}

#[test]
fn the_api_refuses_to_start_with_a_bad_setting_and_names_it() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("HTTP_ADDR", "everywhere"),
                ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ],
            "HTTP_ADDR",
        ),
        (&[], "JWT_SECRET"),
        (&[("JWT_SECRET", "too-short")], "JWT_SECRET"),
        (
            &[("JWT_SECRET", "0123456789abcdef0123456789abcdef")],
            "STRIPE_WEBHOOK_SECRET",
        ),
        (
            &[
                ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef"),
                ("CURRENCY", "EURO"),
            ],
            "CURRENCY",
        ),
        (
            &[
                ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef"),
                ("PAYOUT_DETAILS_KEY", "too-short"),
            ],
            "PAYOUT_DETAILS_KEY",
        ),
    ];
    for (vars, named) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_souk-api"))
            .current_dir(std::env::temp_dir())
            .env_clear()
            .env(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            )
            .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr
                .trim()
                .starts_with(&format!("error: invalid configuration: {named}:")),
            "{stderr}"
        );
    }
}

/// A malformed id in the URL is a problem naming the parameter (by its name
/// in the route, for routes with several), never axum's plain-text 400.
#[tokio::test]
async fn a_malformed_id_in_the_path_is_a_problem_naming_the_parameter() {
    let app = spawn_app(&amqp_url()).await;
    let customer = common::signed_in(&app, None).await;
    let seller = common::verified_seller(&app, "shop-a").await;
    let id = uuid::Uuid::now_v7();
    let cases = [
        (
            reqwest::Method::GET,
            "/api/v1/orders/nope".to_string(),
            &customer,
            "id",
        ),
        (
            reqwest::Method::DELETE,
            format!("/api/v1/seller/products/nope/images/{id}"),
            &seller,
            "id",
        ),
        (
            reqwest::Method::DELETE,
            format!("/api/v1/seller/products/{id}/images/nope"),
            &seller,
            "image",
        ),
    ];
    for (method, path, token, field) in cases {
        let resp = app
            .http
            .request(method, format!("{}{path}", app.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(body["errors"][0]["field"], field, "{path}: {body}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("nope"),
            "{body}"
        );
    }
}

/// PostgreSQL keeps no NUL in text: one in a body field or a query
/// parameter is refused naming it, not a 500 from the write.
#[tokio::test]
async fn a_nul_character_is_refused_naming_its_field() {
    let app = spawn_app(&amqp_url()).await;
    let mut bad = request("ann@example.com");
    bad["message"] = json!("where is\u{0}my order?");
    let body = problem(
        app.post("/api/v1/support-requests", &bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "message", "{body}");
    assert_eq!(written(&app).await, (0, 0));
    let body = problem(
        app.get("/api/v1/products?q=oak%00").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "q", "{body}");
    // And in a path parameter (a slug), public or not.
    let body = problem(
        app.get("/api/v1/shops/a%00b").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body["errors"][0]["field"], "slug", "{body}");
}
