//! Shops: a public page per shop, changed only by the seller who owns it.

use axum::{Json, extract::State, http::HeaderMap, response::Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, Validate},
    http_cache::cached_json,
    routes::{catalog::Rating, support::valid_email},
    state::AppState,
};

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Shop {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub description: String,
    pub contact_email: String,
    /// Flat shipping per order from this shop, minor units; absent: the
    /// platform's flat rate.
    pub shipping_flat_minor: Option<i64>,
    /// From the reviews of the shop's products.
    #[sqlx(skip)]
    pub rating: Rating,
    pub created_at: DateTime<Utc>,
}

/// A shop and its owner. The public page (`public`) shows only approved
/// shops that are not suspended; their seller reaches them regardless.
async fn by_slug(state: &AppState, slug: &str, public: bool) -> Result<(Shop, Uuid), ApiError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        shop: Shop,
        owner_id: Uuid,
        rating_sum: i64,
        rating_count: i64,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT s.id, s.name, s.slug, s.description, s.contact_email, s.shipping_flat_minor, s.created_at, s.owner_id,
                s.rating_sum, s.rating_count
           FROM shops s JOIN users u ON u.id = s.owner_id
          WHERE s.slug = $1 AND u.suspended_at IS NULL
            AND (NOT $2 OR (s.approved_at IS NOT NULL AND s.suspended_at IS NULL))",
    )
    .bind(slug)
    .bind(public)
    .fetch_optional(&state.pool)
    .await?;
    row.map(|r| {
        let rating = Rating::new(r.rating_sum, r.rating_count);
        (Shop { rating, ..r.shop }, r.owner_id)
    })
    .ok_or(ApiError::NotFound)
}

/// A shop's public page. Shops of suspended sellers are not shown.
#[utoipa::path(
    get, path = "/shops/{slug}", tag = "shops", params(("slug" = String, Path)),
    responses(
        (status = 200, description = "the shop (with ETag)", body = Shop),
        (status = 304, description = "unchanged since the ETag in If-None-Match"),
        (status = 404, description = "no such shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    Ok(cached_json(
        &headers,
        &by_slug(&state, &slug, true).await?.0,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShopUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub contact_email: Option<String>,
    /// Flat shipping per order from this shop, minor units.
    pub shipping_flat_minor: Option<i64>,
}

impl Validate for ShopUpdate {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(name) = &self.name
            && (name.trim().is_empty() || name.chars().count() > 100)
        {
            errors.push(FieldError::new("name", "must be 1 to 100 characters"));
        }
        if let Some(description) = &self.description
            && description.chars().count() > 2000
        {
            errors.push(FieldError::new(
                "description",
                "must be at most 2000 characters",
            ));
        }
        if let Some(email) = &self.contact_email
            && !valid_email(email.trim())
        {
            errors.push(FieldError::new("contact_email", "must be an email address"));
        }
        if self
            .shipping_flat_minor
            .is_some_and(|m| !(0..=1_000_000).contains(&m))
        {
            errors.push(FieldError::new(
                "shipping_flat_minor",
                "must be 0 to 1000000 minor units",
            ));
        }
        errors
    }
}

/// Change a shop; only its own seller may.
#[utoipa::path(
    patch, path = "/shops/{slug}", tag = "shops", security(("bearer" = [])),
    params(("slug" = String, Path)), request_body = ShopUpdate,
    responses(
        (status = 200, description = "the updated shop", body = Shop),
        (status = 403, description = "not this shop's seller", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such shop", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(slug): Path<String>,
    ValidJson(body): ValidJson<ShopUpdate>,
) -> Result<Json<Shop>, ApiError> {
    let (shop, owner) = by_slug(&state, &slug, false).await?;
    if owner != caller.id {
        return Err(ApiError::Forbidden);
    }
    let updated: Shop = sqlx::query_as(
        "UPDATE shops SET name = coalesce($2, name), description = coalesce($3, description),
                contact_email = coalesce($4, contact_email),
                shipping_flat_minor = coalesce($6, shipping_flat_minor)
          WHERE id = $1 AND owner_id = $5
          RETURNING id, name, slug, description, contact_email, shipping_flat_minor, created_at",
    )
    .bind(shop.id)
    .bind(body.name.as_deref().map(str::trim))
    .bind(body.description.as_deref())
    .bind(body.contact_email.as_deref().map(str::trim))
    .bind(caller.id)
    .bind(body.shipping_flat_minor)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(Shop {
        rating: shop.rating,
        ..updated
    }))
}
