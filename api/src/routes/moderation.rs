//! Admins run the catalog: find any product (drafts and hidden ones too),
//! hide one (with a reason its seller sees), show it again, and keep the
//! category tree. Every action is audited.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Admin,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    routes::{
        admin::{Reason, audit, reason_error},
        auth::valid_slug,
        catalog::{Category, Page, Paging},
        products::ProductStatus,
    },
    state::AppState,
};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AdminProductQuery {
    /// Words in the title, tags or description (web-search syntax).
    pub q: Option<String>,
    /// A shop's slug.
    pub shop: Option<String>,
    pub status: Option<ProductStatus>,
    /// Only hidden (true) or only unhidden (false) products.
    pub hidden: Option<bool>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for AdminProductQuery {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Paging::check(self.page, self.per_page);
        if self.q.as_ref().is_some_and(|q| q.chars().count() > 200) {
            errors.push(FieldError::new("q", "at most 200 characters"));
        }
        errors
    }
}

/// A product as admins see it: whatever its status or visibility.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AdminProduct {
    pub id: Uuid,
    pub title: String,
    pub shop_slug: String,
    pub status: String,
    pub hidden_at: Option<DateTime<Utc>>,
    pub hidden_reason: Option<String>,
    pub variant_count: i64,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
}

/// Every product, newest first: search and filter to moderate.
#[utoipa::path(
    get, path = "/admin/products", tag = "admin", security(("bearer" = [])), params(AdminProductQuery),
    responses(
        (status = 200, description = "a page of products", body = Page<AdminProduct>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a parameter is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<AdminProductQuery>,
) -> Result<Json<Page<AdminProduct>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        product: AdminProduct,
        total: i64,
    }
    let q = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    // The filter, for the page and (past its last page) the count alone.
    const MATCHED: &str = "FROM products p JOIN shops s ON s.id = p.shop_id
          WHERE ($1::text IS NULL OR p.search @@ websearch_to_tsquery('english', $1))
            AND ($2::text IS NULL OR s.slug = $2)
            AND ($3::text IS NULL OR p.status = $3)
            AND ($4::bool IS NULL OR (p.hidden_at IS NOT NULL) = $4)";
    let status = query.status.map(ProductStatus::as_str);
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT p.id, p.title, s.slug AS shop_slug, p.status, p.hidden_at, p.hidden_reason,
                (SELECT count(*) FROM variants v WHERE v.product_id = p.id) AS variant_count,
                p.created_at, p.published_at, count(*) OVER () AS total
           {MATCHED}
          ORDER BY p.created_at DESC, p.id DESC LIMIT $5 OFFSET $6"
    )))
    .bind(q)
    .bind(&query.shop)
    .bind(status)
    .bind(query.hidden)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let count = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) {MATCHED}")))
        .bind(q)
        .bind(&query.shop)
        .bind(status)
        .bind(query.hidden)
        .fetch_one(&state.pool);
    let total = paging.total(rows.first().map(|r| r.total), count).await?;
    Ok(Json(paging.page(
        rows.into_iter().map(|r| r.product).collect(),
        total,
    )))
}

/// Hide a product from the storefront (moderation). Its seller sees why.
#[utoipa::path(
    post, path = "/admin/products/{id}/hide", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 204, description = "hidden"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such product", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already hidden", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn hide(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<StatusCode, ApiError> {
    set_hidden(&state, &admin, id, true, body.reason.trim()).await
}

/// Show a hidden product again.
#[utoipa::path(
    post, path = "/admin/products/{id}/unhide", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 204, description = "visible again (if active)"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such product", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not hidden", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn unhide(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<StatusCode, ApiError> {
    set_hidden(&state, &admin, id, false, body.reason.trim()).await
}

/// Hides (or shows again) a product, audited with the reason. Only a change
/// is made: hiding a hidden product (which would overwrite the reason its
/// seller was shown) or showing a visible one is a conflict, with nothing
/// written and nothing audited.
async fn set_hidden(
    state: &AppState,
    admin: &Admin,
    id: Uuid,
    hidden: bool,
    reason: &str,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let sql = if hidden {
        "UPDATE products SET hidden_at = now(), hidden_reason = $2, updated_at = now()
          WHERE id = $1 AND hidden_at IS NULL"
    } else {
        "UPDATE products SET hidden_at = NULL, hidden_reason = NULL, updated_at = now()
          WHERE id = $1 AND hidden_at IS NOT NULL AND $2::text IS NOT NULL"
    };
    let changed = sqlx::query(sql)
        .bind(id)
        .bind(reason)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if changed == 0 {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM products WHERE id = $1)")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            return Err(ApiError::NotFound);
        }
        let why = if hidden {
            "the product is already hidden"
        } else {
            "the product is not hidden"
        };
        return Err(ApiError::Conflict(FieldError::new("id", why)));
    }
    let action = if hidden {
        "product.hide"
    } else {
        "product.unhide"
    };
    audit(&mut tx, admin, action, ("product", id), reason).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCategory {
    pub name: String,
    /// Lowercase letters, digits and single dashes; unique.
    pub slug: String,
    /// The parent's slug; absent for a root category.
    pub parent: Option<String>,
    #[serde(default)]
    pub position: i32,
    /// Why it is added; kept in the audit log.
    pub reason: String,
}

impl Validate for NewCategory {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> = reason_error(&self.reason).into_iter().collect();
        let n = self.name.trim().chars().count();
        if n == 0 || n > 100 {
            errors.push(FieldError::new("name", "must be 1 to 100 characters"));
        }
        if !valid_slug(&self.slug) {
            errors.push(FieldError::new(
                "slug",
                "use 3 to 60 lowercase letters, digits and single dashes",
            ));
        }
        errors
    }
}

/// Add a category to the tree.
#[utoipa::path(
    post, path = "/admin/categories", tag = "admin", security(("bearer" = [])), request_body = NewCategory,
    responses(
        (status = 201, description = "created", body = Category),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the slug is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid, or no such parent", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_category(
    State(state): State<AppState>,
    admin: Admin,
    ValidJson(body): ValidJson<NewCategory>,
) -> Result<(StatusCode, Json<Category>), ApiError> {
    let mut tx = state.pool.begin().await?;
    let parent = match &body.parent {
        None => None,
        Some(slug) => {
            let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM categories WHERE slug = $1")
                .bind(slug)
                .fetch_optional(&mut *tx)
                .await?;
            Some(id.ok_or_else(|| {
                ApiError::Validation(vec![FieldError::new("parent", "no such category")])
            })?)
        }
    };
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO categories (id, parent_id, name, slug, position) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(parent)
    .bind(body.name.trim())
    .bind(&body.slug)
    .bind(body.position)
    .execute(&mut *tx)
    .await?;
    let why = body.reason.trim();
    audit(&mut tx, &admin, "category.create", ("category", id), why).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(Category {
            id,
            name: body.name.trim().to_string(),
            slug: body.slug,
            children: vec![],
        }),
    ))
}
