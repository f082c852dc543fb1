//! The signed-in account.

use axum::{Json, extract::State};

use crate::{
    auth::{Caller, Role},
    error::{ApiError, FieldError, Problem},
    extract::{ValidJson, Validate},
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
    #[derive(sqlx::FromRow)]
    struct Row {
        email: String,
        name: String,
        role: String,
        email_verified: bool,
        avatar: Option<String>,
        created_at: chrono::DateTime<chrono::Utc>,
    }
    let row: Row = sqlx::query_as(
        "SELECT email, name, role, email_verified_at IS NOT NULL AS email_verified, avatar, created_at
           FROM users WHERE id = $1",
    )
    .bind(caller.id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::NotFound)?;
    let Row {
        email,
        name,
        role,
        email_verified,
        avatar,
        created_at,
    } = row;
    Ok(Json(Account {
        id: caller.id,
        email,
        name,
        role: Role::parse(&role).ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?,
        email_verified,
        avatar_url: avatar.map(|file| format!("/api/v1/avatars/{}/{file}", caller.id)),
        created_at,
    }))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    pub name: Option<String>,
}

impl Validate for ProfileUpdate {
    fn validate(&self) -> Vec<FieldError> {
        match &self.name {
            Some(name) if name.trim().is_empty() || name.chars().count() > 100 => {
                vec![FieldError::new("name", "must be 1 to 100 characters")]
            }
            _ => vec![],
        }
    }
}

/// Update the caller's profile; absent fields stay as they are.
#[utoipa::path(
    patch, path = "/me", tag = "account", security(("bearer" = [])), request_body = ProfileUpdate,
    responses(
        (status = 200, description = "the updated account", body = Account),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ValidJson(body): ValidJson<ProfileUpdate>,
) -> Result<Json<Account>, ApiError> {
    if let Some(name) = &body.name {
        sqlx::query("UPDATE users SET name = $2, updated_at = now() WHERE id = $1")
            .bind(caller.id)
            .bind(name.trim())
            .execute(&state.pool)
            .await?;
    }
    me(State(state), caller).await
}
