//! In-app notifications (low stock, new orders, ...), newest first.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidQuery, Validate},
    routes::catalog::{Page, Paging},
    state::AppState,
};

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Notification {
    pub id: Uuid,
    /// E.g. `low_stock`.
    pub kind: String,
    /// What the notification is about; its shape depends on `kind`.
    pub data: serde_json::Value,
    pub read_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NotificationQuery {
    /// Only unread ones.
    pub unread: Option<bool>,
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100; 20 if absent.
    pub per_page: Option<u32>,
}

impl Validate for NotificationQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// The caller's notifications, newest first.
#[utoipa::path(
    get, path = "/me/notifications", tag = "account", security(("bearer" = [])), params(NotificationQuery),
    responses(
        (status = 200, description = "a page of notifications", body = Page<Notification>),
        (status = 401, description = "not signed in", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ValidQuery(query): ValidQuery<NotificationQuery>,
) -> Result<Json<Page<Notification>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let unread = query.unread.unwrap_or(false);
    let items: Vec<Notification> = sqlx::query_as(
        "SELECT id, kind, data, read_at, created_at FROM notifications
          WHERE user_id = $1 AND (NOT $2 OR read_at IS NULL)
          ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4",
    )
    .bind(caller.id)
    .bind(unread)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM notifications WHERE user_id = $1 AND (NOT $2 OR read_at IS NULL)",
    )
    .bind(caller.id)
    .bind(unread)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(paging.page(items, total)))
}

/// Mark one of the caller's notifications read.
#[utoipa::path(
    post, path = "/me/notifications/{id}/read", tag = "account", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 204, description = "read"),
        (status = 404, description = "no such notification of yours", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn mark_read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let found = sqlx::query(
        "UPDATE notifications SET read_at = coalesce(read_at, now()) WHERE id = $1 AND user_id = $2",
    )
    .bind(id)
    .bind(caller.id)
    .execute(&state.pool)
    .await?;
    if found.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}
