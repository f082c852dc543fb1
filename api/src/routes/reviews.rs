//! Reviews: only a customer whose order line for the product was delivered
//! may review it, once; the shop's seller may reply once; admins may remove
//! a review. Product and shop averages are kept current in the same
//! transaction as each change.

use axum::{
    Json,
    extract::{Multipart, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{Admin, Caller, Seller},
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    http_cache::cached_json,
    images::Gallery,
    routes::{
        admin::{Reason, audit},
        catalog::{self, Page, Paging},
    },
    state::AppState,
};

const PHOTOS: Gallery = Gallery {
    table: "review_images",
    owner_column: "review_id",
    owner_table: "reviews",
    folder: "reviews",
    field: "image",
    size: 1200,
    max_images: 4,
    private: false,
    // Not once removed, nor while its product is off the storefront (as
    // the product's reviews are then).
    shown: &[
        "o.removed_at IS NULL",
        souk_shared::catalog::VISIBLE_PRODUCT_OF_O,
    ],
};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Review {
    pub id: Uuid,
    pub product_id: Uuid,
    /// 1 to 5.
    pub rating: i32,
    pub body: String,
    /// The reviewer's display name.
    pub author: String,
    pub images: Vec<String>,
    /// The seller's reply, if any.
    pub reply: Option<String>,
    pub replied_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct ReviewRow {
    id: Uuid,
    product_id: Uuid,
    rating: i32,
    body: String,
    author: String,
    files: Vec<String>,
    reply: Option<String>,
    replied_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

impl From<ReviewRow> for Review {
    fn from(r: ReviewRow) -> Self {
        Self {
            images: r.files.iter().map(|f| url(r.id, f)).collect(),
            id: r.id,
            product_id: r.product_id,
            rating: r.rating,
            body: r.body,
            author: r.author,
            reply: r.reply,
            replied_at: r.replied_at,
            created_at: r.created_at,
        }
    }
}

const REVIEW_COLUMNS: &str = "r.id, r.product_id, r.rating, r.body, u.name AS author, r.reply,
     r.replied_at, r.created_at,
     array(SELECT file FROM review_images i WHERE i.review_id = r.id ORDER BY position) AS files";

fn url(review: Uuid, file: &str) -> String {
    format!("/api/v1/review-images/{review}/{file}")
}

async fn one(conn: &mut PgConnection, id: Uuid) -> Result<Review, ApiError> {
    let row: ReviewRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {REVIEW_COLUMNS} FROM reviews r JOIN users u ON u.id = r.author_id WHERE r.id = $1"
    )))
    .bind(id)
    .fetch_one(conn)
    .await?;
    Ok(row.into())
}

/// Adds (or with negative signs, takes back) one rating on the product and
/// its shop.
async fn count_rating(
    tx: &mut PgConnection,
    product: Uuid,
    shop: Uuid,
    stars: i64,
    reviews: i64,
) -> Result<(), ApiError> {
    sqlx::query(
        "WITH product AS (
             UPDATE products SET rating_sum = rating_sum + $3, rating_count = rating_count + $4
              WHERE id = $1)
         UPDATE shops SET rating_sum = rating_sum + $3, rating_count = rating_count + $4
          WHERE id = $2",
    )
    .bind(product)
    .bind(shop)
    .bind(stars)
    .bind(reviews)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewReview {
    /// 1 to 5 stars.
    pub rating: i32,
    #[serde(default)]
    pub body: String,
}

impl Validate for NewReview {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !(1..=5).contains(&self.rating) {
            errors.push(FieldError::new("rating", "must be 1 to 5"));
        }
        if self.body.chars().count() > 5000 {
            errors.push(FieldError::new("body", "must be at most 5000 characters"));
        }
        errors
    }
}

/// Review a product the caller received. Once per product.
#[utoipa::path(
    post, path = "/products/{id}/reviews", tag = "reviews", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = NewReview,
    responses(
        (status = 201, description = "published", body = Review),
        (status = 403, description = "no delivered purchase of this product", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such product on the storefront", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already reviewed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(product): Path<Uuid>,
    ValidJson(body): ValidJson<NewReview>,
) -> Result<(StatusCode, Json<Review>), ApiError> {
    // Only what the storefront shows takes reviews (a 404 otherwise, as its
    // reviews and its page are): none for a product withdrawn, hidden by
    // moderation or in a shop suspended, whoever bought it.
    // One statement, in the review's own transaction.
    let mut tx = state.pool.begin().await?;
    let shop: Option<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT p.shop_id FROM products p JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
          WHERE p.id = $1 AND {}",
        souk_shared::catalog::VISIBLE
    )))
    .bind(product)
    .fetch_optional(&mut *tx)
    .await?;
    let shop = shop.ok_or(ApiError::NotFound)?;
    let received: bool = sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM order_lines l
               JOIN orders o ON o.id = l.order_id
               JOIN seller_orders so ON so.order_id = l.order_id AND so.shop_id = l.shop_id
              WHERE l.product_id = $1 AND o.customer_id = $2 AND so.status = 'delivered')",
    )
    .bind(product)
    .bind(caller.id)
    .fetch_one(&mut *tx)
    .await?;
    if !received {
        return Err(ApiError::ForbiddenBecause(FieldError::new(
            "product_id",
            "only customers who received this product may review it",
        )));
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO reviews (id, product_id, shop_id, author_id, rating, body)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(product)
    .bind(shop)
    .bind(caller.id)
    .bind(body.rating)
    .bind(body.body.trim())
    .execute(&mut *tx)
    .await?;
    count_rating(&mut tx, product, shop, i64::from(body.rating), 1).await?;
    let review = one(&mut tx, id).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(review)))
}

