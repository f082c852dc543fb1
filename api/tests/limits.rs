//! Abuse limits: 429 with Retry-After, counted in Redis; a growing lock
//! after failed sign-ins, per client and (later) per account, that bursts
//! cannot slip past and a password reset lifts; and sign-in still works
//! when Redis is down.

mod common;

use std::time::Duration;

use common::{App, Pipeline, WAIT, loose_limits, problem, redis_url, spawn_app_with};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use souk_api::{
    client_ip::TrustedProxies,
    ratelimit::{Limit, Limits},
};
use souk_testkit::{
    amqp_url, count, free_port,
    mail::{mails_to, unique_address},
    wait_until,
};

const PASSWORD: &str = "correct horse battery";

fn limit(max: u32) -> Limit {
    Limit {
        max,
        window: Duration::from_secs(3600),
    }
}

async fn register(app: &App, email: &str) -> reqwest::Response {
    app.post(
        "/api/v1/auth/register",
        &json!({"email": email, "password": PASSWORD, "name": "A"}),
    )
    .await
}

async fn sign_in(app: &App, email: &str, password: &str) -> reqwest::Response {
    app.post(
        "/api/v1/auth/sign-in",
        &json!({"email": email, "password": password}),
    )
    .await
}

/// An app with `limits`, and one registered account's email.
async fn registered(limits: Limits) -> (App, String) {
    let app = spawn_app_with(&amqp_url(), &redis_url(), limits).await;
    let email = unique_address();
    register(&app, &email).await;
    (app, email)
}

