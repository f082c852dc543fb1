//! The HTTP API against real PostgreSQL and RabbitMQ, and end to end through
//! the relay and the mailer to the SMTP sink.

use std::{net::SocketAddr, time::Duration};

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use souk_api::{broker::BrokerProbe, router, state::AppState};
use souk_shared::{telemetry, topology::Names};
use souk_testkit::{
    TestDb, amqp_url, broker, count,
    mail::{mails_to, smtp_port, unique_address},
    proxy::Proxy,
    unique_prefix, wait_until,
};
use souk_workers::{
    mailer::{Mailer, MailerConfig},
    ops::Readiness,
    relay::{self, RelaySettings},
    runtime::{self, ConsumerSettings},
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct App {
    base: String,
    db: TestDb,
    http: Client,
}

/// Starts the API on a free port against a fresh database.
async fn spawn_app(amqp: &str) -> App {
    let db = TestDb::new().await;
    let state = AppState {
        pool: db.pool.clone(),
        broker: BrokerProbe::new(amqp, "souk-api-test"),
        metrics: telemetry::metrics_handle(),
        outbox: souk_shared::outbox::Waker::spawn(db.pool.clone()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router(state, 64 * 1024))
            .await
            .unwrap()
    });
    App {
        base: format!("http://{addr}"),
        db,
        http: Client::new(),
    }
}

impl App {
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }
    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }
    async fn written(&self) -> (i64, i64) {
        (
            count(&self.db.pool, "SELECT count(*) FROM support_requests").await,
            count(&self.db.pool, "SELECT count(*) FROM outbox").await,
        )
    }
}

fn request(email: &str) -> Value {
    json!({"email": email, "name": "Ann", "subject": "Late parcel", "message": "Where is my order?"})
}

async fn problem(resp: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    body
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
        app.written().await,
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
    let prefix = unique_prefix();
    let names = Names::new(&prefix);
    let shutdown = CancellationToken::new();
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap(), false).await;

    let relay = tokio::spawn(relay::run(
        app.db.pool.clone(),
        RelaySettings {
            amqp_url: proxy.amqp_url(),
            names: names.clone(),
            batch_size: 100,
            poll_interval: Duration::from_secs(2),
            retention_hours: 24,
            connection_name: format!("{prefix}.relay@test"),
        },
        Readiness::default(),
        shutdown.clone(),
    ));
    let mailer_config = MailerConfig {
        smtp_host: "127.0.0.1".into(),
        smtp_port: smtp_port(),
        smtp_username: None,
        smtp_password: None,
        from: "Souk <no-reply@souk.test>".parse().unwrap(),
        timeout: Duration::from_secs(5),
        lease: Duration::from_secs(30),
    };
    let delays = vec![200, 1000];
    let mailer = tokio::spawn(runtime::run(
        Mailer::new(&mailer_config),
        app.db.pool.clone(),
        ConsumerSettings {
            amqp_url: amqp_url(),
            names: names.clone(),
            prefetch: 8,
            concurrency: 4,
            batch: 8,
            retry_delays_ms: delays.clone(),
            connection_name: format!("{prefix}.mailer@test"),
            processed_retention: Duration::from_secs(3600),
        },
        Readiness::default(),
        shutdown.clone(),
    ));

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

    shutdown.cancel();
    let _ = tokio::time::timeout(WAIT, relay).await;
    let _ = tokio::time::timeout(WAIT, mailer).await;
    let conn = souk_shared::amqp::connect(&amqp_url(), "cleanup")
        .await
        .unwrap();
    broker::delete_group(&conn, &names, "mailer", &delays).await;
}

#[test]
fn the_api_refuses_to_start_with_a_bad_setting_and_names_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_souk-api"))
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        .env("HTTP_ADDR", "everywhere")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .trim()
            .starts_with("error: invalid configuration: HTTP_ADDR:"),
        "{stderr}"
    );
}
