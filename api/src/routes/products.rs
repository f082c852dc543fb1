//! Sellers manage their shop's products and variants. Every query is scoped
//! by the seller's shop: another shop's product is a 404, drafts included.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::inventory;
use sqlx::{PgConnection, PgPool};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Seller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    middleware::RequestId,
    routes::{
        catalog::{Page, Paging},
        product_images::{self, ProductImage},
    },
    state::AppState,
};

/// Largest price or compare-at price, in minor units (a million in major units).
const MAX_PRICE: i64 = 100_000_000;
const MAX_STOCK: i32 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProductStatus {
    Draft,
    Active,
    Archived,
}

impl ProductStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Active => "active",
            Self::Archived => "archived",
        }
    }
}

/// A variant as its seller sees it: prices, stock and the low-stock setting.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct SellerVariant {
    pub id: Uuid,
    pub sku: String,
    pub title: String,
    /// Minor units of the marketplace currency.
    pub price_minor: i64,
    pub compare_at_minor: Option<i64>,
    /// The price in force now: a running sale's, else `price_minor`.
    pub price_now_minor: i64,
    pub on_hand: i32,
    /// Held for orders not yet paid.
    pub reserved: i32,
    pub available: i32,
    pub low_stock_threshold: i32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Moderation {
    pub hidden_at: DateTime<Utc>,
    pub reason: String,
}

/// A product as its seller sees it, whatever its status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SellerProduct {
    pub id: Uuid,
    pub title: String,
    pub description: String,
    /// The category's slug.
    pub category: Option<String>,
    pub tags: Vec<String>,
    pub status: ProductStatus,
    /// Set when an admin hid the product from the storefront.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden: Option<Moderation>,
    pub variants: Vec<SellerVariant>,
    pub images: Vec<ProductImage>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVariant {
    /// Unique within the shop; letters, digits, `-`, `_` and `.`.
    pub sku: String,
    /// E.g. `Large / Red`; `Default` for a simple product.
    #[serde(default = "default_title")]
    pub title: String,
    pub price_minor: i64,
    pub compare_at_minor: Option<i64>,
    /// Starting stock, recorded as an adjustment.
    #[serde(default)]
    pub on_hand: i32,
    #[serde(default)]
    pub low_stock_threshold: i32,
}

fn default_title() -> String {
    "Default".into()
}

