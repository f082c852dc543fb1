//! Admins and the people on the platform: finding accounts, changing a
//! role, approving new sellers' shops, suspending and reinstating shops.
//! Every change is kept in the audit log with who, what, when and why.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use souk_shared::notify;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{Admin, Role},
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    middleware::RequestId,
    routes::{
        admin::{Reason, audit, lock_actor_and_target, reason_error},
        catalog::{Page, Paging},
    },
    state::AppState,
};

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub role: String,
    pub email_verified: bool,
    pub suspended_at: Option<DateTime<Utc>>,
    /// The seller's shop.
    pub shop: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AccountQuery {
    /// Part of the email or the name.
    pub q: Option<String>,
    pub role: Option<Role>,
    /// Only suspended accounts (or only active ones with `false`).
    pub suspended: Option<bool>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for AccountQuery {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Paging::check(self.page, self.per_page);
        if self.q.as_deref().is_some_and(|q| q.chars().count() > 100) {
            errors.push(FieldError::new("q", "must be at most 100 characters"));
        }
        errors
    }
}

/// Find accounts, newest first.
#[utoipa::path(
    get, path = "/admin/users", tag = "admin", security(("bearer" = [])), params(AccountQuery),
    responses(
        (status = 200, description = "a page of accounts", body = Page<Account>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn search(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<AccountQuery>,
) -> Result<Json<Page<Account>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let pattern = query
        .q
        .as_deref()
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(|q| {
            format!(
                "%{}%",
                q.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        });
    let role = query.role.map(Role::as_str);
    let filter = "($1::text IS NULL OR u.email ILIKE $1 OR u.name ILIKE $1)
                  AND ($2::text IS NULL OR u.role = $2)
                  AND ($3::bool IS NULL OR (u.suspended_at IS NOT NULL) = $3)";
    let items: Vec<Account> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT u.id, u.email, u.name, u.role, u.email_verified_at IS NOT NULL AS email_verified,
                u.suspended_at, s.slug AS shop, u.created_at
           FROM users u LEFT JOIN shops s ON s.owner_id = u.id
          WHERE {filter} ORDER BY u.created_at DESC, u.id DESC LIMIT $4 OFFSET $5"
    )))
    .bind(&pattern)
    .bind(role)
    .bind(query.suspended)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM users u WHERE {filter}"
    )))
    .bind(&pattern)
    .bind(role)
    .bind(query.suspended)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(paging.page(items, total)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    /// `customer` or `admin`; sellers are the accounts that run a shop.
    pub role: Role,
    pub reason: String,
}

impl Validate for RoleChange {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> = reason_error(&self.reason).into_iter().collect();
        if self.role == Role::Seller {
            errors.push(FieldError::new(
                "role",
                "an account becomes a seller by registering a shop",
            ));
        }
        errors
    }
}

/// Make an account an admin, or a customer again. Takes effect at once
/// (every request reads the account's role).
#[utoipa::path(
    put, path = "/admin/users/{id}/role", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = RoleChange,
    responses(
        (status = 200, description = "the account", body = Account),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such account", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the account has that role already", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a seller's account, or the admin's own", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn set_role(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<RoleChange>,
) -> Result<Json<Account>, ApiError> {
    if id == admin.0.id {
        return Err(ApiError::Validation(vec![FieldError::new(
            "id",
            "admins cannot change their own role",
        )]));
    }
    let mut tx = state.pool.begin().await?;
    lock_actor_and_target(&mut tx, &admin, id).await?;
    let has_shop: Option<bool> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM shops s WHERE s.owner_id = u.id) FROM users u WHERE u.id = $1 FOR NO KEY UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if has_shop.ok_or(ApiError::NotFound)? {
        return Err(ApiError::Validation(vec![FieldError::new(
            "role",
            "this account runs a shop; suspend the shop instead",
        )]));
    }
    // Only a change is made (and audited): the role it already has is a
    // conflict, with nothing written.
    let changed =
        sqlx::query("UPDATE users SET role = $2, updated_at = now() WHERE id = $1 AND role <> $2")
            .bind(id)
            .bind(body.role.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if changed == 0 {
        return Err(ApiError::Conflict(FieldError::new(
            "role",
            format!("the account's role is already {}", body.role.as_str()),
        )));
    }
    let action = format!("user.role.{}", body.role.as_str());
    audit(&mut tx, &admin, &action, ("user", id), body.reason.trim()).await?;
    let account: Account = sqlx::query_as(
        "SELECT u.id, u.email, u.name, u.role, u.email_verified_at IS NOT NULL AS email_verified,
                u.suspended_at, NULL::text AS shop, u.created_at
           FROM users u WHERE u.id = $1",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(account))
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AdminShop {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub owner_email: String,
    pub approved_at: Option<DateTime<Utc>>,
    pub suspended_at: Option<DateTime<Utc>>,
    pub suspended_reason: Option<String>,
    pub commission_bps: Option<i32>,
    pub shipping_flat_minor: Option<i64>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShopState {
    /// Waiting for approval.
    Pending,
    /// Approved and selling.
    Active,
    Suspended,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ShopQuery {
    pub status: Option<ShopState>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for ShopQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

const SHOP_SELECT: &str =
    "SELECT s.id, s.slug, s.name, u.email AS owner_email, s.approved_at, s.suspended_at,
            s.suspended_reason, s.commission_bps, s.shipping_flat_minor, s.created_at
       FROM shops s JOIN users u ON u.id = s.owner_id";

/// Shops, oldest first (`status=pending`: the sellers waiting for approval).
#[utoipa::path(
    get, path = "/admin/shops", tag = "admin", security(("bearer" = [])), params(ShopQuery),
    responses(
        (status = 200, description = "a page of shops", body = Page<AdminShop>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn shops(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<ShopQuery>,
) -> Result<Json<Page<AdminShop>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    // Fixed SQL chosen from a closed set.
    let filter = match query.status {
        None => "true",
        Some(ShopState::Pending) => "s.approved_at IS NULL AND s.suspended_at IS NULL",
        Some(ShopState::Active) => "s.approved_at IS NOT NULL AND s.suspended_at IS NULL",
        Some(ShopState::Suspended) => "s.suspended_at IS NOT NULL",
    };
    let items: Vec<AdminShop> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SHOP_SELECT} WHERE {filter} ORDER BY s.created_at, s.id LIMIT $1 OFFSET $2"
    )))
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM shops s WHERE {filter}"
    )))
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(paging.page(items, total)))
}

