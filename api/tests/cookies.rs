//! The cookie form of sign-in: HttpOnly cookies, and CSRF protection for
//! every cookie-authenticated change.

mod common;

use std::collections::HashMap;

use common::{App, problem, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{amqp_url, mail::unique_address};

const PASSWORD: &str = "correct horse battery";

/// The cookies a response sets: name -> (value, attributes).
fn set_cookies(resp: &reqwest::Response) -> HashMap<String, (String, String)> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=').unwrap();
            (name.to_string(), (value.to_string(), attrs.to_string()))
        })
        .collect()
}

async fn send(
    app: &App,
    method: Method,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    body: Value,
) -> reqwest::Response {
    let mut req = app
        .http
        .request(method, format!("{}/api/v1{path}", app.base))
        .header("cookie", cookie)
        .json(&body);
    if let Some(csrf) = csrf {
        req = req.header("x-csrf-token", csrf);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn cookie_sessions_are_http_only_and_every_change_needs_the_csrf_token() {
    let app = spawn_app(&amqp_url()).await;
    let email = unique_address();
    app.post(
        "/api/v1/auth/register",
        &json!({"email": email, "password": PASSWORD, "name": "Ann"}),
    )
    .await;

    let resp = app
        .post(
            "/api/v1/auth/sign-in",
            &json!({"email": email, "password": PASSWORD, "use_cookies": true}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cookies = set_cookies(&resp);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body.get("access_token").is_none() && body.get("refresh_token").is_none(),
        "{body}"
    );
    assert_eq!(body["token_type"], "cookie");
    let (access, access_attrs) = &cookies["souk_access"];
    let (refresh, refresh_attrs) = &cookies["souk_refresh"];
    let (csrf, csrf_attrs) = &cookies["souk_csrf"];
    for attrs in [access_attrs, refresh_attrs] {
        assert!(
            attrs.contains("HttpOnly")
                && attrs.contains("Secure")
                && attrs.contains("SameSite=Lax"),
            "{attrs}"
        );
    }
    assert!(refresh_attrs.contains("Path=/api/v1/auth"));
    assert!(
        !csrf_attrs.contains("HttpOnly"),
        "the page must be able to read the CSRF cookie"
    );

    let jar = format!("souk_access={access}; souk_refresh={refresh}; souk_csrf={csrf}");
    // Reads need no CSRF token.
    let me = send(&app, Method::GET, "/me", &jar, None, json!({})).await;
    assert_eq!(me.status(), StatusCode::OK);
    // Changes do: missing or wrong is 403, and nothing changes.
    let rename = json!({"name": "Mallory"});
    problem(
        send(&app, Method::PATCH, "/me", &jar, None, rename.clone()).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    problem(
        send(
            &app,
            Method::PATCH,
            "/me",
            &jar,
            Some("guess"),
            rename.clone(),
        )
        .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let me: Value = send(&app, Method::GET, "/me", &jar, None, json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["name"], "Ann");
    let ok = send(
        &app,
        Method::PATCH,
        "/me",
        &jar,
        Some(csrf),
        json!({"name": "Anna"}),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);

    // Refresh from the cookie (CSRF checked too) sets new cookies.
    problem(
        send(&app, Method::POST, "/auth/refresh", &jar, None, json!({})).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let rotated = send(
        &app,
        Method::POST,
        "/auth/refresh",
        &jar,
        Some(csrf),
        json!({}),
    )
    .await;
    assert_eq!(rotated.status(), StatusCode::OK);
    let fresh = set_cookies(&rotated);
    assert_ne!(&fresh["souk_refresh"].0, refresh);
    // The old refresh cookie again at once, the new one unused (another tab
    // of the browser refreshing too): within the grace, a new pair as well.
    // Replays that are theft are in `auth.rs`.
    let again = send(
        &app,
        Method::POST,
        "/auth/refresh",
        &jar,
        Some(csrf),
        json!({}),
    )
    .await;
    assert_eq!(again.status(), StatusCode::OK);

    // Sign-out clears the cookies.
    let jar = format!(
        "souk_refresh={}; souk_csrf={}",
        fresh["souk_refresh"].0, fresh["souk_csrf"].0
    );
    let out = send(
        &app,
        Method::POST,
        "/auth/sign-out",
        &jar,
        Some(&fresh["souk_csrf"].0),
        json!({}),
    )
    .await;
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    let cleared = set_cookies(&out);
    assert!(
        cleared
            .values()
            .all(|(v, attrs)| v.is_empty() && attrs.contains("Max-Age=0")),
        "{cleared:?}"
    );
}
