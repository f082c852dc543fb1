//! Coupons: sellers make them for their shop's items, admins for the whole
//! platform. One set of rules for both (`souk_shared::coupons`); a use is
//! counted once, when an order that used it is paid.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::coupons::{self, Coupon};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::{Admin, Seller},
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, Validate},
    routes::admin::{Reason, audit, reason_error},
    state::AppState,
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCoupon {
    /// 3 to 32 letters, digits, `-` or `_`; unique regardless of case.
    pub code: String,
    /// 1 to 100; or give `amount_off_minor`.
    pub percent_off: Option<i32>,
    /// A fixed amount off, minor units; or give `percent_off`.
    pub amount_off_minor: Option<i64>,
    /// The least the eligible items must come to.
    #[serde(default)]
    pub min_order_minor: i64,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    /// Paid orders that may use it, in all.
    pub max_uses: Option<i32>,
    /// Paid orders that may use it, per customer.
    pub max_uses_per_customer: Option<i32>,
    /// Why a platform coupon is made, kept in the audit log: required when
    /// an admin makes one, refused from a seller (a shop's coupons are not
    /// admin actions).
    pub reason: Option<String>,
}

impl Validate for NewCoupon {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let code_ok = (3..=32).contains(&self.code.len())
            && self
                .code
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !code_ok {
            errors.push(FieldError::new(
                "code",
                "use 3 to 32 letters, digits, '-' or '_'",
            ));
        }
        match (self.percent_off, self.amount_off_minor) {
            (Some(p), None) if (1..=100).contains(&p) => {}
            (Some(_), None) => errors.push(FieldError::new("percent_off", "must be 1 to 100")),
            (None, Some(a)) if a > 0 => {}
            (None, Some(_)) => errors.push(FieldError::new("amount_off_minor", "must be above 0")),
            _ => errors.push(FieldError::new(
                "percent_off",
                "give exactly one of percent_off and amount_off_minor",
            )),
        }
        if self.min_order_minor < 0 {
            errors.push(FieldError::new("min_order_minor", "must not be negative"));
        }
        if let (Some(start), Some(end)) = (self.starts_at, self.ends_at)
            && end <= start
        {
            errors.push(FieldError::new("ends_at", "must be after starts_at"));
        }
        for (field, limit) in [
            ("max_uses", self.max_uses),
            ("max_uses_per_customer", self.max_uses_per_customer),
        ] {
            if limit.is_some_and(|n| n < 1) {
                errors.push(FieldError::new(field, "must be at least 1"));
            }
        }
        errors
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CouponView {
    pub id: Uuid,
    pub code: String,
    /// `true` for a platform coupon (the whole cart).
    pub platform: bool,
    pub percent_off: Option<i32>,
    pub amount_off_minor: Option<i64>,
    pub min_order_minor: i64,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub max_uses: Option<i32>,
    pub max_uses_per_customer: Option<i32>,
    /// Paid orders that used it.
    pub uses: i32,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
}

impl From<Coupon> for CouponView {
    fn from(c: Coupon) -> Self {
        Self {
            id: c.id,
            code: c.code,
            platform: c.shop_id.is_none(),
            percent_off: c.percent_off,
            amount_off_minor: c.amount_off_minor,
            min_order_minor: c.min_order_minor,
            starts_at: c.starts_at,
            ends_at: c.ends_at,
            max_uses: c.max_uses,
            max_uses_per_customer: c.max_uses_per_customer,
            uses: c.uses,
            disabled: c.disabled_at.is_some(),
            created_at: c.created_at,
        }
    }
}

/// Creates a coupon for `shop` (`None`: the platform).
async fn create(
    conn: &mut PgConnection,
    shop: Option<Uuid>,
    actor: Uuid,
    body: NewCoupon,
) -> Result<CouponView, ApiError> {
    let coupon: Coupon = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO coupons (id, code, shop_id, percent_off, amount_off_minor, min_order_minor,
                              starts_at, ends_at, max_uses, max_uses_per_customer, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING {}",
        coupons::COLUMNS
    )))
    .bind(Uuid::now_v7())
    .bind(&body.code)
    .bind(shop)
    .bind(body.percent_off)
    .bind(body.amount_off_minor)
    .bind(body.min_order_minor)
    .bind(body.starts_at)
    .bind(body.ends_at)
    .bind(body.max_uses)
    .bind(body.max_uses_per_customer)
    .bind(actor)
    .fetch_one(conn)
    .await?;
    Ok(coupon.into())
}