/// What a shop decision changes, and what the seller is told.
struct ShopDecision {
    action: &'static str,
    /// Applied only when it changes something: `$2` is the reason.
    sql: &'static str,
    template: &'static str,
}

async fn decide_shop(
    state: &AppState,
    admin: &Admin,
    slug: &str,
    reason: &str,
    decision: ShopDecision,
    corr: &str,
) -> Result<Json<AdminShop>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let shop: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM shops WHERE slug = $1 FOR NO KEY UPDATE")
            .bind(slug)
            .fetch_optional(&mut *tx)
            .await?;
    let shop = shop.ok_or(ApiError::NotFound)?;
    let changed = sqlx::query(decision.sql)
        .bind(shop)
        .bind(reason)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if changed == 0 {
        return Err(ApiError::Conflict(FieldError::new(
            "status",
            format!("the shop is already {}", decision.action),
        )));
    }
    audit(
        &mut tx,
        admin,
        &format!("shop.{}", decision.action),
        ("shop", shop),
        reason,
    )
    .await?;
    let (owner, email, name, shop_name): (Uuid, String, String, String) = sqlx::query_as(
        "SELECT u.id, u.email, u.name, s.name FROM shops s JOIN users u ON u.id = s.owner_id WHERE s.id = $1",
    )
    .bind(shop)
    .fetch_one(&mut *tx)
    .await?;
    let data = json!({ "name": name, "shop": shop_name, "reason": reason });
    notify::in_app(&mut tx, owner, decision.template, &data).await?;
    notify::email(&mut tx, &email, decision.template, data, corr).await?;
    let view: AdminShop = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SHOP_SELECT} WHERE s.id = $1"
    )))
    .bind(shop)
    .fetch_one(&mut *tx)
    .await?;
    state.commit_with_messages(tx).await?;
    Ok(Json(view))
}

/// Approve a new seller's shop: its products show and sell from now on.
#[utoipa::path(
    post, path = "/admin/shops/{slug}/approve", tag = "admin", security(("bearer" = [])),
    params(("slug" = String, Path)), request_body = Reason,
    responses(
        (status = 200, description = "approved; the seller is told", body = AdminShop),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such shop", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already approved", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn approve_shop(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(slug): Path<String>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<AdminShop>, ApiError> {
    let decision = ShopDecision {
        action: "approved",
        sql: "UPDATE shops SET approved_at = now() WHERE id = $1 AND approved_at IS NULL AND $2::text IS NOT NULL",
        template: "shop_approved",
    };
    decide_shop(
        &state,
        &admin,
        &slug,
        body.reason.trim(),
        decision,
        &request_id.0,
    )
    .await
}

/// Suspend a shop: its products leave the storefront and it cannot withdraw.
#[utoipa::path(
    post, path = "/admin/shops/{slug}/suspend", tag = "admin", security(("bearer" = [])),
    params(("slug" = String, Path)), request_body = Reason,
    responses(
        (status = 200, description = "suspended; the seller is told why", body = AdminShop),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such shop", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already suspended", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn suspend_shop(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(slug): Path<String>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<AdminShop>, ApiError> {
    let decision = ShopDecision {
        action: "suspended",
        sql: "UPDATE shops SET suspended_at = now(), suspended_reason = $2 WHERE id = $1 AND suspended_at IS NULL",
        template: "shop_suspended",
    };
    decide_shop(
        &state,
        &admin,
        &slug,
        body.reason.trim(),
        decision,
        &request_id.0,
    )
    .await
}

/// Lift a shop's suspension.
#[utoipa::path(
    post, path = "/admin/shops/{slug}/unsuspend", tag = "admin", security(("bearer" = [])),
    params(("slug" = String, Path)), request_body = Reason,
    responses(
        (status = 200, description = "selling again; the seller is told", body = AdminShop),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such shop", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not suspended", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn unsuspend_shop(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(slug): Path<String>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<AdminShop>, ApiError> {
    let decision = ShopDecision {
        action: "reinstated",
        sql: "UPDATE shops SET suspended_at = NULL, suspended_reason = NULL
               WHERE id = $1 AND suspended_at IS NOT NULL AND $2::text IS NOT NULL",
        template: "shop_reinstated",
    };
    decide_shop(
        &state,
        &admin,
        &slug,
        body.reason.trim(),
        decision,
        &request_id.0,
    )
    .await
}
