//! Single sign-on with OpenID Connect: start a sign-in at the provider, then
//! finish it with the code the provider sent the browser back with.
//!
//! The storefront calls `start`, sends the browser to `authorization_url`,
//! and on its callback page posts `code` and `state` to `callback`, which
//! answers with a session exactly as password sign-in does.

use axum::{Json, extract::State, http::HeaderMap};
use chrono::{Duration, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::{
        Role, end_all_sessions,
        links::{self, Purpose},
        oidc::{Identity, OidcClient, OidcError},
        secret,
    },
    client_ip::ClientIp,
    error::{ApiError, FieldError, Problem},
    extract::{ValidJson, Validate},
    routes::auth::{Session, open_session},
    state::AppState,
};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SsoStart {
    /// Send the browser here.
    pub authorization_url: String,
    /// Also in the URL; keep it (e.g. in session storage) and check that the
    /// provider sends the same one back before calling `/auth/oidc/callback`.
    pub state: String,
}

fn client(state: &AppState) -> Result<&OidcClient, ApiError> {
    state.oidc.as_deref().ok_or(ApiError::NotFound)
}

fn provider_failed(e: OidcError) -> ApiError {
    match e {
        OidcError::Unavailable(_) => {
            tracing::error!(error = %e, "single sign-on");
            ApiError::BadGateway("the identity provider could not be reached; try again")
        }
        OidcError::CodeRefused(_) => {
            tracing::warn!(error = %e, "single sign-on");
            ApiError::Validation(vec![FieldError::new(
                "code",
                "the identity provider refused this code; start again",
            )])
        }
        // Never say which check failed: it would help a forger.
        OidcError::BadToken(_) => {
            tracing::warn!(error = %e, "single sign-on");
            ApiError::Unauthorized
        }
    }
}

