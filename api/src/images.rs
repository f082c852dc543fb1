//! Uploaded images (avatars, product photos). An upload is recognised by
//! its content (JPEG, PNG or WebP), never by its name or declared type,
//! read with a size cap, decoded within limits, resized and re-encoded as
//! PNG: nothing the user sent is ever served back as-is.

use std::io::Cursor;

use axum::{
    extract::{Multipart, multipart::MultipartError},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use image::{ImageFormat, ImageReader, Limits, imageops::FilterType};
use object_store::{ObjectStoreExt, PutPayload, path::Path as StorePath};
use uuid::Uuid;

use crate::{
    error::{ApiError, FieldError},
    state::AppState,
};

fn invalid(field: &str, message: &str) -> ApiError {
    ApiError::Validation(vec![FieldError::new(field, message)])
}

/// Reads the multipart `field`, refusing as soon as it passes `max` bytes,
/// so an oversized upload is never held whole in memory.
pub async fn read_field(
    multipart: &mut Multipart,
    field_name: &str,
    max: usize,
) -> Result<Vec<u8>, ApiError> {
    let upload_error = |e: MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            invalid(field_name, "must be sent as multipart/form-data")
        }
    };
    while let Some(mut field) = multipart.next_field().await.map_err(upload_error)? {
        if field.name() != Some(field_name) {
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
    Err(invalid(field_name, "is required"))
}

/// Decodes (JPEG, PNG or WebP, by content), shrinks to fit `size`×`size`
/// and re-encodes as PNG, off the async threads.
pub async fn normalise(bytes: Vec<u8>, field: &'static str, size: u32) -> Result<Vec<u8>, ApiError> {
    tokio::task::spawn_blocking(move || {
        let not_image = || invalid(field, "must be a JPEG, PNG or WebP image");
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|_| not_image())?;
        if !matches!(
            reader.format(),
            Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)
        ) {
            return Err(not_image());
        }
        let mut limits = Limits::default();
        limits.max_image_width = Some(8_000);
        limits.max_image_height = Some(8_000);
        limits.max_alloc = Some(256 * 1024 * 1024);
        reader.limits(limits);
        let image = reader
            .decode()
            .map_err(|_| invalid(field, "is not a readable image"))?;
        let image = image.resize(size, size, FilterType::Lanczos3);
        let mut out = Cursor::new(Vec::new());
        image
            .write_to(&mut out, ImageFormat::Png)
            .map_err(|e| ApiError::Internal(e.into()))?;
        Ok(out.into_inner())
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?
}

/// A new, unique file name for a stored PNG.
pub fn new_file() -> String {
    format!("{}.png", Uuid::now_v7())
}

/// Only names this API made: a UUID and `.png`, nothing that walks paths.
pub fn valid_file(file: &str) -> bool {
    file.strip_suffix(".png")
        .is_some_and(|stem| Uuid::parse_str(stem).is_ok())
}

pub async fn store(state: &AppState, key: &StorePath, png: Vec<u8>) -> Result<(), ApiError> {
    state
        .storage
        .put(key, PutPayload::from(png))
        .await
        .map(|_| ())
        .map_err(|e| ApiError::Internal(e.into()))
}

/// Best effort: an orphaned file costs space, not correctness.
pub async fn discard(state: &AppState, key: &StorePath) {
    let _ = state.storage.delete(key).await;
}

/// A stored PNG. File names are unique per upload, so it is cached forever.
pub async fn serve(state: &AppState, key: &StorePath) -> Result<Response, ApiError> {
    let bytes = match state.storage.get(key).await {
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
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    Ok(response)
}