/// Coupons of `shop` (`None`: the platform's), newest first.
async fn list(state: &AppState, shop: Option<Uuid>) -> Result<Vec<CouponView>, ApiError> {
    let rows: Vec<Coupon> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM coupons WHERE shop_id IS NOT DISTINCT FROM $1 ORDER BY created_at DESC",
        coupons::COLUMNS
    )))
    .bind(shop)
    .fetch_all(&state.pool)
    .await?;
    Ok(rows.into_iter().map(CouponView::from).collect())
}

/// Whose coupons a caller may disable.
enum Owner {
    /// A seller: its shop's only; others' are 404.
    Shop(Uuid),
    /// An admin: any, the platform's or a shop's.
    Anyone,
}

async fn disable(conn: &mut PgConnection, owner: Owner, id: Uuid) -> Result<StatusCode, ApiError> {
    let shop = match owner {
        Owner::Shop(shop) => Some(shop),
        Owner::Anyone => None,
    };
    let done = sqlx::query(
        "UPDATE coupons SET disabled_at = coalesce(disabled_at, now())
          WHERE id = $1 AND ($2::uuid IS NULL OR shop_id = $2)",
    )
    .bind(id)
    .bind(shop)
    .execute(conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Create a coupon for the seller's shop's items.
#[utoipa::path(
    post, path = "/seller/coupons", tag = "seller", security(("bearer" = [])), request_body = NewCoupon,
    responses(
        (status = 201, description = "created", body = CouponView),
        (status = 409, description = "the code is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn seller_create(
    State(state): State<AppState>,
    seller: Seller,
    ValidJson(body): ValidJson<NewCoupon>,
) -> Result<(StatusCode, Json<CouponView>), ApiError> {
    if body.reason.is_some() {
        return Err(ApiError::Validation(vec![FieldError::new(
            "reason",
            "only an admin's platform coupon takes a reason",
        )]));
    }
    let mut conn = state.pool.acquire().await?;
    let coupon = create(&mut conn, Some(seller.shop_id), seller.caller.id, body).await?;
    Ok((StatusCode::CREATED, Json(coupon)))
}

/// The seller's shop's coupons.
#[utoipa::path(
    get, path = "/seller/coupons", tag = "seller", security(("bearer" = [])),
    responses((status = 200, description = "the shop's coupons", body = Vec<CouponView>))
)]
pub async fn seller_list(
    State(state): State<AppState>,
    seller: Seller,
) -> Result<Json<Vec<CouponView>>, ApiError> {
    Ok(Json(list(&state, Some(seller.shop_id)).await?))
}

/// Stop a coupon of the seller's shop from applying.
#[utoipa::path(
    post, path = "/seller/coupons/{id}/disable", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 204, description = "disabled"),
        (status = 404, description = "no such coupon in this shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn seller_disable(
    State(state): State<AppState>,
    seller: Seller,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut conn = state.pool.acquire().await?;
    disable(&mut conn, Owner::Shop(seller.shop_id), id).await
}

/// Create a platform coupon (the whole cart).
#[utoipa::path(
    post, path = "/admin/coupons", tag = "admin", security(("bearer" = [])), request_body = NewCoupon,
    responses(
        (status = 201, description = "created", body = CouponView),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the code is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn admin_create(
    State(state): State<AppState>,
    admin: Admin,
    ValidJson(body): ValidJson<NewCoupon>,
) -> Result<(StatusCode, Json<CouponView>), ApiError> {
    let reason = body.reason.clone().unwrap_or_default();
    if let Some(missing) = reason_error(&reason) {
        return Err(ApiError::Validation(vec![missing]));
    }
    let mut tx = state.pool.begin().await?;
    let coupon = create(&mut tx, None, admin.0.id, body).await?;
    audit(
        &mut tx,
        &admin,
        "coupon.create",
        ("coupon", coupon.id),
        reason.trim(),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(coupon)))
}

/// The platform's coupons.
#[utoipa::path(
    get, path = "/admin/coupons", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "platform coupons", body = Vec<CouponView>))
)]
pub async fn admin_list(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<CouponView>>, ApiError> {
    Ok(Json(list(&state, None).await?))
}

/// Stop any coupon from applying, the platform's or a shop's (moderation),
/// with the reason kept in the audit log.
#[utoipa::path(
    post, path = "/admin/coupons/{id}/disable", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 204, description = "disabled"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such coupon", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no reason", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn admin_disable(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let done = disable(&mut tx, Owner::Anyone, id).await?;
    audit(
        &mut tx,
        &admin,
        "coupon.disable",
        ("coupon", id),
        body.reason.trim(),
    )
    .await?;
    tx.commit().await?;
    Ok(done)
}
