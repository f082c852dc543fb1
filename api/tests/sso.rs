//! Single sign-on with OpenID Connect, against a provider the test starts on
//! localhost (its own RSA key, discovery document and JWKS).

mod common;

use common::{App, PASSWORD, Pipeline, WAIT, fields, problem, spawn_app, spawn_app_with_sso};
use reqwest::StatusCode;
use serde_json::{Value, json};
use souk_api::auth::oidc::OidcConfig;
use souk_testkit::{
    amqp_url, count,
    mail::{mails_to, unique_address},
    oidc::{Forgery, OidcProvider, Redirect, User},
    wait_until,
};

const CLIENT: &str = "souk-storefront";
const SECRET: &str = "storefront-secret";
const REDIRECT: &str = "http://shop.test/auth/callback";

fn config(issuer: &str) -> OidcConfig {
    OidcConfig {
        issuer: issuer.into(),
        client_id: CLIENT.into(),
        client_secret: Some(SECRET.into()),
        redirect_url: REDIRECT.into(),
        scopes: "openid email profile".into(),
        trust_emails: false,
        login_ttl_secs: 600,
    }
}

async fn setup() -> (App, OidcProvider) {
    let provider = OidcProvider::start(CLIENT, Some(SECRET)).await;
    let app = spawn_app_with_sso(&amqp_url(), config(&provider.issuer)).await;
    (app, provider)
}

/// Starts a sign-in and plays the browser at the provider.
async fn through_provider(app: &App, provider: &OidcProvider) -> Redirect {
    let resp = app.post("/api/v1/auth/oidc/start", &json!({})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let start: Value = resp.json().await.unwrap();
    let url = start["authorization_url"].as_str().unwrap();
    assert!(url.starts_with(&provider.issuer), "{url}");
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    assert!(!url.contains("code_verifier"), "{url}");
    let back = provider.visit(url).await;
    assert_eq!(back.state, start["state"].as_str().unwrap());
    assert_eq!(back.redirect_uri, REDIRECT);
    back
}

async fn finish(app: &App, back: &Redirect) -> reqwest::Response {
    app.post(
        "/api/v1/auth/oidc/callback",
        &json!({"code": back.code, "state": back.state}),
    )
    .await
}

/// Signs in through the provider and returns `GET /me` for the session.
async fn sso_me(app: &App, provider: &OidcProvider) -> Value {
    let back = through_provider(app, provider).await;
    let resp = finish(app, &back).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let session: Value = resp.json().await.unwrap();
    let token = session["access_token"].as_str().unwrap();
    let me = app.get_with_token("/api/v1/me", token).await;
    assert_eq!(me.status(), StatusCode::OK);
    me.json().await.unwrap()
}

#[tokio::test]
async fn a_new_identity_gets_a_verified_customer_account_and_keeps_it() {
    let (app, provider) = setup().await;
    let email = unique_address();
    provider.sign_in_as(User::verified("sub-1", &email, "Nadia Haddad"));

    let me = sso_me(&app, &provider).await;
    assert_eq!(me["email"], email.as_str());
    assert_eq!(me["name"], "Nadia Haddad");
    assert_eq!(me["role"], "customer");
    assert_eq!(me["email_verified"], true);

    // The same identity again, even with a changed email at the provider,
    // is the same account: identities are keyed by issuer and subject.
    provider.sign_in_as(User::verified("sub-1", &unique_address(), "Nadia H."));
    let again = sso_me(&app, &provider).await;
    assert_eq!(again["id"], me["id"]);
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM users").await, 1);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM user_identities").await,
        1
    );
}

