//! Time-boxed sales: a seller sets a sale price for a variant between a
//! start and an end. The catalog and the cart use it while it runs (the
//! `variants_now` view is the one place that decides the price in force).

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Seller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, Validate},
    routes::products::owned_variant,
    state::AppState,
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSalePrice {
    /// The sale price, minor units; below the variant's regular price.
    pub price_minor: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

impl Validate for NewSalePrice {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.price_minor < 0 {
            errors.push(FieldError::new("price_minor", "must not be negative"));
        }
        if self.ends_at <= self.starts_at {
            errors.push(FieldError::new("ends_at", "must be after starts_at"));
        }
        if self.ends_at <= Utc::now() {
            errors.push(FieldError::new("ends_at", "must be in the future"));
        }
        errors
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct SalePrice {
    pub id: Uuid,
    pub variant_id: Uuid,
    pub price_minor: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

/// Put a variant of the seller's shop on sale for a time.
#[utoipa::path(
    post, path = "/seller/variants/{id}/sale-prices", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = NewSalePrice,
    responses(
        (status = 201, description = "scheduled", body = SalePrice),
        (status = 404, description = "no such variant in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid, or not below the regular price", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    seller: Seller,
    Path(variant): Path<Uuid>,
    ValidJson(body): ValidJson<NewSalePrice>,
) -> Result<(StatusCode, Json<SalePrice>), ApiError> {
    let regular: Option<i64> =
        sqlx::query_scalar("SELECT price_minor FROM variants WHERE id = $1 AND shop_id = $2")
            .bind(variant)
            .bind(seller.shop_id)
            .fetch_optional(&state.pool)
            .await?;
    let regular = regular.ok_or(ApiError::NotFound)?;
    if body.price_minor >= regular {
        return Err(ApiError::Validation(vec![FieldError::new(
            "price_minor",
            format!("must be below the regular price ({regular})"),
        )]));
    }
    let sale: SalePrice = sqlx::query_as(
        "INSERT INTO sale_prices (id, variant_id, price_minor, starts_at, ends_at)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id, variant_id, price_minor, starts_at, ends_at",
    )
    .bind(Uuid::now_v7())
    .bind(variant)
    .bind(body.price_minor)
    .bind(body.starts_at)
    .bind(body.ends_at)
    .fetch_one(&state.pool)
    .await?;
    Ok((StatusCode::CREATED, Json(sale)))
}

/// A variant's sale prices, running and scheduled, soonest first.
#[utoipa::path(
    get, path = "/seller/variants/{id}/sale-prices", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "sale prices not yet ended", body = Vec<SalePrice>),
        (status = 404, description = "no such variant in this shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    seller: Seller,
    Path(variant): Path<Uuid>,
) -> Result<Json<Vec<SalePrice>>, ApiError> {
    owned_variant(&state, &seller, variant).await?;
    let sales: Vec<SalePrice> = sqlx::query_as(
        "SELECT id, variant_id, price_minor, starts_at, ends_at FROM sale_prices
          WHERE variant_id = $1 AND ends_at > now() ORDER BY starts_at, id",
    )
    .bind(variant)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(sales))
}

/// Cancel a sale price of the seller's shop (running or scheduled).
#[utoipa::path(
    delete, path = "/seller/sale-prices/{id}", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 204, description = "cancelled"),
        (status = 404, description = "no such sale price in this shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    seller: Seller,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let deleted = sqlx::query(
        "DELETE FROM sale_prices sp USING variants v
          WHERE sp.id = $1 AND v.id = sp.variant_id AND v.shop_id = $2",
    )
    .bind(id)
    .bind(seller.shop_id)
    .execute(&state.pool)
    .await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}