/// Add a photo to the caller's review (multipart field `image`; at most 4).
#[utoipa::path(
    post, path = "/reviews/{id}/images", tag = "reviews", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    request_body(content_type = "multipart/form-data", description = "field `image`: the photo"),
    responses(
        (status = 201, description = "the review with its photos", body = Review),
        (status = 404, description = "no such review of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already 4 photos", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a JPEG, PNG or WebP image", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn add_image(
    State(state): State<AppState>,
    caller: Caller,
    Path(review): Path<Uuid>,
    mut multipart: Multipart,
) -> Result<(StatusCode, Json<Review>), ApiError> {
    let mine: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM reviews WHERE id = $1 AND author_id = $2 AND removed_at IS NULL",
    )
    .bind(review)
    .bind(caller.id)
    .fetch_optional(&state.pool)
    .await?;
    mine.ok_or(ApiError::NotFound)?;
    PHOTOS.append(&state, review, &mut multipart).await?;
    let mut conn = state.pool.acquire().await?;
    Ok((StatusCode::CREATED, Json(one(&mut conn, review).await?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReviewQuery {
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100; 20 if absent.
    pub per_page: Option<u32>,
}

impl Validate for ReviewQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// A product's reviews, newest first.
#[utoipa::path(
    get, path = "/products/{id}/reviews", tag = "reviews", params(("id" = Uuid, Path), ReviewQuery),
    responses(
        (status = 200, description = "a page of reviews (with ETag)", body = Page<Review>),
        (status = 304, description = "unchanged since the ETag in If-None-Match"),
        (status = 404, description = "no such product on the storefront", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(product): Path<Uuid>,
    ValidQuery(query): ValidQuery<ReviewQuery>,
) -> Result<Response, ApiError> {
    catalog::ensure_visible(&state, product).await?;
    let paging = Paging::new(query.page, query.per_page);
    let rows: Vec<ReviewRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {REVIEW_COLUMNS} FROM reviews r JOIN users u ON u.id = r.author_id
          WHERE r.product_id = $1 AND r.removed_at IS NULL
          ORDER BY r.created_at DESC, r.id DESC LIMIT $2 OFFSET $3"
    )))
    .bind(product)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reviews WHERE product_id = $1 AND removed_at IS NULL",
    )
    .bind(product)
    .fetch_one(&state.pool)
    .await?;
    let page = paging.page(rows.into_iter().map(Review::from).collect(), total);
    Ok(cached_json(&headers, &page))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewReply {
    pub body: String,
}

impl Validate for ReviewReply {
    fn validate(&self) -> Vec<FieldError> {
        let n = self.body.trim().chars().count();
        if n == 0 || n > 2000 {
            vec![FieldError::new("body", "must be 1 to 2000 characters")]
        } else {
            vec![]
        }
    }
}

/// Reply to a review of one of the seller's products. Once.
#[utoipa::path(
    post, path = "/seller/reviews/{id}/reply", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = ReviewReply,
    responses(
        (status = 200, description = "the review with the reply", body = Review),
        (status = 404, description = "no such review of this shop's products", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already replied", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reply(
    State(state): State<AppState>,
    seller: Seller,
    Path(review): Path<Uuid>,
    ValidJson(body): ValidJson<ReviewReply>,
) -> Result<Json<Review>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let found: Option<bool> = sqlx::query_scalar(
        "SELECT reply IS NOT NULL FROM reviews
          WHERE id = $1 AND shop_id = $2 AND removed_at IS NULL FOR NO KEY UPDATE",
    )
    .bind(review)
    .bind(seller.shop_id)
    .fetch_optional(&mut *tx)
    .await?;
    match found {
        None => return Err(ApiError::NotFound),
        Some(true) => {
            return Err(ApiError::Conflict(FieldError::new(
                "body",
                "this review already has your reply",
            )));
        }
        Some(false) => {}
    }
    sqlx::query("UPDATE reviews SET reply = $2, replied_at = now() WHERE id = $1")
        .bind(review)
        .bind(body.body.trim())
        .execute(&mut *tx)
        .await?;
    let updated = one(&mut tx, review).await?;
    tx.commit().await?;
    Ok(Json(updated))
}

/// Remove a review (moderation): hidden, and out of the averages.
#[utoipa::path(
    post, path = "/admin/reviews/{id}/remove", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 204, description = "removed"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such review", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    admin: Admin,
    Path(review): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let found: Option<(Uuid, Uuid, i32, bool)> = sqlx::query_as(
        "SELECT product_id, shop_id, rating, removed_at IS NOT NULL FROM reviews
          WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(review)
    .fetch_optional(&mut *tx)
    .await?;
    let (product, shop, rating, already) = found.ok_or(ApiError::NotFound)?;
    if !already {
        sqlx::query("UPDATE reviews SET removed_at = now(), removed_reason = $2 WHERE id = $1")
            .bind(review)
            .bind(body.reason.trim())
            .execute(&mut *tx)
            .await?;
        count_rating(&mut tx, product, shop, -i64::from(rating), -1).await?;
        audit(
            &mut tx,
            &admin,
            "review.remove",
            ("review", review),
            body.reason.trim(),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A review photo.
#[utoipa::path(
    get, path = "/review-images/{review}/{file}", tag = "reviews",
    params(("review" = Uuid, Path), ("file" = String, Path)),
    responses(
        (status = 200, description = "the PNG", content_type = "image/png"),
        (status = 404, description = "no such image", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn serve_image(
    State(state): State<AppState>,
    Path((review, file)): Path<(Uuid, String)>,
) -> Result<Response, ApiError> {
    PHOTOS.serve(&state, review, &file).await
}
