//! Single-use links mailed to users: email verification and password reset.
//! The token travels only in the mail; the database keeps its SHA-256.

use chrono::Duration;
use souk_shared::{contracts::EmailRequested, envelope::Envelope, outbox};
use sqlx::PgConnection;
use uuid::Uuid;

use super::secret;
use crate::{error::ApiError, state::AppState};

#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    VerifyEmail,
    ResetPassword,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::ResetPassword => "reset_password",
        }
    }
    /// The storefront page the link opens.
    fn page(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify-email",
            Self::ResetPassword => "reset-password",
        }
    }
    fn lifetime(self, state: &AppState) -> Duration {
        match self {
            Self::VerifyEmail => Duration::hours(state.auth.verify_email_ttl_hours),
            Self::ResetPassword => Duration::minutes(state.auth.reset_password_ttl_minutes),
        }
    }
}

/// A link's lifetime as the mail says it: "1 hour", "24 hours", "90 minutes".
fn human(d: Duration) -> String {
    let minutes = d.num_minutes();
    let (n, unit) = if minutes != 0 && minutes % 60 == 0 {
        (d.num_hours(), "hour")
    } else {
        (minutes, "minute")
    };
    let s = if n == 1 { "" } else { "s" };
    format!("{n} {unit}{s}")
}

/// Stores a new token and enqueues the mail with its link, in the caller's
/// transaction.
pub async fn send(
    tx: &mut PgConnection,
    state: &AppState,
    purpose: Purpose,
    user: Uuid,
    (email, name): (&str, &str),
    correlation_id: &str,
) -> Result<(), ApiError> {
    let token = secret::generate();
    let lifetime = purpose.lifetime(state);
    sqlx::query(
        "INSERT INTO user_tokens (token_hash, user_id, purpose, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
    )
    .bind(secret::digest(&token))
    .bind(user)
    .bind(purpose.name())
    .bind(lifetime.num_seconds() as f64)
    .execute(&mut *tx)
    .await?;
    let mail = EmailRequested {
        to: email.to_string(),
        template: purpose.name().into(),
        data: serde_json::json!({
            "name": name,
            "link": format!("{}/{}?token={token}", state.auth.storefront_url, purpose.page()),
            "expires": human(lifetime),
        }),
    };
    outbox::enqueue(tx, &Envelope::new(&mail, correlation_id)).await?;
    Ok(())
}

/// [`send`] in a transaction of its own, committed, with the relays woken.
pub async fn send_now(
    state: &AppState,
    purpose: Purpose,
    user: Uuid,
    to: (&str, &str),
    correlation_id: &str,
) -> Result<(), ApiError> {
    let mut tx = state.pool.begin().await?;
    send(&mut tx, state, purpose, user, to, correlation_id).await?;
    state.commit_with_messages(tx).await?;
    Ok(())
}

/// The answer for a token that is unknown, used or expired: a 422 naming
/// the `token` field.
fn not_live() -> ApiError {
    ApiError::Validation(vec![crate::error::FieldError::new(
        "token",
        "is unknown, used or expired",
    )])
}

/// Fails as [`consume`] would if the token is not live, without using it up:
/// a cheap look first, so a made-up token costs no expensive work (such as
/// hashing a new password) before it is refused.
pub async fn check(pool: &sqlx::PgPool, purpose: Purpose, token: &str) -> Result<(), ApiError> {
    let live: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM user_tokens
          WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now())",
    )
    .bind(secret::digest(token))
    .bind(purpose.name())
    .fetch_one(pool)
    .await?;
    if live { Ok(()) } else { Err(not_live()) }
}

/// Uses up a token and returns the user it was for; a token that is
/// unknown, used or expired is a 422 naming the `token` field.
pub async fn consume(
    tx: &mut PgConnection,
    purpose: Purpose,
    token: &str,
) -> Result<Uuid, ApiError> {
    let user: Option<Uuid> = sqlx::query_scalar(
        "UPDATE user_tokens SET used_at = now()
          WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now()
          RETURNING user_id",
    )
    .bind(secret::digest(token))
    .bind(purpose.name())
    .fetch_optional(tx)
    .await?;
    user.ok_or_else(not_live)
}

/// Uses up every outstanding `purpose` link of `user`, in the caller's
/// transaction: once the password has changed (or the account changed
/// hands), an older reset mail must not set it again.
pub async fn revoke_all(
    tx: &mut PgConnection,
    purpose: Purpose,
    user: Uuid,
) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE user_tokens SET used_at = now()
          WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL",
    )
    .bind(user)
    .bind(purpose.name())
    .execute(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_read_in_the_right_number() {
        assert_eq!(human(Duration::minutes(60)), "1 hour");
        assert_eq!(human(Duration::hours(24)), "24 hours");
        assert_eq!(human(Duration::minutes(1)), "1 minute");
        assert_eq!(human(Duration::minutes(30)), "30 minutes");
        assert_eq!(human(Duration::minutes(90)), "90 minutes");
        assert_eq!(human(Duration::zero()), "0 minutes");
    }
}