async fn register(app: &App, email: &str, name: &str) -> Value {
    let resp = app
        .post(
            "/api/v1/auth/register",
            &json!({"email": email, "password": PASSWORD, "name": name}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    resp.json().await.unwrap()
}

async fn sign_in(app: &App, email: &str, password: &str) -> reqwest::Response {
    app.post(
        "/api/v1/auth/sign-in",
        &json!({"email": email, "password": password}),
    )
    .await
}

async fn password_session(app: &App, email: &str) -> Value {
    let resp = sign_in(app, email, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

async fn refresh(app: &App, session: &Value) -> StatusCode {
    app.post(
        "/api/v1/auth/refresh",
        &json!({"refresh_token": session["refresh_token"]}),
    )
    .await
    .status()
}

async fn me_status(app: &App, session: &Value) -> StatusCode {
    app.get_with_token("/api/v1/me", session["access_token"].as_str().unwrap())
        .await
        .status()
}

const RESET_MAIL: &str = "Reset your Souk password";

/// The reset links mailed to `to` so far, once there are `n`.
async fn reset_links(to: &str, n: usize) -> Vec<String> {
    wait_until("the reset mails", WAIT, || async {
        mails_to(to)
            .await
            .iter()
            .filter(|m| m.subject == RESET_MAIL)
            .count()
            >= n
    })
    .await;
    mails_to(to)
        .await
        .iter()
        .filter(|m| m.subject == RESET_MAIL)
        .map(|m| {
            let link = m.text.split_whitespace().find(|w| w.contains("?token="));
            link.unwrap().split("token=").nth(1).unwrap().to_string()
        })
        .collect()
}

async fn forgot(app: &App, email: &str) {
    let resp = app
        .post("/api/v1/auth/forgot-password", &json!({"email": email}))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

async fn reset(app: &App, token: &str, password: &str) -> StatusCode {
    app.post(
        "/api/v1/auth/reset-password",
        &json!({"token": token, "new_password": password}),
    )
    .await
    .status()
}

#[tokio::test]
async fn a_verified_account_is_linked_by_a_verified_email_and_keeps_its_password() {
    let (app, provider) = setup().await;
    let email = unique_address();
    let registered = register(&app, &email, "Omar").await;
    sqlx::query("UPDATE users SET email_verified_at = now()")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let before = password_session(&app, &email).await;

    // The provider's address differs only in case.
    provider.sign_in_as(User::verified("sub-omar", &email.to_uppercase(), "Omar"));
    let me = sso_me(&app, &provider).await;
    assert_eq!(me["id"], registered["id"]);
    assert_eq!(me["email_verified"], true);

    // The owner proved the address before: the password and the sessions
    // are theirs and stay.
    assert_eq!(
        sign_in(&app, &email, PASSWORD).await.status(),
        StatusCode::OK
    );
    assert_eq!(me_status(&app, &before).await, StatusCode::OK);
    assert_eq!(refresh(&app, &before).await, StatusCode::OK);
}

#[tokio::test]
async fn linking_an_unverified_account_takes_it_from_whoever_registered_the_address() {
    let (app, provider) = setup().await;
    let pipeline = Pipeline::start(&app, &amqp_url());
    // A squatter registers the victim's address with a password of theirs
    // (and never verifies it, having no access to the mailbox), signs in and
    // asks for a reset link (mailed to the victim, but let's be thorough).
    let email = unique_address();
    let registered = register(&app, &email, "Omar").await;
    assert_eq!(registered["email_verified"], false);
    let squatter = password_session(&app, &email).await;
    forgot(&app, &email).await;
    let old_link = reset_links(&email, 1).await.remove(0);

    // The real owner signs in with the provider, which vouches for the address.
    provider.sign_in_as(User::verified("sub-omar", &email.to_uppercase(), "Omar"));
    let me = sso_me(&app, &provider).await;
    assert_eq!(me["id"], registered["id"]);
    assert_eq!(
        me["email_verified"], true,
        "the provider proved the address"
    );

    // Everything the squatter had is gone: password, sessions, reset link.
    problem(
        sign_in(&app, &email, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(refresh(&app, &squatter).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me_status(&app, &squatter).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reset(&app, &old_link, "the squatters new password").await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let hash: Option<String> = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(hash, None);

    // The owner can still give the account a password, by a reset.
    forgot(&app, &email).await;
    let link = reset_links(&email, 2).await.remove(1);
    assert_eq!(
        reset(&app, &link, "the owners own password").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        sign_in(&app, &email, "the owners own password")
            .await
            .status(),
        StatusCode::OK
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn an_email_the_provider_did_not_verify_links_and_creates_nothing() {
    let (app, provider) = setup().await;
    let email = unique_address();
    app.post(
        "/api/v1/auth/register",
        &json!({"email": email, "password": PASSWORD, "name": "Victim"}),
    )
    .await;
    for address in [email.clone(), unique_address()] {
        provider.sign_in_as(User {
            email_verified: false,
            ..User::verified("sub-attacker", &address, "Mallory")
        });
        let back = through_provider(&app, &provider).await;
        let body = problem(finish(&app, &back).await, StatusCode::FORBIDDEN).await;
        assert_eq!(fields(&body), ["email"]);
    }
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM users").await, 1);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM user_identities").await,
        0
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM refresh_tokens").await,
        0
    );
    let verified: bool = sqlx::query_scalar("SELECT email_verified_at IS NOT NULL FROM users")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(!verified);
}

#[tokio::test]
async fn forged_or_mismatched_id_tokens_are_refused() {
    let (app, provider) = setup().await;
    provider.sign_in_as(User::verified("sub-1", &unique_address(), "Ann"));
    for forgery in [
        Forgery::WrongKey,
        Forgery::UnknownKeyId,
        Forgery::AlgNone,
        Forgery::Hs256,
        Forgery::WrongAudience,
        Forgery::WrongIssuer,
        Forgery::WrongNonce,
        Forgery::Expired,
    ] {
        provider.forge(forgery);
        let back = through_provider(&app, &provider).await;
        let resp = finish(&app, &back).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{forgery:?}");
        problem(resp, StatusCode::UNAUTHORIZED).await;
    }
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM users").await, 0);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM user_identities").await,
        0
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM refresh_tokens").await,
        0
    );

    // The same provider, honest again, works: the refusals were the tokens.
    provider.forge(Forgery::Honest);
    sso_me(&app, &provider).await;
}

#[tokio::test]
async fn a_state_is_single_use_and_a_code_is_bound_to_its_own_sign_in() {
    let (app, provider) = setup().await;
    provider.sign_in_as(User::verified("sub-1", &unique_address(), "Ann"));

    // A code from one sign-in presented with another sign-in's state: the
    // API sends that sign-in's PKCE verifier, which the provider refuses.
    let first = through_provider(&app, &provider).await;
    let second = through_provider(&app, &provider).await;
    let crossed = Redirect {
        code: first.code.clone(),
        state: second.state.clone(),
        redirect_uri: REDIRECT.into(),
    };
    let body = problem(
        finish(&app, &crossed).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["code"]);
    assert_eq!(provider.token_requests(), 1);

    // `second`'s state is spent now; `first`'s code was spent at the provider.
    let body = problem(
        finish(&app, &second).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["state"]);
    let body = problem(finish(&app, &first).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&body), ["code"]);

    // An unknown state never reaches the provider.
    let before = provider.token_requests();
    let unknown = Redirect {
        code: "whatever".into(),
        state: "not-a-state-we-issued".into(),
        redirect_uri: REDIRECT.into(),
    };
    let body = problem(
        finish(&app, &unknown).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&body), ["state"]);
    assert_eq!(provider.token_requests(), before);
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_suspended_account_cannot_sign_in_with_the_provider() {
    let (app, provider) = setup().await;
    provider.sign_in_as(User::verified("sub-1", &unique_address(), "Ann"));
    sso_me(&app, &provider).await;
    sqlx::query("UPDATE users SET suspended_at = now(), suspended_reason = 'fraud'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let back = through_provider(&app, &provider).await;
    problem(finish(&app, &back).await, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn cookie_form_sets_http_only_cookies() {
    let (app, provider) = setup().await;
    provider.sign_in_as(User::verified("sub-1", &unique_address(), "Ann"));
    let back = through_provider(&app, &provider).await;
    let resp = app
        .post(
            "/api/v1/auth/oidc/callback",
            &json!({"code": back.code, "state": back.state, "use_cookies": true}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cookies: Vec<_> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert!(
        cookies.iter().any(|c| c.contains("HttpOnly")),
        "{cookies:?}"
    );
    let session: Value = resp.json().await.unwrap();
    assert_eq!(session["token_type"], "cookie");
    assert!(session.get("access_token").is_none());
}

#[tokio::test]
async fn without_a_provider_sso_is_not_found_and_a_dead_provider_is_a_502() {
    let app = spawn_app(&amqp_url()).await;
    problem(
        app.post("/api/v1/auth/oidc/start", &json!({})).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let issuer = format!("http://{}/tenant", closed.local_addr().unwrap());
    drop(closed);
    let app = spawn_app_with_sso(&amqp_url(), config(&issuer)).await;
    problem(
        app.post("/api/v1/auth/oidc/start", &json!({})).await,
        StatusCode::BAD_GATEWAY,
    )
    .await;
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM oidc_logins").await,
        0
    );
}

#[tokio::test]
async fn a_wrong_client_secret_is_the_operators_problem_not_the_users() {
    let provider = OidcProvider::start(CLIENT, Some("the-real-secret")).await;
    let app = spawn_app_with_sso(&amqp_url(), config(&provider.issuer)).await;
    provider.sign_in_as(User::verified("sub-1", &unique_address(), "Ann"));
    let back = through_provider(&app, &provider).await;
    problem(finish(&app, &back).await, StatusCode::BAD_GATEWAY).await;
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM users").await, 0);
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

/// Runs `callbacks` while `holder` holds a lock they all queue behind, and
/// ends `holder` with `release` once all of them wait: then they race.
async fn race<F, R>(
    app: &App,
    waiting: i64,
    holder: sqlx::Transaction<'static, sqlx::Postgres>,
    release: R,
    callbacks: F,
) -> F::Output
where
    F: std::future::Future,
    R: AsyncFnOnce(sqlx::Transaction<'static, sqlx::Postgres>),
{
    let released = async {
        wait_until("the callbacks to wait for the lock", WAIT, || async {
            lock_waiters(app).await == waiting
        })
        .await;
        release(holder).await;
    };
    tokio::join!(callbacks, released).0
}

/// Both callbacks run once they queue behind `holder`, which then rolls
/// back; each must have signed in.
async fn both_behind(
    app: &App,
    holder: sqlx::Transaction<'static, sqlx::Postgres>,
    one: &Redirect,
    two: &Redirect,
) -> (Value, Value) {
    let (a, b) = race(
        app,
        2,
        holder,
        async |tx: sqlx::Transaction<'static, sqlx::Postgres>| tx.rollback().await.unwrap(),
        async { tokio::join!(finish(app, one), finish(app, two)) },
    )
    .await;
    (session_of(a).await, session_of(b).await)
}

async fn session_of(resp: reqwest::Response) -> Value {
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

async fn me_id(app: &App, session: &Value) -> Value {
    let me: Value = app
        .get_with_token("/api/v1/me", session["access_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    me["id"].clone()
}

#[tokio::test]
async fn two_callbacks_at_once_for_a_new_identity_make_one_account() {
    let (app, provider) = setup().await;
    let email = unique_address();
    provider.sign_in_as(User::verified("sub-twice", &email, "Ann"));
    let one = through_provider(&app, &provider).await;
    let two = through_provider(&app, &provider).await;

    // Someone is creating an account with the address (uncommitted): both
    // callbacks find none, and both queue to create it.
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO users (id, email, name, role) VALUES ($1, $2, 'x', 'customer')")
        .bind(uuid::Uuid::now_v7())
        .bind(&email)
        .execute(&mut *holder)
        .await
        .unwrap();
    let (a, b) = both_behind(&app, holder, &one, &two).await;
    assert_eq!(me_id(&app, &a).await, me_id(&app, &b).await);
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM users").await, 1);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM user_identities").await,
        1
    );
}

#[tokio::test]
async fn two_callbacks_at_once_link_an_existing_account_once() {
    let (app, provider) = setup().await;
    let email = unique_address();
    let registered = register(&app, &email, "Omar").await;
    provider.sign_in_as(User::verified("sub-twice", &email, "Omar"));
    let one = through_provider(&app, &provider).await;
    let two = through_provider(&app, &provider).await;

    // The account's row held until both callbacks queue behind it.
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM users FOR NO KEY UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let (a, b) = both_behind(&app, holder, &one, &two).await;
    assert_eq!(me_id(&app, &a).await, registered["id"]);
    assert_eq!(me_id(&app, &b).await, registered["id"]);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM user_identities").await,
        1
    );
}

#[tokio::test]
async fn a_callback_racing_a_suspension_leaves_no_session_behind() {
    let (app, provider) = setup().await;
    provider.sign_in_as(User::verified("sub-1", &unique_address(), "Ann"));
    sso_me(&app, &provider).await;
    let back = through_provider(&app, &provider).await;

    // The suspension takes the account's row (as the admin's does) while
    // the callback is under way, and commits while the callback waits.
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM users FOR NO KEY UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let suspend = async |mut tx: sqlx::Transaction<'static, sqlx::Postgres>| {
        sqlx::query(
            "UPDATE users SET suspended_at = now(), suspended_reason = 'fraud',
                    session_epoch = session_epoch + 1",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query("UPDATE refresh_tokens SET revoked_at = now() WHERE revoked_at IS NULL")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    };
    let resp = race(&app, 1, holder, suspend, finish(&app, &back)).await;
    problem(resp, StatusCode::UNAUTHORIZED).await;

    // Nothing minted meanwhile comes back with the account.
    sqlx::query("UPDATE users SET suspended_at = NULL, suspended_reason = NULL")
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM refresh_tokens WHERE revoked_at IS NULL"
        )
        .await,
        0
    );
}

/// A provider that names itself with a trailing `/`, as Auth0 does
/// (`https://tenant.auth0.com/`), in its discovery document and its tokens.
/// It signs in whoever the test says, with the provider key of the testkit;
/// the code it takes is the sign-in's nonce (a fake needs no more).
async fn slash_provider(user: User) -> String {
    use axum::{Form, Json, Router, extract::State, routing::get, routing::post};
    use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
    use std::collections::HashMap;

    const KEY: &str = include_str!("../../testkit/keys/oidc-provider.pem");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}/auth0/", listener.local_addr().unwrap());
    fn key() -> EncodingKey {
        EncodingKey::from_rsa_pem(KEY.as_bytes()).unwrap()
    }
    async fn discovery(State((issuer, _)): State<(String, User)>) -> Json<Value> {
        Json(json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}authorize"),
            "token_endpoint": format!("{issuer}oauth/token"),
            "jwks_uri": format!("{issuer}.well-known/jwks.json"),
            "id_token_signing_alg_values_supported": ["RS256"],
        }))
    }
    async fn jwks() -> Json<Value> {
        let mut jwk = Jwk::from_encoding_key(&key(), Algorithm::RS256).unwrap();
        jwk.common.key_id = Some("k1".into());
        Json(json!({ "keys": [jwk] }))
    }
    async fn token(
        State((issuer, user)): State<(String, User)>,
        Form(form): Form<HashMap<String, String>>,
    ) -> Json<Value> {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": issuer, "sub": user.sub, "aud": CLIENT, "iat": now, "exp": now + 300,
            "nonce": form["code"], "email": user.email, "email_verified": true,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("k1".into());
        let id_token = jsonwebtoken::encode(&header, &claims, &key()).unwrap();
        Json(json!({ "access_token": "x", "token_type": "Bearer", "id_token": id_token }))
    }
    let app = Router::new()
        .route("/auth0/.well-known/openid-configuration", get(discovery))
        .route("/auth0/.well-known/jwks.json", get(jwks))
        .route("/auth0/oauth/token", post(token))
        .with_state((issuer.clone(), user));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    issuer
}

#[tokio::test]
async fn an_issuer_ending_in_a_slash_signs_in_configured_with_or_without_it() {
    let email = unique_address();
    let issuer = slash_provider(User::verified("auth0|42", &email, "Ann")).await;
    for configured in [issuer.clone(), issuer.trim_end_matches('/').to_string()] {
        let app = spawn_app_with_sso(&amqp_url(), config(&configured)).await;
        let resp = app.post("/api/v1/auth/oidc/start", &json!({})).await;
        assert_eq!(resp.status(), StatusCode::OK, "configured {configured}");
        let start: Value = resp.json().await.unwrap();
        let url = reqwest::Url::parse(start["authorization_url"].as_str().unwrap()).unwrap();
        assert!(
            url.as_str().starts_with(&format!("{issuer}authorize")),
            "{url}"
        );
        let nonce = url.query_pairs().find(|(k, _)| k == "nonce").unwrap().1;
        let resp = app
            .post(
                "/api/v1/auth/oidc/callback",
                &json!({"code": nonce, "state": start["state"]}),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "configured {configured}");
        let session: Value = resp.json().await.unwrap();
        let me: Value = app
            .get_with_token("/api/v1/me", session["access_token"].as_str().unwrap())
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(me["email"], email.as_str());
        // The identity is kept under the issuer exactly as the provider names it.
        let kept: String = sqlx::query_scalar("SELECT issuer FROM user_identities")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        assert_eq!(kept, issuer);
    }
}
