//! Avatars. An upload is recognised by its content (JPEG, PNG or WebP),
//! never by its name or declared type, decoded within limits, resized and
//! re-encoded as PNG: nothing the user sent is ever served back as-is.

use std::io::Cursor;

use axum::{
    Json,
    extract::{Multipart, Path, State, multipart::MultipartError},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use image::{ImageFormat, ImageReader, Limits, imageops::FilterType};
use object_store::{ObjectStoreExt, PutPayload, path::Path as StorePath};
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Problem},
    routes::{auth::Account, me},
    state::AppState,
};

const FIELD: &str = "avatar";
/// Avatars are stored at most this wide and high.
const SIZE: u32 = 512;

fn invalid(message: &str) -> ApiError {
    ApiError::Validation(vec![FieldError::new(FIELD, message)])
}

fn upload_error(e: MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        invalid("must be sent as multipart/form-data")
    }
}

/// Reads the `avatar` field, refusing as soon as it passes `max` bytes, so
/// an oversized upload is never held whole in memory.
async fn read_field(multipart: &mut Multipart, max: usize) -> Result<Vec<u8>, ApiError> {
    while let Some(mut field) = multipart.next_field().await.map_err(upload_error)? {
        if field.name() != Some(FIELD) {
            continue;
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(upload_error)? {
            if bytes.len() + chunk.len() > max {
                return Err(ApiError::PayloadTooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        return Ok(bytes);
    }
    Err(invalid("is required"))
}

/// Decodes (JPEG, PNG or WebP, by content), shrinks and re-encodes as PNG.
fn normalise(bytes: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| invalid("must be a JPEG, PNG or WebP image"))?;
    if !matches!(
        reader.format(),
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)
    ) {
        return Err(invalid("must be a JPEG, PNG or WebP image"));
    }
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_image_width = Some(8_000);
    limits.max_image_height = Some(8_000);
    limits.max_alloc = Some(256 * 1024 * 1024);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|_| invalid("is not a readable image"))?;
    let image = image.resize(SIZE, SIZE, FilterType::Lanczos3);
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(out.into_inner())
}

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
        (status = 413, description = "larger than AVATAR_MAX_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a JPEG, PNG or WebP image", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    mut multipart: Multipart,
) -> Result<Json<Account>, ApiError> {
    let bytes = read_field(&mut multipart, state.storage_config.avatar_max_bytes).await?;
    let png = tokio::task::spawn_blocking(move || normalise(bytes))
        .await
        .map_err(|e| ApiError::Internal(e.into()))??;
    let file = format!("{}.png", Uuid::now_v7());
    state
        .storage
        .put(&key(caller.id, &file), PutPayload::from(png))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let previous: Option<String> = sqlx::query_scalar(
        "UPDATE users u SET avatar = $2, updated_at = now()
           FROM (SELECT avatar FROM users WHERE id = $1 FOR UPDATE) old
          WHERE u.id = $1 RETURNING old.avatar",
    )
    .bind(caller.id)
    .bind(&file)
    .fetch_one(&state.pool)
    .await?;
    if let Some(previous) = previous {
        // Best effort: an orphaned file costs space, not correctness.
        let _ = state.storage.delete(&key(caller.id, &previous)).await;
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
           FROM (SELECT avatar FROM users WHERE id = $1 FOR UPDATE) old
          WHERE u.id = $1 RETURNING old.avatar",
    )
    .bind(caller.id)
    .fetch_one(&state.pool)
    .await?;
    if let Some(previous) = previous {
        let _ = state.storage.delete(&key(caller.id, &previous)).await;
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
    // Only names this API made: a UUID and `.png`, nothing that walks paths.
    let valid = file
        .strip_suffix(".png")
        .is_some_and(|stem| Uuid::parse_str(stem).is_ok());
    if !valid {
        return Err(ApiError::NotFound);
    }
    let found = state.storage.get(&key(user, &file)).await;
    let bytes = match found {
        Ok(result) => result
            .bytes()
            .await
            .map_err(|e| ApiError::Internal(e.into()))?,
        Err(object_store::Error::NotFound { .. }) => return Err(ApiError::NotFound),
        Err(e) => return Err(ApiError::Internal(e.into())),
    };
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(response)
}