/// Start signing in with the identity provider (authorization code + PKCE).
#[utoipa::path(
    post, path = "/auth/oidc/start", tag = "auth",
    responses(
        (status = 200, description = "send the browser to authorization_url", body = SsoStart),
        (status = 404, description = "single sign-on is not configured", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many sign-ins started from this address; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "the identity provider could not be reached", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn start(
    State(state): State<AppState>,
    ip: ClientIp,
) -> Result<Json<SsoStart>, ApiError> {
    // Each start writes a row and may call the provider: without a budget
    // one client could fill `oidc_logins` or get us throttled there. The
    // sign-in budget per address, counted apart from the callbacks.
    state
        .limiter
        .hit("sso-start-ip", &ip.0, state.limiter.limits.sign_in_per_ip)
        .await?;
    let oidc = client(&state)?;
    let authorization = oidc.authorize().await.map_err(provider_failed)?;
    // Abandoned sign-ins are swept as new ones start.
    sqlx::query("DELETE FROM oidc_logins WHERE expires_at < now()")
        .execute(&state.pool)
        .await?;
    sqlx::query(
        "INSERT INTO oidc_logins (state_hash, nonce, code_verifier, expires_at)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(secret::digest(&authorization.state))
    .bind(&authorization.nonce)
    .bind(&authorization.code_verifier)
    .bind(Utc::now() + Duration::seconds(oidc.config.login_ttl_secs))
    .execute(&state.pool)
    .await?;
    Ok(Json(SsoStart {
        authorization_url: authorization.url,
        state: authorization.state,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SsoCallback {
    /// From the provider's redirect.
    pub code: String,
    /// From the provider's redirect; the one `start` returned.
    pub state: String,
    /// Browsers: set HttpOnly cookies instead of returning the tokens.
    #[serde(default)]
    pub use_cookies: bool,
}

impl Validate for SsoCallback {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.code.is_empty() || self.code.len() > 4096 {
            errors.push(FieldError::new(
                "code",
                "must be the code from the provider",
            ));
        }
        if self.state.is_empty() || self.state.len() > 100 {
            errors.push(FieldError::new(
                "state",
                "must be the state from the provider",
            ));
        }
        errors
    }
}

/// Finish signing in with the identity provider. The account is the one
/// linked to this provider identity, else the one with the same (provider
/// verified) email, else a new customer account.
#[utoipa::path(
    post, path = "/auth/oidc/callback", tag = "auth", request_body = SsoCallback,
    responses(
        (status = 200, description = "signed in", body = Session),
        (status = 401, description = "the provider's id_token failed a check, or the account is suspended", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the provider did not confirm an email address", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "single sign-on is not configured", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "unknown, used or expired state, or a code the provider refused", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many attempts; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "the identity provider could not be reached", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn callback(
    State(state): State<AppState>,
    ip: ClientIp,
    ValidJson(body): ValidJson<SsoCallback>,
) -> Result<(HeaderMap, Json<Session>), ApiError> {
    let oidc = client(&state)?;
    state
        .limiter
        .hit("sign-in-ip", &ip.0, state.limiter.limits.sign_in_per_ip)
        .await?;
    // Single use: deleted before anything else, whatever happens next.
    let started: Option<(String, String, bool)> = sqlx::query_as(
        "DELETE FROM oidc_logins WHERE state_hash = $1
         RETURNING nonce, code_verifier, expires_at > now()",
    )
    .bind(secret::digest(&body.state))
    .fetch_optional(&state.pool)
    .await?;
    let Some((nonce, code_verifier, true)) = started else {
        return Err(ApiError::Validation(vec![FieldError::new(
            "state",
            "unknown, used or expired sign-in; start again",
        )]));
    };
    let identity = oidc
        .finish(&body.code, &code_verifier, &nonce)
        .await
        .map_err(provider_failed)?;
    let mut tx = state.pool.begin().await?;
    let user = account_for(&mut tx, &identity).await?;
    // Share-locked, so a suspension committing meanwhile either came first
    // (and is seen here) or waits for this sign-in and then ends its session;
    // `open_session` checks the standing again under the same lock.
    let found: (String, bool) =
        sqlx::query_as("SELECT role, suspended_at IS NULL FROM users WHERE id = $1 FOR SHARE")
            .bind(user)
            .fetch_one(&mut *tx)
            .await?;
    let role = match found {
        (role, true) => Role::parse(&role).ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?,
        _ => return Err(ApiError::Unauthorized),
    };
    let session = open_session(&mut tx, &state, user, role, None).await?;
    tx.commit().await?;
    Ok(session.respond(&state, body.use_cookies))
}

/// The account an identity signs in to, linking or creating it as needed.
///
/// Two callbacks for one identity not linked yet (a double submit, two
/// tabs) may both find no link: the second then waits for the first's link
/// or account to commit, and signs in to the same account.
async fn account_for(tx: &mut PgConnection, identity: &Identity) -> Result<Uuid, ApiError> {
    // Looked for again when a concurrent callback (or registration) wrote
    // the account or the link between the look and the insert: the account
    // it created, then its link, are found on the next rounds.
    for _ in 0..3 {
        if let Some(user) = link_or_account(tx, identity).await? {
            return Ok(user);
        }
    }
    Err(anyhow::anyhow!("the account for {} kept changing", identity.subject).into())
}

/// The linked (or linked now) account, or `None` when the account about to
/// be created for the identity's email appeared meanwhile: look again.
async fn link_or_account(
    tx: &mut PgConnection,
    identity: &Identity,
) -> Result<Option<Uuid>, ApiError> {
    let linked: Option<Uuid> = sqlx::query_scalar(
        "UPDATE user_identities SET last_sign_in_at = now(), email = coalesce($3, email)
          WHERE issuer = $1 AND subject = $2
         RETURNING user_id",
    )
    .bind(&identity.issuer)
    .bind(&identity.subject)
    .bind(&identity.email)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(user) = linked {
        return Ok(Some(user));
    }
    // Linking by email is only safe when the provider vouches for it;
    // otherwise anyone could claim an existing account's address there.
    let email = match &identity.email {
        Some(email) if identity.email_verified => email,
        _ => {
            return Err(ApiError::ForbiddenBecause(FieldError::new(
                "email",
                "the identity provider did not confirm an email address for this account",
            )));
        }
    };
    let existing: Option<(Uuid, bool)> = sqlx::query_as(
        "SELECT id, email_verified_at IS NOT NULL FROM users
          WHERE lower(email) = lower($1) FOR NO KEY UPDATE",
    )
    .bind(email)
    .fetch_optional(&mut *tx)
    .await?;
    let user = match existing {
        Some((user, verified)) => {
            if !verified {
                // Nobody ever proved this address for the account, so its
                // password may be a squatter's, set before the real owner
                // came along: it goes, with every session and reset link
                // of the account. The owner can set a password by reset.
                sqlx::query(
                    "UPDATE users SET password_hash = NULL, updated_at = now() WHERE id = $1",
                )
                .bind(user)
                .execute(&mut *tx)
                .await?;
                links::revoke_all(tx, Purpose::ResetPassword, user).await?;
                end_all_sessions(tx, user).await?;
            }
            // The provider proved the address, so it counts as verified here.
            sqlx::query(
                "UPDATE users SET email_verified_at = coalesce(email_verified_at, now()),
                        updated_at = now() WHERE id = $1",
            )
            .bind(user)
            .execute(&mut *tx)
            .await?;
            user
        }
        None => {
            let user = Uuid::now_v7();
            let name = identity
                .name
                .as_deref()
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| email.split('@').next().unwrap_or(email));
            // A concurrent callback for this identity (or a registration)
            // may have taken the address since the look above: this waits
            // for it to commit, and then the account is looked up again.
            let created = sqlx::query(
                "INSERT INTO users (id, email, password_hash, name, role, email_verified_at)
                 VALUES ($1, $2, NULL, $3, 'customer', now())
                 ON CONFLICT DO NOTHING",
            )
            .bind(user)
            .bind(email)
            .bind(name.chars().take(100).collect::<String>())
            .execute(&mut *tx)
            .await?;
            if created.rows_affected() == 0 {
                return Ok(None);
            }
            user
        }
    };
    // A concurrent callback for this identity may have linked it since the
    // look above (it held the account's row until it committed): its link
    // stands, and the next look finds it.
    let linked = sqlx::query(
        "INSERT INTO user_identities (issuer, subject, user_id, email) VALUES ($1, $2, $3, $4)
         ON CONFLICT (issuer, subject) DO NOTHING",
    )
    .bind(&identity.issuer)
    .bind(&identity.subject)
    .bind(user)
    .bind(email)
    .execute(&mut *tx)
    .await?;
    Ok((linked.rows_affected() == 1).then_some(user))
}
