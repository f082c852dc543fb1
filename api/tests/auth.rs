//! Registration, email verification through the real mailer and SMTP sink,
//! sign-in, refresh-token rotation and reuse, and token checks.

mod common;

use common::{App, Pipeline, WAIT, fields, problem, spawn_app};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use souk_testkit::{
    amqp_url, count,
    mail::{mails_to, unique_address},
    wait_until,
};

const PASSWORD: &str = "correct horse battery";

fn customer(email: &str) -> Value {
    json!({"email": email, "password": PASSWORD, "name": "Ann"})
}

async fn sign_in(app: &App, email: &str, password: &str) -> reqwest::Response {
    app.post(
        "/api/v1/auth/sign-in",
        &json!({"email": email, "password": password}),
    )
    .await
}

async fn session(app: &App, email: &str) -> Value {
    let resp = sign_in(app, email, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

async fn verify(app: &App, token: &str) -> reqwest::Response {
    app.post("/api/v1/auth/verify-email", &json!({"token": token}))
        .await
}

async fn refresh(app: &App, token: &Value) -> reqwest::Response {
    app.post("/api/v1/auth/refresh", &json!({"refresh_token": token}))
        .await
}

async fn registered(app: &App) -> String {
    let email = unique_address();
    assert_eq!(
        app.post("/api/v1/auth/register", &customer(&email))
            .await
            .status(),
        StatusCode::CREATED
    );
    email
}

#[tokio::test]
async fn a_customer_registers_verifies_through_the_mailed_link_and_signs_in() {
    let app = spawn_app(&amqp_url()).await;
    let pipeline = Pipeline::start(&app, &amqp_url());
    let email = unique_address();

    let resp = app.post("/api/v1/auth/register", &customer(&email)).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let account: Value = resp.json().await.unwrap();
    assert_eq!(account["role"], "customer");
    assert_eq!(account["email_verified"], false);
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );

    // Unverified accounts may sign in.
    let s = session(&app, &email).await;
    let me: Value = app
        .get_with_token("/api/v1/me", s["access_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["email_verified"], false);

    wait_until("the verification mail", WAIT, || async {
        !mails_to(&email).await.is_empty()
    })
    .await;
    let mail = &mails_to(&email).await[0];
    assert_eq!(mail.subject, "Confirm your email address");
    let link = mail
        .text
        .split_whitespace()
        .find(|w| w.starts_with("http://shop.test/verify-email?token="))
        .expect("the mail holds the link");
    let token = link.split("token=").nth(1).unwrap();
    let stored: Vec<u8> = sqlx::query_scalar("SELECT token_hash FROM user_tokens")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_ne!(
        stored,
        token.as_bytes(),
        "only a digest of the token is stored"
    );

    assert_eq!(verify(&app, token).await.status(), StatusCode::NO_CONTENT);
    let me: Value = app
        .get_with_token("/api/v1/me", s["access_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["email_verified"], true);
    let again = problem(verify(&app, token).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&again), ["token"], "the link works once");
    pipeline.stop().await;
}

#[tokio::test]
async fn a_seller_registers_with_a_shop_and_clashes_name_their_field_and_write_nothing() {
    let app = spawn_app(&amqp_url()).await;
    let seller = |email: &str, slug: &str| {
        json!({"email": email, "password": PASSWORD, "name": "Sam", "kind": "seller",
               "shop": {"name": "Green Grocer", "slug": slug, "contact_email": "shop@example.com"}})
    };
    let first = unique_address();
    let resp = app
        .post("/api/v1/auth/register", &seller(&first, "green-grocer"))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.json::<Value>().await.unwrap()["role"], "seller");
    let before = (
        count(&app.db.pool, "SELECT count(*) FROM users").await,
        count(&app.db.pool, "SELECT count(*) FROM outbox").await,
    );

    let taken = problem(
        app.post("/api/v1/auth/register", &customer(&first.to_uppercase()))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(
        fields(&taken),
        ["email"],
        "emails are unique regardless of case"
    );
    let slug = problem(
        app.post(
            "/api/v1/auth/register",
            &seller(&unique_address(), "green-grocer"),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&slug), ["shop.slug"]);

    let mut bad = seller("not-an-email", "Bad Slug");
    bad["password"] = json!("short");
    let invalid = problem(
        app.post("/api/v1/auth/register", &bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&invalid), ["email", "password", "shop.slug"]);
    let no_shop =
        json!({"email": unique_address(), "password": PASSWORD, "name": "S", "kind": "seller"});
    let invalid = problem(
        app.post("/api/v1/auth/register", &no_shop).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&invalid), ["shop"]);

    let after = (
        count(&app.db.pool, "SELECT count(*) FROM users").await,
        count(&app.db.pool, "SELECT count(*) FROM outbox").await,
    );
    assert_eq!(before, after, "nothing half-written");
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM shops").await, 1);
}

#[tokio::test]
async fn wrong_credentials_get_the_same_answer_whether_or_not_the_account_exists() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let wrong_password = problem(
        sign_in(&app, &email, "not the password").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let unknown = problem(
        sign_in(&app, &unique_address(), PASSWORD).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(wrong_password, unknown);
    let resp = app.get("/api/v1/me").await;
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    problem(resp, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn a_refresh_token_works_once_and_its_reuse_revokes_the_family() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let first = session(&app, &email).await;

    let resp = refresh(&app, &first["refresh_token"]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let second: Value = resp.json().await.unwrap();
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let me = app
        .get_with_token("/api/v1/me", second["access_token"].as_str().unwrap())
        .await;
    assert_eq!(me.status(), StatusCode::OK);

    let resp = refresh(&app, &second["refresh_token"]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let third: Value = resp.json().await.unwrap();

    // The first token again, after its successor was used: someone has a
    // copy. The whole family dies, down to the latest token.
    replay_ends_the_family(&app, &first, &third).await;

    // Another sign-in is its own family, unaffected; signing out ends it.
    let other = session(&app, &email).await;
    let resp = app
        .post(
            "/api/v1/auth/sign-out",
            &json!({"refresh_token": other["refresh_token"]}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    problem(
        refresh(&app, &other["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[tokio::test]
async fn tampered_expired_unsigned_and_foreign_tokens_are_refused() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let good = session(&app, &email).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        app.get_with_token("/api/v1/me", &good).await.status(),
        StatusCode::OK
    );
    let sub: String = sqlx::query_scalar("SELECT id::text FROM users")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();

    let now = chrono::Utc::now().timestamp();
    let claims = |aud: &str, iss: &str, exp: i64| json!({"sub": sub, "role": "admin", "iss": iss, "aud": aud, "iat": now, "exp": exp});
    let secret = EncodingKey::from_secret(common::auth_config().secret.as_bytes());
    let sign = |claims: &Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &secret).unwrap()
    };
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };

    let mut tampered = good.clone();
    tampered.insert(good.len() - 3, 'A');
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("souk-api", "souk", now + 600))
    );
    let other_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("souk-api", "souk", now + 600),
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
    )
    .unwrap();
    let cases = [
        ("tampered", tampered),
        ("alg none", unsigned),
        ("wrong key", other_key),
        (
            "wrong audience",
            sign(&claims("someone-else", "souk", now + 600)),
        ),
        ("wrong issuer", sign(&claims("souk-api", "evil", now + 600))),
        ("expired", sign(&claims("souk-api", "souk", now - 60))),
    ];
    for (what, token) in cases {
        let resp = app.get_with_token("/api/v1/me", &token).await;
        assert_eq!(
            resp.status(),
            StatusCode::UNAUTHORIZED,
            "{what} token accepted"
        );
    }

    // A suspended account's still-valid token stops working at once.
    sqlx::query("UPDATE users SET suspended_at = now()")
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        app.get_with_token("/api/v1/me", &good).await.status(),
        StatusCode::UNAUTHORIZED
    );
    problem(
        sign_in(&app, &email, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

/// The tokens in the links of the first `n` mails to `to` whose subject is
/// `subject`, oldest first.
async fn mailed_tokens(to: &str, subject: &str, n: usize) -> Vec<String> {
    wait_until("the mails", WAIT, || async {
        mails_to(to)
            .await
            .iter()
            .filter(|m| m.subject == subject)
            .count()
            >= n
    })
    .await;
    let mails = mails_to(to).await;
    let tokens: Vec<String> = mails
        .iter()
        .filter(|m| m.subject == subject)
        .map(|mail| {
            let link = mail
                .text
                .split_whitespace()
                .find(|w| w.contains("?token="))
                .expect("a link");
            link.split("token=").nth(1).unwrap().to_string()
        })
        .collect();
    assert_eq!(tokens.len(), n, "{tokens:?}");
    tokens
}

/// The token in the link of the only mail to `to` whose subject is `subject`.
async fn mailed_token(to: &str, subject: &str) -> String {
    mailed_tokens(to, subject, 1).await.remove(0)
}

const RESET_MAIL: &str = "Reset your Souk password";

async fn forgot(app: &App, email: &str) {
    let resp = app
        .post("/api/v1/auth/forgot-password", &json!({"email": email}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

async fn reset(app: &App, token: &str, password: &str) -> reqwest::Response {
    app.post(
        "/api/v1/auth/reset-password",
        &json!({"token": token, "new_password": password}),
    )
    .await
}

async fn me_status(app: &App, session: &Value) -> StatusCode {
    app.get_with_token("/api/v1/me", session["access_token"].as_str().unwrap())
        .await
        .status()
}

#[tokio::test]
async fn a_forgotten_password_is_reset_by_the_mailed_link_once_and_ends_every_session() {
    let app = spawn_app(&amqp_url()).await;
    let pipeline = Pipeline::start(&app, &amqp_url());
    let email = registered(&app).await;
    let before = session(&app, &email).await;

    let api = &app;
    let forgot = |email: String| async move {
        api.post("/api/v1/auth/forgot-password", &json!({"email": email}))
            .await
    };
    // Same answer for an account that does not exist, and no mail for it.
    let stranger = unique_address();
    let resp = forgot(stranger.clone()).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let known = forgot(email.to_uppercase()).await;
    assert_eq!(known.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.text().await.unwrap(), known.text().await.unwrap());

    let token = mailed_token(&email, RESET_MAIL).await;
    assert!(mails_to(&stranger).await.is_empty());
    let reset = |token: String, password: &'static str| async move {
        api.post(
            "/api/v1/auth/reset-password",
            &json!({"token": token, "new_password": password}),
        )
        .await
    };
    let weak = problem(
        reset(token.clone(), "short").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&weak), ["new_password"]);
    assert_eq!(
        reset(token.clone(), "a brand new password").await.status(),
        StatusCode::NO_CONTENT
    );
    let reused = problem(
        reset(token, "yet another password").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&reused), ["token"], "the link works once");

    problem(
        sign_in(&app, &email, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(
        sign_in(&app, &email, "a brand new password").await.status(),
        StatusCode::OK
    );
    problem(
        refresh(&app, &before["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    pipeline.stop().await;
}

#[tokio::test]
async fn changing_the_password_needs_the_current_one_and_ends_the_other_sessions() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let here = session(&app, &email).await;
    let elsewhere = session(&app, &email).await;
    let token = here["access_token"].as_str().unwrap();
    let change = |current: &'static str, new: &'static str| {
        app.http
            .post(format!("{}/api/v1/me/password", app.base))
            .bearer_auth(token)
            .json(&json!({"current_password": current, "new_password": new}))
            .send()
    };

    let wrong = problem(
        change("not my password", "a brand new password")
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&wrong), ["current_password"]);
    let resp = change(PASSWORD, "a brand new password").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let fresh: Value = resp.json().await.unwrap();

    problem(
        refresh(&app, &elsewhere["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    problem(
        refresh(&app, &here["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(
        refresh(&app, &fresh["refresh_token"]).await.status(),
        StatusCode::OK,
        "the new session goes on"
    );
    assert_eq!(
        sign_in(&app, &email, "a brand new password").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn signing_out_everywhere_ends_every_session() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let one = session(&app, &email).await;
    let two = session(&app, &email).await;
    let resp = app
        .http
        .post(format!("{}/api/v1/auth/sign-out-everywhere", app.base))
        .bearer_auth(one["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    problem(
        refresh(&app, &one["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    problem(
        refresh(&app, &two["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[tokio::test]
async fn an_access_token_from_before_a_password_reset_is_refused_after_it() {
    let app = spawn_app(&amqp_url()).await;
    let pipeline = Pipeline::start(&app, &amqp_url());
    let email = registered(&app).await;
    let before = session(&app, &email).await;
    assert_eq!(me_status(&app, &before).await, StatusCode::OK);

    forgot(&app, &email).await;
    let token = mailed_token(&email, RESET_MAIL).await;
    assert_eq!(
        reset(&app, &token, "a brand new password").await.status(),
        StatusCode::NO_CONTENT
    );
    let refused = app
        .get_with_token("/api/v1/me", before["access_token"].as_str().unwrap())
        .await;
    problem(refused, StatusCode::UNAUTHORIZED).await;

    // A session started right after, within the same second, works.
    let resp = sign_in(&app, &email, "a brand new password").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let after: Value = resp.json().await.unwrap();
    assert_eq!(me_status(&app, &after).await, StatusCode::OK);
    pipeline.stop().await;
}

#[tokio::test]
async fn a_reset_or_a_password_change_voids_every_other_reset_link() {
    let app = spawn_app(&amqp_url()).await;
    let pipeline = Pipeline::start(&app, &amqp_url());
    let email = registered(&app).await;

    forgot(&app, &email).await;
    forgot(&app, &email).await;
    let links = mailed_tokens(&email, RESET_MAIL, 2).await;
    assert_eq!(
        reset(&app, &links[0], "a brand new password")
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    let refused = problem(
        reset(&app, &links[1], "the attackers password").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&refused), ["token"]);
    assert_eq!(
        sign_in(&app, &email, "a brand new password").await.status(),
        StatusCode::OK
    );

    // A link mailed before a password change is void after it.
    forgot(&app, &email).await;
    let third = mailed_tokens(&email, RESET_MAIL, 3).await.remove(2);
    let here = session_with(&app, &email, "a brand new password").await;
    let resp = app
        .http
        .post(format!("{}/api/v1/me/password", app.base))
        .bearer_auth(here["access_token"].as_str().unwrap())
        .json(&json!({"current_password": "a brand new password", "new_password": "changed again, by me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let refused = problem(
        reset(&app, &third, "the attackers password").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&refused), ["token"]);
    assert_eq!(
        sign_in(&app, &email, "changed again, by me").await.status(),
        StatusCode::OK
    );
    pipeline.stop().await;
}

async fn session_with(app: &App, email: &str, password: &str) -> Value {
    let resp = sign_in(app, email, password).await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_password_change_or_signing_out_everywhere_ends_access_tokens_too() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let here = session(&app, &email).await;
    let elsewhere = session(&app, &email).await;

    let resp = app
        .http
        .post(format!("{}/api/v1/me/password", app.base))
        .bearer_auth(here["access_token"].as_str().unwrap())
        .json(&json!({"current_password": PASSWORD, "new_password": "a brand new password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let fresh: Value = resp.json().await.unwrap();
    assert_eq!(me_status(&app, &elsewhere).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me_status(&app, &here).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        me_status(&app, &fresh).await,
        StatusCode::OK,
        "the session the change answered with goes on"
    );

    let resp = app
        .http
        .post(format!("{}/api/v1/auth/sign-out-everywhere", app.base))
        .bearer_auth(fresh["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(me_status(&app, &fresh).await, StatusCode::UNAUTHORIZED);
    let again = session_with(&app, &email, "a brand new password").await;
    assert_eq!(me_status(&app, &again).await, StatusCode::OK);
}

/// The id of the account at `email`.
async fn id_of(app: &App, email: &str) -> String {
    sqlx::query_scalar("SELECT id::text FROM users WHERE email = $1")
        .bind(email)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// A live password-reset link of `user`, stored as `forgot-password` stores
/// one (without the round trip through the mailer).
async fn reset_link(app: &App, user: &str) -> String {
    use souk_api::auth::secret;
    let token = secret::generate();
    sqlx::query(
        "INSERT INTO user_tokens (token_hash, user_id, purpose, expires_at)
         VALUES ($1, $2::uuid, 'reset_password', now() + interval '1 hour')",
    )
    .bind(secret::digest(&token))
    .bind(user)
    .execute(&app.db.pool)
    .await
    .unwrap();
    token
}

/// How many statements of `app`'s database wait for a lock.
async fn lock_waiters(app: &App) -> i64 {
    count(
        &app.db.pool,
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .await
}

/// An admin's `action` (`suspend`, `unsuspend`) on `user`.
async fn admin_act(
    app: &App,
    admin: &str,
    user: &str,
    action: &str,
    reason: &str,
) -> reqwest::Response {
    app.http
        .post(format!("{}/api/v1/admin/users/{user}/{action}", app.base))
        .bearer_auth(admin)
        .json(&json!({ "reason": reason }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_suspension_ends_access_for_good_voids_reset_links_and_is_not_repeated() {
    let app = spawn_app(&amqp_url()).await;
    let admin = common::token_for(&app, &common::admin(&app).await).await;
    let email = registered(&app).await;
    let user = id_of(&app, &email).await;
    let before = session(&app, &email).await;
    let link = reset_link(&app, &user).await;

    let resp = admin_act(&app, &admin, &user, "suspend", "chargebacks").await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // Suspending it again changes nothing: the reason stays the first one,
    // and the audit log keeps one entry.
    let again = problem(
        admin_act(&app, &admin, &user, "suspend", "something else").await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&again), ["id"]);
    let reason: String =
        sqlx::query_scalar("SELECT suspended_reason FROM users WHERE id = $1::uuid")
            .bind(&user)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(reason, "chargebacks");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'user.suspend'"
        )
        .await,
        1
    );

    let resp = admin_act(&app, &admin, &user, "unsuspend", "resolved").await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // What was issued before the suspension does not come back with the
    // account: not the access token, not the refresh token, not the link.
    assert_eq!(me_status(&app, &before).await, StatusCode::UNAUTHORIZED);
    problem(
        refresh(&app, &before["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let dead = problem(
        reset(&app, &link, "the attackers password").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&dead), ["token"]);
    // The owner signs in again, with the password they had.
    let after = session(&app, &email).await;
    assert_eq!(me_status(&app, &after).await, StatusCode::OK);
}

#[tokio::test]
async fn a_reset_link_does_not_set_a_password_on_a_suspended_account() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let user = id_of(&app, &email).await;
    sqlx::query("UPDATE users SET suspended_at = now(), suspended_reason = 'fraud'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    // A link stored after the suspension (a forgot-password request that
    // checked the account just before it was suspended).
    let link = reset_link(&app, &user).await;
    let refused = problem(
        reset(&app, &link, "the attackers password").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&refused), ["token"]);

    sqlx::query("UPDATE users SET suspended_at = NULL, suspended_reason = NULL")
        .execute(&app.db.pool)
        .await
        .unwrap();
    // Nor once the suspension is lifted: the link was used up.
    problem(
        reset(&app, &link, "the attackers password").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    problem(
        sign_in(&app, &email, "the attackers password").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(
        sign_in(&app, &email, PASSWORD).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn two_reset_links_used_at_once_set_one_password_and_never_deadlock() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let user = id_of(&app, &email).await;
    for round in 0..3 {
        let (one, two) = (reset_link(&app, &user).await, reset_link(&app, &user).await);
        let (first, second) = (
            format!("first password {round}"),
            format!("second password {round}"),
        );
        // The account's row held, as a sign-in or a suspension may hold it,
        // until both resets queue behind it: then they run at once.
        let mut holder = app.db.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM users WHERE id = $1::uuid FOR NO KEY UPDATE")
            .bind(&user)
            .execute(&mut *holder)
            .await
            .unwrap();
        let both = async { tokio::join!(reset(&app, &one, &first), reset(&app, &two, &second)) };
        let release = async {
            wait_until("both resets to wait for the account", WAIT, || async {
                lock_waiters(&app).await == 2
            })
            .await;
            holder.rollback().await.unwrap();
        };
        let ((a, b), ()) = tokio::join!(both, release);
        let mut statuses = [a.status(), b.status()];
        statuses.sort();
        // The first voids the other link, which is then refused; never a 500.
        assert_eq!(
            statuses,
            [StatusCode::NO_CONTENT, StatusCode::UNPROCESSABLE_ENTITY],
            "round {round}"
        );
        let set = if a.status() == StatusCode::NO_CONTENT {
            &first
        } else {
            &second
        };
        assert_eq!(sign_in(&app, &email, set).await.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_refresh_token_presented_twice_at_once_keeps_the_session() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let first = session(&app, &email).await;

    // Two tabs refresh with the same token at once: neither is a thief.
    let (a, b) = tokio::join!(
        refresh(&app, &first["refresh_token"]),
        refresh(&app, &first["refresh_token"])
    );
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    let (a, b): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
    assert_eq!(me_status(&app, &a).await, StatusCode::OK);
    assert_eq!(me_status(&app, &b).await, StatusCode::OK);
    // One token of the family lives on: the one issued last.
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM refresh_tokens WHERE rotated_at IS NULL AND revoked_at IS NULL"
        )
        .await,
        1
    );
    // The tab whose token was superseded (its cookie overwritten by the
    // other's, in a browser) never sends it again; one that does holds a
    // copy: the family ends. First the live one is used, as the browser
    // would.
    let superseded: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT token_hash FROM refresh_tokens WHERE superseded_at IS NOT NULL")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    let digest = |v: &Value| souk_api::auth::secret::digest(v["refresh_token"].as_str().unwrap());
    let (live, loser) = match (superseded.as_slice(), digest(&a), digest(&b)) {
        ([s], da, _) if *s == da => (b, a),
        ([s], _, db) if *s == db => (a, b),
        other => panic!("exactly one of the two superseded: {other:?}"),
    };
    let resp = refresh(&app, &live["refresh_token"]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let latest: Value = resp.json().await.unwrap();
    replay_ends_the_family(&app, &loser, &latest).await;
    problem(
        refresh(&app, &first["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[tokio::test]
async fn a_rotated_refresh_token_presented_after_the_grace_ends_the_family() {
    let app = spawn_app(&amqp_url()).await;
    let email = registered(&app).await;
    let first = session(&app, &email).await;
    let resp = refresh(&app, &first["refresh_token"]).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Within the grace, with `second` unused: a new token in its place.
    let resp = refresh(&app, &first["refresh_token"]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let third: Value = resp.json().await.unwrap();

    // Eleven seconds later, `third` still unused: theft, the family ends.
    sqlx::query(
        "UPDATE refresh_tokens SET rotated_at = rotated_at - interval '11 seconds'
          WHERE token_hash = $1",
    )
    .bind(souk_api::auth::secret::digest(
        first["refresh_token"].as_str().unwrap(),
    ))
    .execute(&app.db.pool)
    .await
    .unwrap();
    replay_ends_the_family(&app, &first, &third).await;
}

/// `stale`'s refresh token, presented again, is refused as stolen, and the
/// family's `latest` token dies with it.
async fn replay_ends_the_family(app: &App, stale: &Value, latest: &Value) {
    for token in [stale, latest] {
        problem(
            refresh(app, &token["refresh_token"]).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
    }
}
