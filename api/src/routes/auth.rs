//! Registration, email verification, sign-in, refresh and sign-out.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, Method, StatusCode},
};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::{
        Caller, Role, cookies, end_all_sessions,
        links::{self, Purpose},
        password, secret,
    },
    client_ip::ClientIp,
    error::{ApiError, FieldError, Problem},
    extract::{ValidJson, Validate},
    middleware::RequestId,
    ratelimit::{Guard, Limits},
    routes::support::valid_email,
    state::AppState,
};

const MIN_PASSWORD: usize = 10;
/// Lockout scopes: failed sign-ins by email and client, and by email from
/// every client; wrong current passwords given to a password change by
/// account.
const SIGN_IN: &str = "sign-in";
const SIGN_IN_ACCOUNT: &str = "sign-in-account";
const PASSWORD_CHANGE: &str = "password";
const MAX_PASSWORD: usize = 128;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewShop {
    pub name: String,
    /// Lowercase letters, digits and single dashes, e.g. `green-grocer`.
    pub slug: String,
    #[serde(default)]
    pub description: String,
    pub contact_email: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    Customer,
    Seller,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub email: String,
    /// 10 to 128 characters.
    pub password: String,
    pub name: String,
    /// `customer` (default) or `seller`; a seller registers with a shop.
    #[serde(default = "customer")]
    pub kind: AccountKind,
    pub shop: Option<NewShop>,
}

fn customer() -> AccountKind {
    AccountKind::Customer
}

