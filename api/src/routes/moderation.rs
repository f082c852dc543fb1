//! Admins run the catalog: hide a product (with a reason its seller sees),
//! show it again, and keep the category tree. Every action is audited.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Admin,
    error::{ApiError, FieldError, Problem},
    extract::{ValidJson, Validate},
    routes::{
        admin::{Reason, audit},
        auth::valid_slug,
        catalog::Category,
    },
    state::AppState,
};

/// Hide a product from the storefront (moderation). Its seller sees why.
#[utoipa::path(
    post, path = "/admin/products/{id}/hide", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 204, description = "hidden"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such product", body = Problem, content_type = "application/problem+json"),
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

/// Hides (or shows again) a product, audited with the reason.
async fn set_hidden(
    state: &AppState,
    admin: &Admin,
    id: Uuid,
    hidden: bool,
    reason: &str,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let found = sqlx::query(
        "UPDATE products SET
                hidden_at = CASE WHEN $2 THEN coalesce(hidden_at, now()) END,
                hidden_reason = CASE WHEN $2 THEN $3 END,
                updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(hidden)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    if found.rows_affected() == 0 {
        return Err(ApiError::NotFound);
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
}

impl Validate for NewCategory {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
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
    let what = format!("new category {}", body.slug);
    audit(&mut tx, &admin, "category.create", ("category", id), &what).await?;
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
