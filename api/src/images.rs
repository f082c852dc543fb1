//! Uploaded images (avatars, product photos). An upload is recognised by
//! its content (JPEG, PNG or WebP), never by its name or declared type,
//! read with a size cap, decoded within limits, resized and re-encoded as
//! PNG: nothing the user sent is ever served back as-is.

use std::{io::Cursor, sync::Arc};

use axum::{
    extract::{Multipart, multipart::MultipartError},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use image::{ImageFormat, ImageReader, Limits, imageops::FilterType};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path as StorePath};
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
pub async fn normalise(
    bytes: Vec<u8>,
    field: &'static str,
    size: u32,
) -> Result<Vec<u8>, ApiError> {
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
        // Shrunk to fit the box, never enlarged: a small photo enlarged is
        // only a bigger file.
        let image = if image.width() > size || image.height() > size {
            image.resize(size, size, FilterType::Lanczos3)
        } else {
            image
        };
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
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(response)
}

/// A file just stored whose row is not in yet: discarded unless [`keep`]
/// is called once the row is committed. Dropped armed (the request gone
/// mid-way, a panic) it discards in the background, since `Drop` cannot
/// wait; the error paths [`discard`](Stored::discard) it before answering.
///
/// Either way only once the table shows no row naming the file: a commit
/// whose answer never came back (the request dropped while it was in
/// flight, the connection lost just after it) may have put the row in,
/// and a row whose file is gone would 404 for good. When that cannot be
/// read the file stays: an orphan costs space, a broken row correctness.
///
/// [`keep`]: Stored::keep
struct Stored {
    storage: Arc<dyn ObjectStore>,
    pool: sqlx::PgPool,
    /// The gallery's table and the file's name in it.
    table: &'static str,
    file: String,
    key: Option<StorePath>,
}

impl Stored {
    fn new(state: &AppState, table: &'static str, file: &str, key: StorePath) -> Self {
        Self {
            storage: state.storage.clone(),
            pool: state.pool.clone(),
            table,
            file: file.to_string(),
            key: Some(key),
        }
    }

    /// The row is in: the file stays.
    fn keep(mut self) {
        self.key = None;
    }

    async fn discard(mut self) {
        if let Some(key) = self.key.take() {
            self.orphan(key).await;
        }
    }

    /// Deletes the file if no row names it (best effort, as [`discard`]).
    fn orphan(&self, key: StorePath) -> impl Future<Output = ()> + Send + 'static {
        let (storage, pool) = (self.storage.clone(), self.pool.clone());
        let (table, file) = (self.table, self.file.clone());
        async move {
            let named: Result<bool, sqlx::Error> = sqlx::query_scalar(sqlx::AssertSqlSafe(
                format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE file = $1)"),
            ))
            .bind(&file)
            .fetch_one(&pool)
            .await;
            if let Ok(false) = named {
                let _ = storage.delete(&key).await;
            }
        }
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(self.orphan(key));
        }
    }
}

/// An ordered set of images belonging to one row (a product's photos, a
/// review's): the table holding them, where their files live, their limits.
pub struct Gallery {
    /// Holds `id`, the owner column, `file` and `position`.
    pub table: &'static str,
    /// The owner's id column in `table`, e.g. `product_id`.
    pub owner_column: &'static str,
    /// The owner's table, locked while an image is added.
    pub owner_table: &'static str,
    /// The object-store folder: `<folder>/<owner>/<file>`.
    pub folder: &'static str,
    /// The multipart field carrying the upload.
    pub field: &'static str,
    /// Stored at most this wide and high.
    pub size: u32,
    pub max_images: i64,
    /// Shown only to some people (the caller checks who): never kept by
    /// shared caches.
    pub private: bool,
    /// When an image may be served at all, as SQL over the image row `i`
    /// and its owner `o`: a removed review's photos or a product hidden by
    /// moderation stop being served, though their files stay stored.
    pub shown: &'static [&'static str],
}

impl Gallery {
    pub fn key(&self, owner: Uuid, file: &str) -> StorePath {
        StorePath::from(format!("{}/{owner}/{file}", self.folder))
    }

    /// Reads, checks and stores an upload as the owner's last image. The
    /// caller has checked that the owner is the caller's.
    pub async fn append(
        &self,
        state: &AppState,
        owner: Uuid,
        multipart: &mut Multipart,
    ) -> Result<(), ApiError> {
        let max_bytes = state.storage_config.image_max_bytes;
        let bytes = read_field(multipart, self.field, max_bytes).await?;
        let png = normalise(bytes, self.field, self.size).await?;
        let file = new_file();
        let key = self.key(owner, &file);
        store(state, &key, png).await?;
        // Stored before its row exists (the row lock is not held across the
        // upload), so whatever stops the row going in (the limit, a database
        // error, the request dropped) takes the file away again.
        let stored = Stored::new(state, self.table, &file, key);
        match self.record(state, owner, &file).await {
            Ok(()) => {
                stored.keep();
                Ok(())
            }
            Err(e) => {
                stored.discard().await;
                Err(e)
            }
        }
    }

    /// The row of a stored image, last of the owner's; refused past the limit.
    async fn record(&self, state: &AppState, owner: Uuid, file: &str) -> Result<(), ApiError> {
        let mut tx = state.pool.begin().await?;
        // The owner row is locked, so concurrent uploads count and number right.
        let (n, next): (i64, i32) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT (SELECT count(*) FROM {t} WHERE {c} = o.id),
                    (SELECT coalesce(max(position) + 1, 0) FROM {t} WHERE {c} = o.id)
               FROM {o} o WHERE o.id = $1 FOR NO KEY UPDATE",
            t = self.table,
            c = self.owner_column,
            o = self.owner_table
        )))
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        if n >= self.max_images {
            return Err(ApiError::Conflict(FieldError::new(
                self.field,
                format!("at most {} images", self.max_images),
            )));
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (id, {}, file, position) VALUES ($1, $2, $3, $4)",
            self.table, self.owner_column
        )))
        .bind(Uuid::now_v7())
        .bind(owner)
        .bind(file)
        .bind(next)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Serves one of the owner's images by file name.
    pub async fn serve(
        &self,
        state: &AppState,
        owner: Uuid,
        file: &str,
    ) -> Result<Response, ApiError> {
        if !valid_file(file) {
            return Err(ApiError::NotFound);
        }
        let shown: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {table} i JOIN {owner_table} o ON o.id = i.{owner}
                             WHERE i.{owner} = $1 AND i.file = $2 AND {shown})",
            table = self.table,
            owner_table = self.owner_table,
            owner = self.owner_column,
            shown = self.shown.join(" AND "),
        )))
        .bind(owner)
        .bind(file)
        .fetch_one(&state.pool)
        .await?;
        if !shown {
            return Err(ApiError::NotFound);
        }
        let mut response = serve(state, &self.key(owner, file)).await?;
        // An hour, not forever: an image taken down (a removed review, a
        // hidden product) leaves shared caches within it.
        let cache = if self.private {
            "private, max-age=3600"
        } else {
            "public, max-age=3600"
        };
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
        Ok(response)
    }
}