pub(crate) fn valid_slug(s: &str) -> bool {
    (3..=60).contains(&s.len())
        && s.split('-').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

impl Validate for Registration {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !valid_email(self.email.trim()) {
            errors.push(FieldError::new("email", "must be an email address"));
        }
        check_new_password(&mut errors, "password", &self.password);
        if self.name.trim().is_empty() || self.name.chars().count() > 100 {
            errors.push(FieldError::new("name", "must be 1 to 100 characters"));
        }
        match (&self.kind, &self.shop) {
            (AccountKind::Seller, None) => {
                errors.push(FieldError::new("shop", "a seller registers with a shop"))
            }
            (AccountKind::Customer, Some(_)) => {
                errors.push(FieldError::new("shop", "only sellers have a shop"))
            }
            (AccountKind::Seller, Some(shop)) => {
                if shop.name.trim().is_empty() || shop.name.chars().count() > 100 {
                    errors.push(FieldError::new("shop.name", "must be 1 to 100 characters"));
                }
                if !valid_slug(&shop.slug) {
                    errors.push(FieldError::new(
                        "shop.slug",
                        "use 3 to 60 lowercase letters, digits and single dashes",
                    ));
                }
                if shop.description.chars().count() > 2000 {
                    errors.push(FieldError::new(
                        "shop.description",
                        "must be at most 2000 characters",
                    ));
                }
                if !valid_email(shop.contact_email.trim()) {
                    errors.push(FieldError::new(
                        "shop.contact_email",
                        "must be an email address",
                    ));
                }
            }
            (AccountKind::Customer, None) => {}
        }
        errors
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub email_verified: bool,
    /// Where the avatar is served, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Create an account; a verification link is mailed to `email`.
///
/// Until the email is verified the account can sign in but cannot check out,
/// publish products or withdraw.
#[utoipa::path(
    post, path = "/auth/register", tag = "auth", request_body = Registration,
    responses(
        (status = 201, description = "created", body = Account),
        (status = 409, description = "email or shop slug taken", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many registrations from this address; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    request_id: RequestId,
    ip: ClientIp,
    ValidJson(body): ValidJson<Registration>,
) -> Result<(StatusCode, Json<Account>), ApiError> {
    let limits = &state.limiter.limits;
    state
        .limiter
        .hit("register-ip", &ip.0, limits.register_per_ip)
        .await?;
    let password_hash = password::hash(body.password.clone()).await?;
    let id = Uuid::now_v7();
    let email = body.email.trim().to_string();
    let name = body.name.trim().to_string();
    let role = match body.kind {
        AccountKind::Customer => Role::Customer,
        AccountKind::Seller => Role::Seller,
    };
    let mut tx = state.pool.begin().await?;
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO users (id, email, password_hash, name, role) VALUES ($1, $2, $3, $4, $5)
         RETURNING created_at",
    )
    .bind(id)
    .bind(&email)
    .bind(password_hash.as_str())
    .bind(&name)
    .bind(role.as_str())
    .fetch_one(&mut *tx)
    .await?;
    if let Some(shop) = &body.shop {
        sqlx::query(
            // With manual approval a new shop waits for an admin before
            // its products show or sell.
            "INSERT INTO shops (id, owner_id, name, slug, description, contact_email, approved_at)
             VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $7 THEN NULL ELSE now() END)",
        )
        .bind(Uuid::now_v7())
        .bind(id)
        .bind(shop.name.trim())
        .bind(&shop.slug)
        .bind(&shop.description)
        .bind(shop.contact_email.trim())
        .bind(state.market.seller_approval_manual)
        .execute(&mut *tx)
        .await?;
    }
    links::send(
        &mut tx,
        &state,
        Purpose::VerifyEmail,
        id,
        (&email, &name),
        &request_id.0,
    )
    .await?;
    state.commit_with_messages(tx).await?;
    Ok((
        StatusCode::CREATED,
        Json(Account {
            id,
            email,
            name,
            role,
            email_verified: false,
            avatar_url: None,
            created_at,
        }),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyEmail {
    /// The token from the mailed link.
    pub token: String,
}

impl Validate for VerifyEmail {
    fn validate(&self) -> Vec<FieldError> {
        if self.token.is_empty() || self.token.len() > 100 {
            vec![FieldError::new("token", "must be the token from the link")]
        } else {
            vec![]
        }
    }
}

/// Confirm an email address with the token from the mailed link (single use).
#[utoipa::path(
    post, path = "/auth/verify-email", tag = "auth", request_body = VerifyEmail,
    responses(
        (status = 204, description = "verified"),
        (status = 422, description = "unknown, used or expired token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn verify_email(
    State(state): State<AppState>,
    ValidJson(body): ValidJson<VerifyEmail>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let user = links::consume(&mut tx, Purpose::VerifyEmail, &body.token).await?;
    sqlx::query("UPDATE users SET email_verified_at = coalesce(email_verified_at, now()), updated_at = now() WHERE id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    pub email: String,
    pub password: String,
    /// Browsers: set HttpOnly cookies (and a CSRF cookie) instead of
    /// returning the tokens in the body.
    #[serde(default)]
    pub use_cookies: bool,
}

impl Validate for SignIn {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.email.trim().is_empty() {
            errors.push(FieldError::new("email", "must not be empty"));
        }
        if self.password.is_empty() || self.password.chars().count() > MAX_PASSWORD {
            errors.push(FieldError::new(
                "password",
                format!("must be 1 to {MAX_PASSWORD} characters"),
            ));
        }
        errors
    }
}

/// A short-lived access token and a single-use refresh token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Session {
    /// Absent in the cookie form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// `Bearer`, or `cookie` when the tokens were set as cookies.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// Exchange at `/auth/refresh` for a new pair; each is accepted once.
    /// Absent in the cookie form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl Session {
    /// The answer: tokens in the body, or (`cookie_form`) in cookies only.
    pub(crate) fn respond(
        mut self,
        state: &AppState,
        cookie_form: bool,
    ) -> (HeaderMap, Json<Session>) {
        if !cookie_form {
            return (HeaderMap::new(), Json(self));
        }
        let access = self.access_token.take().unwrap_or_default();
        let refresh = self.refresh_token.take().unwrap_or_default();
        self.token_type = "cookie".into();
        (cookies::set(&state.auth, &access, &refresh), Json(self))
    }
}

/// Starts (`family = None`) or continues a refresh-token family; the caller commits.
pub(crate) async fn open_session(
    tx: &mut PgConnection,
    state: &AppState,
    user: Uuid,
    role: Role,
    family: Option<Uuid>,
) -> Result<Session, ApiError> {
    // The account's epoch and standing, share-locked: a change ending every
    // session (which updates this row first) cannot slip between the read
    // and the new token's insert. A suspension is one such change, so the
    // standing is checked here, for every way of signing in: a check made
    // earlier without this lock (an SSO callback's) could have been passed
    // just before the suspension committed, and the token written now would
    // escape the revocation.
    let (epoch, active): (i32, bool) = sqlx::query_as(
        "SELECT session_epoch, suspended_at IS NULL FROM users WHERE id = $1 FOR SHARE",
    )
    .bind(user)
    .fetch_one(&mut *tx)
    .await?;
    if !active {
        return Err(ApiError::Unauthorized);
    }
    let refresh = secret::generate();
    sqlx::query(
        "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(family.unwrap_or_else(Uuid::now_v7))
    .bind(user)
    .bind(secret::digest(&refresh))
    .bind(Utc::now() + Duration::days(state.auth.refresh_ttl_days))
    .execute(&mut *tx)
    .await?;
    Ok(Session {
        access_token: Some(state.jwt.issue(user, role, epoch)),
        token_type: "Bearer".into(),
        expires_in: state.jwt.ttl_secs(),
        refresh_token: Some(refresh),
    })
}

/// Whether `user`'s password (and standing) is still what was checked before
/// the transaction (hashing is slow, so it runs outside): `verified`, the
/// hash then read. The account row is locked with `lock` for the rest of
/// `tx`, so a reset, a change, a suspension or an SSO takeover committed
/// meanwhile wins over the check, and one coming later waits for `tx`.
async fn password_unchanged(
    tx: &mut PgConnection,
    user: Uuid,
    verified: Option<&str>,
    lock: &'static str,
) -> Result<bool, ApiError> {
    let same: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT password_hash IS NOT DISTINCT FROM $2 AND suspended_at IS NULL
           FROM users WHERE id = $1 {lock}"
    )))
    .bind(user)
    .bind(verified)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(same == Some(true))
}

/// What a password sign-in to `email` from `client` is counted against:
/// that pair, soon locked, so a stranger's guesses lock out the stranger
/// and not the owner elsewhere; and the email from every client, locked
/// later, so guesses spread over many addresses stay bounded.
fn sign_in_guards(limits: &Limits, email: &str, client: &str) -> [Guard; 2] {
    [
        // Client first: an address holds no `/`, so no other pair can
        // spell the same key.
        Guard {
            scope: SIGN_IN,
            id: format!("{client}/{email}"),
            threshold: limits.failures_before_lock,
        },
        Guard {
            scope: SIGN_IN_ACCOUNT,
            id: email.to_string(),
            threshold: limits.failures_before_account_lock,
        },
    ]
}

/// Sign in with email and password. Failed attempts lock the email for a
/// growing time: from the client that made them, and, after many more,
/// from every client.
#[utoipa::path(
    post, path = "/auth/sign-in", tag = "auth", request_body = SignIn,
    responses(
        (status = 200, description = "signed in", body = Session),
        (status = 401, description = "wrong email or password, or account suspended", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many attempts; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn sign_in(
    State(state): State<AppState>,
    ip: ClientIp,
    ValidJson(body): ValidJson<SignIn>,
) -> Result<(HeaderMap, Json<Session>), ApiError> {
    let email = body.email.trim();
    state
        .limiter
        .hit("sign-in-ip", &ip.0, state.limiter.limits.sign_in_per_ip)
        .await?;
    // Counted before the (slow) check, so a burst of guesses cannot all
    // pass a lock that none of them has set yet.
    let guards = sign_in_guards(&state.limiter.limits, email, &ip.0);
    state.limiter.attempt(&guards).await?;
    let found: Option<(Uuid, Option<String>, String, bool)> = sqlx::query_as(
        "SELECT id, password_hash, role, suspended_at IS NULL FROM users WHERE lower(email) = lower($1)",
    )
    .bind(email)
    .fetch_optional(&state.pool)
    .await?;
    let stored = found.as_ref().and_then(|(_, hash, _, _)| hash.clone());
    // Always hash, so an unknown email takes as long as a wrong password.
    let matches = password::verify(body.password, stored.clone()).await?;
    let (id, role) = match found {
        Some((id, _, role, true)) if matches => (id, role),
        _ => return Err(ApiError::Unauthorized),
    };
    state.limiter.clear(&guards).await;
    let role = Role::parse(&role).ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?;
    let mut tx = state.pool.begin().await?;
    if !password_unchanged(&mut tx, id, stored.as_deref(), "FOR SHARE").await? {
        return Err(ApiError::Unauthorized);
    }
    let session = open_session(&mut tx, &state, id, role, None).await?;
    tx.commit().await?;
    Ok(session.respond(&state, body.use_cookies))
}

/// Mail a new verification link to the caller (rate limited).
#[utoipa::path(
    post, path = "/auth/resend-verification", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 202, description = "a new link is on its way"),
        (status = 409, description = "the email is already verified", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many requests; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn resend_verification(
    State(state): State<AppState>,
    caller: Caller,
    request_id: RequestId,
) -> Result<StatusCode, ApiError> {
    let (email, name, verified): (String, String, bool) = sqlx::query_as(
        "SELECT email, name, email_verified_at IS NOT NULL FROM users WHERE id = $1",
    )
    .bind(caller.id)
    .fetch_one(&state.pool)
    .await?;
    if verified {
        return Err(ApiError::Conflict(FieldError::new(
            "email",
            "is already verified",
        )));
    }
    let limit = state.limiter.limits.resend_per_account;
    state
        .limiter
        .hit("resend", &caller.id.to_string(), limit)
        .await?;
    links::send_now(
        &state,
        Purpose::VerifyEmail,
        caller.id,
        (&email, &name),
        &request_id.0,
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// Omit in the cookie form: the refresh cookie is used (with `X-CSRF-Token`).
    pub refresh_token: Option<String>,
}

impl Validate for RefreshRequest {
    fn validate(&self) -> Vec<FieldError> {
        match &self.refresh_token {
            Some(t) if t.is_empty() || t.len() > 100 => {
                vec![FieldError::new("refresh_token", "must be a refresh token")]
            }
            _ => vec![],
        }
    }
}

/// The refresh token a request presents, and whether it came as a cookie
/// (which, like any cookie-authenticated change, needs the CSRF header).
fn presented(
    body: Option<String>,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(String, bool), ApiError> {
    match body {
        Some(token) => Ok((token, false)),
        None => {
            let token = cookies::read(headers, cookies::REFRESH)
                .filter(|t| !t.is_empty())
                .ok_or(ApiError::Unauthorized)?;
            cookies::check_csrf(method, headers)?;
            Ok((token, true))
        }
    }
}

/// Exchange a refresh token for a new pair. A refresh token that was already
/// exchanged revokes its whole family: someone else has a copy. Except
/// within 10 seconds of its exchange, while the token it was exchanged for
/// is unused (two tabs refreshing at once): then it gets a new pair too, and
/// the unused token is superseded: presented later, it too revokes the
/// family.
#[utoipa::path(
    post, path = "/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses(
        (status = 200, description = "a new pair", body = Session),
        (status = 401, description = "unknown, expired, reused or revoked token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    ValidJson(body): ValidJson<RefreshRequest>,
) -> Result<(HeaderMap, Json<Session>), ApiError> {
    let (token, cookie_form) = presented(body.refresh_token, &method, &headers)?;
    let mut tx = state.pool.begin().await?;
    // The account row first (share-locked), then the token, in the order a
    // change ending every session takes them: the other order could
    // deadlock with it, or rotate a token it had just revoked.
    sqlx::query(
        "SELECT 1 FROM users WHERE id = (SELECT user_id FROM refresh_tokens WHERE token_hash = $1)
            FOR SHARE",
    )
    .bind(secret::digest(&token))
    .execute(&mut *tx)
    .await?;
    // Locked so two refreshes with the same token cannot both rotate it.
    let found: Option<PresentedToken> = sqlx::query_as(
        "SELECT t.id, t.family_id, t.user_id, t.rotated_at IS NOT NULL AS rotated,
                t.revoked_at IS NOT NULL AS revoked, t.superseded_at IS NOT NULL AS superseded,
                t.expires_at <= now() AS expired,
                u.role, u.suspended_at IS NULL AS active
           FROM refresh_tokens t JOIN users u ON u.id = t.user_id
          WHERE t.token_hash = $1
          FOR NO KEY UPDATE OF t",
    )
    .bind(secret::digest(&token))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(PresentedToken {
        id,
        family_id: family,
        user_id: user,
        rotated,
        revoked,
        superseded,
        expired,
        role,
        active,
    }) = found
    else {
        return Err(ApiError::Unauthorized);
    };
    if rotated && !revoked {
        // Two tabs of one browser refreshing at once present the same
        // token: within the grace, while what it was rotated to is unused,
        // that is no theft. The second gets a new token of the family in
        // place of the unused one, which stops working: one live token
        // per family, as ever.
        if !expired && active && replace_unused_successor(&mut tx, id).await? {
            let role = Role::parse(&role).ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?;
            let session = open_session(&mut tx, &state, user, role, Some(family)).await?;
            tx.commit().await?;
            return Ok(session.respond(&state, cookie_form));
        }
        tracing::warn!(%user, %family, "refresh token reused; revoking its family");
        revoke_family(&mut tx, family).await?;
        tx.commit().await?;
        return Err(ApiError::Unauthorized);
    }
    if superseded {
        // The grace handed the family on to whoever presented its
        // predecessor second; the one it took this token from presents it
        // now. One of the two holds a copy: the family ends for both.
        tracing::warn!(%user, %family, "superseded refresh token presented; revoking its family");
        revoke_family(&mut tx, family).await?;
        tx.commit().await?;
        return Err(ApiError::Unauthorized);
    }
    if revoked || expired || !active {
        return Err(ApiError::Unauthorized);
    }
    sqlx::query("UPDATE refresh_tokens SET rotated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let role = Role::parse(&role).ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?;
    let session = open_session(&mut tx, &state, user, role, Some(family)).await?;
    tx.commit().await?;
    Ok(session.respond(&state, cookie_form))
}

/// A presented refresh token and the state of its account.
#[derive(sqlx::FromRow)]
struct PresentedToken {
    id: Uuid,
    family_id: Uuid,
    user_id: Uuid,
    rotated: bool,
    revoked: bool,
    superseded: bool,
    expired: bool,
    role: String,
    active: bool,
}

/// How long after its rotation a refresh token may be presented again
/// without counting as stolen (see [`replace_unused_successor`]). Counted
/// from the rotation, never extended: a stolen token replayed later is
/// still caught.
const REUSE_GRACE_SECS: f64 = 10.0;

/// For a rotated token presented again (its row locked by the caller):
/// whether it was rotated less than [`REUSE_GRACE_SECS`] ago and nothing it
/// was rotated to has been used since. If so, those tokens (its successor,
/// and any issued in the successor's place by this same grace) are revoked
/// as superseded, and the caller issues the family's next token instead. A
/// superseded token presented later ends the family: the grace spares two
/// tabs sharing one cookie jar, where the loser's token is overwritten and
/// never sent again, not a copy racing its owner.
///
/// What it was rotated to are the family's tokens created after it: each is
/// issued by a transaction begun once the token before it was handed out,
/// so after that one was written (`created_at` is a transaction's start).
/// Its predecessors are older; so is a sibling issued by this grace in a
/// transaction begun before the rotation, which is why the rotation's own
/// time is no bound.
async fn replace_unused_successor(tx: &mut PgConnection, token: Uuid) -> Result<bool, ApiError> {
    // Locked (after the presented token, as a refresh of the successor
    // locks it), so the successor cannot be used while it is replaced.
    let successors: Vec<(Uuid, bool)> = sqlx::query_as(
        "SELECT s.id, s.rotated_at IS NOT NULL
           FROM refresh_tokens t
           JOIN refresh_tokens s
             ON s.family_id = t.family_id AND s.created_at > t.created_at
          WHERE t.id = $1 AND t.rotated_at > now() - make_interval(secs => $2)
          ORDER BY s.id
          FOR NO KEY UPDATE OF s",
    )
    .bind(token)
    .bind(REUSE_GRACE_SECS)
    .fetch_all(&mut *tx)
    .await?;
    if successors.is_empty() || successors.iter().any(|(_, used)| *used) {
        return Ok(false);
    }
    let ids: Vec<Uuid> = successors.into_iter().map(|(id, _)| id).collect();
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now(), superseded_at = now()
          WHERE id = ANY($1) AND revoked_at IS NULL",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    Ok(true)
}

async fn revoke_family(tx: &mut PgConnection, family: Uuid) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
    )
    .bind(family)
    .execute(tx)
    .await?;
    Ok(())
}

/// Sign out: the refresh token's family stops working. Answers 204 for any
/// token, known or not.
#[utoipa::path(
    post, path = "/auth/sign-out", tag = "auth", request_body = RefreshRequest,
    responses((status = 204, description = "signed out"))
)]
pub async fn sign_out(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    ValidJson(body): ValidJson<RefreshRequest>,
) -> Result<(StatusCode, HeaderMap), ApiError> {
    let (token, cookie_form) = presented(body.refresh_token, &method, &headers)?;
    let mut tx = state.pool.begin().await?;
    let family: Option<Uuid> =
        sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
            .bind(secret::digest(&token))
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(family) = family {
        revoke_family(&mut tx, family).await?;
    }
    tx.commit().await?;
    let cleared = if cookie_form {
        cookies::clear(&state.auth)
    } else {
        HeaderMap::new()
    };
    Ok((StatusCode::NO_CONTENT, cleared))
}

/// The password rule, for every field that sets one.
fn check_new_password(errors: &mut Vec<FieldError>, field: &str, password: &str) {
    let n = password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) {
        errors.push(FieldError::new(
            field,
            format!("must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"),
        ));
    }
}

/// Stores a new password hash (computed before the transaction: hashing
/// takes tens of milliseconds), ends every session and voids every reset
/// link still in a mailbox.
async fn set_password(
    tx: &mut PgConnection,
    user: Uuid,
    hash: password::Hashed,
) -> Result<(), ApiError> {
    sqlx::query("UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1")
        .bind(user)
        .bind(hash.as_str())
        .execute(&mut *tx)
        .await?;
    links::revoke_all(tx, Purpose::ResetPassword, user).await?;
    Ok(end_all_sessions(tx, user).await?)
}

/// Sign out everywhere: every refresh token of the caller, and every access
/// token issued before this, stops working.
#[utoipa::path(
    post, path = "/auth/sign-out-everywhere", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "every session ended"),
        (status = 401, description = "not signed in", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn sign_out_everywhere(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    end_all_sessions(&mut tx, caller.id).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    pub current_password: String,
    pub new_password: String,
}

impl Validate for PasswordChange {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.current_password.is_empty() || self.current_password.chars().count() > MAX_PASSWORD
        {
            errors.push(FieldError::new("current_password", "must not be empty"));
        }
        check_new_password(&mut errors, "new_password", &self.new_password);
        errors
    }
}

/// Change the caller's password. Every other session ends; the answer is a
/// new session for this one. Wrong current passwords lock the account's
/// changes for a growing time, as failed sign-ins do.
#[utoipa::path(
    post, path = "/me/password", tag = "account", security(("bearer" = [])), request_body = PasswordChange,
    responses(
        (status = 200, description = "changed; a new session", body = Session),
        (status = 401, description = "not signed in", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the password changed (a reset, a sign-in with SSO) while this one was checked", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "wrong current password or weak new one", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many wrong current passwords; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn change_password(
    State(state): State<AppState>,
    caller: Caller,
    ValidJson(body): ValidJson<PasswordChange>,
) -> Result<(HeaderMap, Json<Session>), ApiError> {
    // A stolen access token must not become a way to guess the password
    // (and so take the account over) at the speed of the API.
    let guards = [Guard {
        scope: PASSWORD_CHANGE,
        id: caller.id.to_string(),
        threshold: state.limiter.limits.failures_before_lock,
    }];
    state.limiter.attempt(&guards).await?;
    let stored: Option<String> =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
            .bind(caller.id)
            .fetch_one(&state.pool)
            .await?;
    if !password::verify(body.current_password, stored.clone()).await? {
        return Err(ApiError::Validation(vec![FieldError::new(
            "current_password",
            "is not your password",
        )]));
    }
    state.limiter.clear(&guards).await;
    let hash = password::hash(body.new_password).await?;
    let mut tx = state.pool.begin().await?;
    // The password checked is still the account's: a reset or an SSO
    // takeover committed while this one hashed must not be overwritten.
    if !password_unchanged(&mut tx, caller.id, stored.as_deref(), "FOR NO KEY UPDATE").await? {
        return Err(ApiError::Conflict(FieldError::new(
            "current_password",
            "your password changed meanwhile; sign in again",
        )));
    }
    set_password(&mut tx, caller.id, hash).await?;
    let session = open_session(&mut tx, &state, caller.id, caller.role, None).await?;
    tx.commit().await?;
    Ok(session.respond(&state, caller.via_cookie))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgotPassword {
    pub email: String,
}

impl Validate for ForgotPassword {
    fn validate(&self) -> Vec<FieldError> {
        if valid_email(self.email.trim()) {
            vec![]
        } else {
            vec![FieldError::new("email", "must be an email address")]
        }
    }
}

/// Mail a password-reset link. Answers the same whether or not an account
/// has this email, so it cannot be used to find out who has one.
#[utoipa::path(
    post, path = "/auth/forgot-password", tag = "auth", request_body = ForgotPassword,
    responses(
        (status = 202, description = "if the account exists, a link is on its way"),
        (status = 429, description = "too many requests; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn forgot_password(
    State(state): State<AppState>,
    request_id: RequestId,
    ip: ClientIp,
    ValidJson(body): ValidJson<ForgotPassword>,
) -> Result<StatusCode, ApiError> {
    let limits = &state.limiter.limits;
    state
        .limiter
        .hit("forgot-ip", &ip.0, limits.forgot_per_ip)
        .await?;
    state
        .limiter
        .hit("forgot-email", body.email.trim(), limits.forgot_per_email)
        .await?;
    let found: Option<(Uuid, String, String)> = sqlx::query_as(
        "SELECT id, email, name FROM users WHERE lower(email) = lower($1) AND suspended_at IS NULL",
    )
    .bind(body.email.trim())
    .fetch_optional(&state.pool)
    .await?;
    if let Some((user, email, name)) = found {
        links::send_now(
            &state,
            Purpose::ResetPassword,
            user,
            (&email, &name),
            &request_id.0,
        )
        .await?;
    }
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPassword {
    /// The token from the mailed link.
    pub token: String,
    pub new_password: String,
}

impl Validate for ResetPassword {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.token.is_empty() || self.token.len() > 100 {
            errors.push(FieldError::new("token", "must be the token from the link"));
        }
        check_new_password(&mut errors, "new_password", &self.new_password);
        errors
    }
}

/// Set a new password with the token from a reset mail (single use); every
/// session of the account ends, and failed sign-ins to it are forgotten
/// (those from this client, and those from all clients together).
#[utoipa::path(
    post, path = "/auth/reset-password", tag = "auth", request_body = ResetPassword,
    responses(
        (status = 204, description = "password changed"),
        (status = 422, description = "unknown, used or expired token, or weak password", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many attempts from this address; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reset_password(
    State(state): State<AppState>,
    ip: ClientIp,
    ValidJson(body): ValidJson<ResetPassword>,
) -> Result<StatusCode, ApiError> {
    // The reset flow's per-address budget, as for asking for the link.
    state
        .limiter
        .hit("reset-ip", &ip.0, state.limiter.limits.forgot_per_ip)
        .await?;
    // Hashing costs tens of milliseconds of CPU: only for a live token. It
    // is checked again, and used up, in the transaction below.
    links::check(&state.pool, Purpose::ResetPassword, &body.token).await?;
    let hash = password::hash(body.new_password).await?;
    let mut tx = state.pool.begin().await?;
    // The account row first, then the links, in the order everything else
    // that touches both takes them (a suspension, a password change, an SSO
    // takeover, another reset): two links of one account used at once would
    // otherwise each hold its own link and wait for the other's. The second
    // then finds its link voided by the first.
    let account: Option<(String, bool)> = sqlx::query_as(
        "SELECT email, suspended_at IS NULL FROM users
          WHERE id = (SELECT user_id FROM user_tokens WHERE token_hash = $1)
          FOR NO KEY UPDATE",
    )
    .bind(secret::digest(&body.token))
    .fetch_optional(&mut *tx)
    .await?;
    let user = links::consume(&mut tx, Purpose::ResetPassword, &body.token).await?;
    // A suspended account gets no new password, whatever link it holds; the
    // answer is a dead link's, as asking for a link answers as for nobody.
    // The link is used up all the same (the suspension voided the others),
    // so it does not come back to life with the account.
    let Some((email, true)) = account else {
        tx.commit().await?;
        return Err(ApiError::Validation(vec![FieldError::new(
            "token",
            "is unknown, used or expired",
        )]));
    };
    set_password(&mut tx, user, hash).await?;
    tx.commit().await?;
    // Whoever reset it holds the mailbox: the owner, who must not stay
    // locked out by guesses (theirs, or a distributed attack's). Locks of
    // other clients are theirs to wait out.
    let guards = sign_in_guards(&state.limiter.limits, email.trim(), &ip.0);
    state.limiter.clear(&guards).await;
    Ok(StatusCode::NO_CONTENT)
}
