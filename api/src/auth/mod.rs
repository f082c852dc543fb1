//! Authentication: passwords, access tokens, refresh-token families and the
//! [`Caller`] extractor every protected handler takes.

pub mod config;
pub mod cookies;
pub mod links;
pub mod oidc;
pub mod secret;

pub use souk_shared::password;

use axum::{extract::FromRequestParts, http::request::Parts};
use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use config::AuthConfig;

use crate::{error::ApiError, state::AppState};

/// The only algorithm accepted: pinned, so a token claiming `none` or an
/// asymmetric algorithm is refused before its signature is looked at.
const ALGORITHM: Algorithm = Algorithm::HS256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Seller,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Seller => "seller",
            Self::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "customer" => Some(Self::Customer),
            "seller" => Some(Self::Seller),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// What an access token says.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// The account's session epoch when the token was issued: every
    /// session of the account ends when the epoch moves on.
    #[serde(default)]
    pub sv: i32,
}

/// Signs and checks access tokens.
pub struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_secs: i64,
}

impl Jwt {
    pub fn new(config: &AuthConfig) -> Self {
        let mut validation = Validation::new(ALGORITHM);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(config.secret.as_bytes()),
            decoding: DecodingKey::from_secret(config.secret.as_bytes()),
            validation,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            ttl_secs: config.access_ttl_secs,
        }
    }

    pub fn ttl_secs(&self) -> i64 {
        self.ttl_secs
    }

    /// An access token for `user` in session epoch `epoch` (read from the
    /// account, locked, in the transaction that opens the session).
    pub fn issue(&self, user: Uuid, role: Role, epoch: i32) -> String {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: user,
            role,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.ttl_secs,
            sv: epoch,
        };
        jsonwebtoken::encode(&Header::new(ALGORITHM), &claims, &self.encoding)
            .expect("HS256 signing does not fail")
    }

    pub fn verify(&self, token: &str) -> Option<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()
            .map(|data| data.claims)
    }
}

/// The authenticated caller. Taking it as an argument makes a handler
/// require a valid access token of an account that is not suspended.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: Uuid,
    pub role: Role,
    /// Authenticated by the access cookie rather than a bearer header.
    pub via_cookie: bool,
    pub email_verified: bool,
}

impl Caller {
    /// For what an unverified account may not do yet: check out, publish
    /// products, withdraw.
    pub fn require_verified(&self) -> Result<(), ApiError> {
        if self.email_verified {
            Ok(())
        } else {
            Err(ApiError::ForbiddenBecause(crate::error::FieldError::new(
                "email",
                "verify your email address first",
            )))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let bearer = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let via_cookie = bearer.is_none();
        let token = match bearer {
            Some(token) => token,
            // The cookie form: the browser sends it by itself, so a request
            // that changes anything must prove it came from our page.
            None => {
                let token = cookies::read(&parts.headers, cookies::ACCESS)
                    .filter(|t| !t.is_empty())
                    .ok_or(ApiError::Unauthorized)?;
                cookies::check_csrf(&parts.method, &parts.headers)?;
                token
            }
        };
        let claims = state
            .jwt
            .verify(token.trim())
            .ok_or(ApiError::Unauthorized)?;
        // Read on every request, so a suspension, a role change or the end
        // of every session (a password change or reset, signing out
        // everywhere: the session epoch moved on) takes effect at once
        // rather than when the token expires.
        let account: Option<(String, bool, bool, bool)> = sqlx::query_as(
            "SELECT role, suspended_at IS NULL, email_verified_at IS NOT NULL, session_epoch = $2
               FROM users WHERE id = $1",
        )
        .bind(claims.sub)
        .bind(claims.sv)
        .fetch_optional(&state.pool)
        .await?;
        match account {
            Some((role, true, email_verified, true)) => Ok(Self {
                id: claims.sub,
                role: Role::parse(&role).ok_or(ApiError::Unauthorized)?,
                via_cookie,
                email_verified,
            }),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// Ends every session of `user` in `tx`: the session epoch moves on (every
/// access token issued before stops working) and each refresh-token family
/// is revoked. A session opened later in `tx` (the new one a password
/// change answers with) is of the new epoch and keeps working.
///
/// The account row first, then its refresh tokens, as a session is opened
/// (see `open_session`, which share-locks the row before it writes a
/// token): a sign-in or refresh running meanwhile either committed its
/// token before this lock was granted, and the revocation (a later
/// statement) sees it, or waits and then reads the new epoch.
pub async fn end_all_sessions(tx: &mut sqlx::PgConnection, user: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET session_epoch = session_epoch + 1 WHERE id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Locks the account's row for the rest of `tx`: the account's requests
/// that count or look up each other's writes (address and card caps,
/// schedule caps, a retried subscribe) queue here instead of racing.
pub async fn serialize_account(tx: &mut sqlx::PgConnection, user: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(user)
        .execute(tx)
        .await?;
    Ok(())
}

/// A caller who is an admin. Admin handlers take this instead of [`Caller`],
/// so none can forget the check; anyone else gets 403.
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.role == Role::Admin {
            Ok(Self(caller))
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

/// A caller with a customer account: buying, saving cards, memberships and
/// schedules are theirs alone; anyone else gets 403 naming the role.
#[derive(Debug, Clone)]
pub struct Customer(pub Caller);

impl FromRequestParts<AppState> for Customer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.role == Role::Customer {
            Ok(Self(caller))
        } else {
            Err(ApiError::ForbiddenBecause(crate::error::FieldError::new(
                "role",
                "only customer accounts can do this",
            )))
        }
    }
}

/// A caller who is a seller, with the shop they run. Seller handlers take
/// this, and scope every query by `shop_id`, so a seller can never reach
/// another shop's data; anyone else gets 403.
#[derive(Debug, Clone)]
pub struct Seller {
    pub caller: Caller,
    pub shop_id: Uuid,
}

impl FromRequestParts<AppState> for Seller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.role != Role::Seller {
            return Err(ApiError::Forbidden);
        }
        let shop_id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM shops WHERE owner_id = $1")
            .bind(caller.id)
            .fetch_optional(&state.pool)
            .await?;
        let shop_id = shop_id.ok_or(ApiError::Forbidden)?;
        Ok(Self { caller, shop_id })
    }
}
