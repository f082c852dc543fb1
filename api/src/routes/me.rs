//! The signed-in account.

use axum::{Json, extract::State};

use crate::{
    auth::{Caller, Role},
    error::{ApiError, Problem},
    routes::auth::Account,
    state::AppState,
};

/// The caller's own account.
#[utoipa::path(
    get, path = "/me", tag = "account",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the account", body = Account),
        (status = 401, description = "not signed in", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn me(State(state): State<AppState>, caller: Caller) -> Result<Json<Account>, ApiError> {
    let row: Option<(String, String, String, bool, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT email, name, role, email_verified_at IS NOT NULL, created_at FROM users WHERE id = $1",
    )
    .bind(caller.id)
    .fetch_optional(&state.pool)
    .await?;
    let (email, name, role, email_verified, created_at) = row.ok_or(ApiError::NotFound)?;
    Ok(Json(Account {
        id: caller.id,
        email,
        name,
        role: Role::parse(&role).ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?,
        email_verified,
        created_at,
    }))
}