fn retry_after(resp: &reqwest::Response) -> u64 {
    resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn failed_sign_ins_lock_the_account_for_a_growing_time() {
    let (app, email) = registered(Limits {
        failures_before_lock: 3,
        ..loose_limits()
    })
    .await;

    for _ in 0..3 {
        problem(
            sign_in(&app, &email, "wrong password").await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
    }
    // Locked for 1 s, even with the right password.
    let locked = sign_in(&app, &email, PASSWORD).await;
    assert_eq!(retry_after(&locked), 1);
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    problem(
        sign_in(&app, &email, "wrong again").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let locked = sign_in(&app, &email, PASSWORD).await;
    assert_eq!(retry_after(&locked), 2, "the lock doubles");
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        sign_in(&app, &email, PASSWORD).await.status(),
        StatusCode::OK
    );
    // Success forgets the failures.
    problem(
        sign_in(&app, &email, "wrong").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(
        sign_in(&app, &email, PASSWORD).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn registrations_and_reset_requests_are_limited_and_the_refused_ones_write_nothing() {
    let limits = Limits {
        register_per_ip: limit(2),
        forgot_per_email: limit(1),
        ..loose_limits()
    };
    let app = spawn_app_with(&amqp_url(), &redis_url(), limits).await;
    let first = unique_address();
    assert_eq!(register(&app, &first).await.status(), StatusCode::CREATED);
    assert_eq!(
        register(&app, &unique_address()).await.status(),
        StatusCode::CREATED
    );
    let refused = register(&app, &unique_address()).await;
    assert!(retry_after(&refused) > 0);
    problem(refused, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM users").await, 2);

    let body = json!({"email": first});
    let forgot = || app.post("/api/v1/auth/forgot-password", &body);
    assert_eq!(forgot().await.status(), StatusCode::ACCEPTED);
    problem(forgot().await, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM user_tokens WHERE purpose = 'reset_password'"
        )
        .await,
        1
    );
}

/// The public contact form mails the address it is given: it is budgeted
/// per address and per client, and a refused request writes nothing.
#[tokio::test]
async fn the_contact_form_cannot_mail_an_address_or_from_a_client_without_limit() {
    let limits = Limits {
        support_per_email: limit(1),
        support_per_ip: limit(3),
        ..loose_limits()
    };
    let app = spawn_app_with(&amqp_url(), &redis_url(), limits).await;
    let app = &app;
    let write = |email: String| async move {
        let body = json!({"email": email, "name": "Ann", "subject": "Hello", "message": "Where is my order?"});
        app.post("/api/v1/support-requests", &body).await
    };
    let victim = unique_address();
    assert_eq!(write(victim.clone()).await.status(), StatusCode::CREATED);
    // The same address again, however it is spelt: refused.
    let again = write(victim.to_uppercase()).await;
    assert!(retry_after(&again) > 0);
    problem(again, StatusCode::TOO_MANY_REQUESTS).await;
    // Another address from this client: once more, then the client's budget is spent.
    assert_eq!(write(unique_address()).await.status(), StatusCode::CREATED);
    problem(write(unique_address()).await, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM support_requests").await,
        2
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM outbox WHERE routing_key = 'notify.email'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_verification_link_can_be_resent_a_limited_number_of_times() {
    let app = spawn_app_with(
        &amqp_url(),
        &redis_url(),
        Limits {
            resend_per_account: limit(1),
            ..loose_limits()
        },
    )
    .await;
    let email = unique_address();
    register(&app, &email).await;
    let session: Value = sign_in(&app, &email, PASSWORD).await.json().await.unwrap();
    let token = session["access_token"].as_str().unwrap();
    let resend = || {
        app.http
            .post(format!("{}/api/v1/auth/resend-verification", app.base))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(resend().await.unwrap().status(), StatusCode::ACCEPTED);
    problem(resend().await.unwrap(), StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM user_tokens WHERE purpose = 'verify_email'"
        )
        .await,
        2
    );

    sqlx::query("UPDATE users SET email_verified_at = now()")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let done = problem(resend().await.unwrap(), StatusCode::CONFLICT).await;
    assert_eq!(done["errors"][0]["field"], "email");
}

#[tokio::test]
async fn with_redis_down_the_limits_step_aside_rather_than_lock_everyone_out() {
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let strict = Limits {
        register_per_ip: limit(0),
        sign_in_per_ip: limit(0),
        failures_before_lock: 1,
        failures_before_account_lock: 1,
        ..loose_limits()
    };
    let app = spawn_app_with(&amqp_url(), &nowhere, strict).await;
    let email = unique_address();
    assert_eq!(register(&app, &email).await.status(), StatusCode::CREATED);
    // The lockout steps aside too: a wrong password is just wrong.
    problem(
        sign_in(&app, &email, "wrong password").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(
        sign_in(&app, &email, PASSWORD).await.status(),
        StatusCode::OK
    );
}

/// Signs in as if from `forwarded_for`, through the proxy that forwarded it.
async fn sign_in_from(
    app: &App,
    forwarded_for: &str,
    email: &str,
    password: &str,
) -> reqwest::Response {
    app.http
        .post(format!("{}/api/v1/auth/sign-in", app.base))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

/// Signs in (with a wrong password) as if from `client`, through the proxy
/// that forwarded it.
async fn sign_in_via(app: &App, forwarded_for: &str) -> StatusCode {
    sign_in_from(app, forwarded_for, &unique_address(), "wrong password")
        .await
        .status()
}

/// The test client connects from 127.0.0.1, made the trusted "load
/// balancer", so each request can name its own client.
fn behind_proxy(limits: Limits) -> Limits {
    Limits {
        trusted_proxies: TrustedProxies(vec!["127.0.0.0/8".parse().unwrap()]),
        ..limits
    }
}

/// An app behind the test's proxy locking a client out of an account after
/// `per_client` failed sign-ins and the account after `per_account`, and
/// one registered account's email.
async fn registered_behind_proxy(per_client: u32, per_account: u32) -> (App, String) {
    registered(behind_proxy(Limits {
        failures_before_lock: per_client,
        failures_before_account_lock: per_account,
        ..loose_limits()
    }))
    .await
}

#[tokio::test]
async fn a_stranger_guessing_locks_out_the_stranger_and_not_the_owner() {
    let (app, email) = registered_behind_proxy(3, 20).await;
    let stranger = "198.51.100.66";
    for _ in 0..3 {
        let guess = sign_in_from(&app, stranger, &email, "a guess").await;
        problem(guess, StatusCode::UNAUTHORIZED).await;
    }
    // The stranger is locked out, even with the right password…
    let locked = sign_in_from(&app, stranger, &email, PASSWORD).await;
    assert_eq!(retry_after(&locked), 1);
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;
    // …however the email is spelt…
    let locked = sign_in_from(&app, stranger, &email.to_uppercase(), PASSWORD).await;
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;
    // …while the owner, elsewhere, signs in.
    let owner = sign_in_from(&app, "203.0.113.5", &email, PASSWORD).await;
    assert_eq!(owner.status(), StatusCode::OK);
    // And the owner's success lifts nothing of the stranger's lock.
    let still = sign_in_from(&app, stranger, &email, PASSWORD).await;
    problem(still, StatusCode::TOO_MANY_REQUESTS).await;
}

#[tokio::test]
async fn guesses_spread_over_many_clients_lock_the_account_for_everyone() {
    let (app, email) = registered_behind_proxy(3, 5).await;
    // Two guesses from each client: none reaches its own lock.
    for i in 0..5 {
        let client = format!("198.51.100.{}", 10 + i / 2);
        let guess = sign_in_from(&app, &client, &email, "a guess").await;
        problem(guess, StatusCode::UNAUTHORIZED).await;
    }
    // But together they lock the account, for the owner too…
    let owner = "203.0.113.5";
    let locked = sign_in_from(&app, owner, &email, PASSWORD).await;
    assert_eq!(retry_after(&locked), 1);
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;
    // …for a doubling time, one guess (from anywhere) per lock.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let guess = sign_in_from(&app, "198.51.100.99", &email, "a guess").await;
    problem(guess, StatusCode::UNAUTHORIZED).await;
    let locked = sign_in_from(&app, owner, &email, PASSWORD).await;
    assert_eq!(retry_after(&locked), 2, "the lock doubles");
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;
    // Once it is over, the owner signs in, and the count starts again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let signed_in = sign_in_from(&app, owner, &email, PASSWORD).await;
    assert_eq!(signed_in.status(), StatusCode::OK);
    let guess = sign_in_from(&app, "198.51.100.100", &email, "a guess").await;
    problem(guess, StatusCode::UNAUTHORIZED).await;
    let signed_in = sign_in_from(&app, owner, &email, PASSWORD).await;
    assert_eq!(signed_in.status(), StatusCode::OK);
}

/// How many of `guesses`, all sent at once, were checked (401) and how
/// many refused unchecked (429); nothing else is an answer.
async fn burst(guesses: Vec<impl Future<Output = reqwest::Response>>) -> (usize, usize) {
    let answers: Vec<StatusCode> = join_all(guesses).await.iter().map(|r| r.status()).collect();
    let checked = answers
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let refused = answers
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(checked + refused, answers.len(), "{answers:?}");
    (checked, refused)
}

#[tokio::test]
async fn a_burst_of_concurrent_guesses_gets_no_more_checked_than_the_threshold_allows() {
    let limits = behind_proxy(Limits {
        failures_before_lock: 3,
        failures_before_account_lock: 5,
        ..loose_limits()
    });
    let app = spawn_app_with(&amqp_url(), &redis_url(), limits).await;

    // From one client: its own threshold holds.
    let email = unique_address();
    register(&app, &email).await;
    let guesses = (0..20)
        .map(|i| {
            sign_in_from(
                &app,
                "198.51.100.1",
                &email,
                if i % 2 == 0 { "a" } else { "b" },
            )
        })
        .collect();
    let (checked, refused) = burst(guesses).await;
    assert!((1..=4).contains(&checked), "{checked} guesses were checked");
    assert!(refused >= 16);
    // The lock is a wait, not a ban: the owner there gets in after it.
    let locked = sign_in_from(&app, "198.51.100.1", &email, PASSWORD).await;
    let wait = retry_after(&locked);
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;
    tokio::time::sleep(Duration::from_millis(wait * 1000 + 100)).await;
    let signed_in = sign_in_from(&app, "198.51.100.1", &email, PASSWORD).await;
    assert_eq!(signed_in.status(), StatusCode::OK);

    // From twenty clients at once: the account's threshold holds.
    let email = unique_address();
    register(&app, &email).await;
    let clients: Vec<String> = (0..20).map(|i| format!("198.51.100.{}", 100 + i)).collect();
    let guesses = clients
        .iter()
        .map(|client| sign_in_from(&app, client, &email, "a guess"))
        .collect();
    let (checked, refused) = burst(guesses).await;
    assert!((1..=6).contains(&checked), "{checked} guesses were checked");
    assert!(refused >= 14);
}

/// The token in the link of the password-reset mail to `to`.
async fn mailed_reset_token(to: &str) -> String {
    const SUBJECT: &str = "Reset your Souk password";
    wait_until("the reset mail", WAIT, || async {
        mails_to(to).await.iter().any(|m| m.subject == SUBJECT)
    })
    .await;
    let mails = mails_to(to).await;
    let mail = mails.iter().find(|m| m.subject == SUBJECT).unwrap();
    let link = mail
        .text
        .split_whitespace()
        .find(|w| w.contains("?token="))
        .expect("a link");
    link.split("token=").nth(1).unwrap().to_string()
}

#[tokio::test]
async fn a_password_reset_forgets_the_failed_sign_ins_of_its_account() {
    // The owner's own client reaches both thresholds.
    let limits = Limits {
        failures_before_lock: 3,
        failures_before_account_lock: 3,
        ..loose_limits()
    };
    let app = spawn_app_with(&amqp_url(), &redis_url(), limits).await;
    let pipeline = Pipeline::start(&app, &amqp_url());
    let email = unique_address();
    register(&app, &email).await;
    let forgot = app
        .post("/api/v1/auth/forgot-password", &json!({"email": email}))
        .await;
    assert_eq!(forgot.status(), StatusCode::ACCEPTED);
    let token = mailed_reset_token(&email).await;

    for _ in 0..3 {
        problem(
            sign_in(&app, &email, "was it this").await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
    }
    problem(
        sign_in(&app, &email, PASSWORD).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    let new = "a brand new password";
    let reset = app
        .post(
            "/api/v1/auth/reset-password",
            &json!({"token": token, "new_password": new}),
        )
        .await;
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    // Forgotten, not merely expired: a slip now is the first of a new count
    // (remembered, it would be past the threshold and take a lock).
    problem(
        sign_in(&app, &email, "a slip").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(sign_in(&app, &email, new).await.status(), StatusCode::OK);
    pipeline.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    // The test client connects from 127.0.0.1: the "load balancer".
    let app = spawn_app_with(
        &amqp_url(),
        &redis_url(),
        Limits {
            sign_in_per_ip: limit(1),
            trusted_proxies: TrustedProxies(vec!["127.0.0.0/8".parse().unwrap()]),
            ..loose_limits()
        },
    )
    .await;
    assert_eq!(
        sign_in_via(&app, "198.51.100.1").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        sign_in_via(&app, "198.51.100.2").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        sign_in_via(&app, "198.51.100.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A client cannot dodge by prepending an address of its choice.
    assert_eq!(
        sign_in_via(&app, "203.0.113.77, 198.51.100.2").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn from_an_untrusted_peer_x_forwarded_for_is_ignored() {
    let app = spawn_app_with(
        &amqp_url(),
        &redis_url(),
        Limits {
            sign_in_per_ip: limit(1),
            ..loose_limits()
        },
    )
    .await;
    assert_eq!(
        sign_in_via(&app, "198.51.100.1").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        sign_in_via(&app, "198.51.100.2").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

async fn change_password(app: &App, token: &str, current: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/api/v1/me/password", app.base))
        .bearer_auth(token)
        .json(&json!({"current_password": current, "new_password": "a brand new password"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn wrong_current_passwords_lock_password_changes_for_a_growing_time() {
    let (app, email) = registered(Limits {
        failures_before_lock: 2,
        ..loose_limits()
    })
    .await;
    let session: Value = sign_in(&app, &email, PASSWORD).await.json().await.unwrap();
    let token = session["access_token"].as_str().unwrap();

    for _ in 0..2 {
        problem(
            change_password(&app, token, "a guess").await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    // Locked for 1 s, even with the right password.
    let locked = change_password(&app, token, PASSWORD).await;
    assert_eq!(retry_after(&locked), 1);
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;
    // The lock is on changing the password, not on signing in.
    assert_eq!(
        sign_in(&app, &email, PASSWORD).await.status(),
        StatusCode::OK
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    problem(
        change_password(&app, token, "another guess").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let locked = change_password(&app, token, PASSWORD).await;
    assert_eq!(retry_after(&locked), 2, "the lock doubles");
    problem(locked, StatusCode::TOO_MANY_REQUESTS).await;

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        change_password(&app, token, PASSWORD).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn password_resets_are_limited_per_address_and_a_bad_token_is_refused_as_before() {
    let app = spawn_app_with(
        &amqp_url(),
        &redis_url(),
        Limits {
            forgot_per_ip: limit(1),
            ..loose_limits()
        },
    )
    .await;
    let body = json!({"token": "not-a-token-we-mailed", "new_password": "a brand new password"});
    let reset = || app.post("/api/v1/auth/reset-password", &body);
    let refused = problem(reset().await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(refused["errors"][0]["field"], "token");
    assert_eq!(
        refused["errors"][0]["message"],
        "is unknown, used or expired"
    );
    let limited = reset().await;
    assert!(retry_after(&limited) > 0);
    problem(limited, StatusCode::TOO_MANY_REQUESTS).await;
    // Its own budget: asking for a link is counted apart.
    assert_eq!(
        app.post(
            "/api/v1/auth/forgot-password",
            &json!({"email": unique_address()})
        )
        .await
        .status(),
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn starting_single_sign_on_is_limited_per_address() {
    // No provider configured: the limit is met before anything else.
    let app = spawn_app_with(
        &amqp_url(),
        &redis_url(),
        Limits {
            sign_in_per_ip: limit(1),
            ..loose_limits()
        },
    )
    .await;
    let empty = json!({});
    let start = || app.post("/api/v1/auth/oidc/start", &empty);
    problem(start().await, StatusCode::NOT_FOUND).await;
    let limited = start().await;
    assert!(retry_after(&limited) > 0);
    problem(limited, StatusCode::TOO_MANY_REQUESTS).await;
    // Counted apart from password sign-ins from the same address.
    problem(
        sign_in(&app, &unique_address(), PASSWORD).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}
