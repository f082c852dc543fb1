//! Sellers adjust a variant's stock with a reason; every adjustment is kept.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::inventory::{self, MAX_ON_HAND};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Seller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    middleware::RequestId,
    routes::{
        catalog::{Page, Paging},
        products::owned_variant,
    },
    state::AppState,
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAdjustment {
    /// Units added (positive) or removed (negative); not zero.
    pub delta: i32,
    /// Why, e.g. `restock`, `damaged`, `stocktake`.
    pub reason: String,
}

impl Validate for NewAdjustment {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.delta == 0 || self.delta.unsigned_abs() > 1_000_000 {
            errors.push(FieldError::new(
                "delta",
                "must be non-zero, at most 1000000 either way",
            ));
        }
        let n = self.reason.trim().chars().count();
        if n == 0 || n > 200 {
            errors.push(FieldError::new("reason", "must be 1 to 200 characters"));
        }
        errors
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Adjustment {
    pub id: Uuid,
    pub delta: i32,
    pub reason: String,
    pub on_hand_after: i32,
    /// Who made it; absent for the system (orders, expiries).
    pub actor_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// A variant's stock after an adjustment.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Stock {
    pub variant_id: Uuid,
    pub on_hand: i32,
    pub reserved: i32,
    pub available: i32,
}

/// Add or remove stock of a variant of the seller's shop. Stock that is
/// reserved for orders cannot be removed.
#[utoipa::path(
    post, path = "/seller/variants/{id}/stock-adjustments", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = NewAdjustment,
    responses(
        (status = 201, description = "adjusted", body = Stock),
        (status = 404, description = "no such variant in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "would leave less on hand than is reserved, or more than the most a variant may hold", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn adjust(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<NewAdjustment>,
) -> Result<(StatusCode, Json<Stock>), ApiError> {
    owned_variant(&state, &seller, id).await?;
    let mut tx = state.pool.begin().await?;
    let reason = body.reason.trim();
    let done = inventory::adjust(
        &mut tx,
        id,
        Some(seller.caller.id),
        body.delta,
        reason,
        &request_id.0,
    )
    .await?;
    if done.is_none() {
        // Adding can only break the ceiling; removing only the reservations.
        let why = if body.delta > 0 {
            format!("would leave more than {MAX_ON_HAND} on hand")
        } else {
            "would leave less stock on hand than is reserved for orders".into()
        };
        return Err(ApiError::Conflict(FieldError::new("delta", why)));
    }
    let stock: Stock = sqlx::query_as(
        "SELECT id AS variant_id, on_hand, reserved, on_hand - reserved AS available
           FROM variants WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    state.commit_with_messages(tx).await?;
    Ok((StatusCode::CREATED, Json(stock)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100; 20 if absent.
    pub per_page: Option<u32>,
}

impl Validate for HistoryQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// A variant's stock adjustments, newest first.
#[utoipa::path(
    get, path = "/seller/variants/{id}/stock-adjustments", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path), HistoryQuery),
    responses(
        (status = 200, description = "a page of adjustments", body = Page<Adjustment>),
        (status = 404, description = "no such variant in this shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    seller: Seller,
    Path(id): Path<Uuid>,
    ValidQuery(query): ValidQuery<HistoryQuery>,
) -> Result<Json<Page<Adjustment>>, ApiError> {
    owned_variant(&state, &seller, id).await?;
    let paging = Paging::new(query.page, query.per_page);
    let items: Vec<Adjustment> = sqlx::query_as(
        "SELECT id, delta, reason, on_hand_after, actor_id, created_at FROM stock_adjustments
          WHERE variant_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
    )
    .bind(id)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM stock_adjustments WHERE variant_id = $1")
            .bind(id)
            .fetch_one(&state.pool)
            .await?;
    Ok(Json(paging.page(items, total)))
}
