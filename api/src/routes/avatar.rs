//! Avatars, through the shared image pipeline (`crate::images`): sniffed,
//! decoded within limits, resized and re-encoded as PNG.

use axum::{
    Json,
    extract::{Multipart, State},
    http::StatusCode,
    response::Response,
};
use object_store::path::Path as StorePath;
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, Problem},
    extract::Path,
    images,
    routes::{auth::Account, me},
    state::AppState,
};

const FIELD: &str = "avatar";
/// Avatars are stored at most this wide and high.
const SIZE: u32 = 512;

fn key(user: Uuid, file: &str) -> StorePath {
    StorePath::from(format!("avatars/{user}/{file}"))
}

/// Upload an avatar (multipart field `avatar`: JPEG, PNG or WebP). It is
/// resized to fit 512×512 and stored as PNG.
#[utoipa::path(
    put, path = "/me/avatar", tag = "account", security(("bearer" = [])),
    request_body(content_type = "multipart/form-data", description = "field `avatar`: the image"),
    responses(
        (status = 200, description = "the account with its avatar_url", body = Account),
        (status = 413, description = "larger than IMAGE_MAX_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a JPEG, PNG or WebP image", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    mut multipart: Multipart,
) -> Result<Json<Account>, ApiError> {
    let max = state.storage_config.image_max_bytes;
    let bytes = images::read_field(&mut multipart, FIELD, max).await?;
    let png = images::normalise(bytes, FIELD, SIZE).await?;
    let file = images::new_file();
    images::store(&state, &key(caller.id, &file), png).await?;
    let previous: Option<String> = sqlx::query_scalar(
        "UPDATE users u SET avatar = $2, updated_at = now()
           FROM (SELECT avatar FROM users WHERE id = $1 FOR NO KEY UPDATE) old
          WHERE u.id = $1 RETURNING old.avatar",
    )
    .bind(caller.id)
    .bind(&file)
    .fetch_one(&state.pool)
    .await?;
    if let Some(previous) = previous {
        images::discard(&state, &key(caller.id, &previous)).await;
    }
    me::me(State(state), caller).await
}

/// Remove the caller's avatar.
#[utoipa::path(
    delete, path = "/me/avatar", tag = "account", security(("bearer" = [])),
    responses((status = 204, description = "removed"))
)]
pub async fn remove(State(state): State<AppState>, caller: Caller) -> Result<StatusCode, ApiError> {
    let previous: Option<String> = sqlx::query_scalar(
        "UPDATE users u SET avatar = NULL, updated_at = now()
           FROM (SELECT avatar FROM users WHERE id = $1 FOR NO KEY UPDATE) old
          WHERE u.id = $1 RETURNING old.avatar",
    )
    .bind(caller.id)
    .fetch_one(&state.pool)
    .await?;
    if let Some(previous) = previous {
        images::discard(&state, &key(caller.id, &previous)).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// An avatar image. File names are unique per upload, so it can be cached forever.
#[utoipa::path(
    get, path = "/avatars/{user}/{file}", tag = "account",
    params(("user" = Uuid, Path), ("file" = String, Path)),
    responses(
        (status = 200, description = "the PNG", content_type = "image/png"),
        (status = 404, description = "no such avatar", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn serve(
    State(state): State<AppState>,
    Path((user, file)): Path<(Uuid, String)>,
) -> Result<Response, ApiError> {
    if !images::valid_file(&file) {
        return Err(ApiError::NotFound);
    }
    images::serve(&state, &key(user, &file)).await
}