impl NewVariant {
    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        let field = |name: &str| format!("{at}{name}");
        if !valid_sku(&self.sku) {
            errors.push(FieldError::new(
                field("sku"),
                "use 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        check_text(errors, &field("title"), &self.title, 1, 100);
        check_prices(errors, at, Some(self.price_minor), self.compare_at_minor);
        if !(0..=MAX_STOCK).contains(&self.on_hand) {
            errors.push(FieldError::new(
                field("on_hand"),
                format!("must be 0 to {MAX_STOCK}"),
            ));
        }
        check_threshold(
            errors,
            &field("low_stock_threshold"),
            self.low_stock_threshold,
        );
    }
}

fn valid_sku(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_text(errors: &mut Vec<FieldError>, field: &str, value: &str, min: usize, max: usize) {
    let n = value.trim().chars().count();
    if n < min || n > max {
        errors.push(FieldError::new(
            field,
            format!("must be {min} to {max} characters"),
        ));
    }
}

/// Prices are whole minor units in range; a compare-at ("was") price is
/// above the price, or it would not be a discount.
fn check_prices(errors: &mut Vec<FieldError>, at: &str, price: Option<i64>, compare: Option<i64>) {
    if let Some(price) = price
        && !(0..=MAX_PRICE).contains(&price)
    {
        errors.push(FieldError::new(
            format!("{at}price_minor"),
            format!("must be 0 to {MAX_PRICE} minor units"),
        ));
    }
    if let Some(compare) = compare
        && (!(0..=MAX_PRICE).contains(&compare) || price.is_some_and(|p| compare <= p))
    {
        errors.push(FieldError::new(
            format!("{at}compare_at_minor"),
            "must be above the price",
        ));
    }
}

fn check_threshold(errors: &mut Vec<FieldError>, field: &str, threshold: i32) {
    if !(0..=MAX_STOCK).contains(&threshold) {
        errors.push(FieldError::new(field, format!("must be 0 to {MAX_STOCK}")));
    }
}

fn check_tags(errors: &mut Vec<FieldError>, tags: &[String]) {
    if tags.len() > 20 {
        errors.push(FieldError::new("tags", "at most 20 tags"));
    }
    for (i, tag) in tags.iter().enumerate() {
        check_text(errors, &format!("tags[{i}]"), tag, 1, 40);
    }
}

/// Tags are matched case-insensitively: store them trimmed, lowercase, once.
fn normal_tags(tags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = tags.iter().map(|t| t.trim().to_lowercase()).collect();
    out.sort();
    out.dedup();
    out
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// A category slug (see `GET /categories`).
    pub category: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// At least one; a simple product has one.
    pub variants: Vec<NewVariant>,
}

impl Validate for NewProduct {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_text(&mut errors, "title", &self.title, 1, 200);
        check_text(&mut errors, "description", &self.description, 0, 10_000);
        check_tags(&mut errors, &self.tags);
        if self.variants.is_empty() || self.variants.len() > 100 {
            errors.push(FieldError::new("variants", "must have 1 to 100 variants"));
        }
        for (i, v) in self.variants.iter().enumerate() {
            v.check(&format!("variants[{i}]."), &mut errors);
        }
        let mut skus: Vec<&str> = self.variants.iter().map(|v| v.sku.as_str()).collect();
        skus.sort_unstable();
        if skus.windows(2).any(|w| w[0] == w[1]) {
            errors.push(FieldError::new("variants", "SKUs must differ"));
        }
        errors
    }
}

/// The category id for a slug; an unknown slug is the client's mistake.
async fn category_id(tx: &mut PgConnection, slug: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    let Some(slug) = slug else { return Ok(None) };
    let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM categories WHERE slug = $1")
        .bind(slug)
        .fetch_optional(&mut *tx)
        .await?;
    id.map(Some)
        .ok_or_else(|| ApiError::Validation(vec![FieldError::new("category", "no such category")]))
}

async fn insert_variant(
    tx: &mut PgConnection,
    seller: &Seller,
    product: Uuid,
    position: i32,
    v: &NewVariant,
    request_id: &RequestId,
) -> Result<Uuid, ApiError> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO variants (id, product_id, shop_id, sku, title, price_minor, compare_at_minor,
                               low_stock_threshold, position)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(product)
    .bind(seller.shop_id)
    .bind(&v.sku)
    .bind(v.title.trim())
    .bind(v.price_minor)
    .bind(v.compare_at_minor)
    .bind(v.low_stock_threshold)
    .bind(position)
    .execute(&mut *tx)
    .await?;
    if v.on_hand > 0 {
        let reason = "initial stock";
        inventory::adjust(
            tx,
            id,
            Some(seller.caller.id),
            v.on_hand,
            reason,
            &request_id.0,
        )
        .await?;
    }
    Ok(id)
}

/// Create a product (as a draft) with its variants.
#[utoipa::path(
    post, path = "/seller/products", tag = "seller", security(("bearer" = [])), request_body = NewProduct,
    responses(
        (status = 201, description = "created as a draft", body = SellerProduct),
        (status = 403, description = "not a seller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a SKU is taken in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    ValidJson(body): ValidJson<NewProduct>,
) -> Result<(StatusCode, Json<SellerProduct>), ApiError> {
    let id = Uuid::now_v7();
    let mut tx = state.pool.begin().await?;
    let category = category_id(&mut tx, body.category.as_deref()).await?;
    sqlx::query(
        "INSERT INTO products (id, shop_id, title, description, category_id, tags)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(seller.shop_id)
    .bind(body.title.trim())
    .bind(body.description.trim())
    .bind(category)
    .bind(normal_tags(&body.tags))
    .execute(&mut *tx)
    .await?;
    for (i, v) in body.variants.iter().enumerate() {
        insert_variant(&mut tx, &seller, id, i as i32, v, &request_id).await?;
    }
    state.commit_with_messages(tx).await?;
    Ok((
        StatusCode::CREATED,
        Json(load(&state.pool, &seller, id).await?),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SellerListQuery {
    /// Only products with this status.
    pub status: Option<ProductStatus>,
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100; 20 if absent.
    pub per_page: Option<u32>,
}

impl Validate for SellerListQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// The seller's own products, newest first, any status.
#[utoipa::path(
    get, path = "/seller/products", tag = "seller", security(("bearer" = [])), params(SellerListQuery),
    responses(
        (status = 200, description = "a page of products", body = Page<SellerProduct>),
        (status = 403, description = "not a seller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    seller: Seller,
    ValidQuery(query): ValidQuery<SellerListQuery>,
) -> Result<Json<Page<SellerProduct>>, ApiError> {
    let status = query.status.map(ProductStatus::as_str);
    let paging = Paging::new(query.page, query.per_page);
    let (ids, total): (Vec<Uuid>, i64) = {
        const MATCHED: &str =
            "FROM products WHERE shop_id = $1 AND ($2::text IS NULL OR status = $2)";
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, count(*) OVER () {MATCHED}
              ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4"
        )))
        .bind(seller.shop_id)
        .bind(status)
        .bind(paging.limit())
        .bind(paging.offset())
        .fetch_all(&state.pool)
        .await?;
        let count = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) {MATCHED}")))
            .bind(seller.shop_id)
            .bind(status)
            .fetch_one(&state.pool);
        let total = paging.total(rows.first().map(|r| r.1), count).await?;
        (rows.into_iter().map(|r| r.0).collect(), total)
    };
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        items.push(load(&state.pool, &seller, id).await?);
    }
    Ok(Json(paging.page(items, total)))
}

/// One of the seller's products; another shop's is a 404.
#[utoipa::path(
    get, path = "/seller/products/{id}", tag = "seller", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the product", body = SellerProduct),
        (status = 404, description = "no such product in this shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    seller: Seller,
    Path(id): Path<Uuid>,
) -> Result<Json<SellerProduct>, ApiError> {
    Ok(Json(load(&state.pool, &seller, id).await?))
}

/// 404 unless `variant` belongs to the seller's shop.
pub(crate) async fn owned_variant(
    state: &AppState,
    seller: &Seller,
    variant: Uuid,
) -> Result<(), ApiError> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM variants WHERE id = $1 AND shop_id = $2")
            .bind(variant)
            .bind(seller.shop_id)
            .fetch_optional(&state.pool)
            .await?;
    found.map(|_| ()).ok_or(ApiError::NotFound)
}

/// A product of the seller's shop, with its variants.
pub async fn load(pool: &PgPool, seller: &Seller, id: Uuid) -> Result<SellerProduct, ApiError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: Uuid,
        title: String,
        description: String,
        category: Option<String>,
        tags: Vec<String>,
        status: String,
        hidden_at: Option<DateTime<Utc>>,
        hidden_reason: Option<String>,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    }
    let row: Row = sqlx::query_as(
        "SELECT p.id, p.title, p.description, c.slug AS category, p.tags, p.status,
                p.hidden_at, p.hidden_reason, p.created_at, p.updated_at
           FROM products p LEFT JOIN categories c ON c.id = p.category_id
          WHERE p.id = $1 AND p.shop_id = $2",
    )
    .bind(id)
    .bind(seller.shop_id)
    .fetch_optional(pool)
    .await?
    .ok_or(ApiError::NotFound)?;
    let variants: Vec<SellerVariant> = sqlx::query_as(
        "SELECT id, sku, title, price_minor, compare_at_minor, price_now_minor, on_hand, reserved,
                available, low_stock_threshold
           FROM variants_now WHERE product_id = $1 ORDER BY position, id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let status = match row.status.as_str() {
        "active" => ProductStatus::Active,
        "archived" => ProductStatus::Archived,
        _ => ProductStatus::Draft,
    };
    Ok(SellerProduct {
        id: row.id,
        title: row.title,
        description: row.description,
        category: row.category,
        tags: row.tags,
        status,
        hidden: row.hidden_at.map(|hidden_at| Moderation {
            hidden_at,
            reason: row.hidden_reason.unwrap_or_default(),
        }),
        variants,
        images: product_images::of(pool, id).await?,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductUpdate {
    pub title: Option<String>,
    pub description: Option<String>,
    /// A category slug; `""` removes the category.
    pub category: Option<String>,
    pub tags: Option<Vec<String>>,
    /// `active` publishes (needs a verified email); `archived` withdraws.
    pub status: Option<ProductStatus>,
}

impl Validate for ProductUpdate {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(title) = &self.title {
            check_text(&mut errors, "title", title, 1, 200);
        }
        if let Some(description) = &self.description {
            check_text(&mut errors, "description", description, 0, 10_000);
        }
        if let Some(tags) = &self.tags {
            check_tags(&mut errors, tags);
        }
        errors
    }
}

/// Change a product of the seller's shop, or its status.
#[utoipa::path(
    patch, path = "/seller/products/{id}", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = ProductUpdate,
    responses(
        (status = 200, description = "the updated product", body = SellerProduct),
        (status = 403, description = "publishing needs a verified email", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such product in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    seller: Seller,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<ProductUpdate>,
) -> Result<Json<SellerProduct>, ApiError> {
    if body.status == Some(ProductStatus::Active) {
        seller.caller.require_verified()?;
    }
    let mut tx = state.pool.begin().await?;
    let category = match body.category.as_deref() {
        None => None,
        Some("") => Some(None),
        Some(slug) => Some(category_id(&mut tx, Some(slug)).await?),
    };
    let updated = sqlx::query(
        "UPDATE products SET
                title = coalesce($3, title),
                description = coalesce($4, description),
                category_id = CASE WHEN $5 THEN $6 ELSE category_id END,
                tags = coalesce($7, tags),
                status = coalesce($8, status),
                published_at = CASE WHEN $8 = 'active' THEN coalesce(published_at, now())
                                    ELSE published_at END,
                updated_at = now()
          WHERE id = $1 AND shop_id = $2",
    )
    .bind(id)
    .bind(seller.shop_id)
    .bind(body.title.as_deref().map(str::trim))
    .bind(body.description.as_deref().map(str::trim))
    .bind(category.is_some())
    .bind(category.flatten())
    .bind(body.tags.as_deref().map(normal_tags))
    .bind(body.status.map(ProductStatus::as_str))
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    tx.commit().await?;
    Ok(Json(load(&state.pool, &seller, id).await?))
}

impl Validate for NewVariant {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.check("", &mut errors);
        errors
    }
}

/// Add a variant to a product of the seller's shop.
#[utoipa::path(
    post, path = "/seller/products/{id}/variants", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = NewVariant,
    responses(
        (status = 201, description = "the product with its new variant", body = SellerProduct),
        (status = 404, description = "no such product in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the SKU is taken in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn add_variant(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<NewVariant>,
) -> Result<(StatusCode, Json<SellerProduct>), ApiError> {
    let mut tx = state.pool.begin().await?;
    // Locked, so two concurrent additions get distinct positions.
    let position: Option<i32> = sqlx::query_scalar(
        "SELECT (SELECT coalesce(max(position) + 1, 0) FROM variants WHERE product_id = p.id)
           FROM products p WHERE p.id = $1 AND p.shop_id = $2 FOR NO KEY UPDATE",
    )
    .bind(id)
    .bind(seller.shop_id)
    .fetch_optional(&mut *tx)
    .await?;
    let position = position.ok_or(ApiError::NotFound)?;
    insert_variant(&mut tx, &seller, id, position, &body, &request_id).await?;
    state.commit_with_messages(tx).await?;
    Ok((
        StatusCode::CREATED,
        Json(load(&state.pool, &seller, id).await?),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VariantUpdate {
    pub title: Option<String>,
    pub price_minor: Option<i64>,
    /// Must stay above the price; `clear_compare_at` removes it.
    pub compare_at_minor: Option<i64>,
    #[serde(default)]
    pub clear_compare_at: bool,
    pub low_stock_threshold: Option<i32>,
}

impl Validate for VariantUpdate {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(title) = &self.title {
            check_text(&mut errors, "title", title, 1, 100);
        }
        // Against the stored price this is checked again by the update.
        check_prices(&mut errors, "", self.price_minor, self.compare_at_minor);
        if let Some(t) = self.low_stock_threshold {
            check_threshold(&mut errors, "low_stock_threshold", t);
        }
        errors
    }
}

/// Change a variant's title, prices or low-stock threshold. Stock changes
/// go through stock adjustments, which keep a history.
#[utoipa::path(
    patch, path = "/seller/variants/{id}", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = VariantUpdate,
    responses(
        (status = 200, description = "the product with the changed variant", body = SellerProduct),
        (status = 404, description = "no such variant in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update_variant(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<VariantUpdate>,
) -> Result<Json<SellerProduct>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let row: Option<(Uuid, i64, Option<i64>)> = sqlx::query_as(
        "UPDATE variants SET
                title = coalesce($3, title),
                price_minor = coalesce($4, price_minor),
                compare_at_minor = CASE WHEN $6 THEN NULL ELSE coalesce($5, compare_at_minor) END,
                low_stock_threshold = coalesce($7, low_stock_threshold)
          WHERE id = $1 AND shop_id = $2
         RETURNING product_id, price_minor, compare_at_minor",
    )
    .bind(id)
    .bind(seller.shop_id)
    .bind(body.title.as_deref().map(str::trim))
    .bind(body.price_minor)
    .bind(body.compare_at_minor)
    .bind(body.clear_compare_at)
    .bind(body.low_stock_threshold)
    .fetch_optional(&mut *tx)
    .await?;
    let (product, price, compare) = row.ok_or(ApiError::NotFound)?;
    // The pair as stored now must still make sense (nothing is kept if not).
    let mut errors = Vec::new();
    check_prices(&mut errors, "", Some(price), compare);
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    if body.low_stock_threshold.is_some() {
        inventory::check_low_stock(&mut tx, id, &request_id.0).await?;
    }
    state.commit_with_messages(tx).await?;
    Ok(Json(load(&state.pool, &seller, product).await?))
}
