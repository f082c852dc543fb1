//! Admin endpoints: only admins, every action audited, suspension bites at once.

mod common;

use common::{App, admin, fields, problem, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{amqp_url, count, mail::unique_address};

const PASSWORD: &str = "correct horse battery";

async fn sign_in(app: &App, email: &str) -> reqwest::Response {
    app.post(
        "/api/v1/auth/sign-in",
        &json!({"email": email, "password": PASSWORD}),
    )
    .await
}

async fn token(app: &App, email: &str) -> String {
    let s: Value = sign_in(app, email).await.json().await.unwrap();
    s["access_token"].as_str().expect("signed in").to_string()
}

/// A customer: (id, email).
async fn customer(app: &App) -> (String, String) {
    let email = unique_address();
    let resp = app
        .post(
            "/api/v1/auth/register",
            &json!({"email": email, "password": PASSWORD, "name": "C"}),
        )
        .await;
    let account: Value = resp.json().await.unwrap();
    (account["id"].as_str().unwrap().to_string(), email)
}

async fn call(
    app: &App,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Value,
) -> reqwest::Response {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.base))
        .json(&body);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

/// An admin's action at `path` (suspend, unsuspend), giving `reason`.
async fn act(app: &App, admin: &str, path: &str, reason: &str) -> reqwest::Response {
    call(
        app,
        Some(admin),
        Method::POST,
        path,
        json!({"reason": reason}),
    )
    .await
}

/// How many entries the audit log has.
async fn audited(app: &App) -> i64 {
    count(&app.db.pool, "SELECT count(*) FROM audit_log").await
}

#[tokio::test]
async fn every_admin_route_refuses_non_admins() {
    let app = spawn_app(&amqp_url()).await;
    let (victim, email) = customer(&app).await;
    let customer_token = token(&app, &email).await;

    // Every admin operation in the generated route table.
    let doc = souk_api::app::openapi();
    let mut checked = 0;
    for (path, item) in doc
        .paths
        .paths
        .iter()
        .filter(|(p, _)| p.starts_with("/api/v1/admin/"))
    {
        let path = path.replace("{id}", &victim);
        for (method, present) in [
            (Method::GET, item.get.is_some()),
            (Method::POST, item.post.is_some()),
            (Method::PUT, item.put.is_some()),
            (Method::PATCH, item.patch.is_some()),
            (Method::DELETE, item.delete.is_some()),
        ] {
            if !present {
                continue;
            }
            let body = json!({"reason": "test"});
            problem(
                call(
                    &app,
                    Some(&customer_token),
                    method.clone(),
                    &path,
                    body.clone(),
                )
                .await,
                StatusCode::FORBIDDEN,
            )
            .await;
            problem(
                call(&app, None, method, &path, body).await,
                StatusCode::UNAUTHORIZED,
            )
            .await;
            checked += 1;
        }
    }
    assert!(checked >= 2, "found the admin routes ({checked})");
    assert_eq!(audited(&app).await, 0);
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM users WHERE suspended_at IS NOT NULL"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_suspension_ends_access_at_once_is_audited_and_can_be_lifted() {
    let app = spawn_app(&amqp_url()).await;
    let admin_token = token(&app, &admin(&app).await).await;
    let (victim, email) = customer(&app).await;
    let victim_session: Value = sign_in(&app, &email).await.json().await.unwrap();
    let victim_token = victim_session["access_token"].as_str().unwrap();
    let suspend = format!("/api/v1/admin/users/{victim}/suspend");

    let no_reason = problem(
        act(&app, &admin_token, &suspend, " ").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&no_reason), ["reason"]);
    let unknown = format!("/api/v1/admin/users/{}/suspend", uuid::Uuid::now_v7());
    problem(
        act(&app, &admin_token, &unknown, "x").await,
        StatusCode::NOT_FOUND,
    )
    .await;

    let resp = act(&app, &admin_token, &suspend, "chargebacks").await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    problem(
        app.get_with_token("/api/v1/me", victim_token).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    problem(sign_in(&app, &email).await, StatusCode::UNAUTHORIZED).await;
    let refresh = app
        .post(
            "/api/v1/auth/refresh",
            &json!({"refresh_token": victim_session["refresh_token"]}),
        )
        .await;
    problem(refresh, StatusCode::UNAUTHORIZED).await;

    let (action, reason, target): (String, String, String) =
        sqlx::query_as("SELECT action, reason, target_id::text FROM audit_log")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        (action.as_str(), reason.as_str(), target.as_str()),
        ("user.suspend", "chargebacks", victim.as_str())
    );

    let lift = format!("/api/v1/admin/users/{victim}/unsuspend");
    let resp = act(&app, &admin_token, &lift, "resolved").await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(sign_in(&app, &email).await.status(), StatusCode::OK);
    assert_eq!(audited(&app).await, 2);
    // Lifting it again: nothing to lift, and no entry saying there was.
    let again = act(&app, &admin_token, &lift, "resolved").await;
    problem(again, StatusCode::CONFLICT).await;
    assert_eq!(audited(&app).await, 2);
}

#[tokio::test]
async fn an_admin_cannot_suspend_themselves() {
    let app = spawn_app(&amqp_url()).await;
    let email = admin(&app).await;
    let admin_token = token(&app, &email).await;
    let me: Value = app
        .get_with_token("/api/v1/me", &admin_token)
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/api/v1/admin/users/{}/suspend", me["id"].as_str().unwrap());
    let body = problem(
        act(&app, &admin_token, &path, "oops").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["id"]);
}
