//! The storefront catalog: ranked full-text search with filters, sort and
//! pagination; product detail; shop pages; the category tree. Only active,
//! unhidden products of shops whose seller is not suspended are visible.
//! Public reads carry an `ETag` and answer `304` when unchanged.

use axum::{
    extract::{OriginalUri, State},
    http::HeaderMap,
    response::Response,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidQuery, Validate},
    routes::product_images::{self, ProductImage},
    state::AppState,
};

/// Page numbers and sizes as every list endpoint takes them.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    page: u32,
    per_page: u32,
}

pub const MAX_PER_PAGE: u32 = 100;

impl Paging {
    pub fn new(page: Option<u32>, per_page: Option<u32>) -> Self {
        Self {
            page: page.unwrap_or(1).max(1),
            per_page: per_page.unwrap_or(20).clamp(1, MAX_PER_PAGE),
        }
    }
    pub fn check(page: Option<u32>, per_page: Option<u32>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if page == Some(0) {
            errors.push(FieldError::new("page", "pages start at 1"));
        }
        if per_page.is_some_and(|n| n == 0 || n > MAX_PER_PAGE) {
            errors.push(FieldError::new(
                "per_page",
                format!("must be 1 to {MAX_PER_PAGE}"),
            ));
        }
        errors
    }
    pub fn limit(self) -> i64 {
        i64::from(self.per_page)
    }
    pub fn offset(self) -> i64 {
        i64::from(self.page - 1) * i64::from(self.per_page)
    }
    /// The total of a page read with `count(*) OVER ()`, which every row
    /// of the page carries (`on_rows`, the first one's). A page past the
    /// last has no row to carry it: then `count`, the same filter counted
    /// on its own, is asked (a future: only run then).
    pub async fn total(
        self,
        on_rows: Option<i64>,
        count: impl Future<Output = Result<i64, sqlx::Error>>,
    ) -> Result<i64, sqlx::Error> {
        match on_rows {
            Some(n) => Ok(n),
            None if self.offset() > 0 => count.await,
            None => Ok(0),
        }
    }
    pub fn page<T>(self, items: Vec<T>, total: i64) -> Page<T> {
        Page {
            items,
            page: self.page,
            per_page: self.per_page,
            total,
        }
    }
}

/// One page of a list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub page: u32,
    pub per_page: u32,
    /// Items in the whole list.
    pub total: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShopRef {
    pub slug: String,
    pub name: String,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct Rating {
    /// Mean stars to one decimal; absent without reviews.
    pub average: Option<f64>,
    pub count: i64,
}

impl Rating {
    pub fn new(sum: i64, count: i64) -> Self {
        // Integer arithmetic, then one division for display.
        let average = (count > 0).then(|| ((sum * 10 + count / 2) / count) as f64 / 10.0);
        Self { average, count }
    }
}

/// A product in a list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductSummary {
    pub id: Uuid,
    pub title: String,
    pub category: Option<String>,
    pub shop: ShopRef,
    /// The main photo's URL, if there is one.
    pub image_url: Option<String>,
    /// The lowest price in force now among its variants, in minor units.
    pub price_from_minor: i64,
    /// Some variant sells below its regular price right now.
    pub on_sale: bool,
    pub sold_out: bool,
    pub rating: Rating,
    pub published_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sort {
    /// Best match first with `q`; newest first without.
    #[default]
    Relevance,
    PriceAsc,
    PriceDesc,
    Newest,
    Rating,
    BestSelling,
}

impl Sort {
    /// Fixed SQL, chosen from a closed set: never built from input.
    fn order_by(self) -> &'static str {
        match self {
            Self::Relevance => "rank DESC, published_at DESC",
            Self::PriceAsc => "price_from ASC",
            Self::PriceDesc => "price_from DESC",
            Self::Newest => "published_at DESC",
            Self::Rating => {
                "(rating_sum::numeric / nullif(rating_count, 0)) DESC NULLS LAST, rating_count DESC"
            }
            Self::BestSelling => "sold_count DESC",
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CatalogQuery {
    /// Words to find in titles, tags and descriptions (web-search syntax:
    /// `"exact phrase"`, `-without`, `or`).
    pub q: Option<String>,
    /// A category slug; its subcategories are included.
    pub category: Option<String>,
    /// A shop slug.
    pub shop: Option<String>,
    /// Lowest "from" price, minor units.
    pub min_price: Option<i64>,
    /// Highest "from" price, minor units.
    pub max_price: Option<i64>,
    /// Only products with stock available.
    pub in_stock: Option<bool>,
    /// 1 to 5: only products rated at least this on average.
    pub min_rating: Option<u8>,
    pub sort: Option<Sort>,
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100; 20 if absent.
    pub per_page: Option<u32>,
}

impl Validate for CatalogQuery {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Paging::check(self.page, self.per_page);
        if self.q.as_ref().is_some_and(|q| q.chars().count() > 200) {
            errors.push(FieldError::new("q", "at most 200 characters"));
        }
        for (field, v) in [("min_price", self.min_price), ("max_price", self.max_price)] {
            if v.is_some_and(|v| v < 0) {
                errors.push(FieldError::new(field, "must not be negative"));
            }
        }
        if let (Some(min), Some(max)) = (self.min_price, self.max_price)
            && min > max
        {
            errors.push(FieldError::new("max_price", "must not be below min_price"));
        }
        if self.min_rating.is_some_and(|r| !(1..=5).contains(&r)) {
            errors.push(FieldError::new("min_rating", "must be 1 to 5"));
        }
        errors
    }
}

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: Uuid,
    title: String,
    category: Option<String>,
    shop_slug: String,
    shop_name: String,
    image_file: Option<String>,
    price_from: i64,
    on_sale: bool,
    available: i64,
    rating_sum: i64,
    rating_count: i64,
    published_at: Option<DateTime<Utc>>,
    total: i64,
}

pub use souk_shared::catalog::VISIBLE;
use souk_shared::catalog::{LISTED, OPEN_SHOP};

/// `WITH [subtree,] matched AS NOT MATERIALIZED (…` : the visible
/// products the filters select (the CTE left open for what follows). Only
/// the filters given become SQL (values always bound), so each shape plans
/// simply and its prepared statement is reused. The shops in good standing
/// are a hashed set, so a list in `published_at` order walks
/// `products_listed_order` alone (an index-only scan) however deep the page.
fn matched(query: &CatalogQuery, q: Option<&str>) -> QueryBuilder<Postgres> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new("WITH ");
    if let Some(category) = &query.category {
        sql.push("RECURSIVE subtree AS (SELECT id FROM categories WHERE slug = ")
            .push_bind(category.clone())
            .push(
                " UNION ALL SELECT c.id FROM categories c JOIN subtree t ON c.parent_id = t.id), ",
            );
    }
    sql.push(
        "matched AS NOT MATERIALIZED (
             SELECT p.id, p.shop_id, p.category_id, p.title, p.rating_sum, p.rating_count,
                    p.sold_count, p.published_at, ",
    );
    match q {
        Some(q) => sql
            .push("ts_rank(p.search, websearch_to_tsquery('english', ")
            .push_bind(q.to_string())
            .push("))"),
        None => sql.push("0::real"),
    };
    sql.push(format!(
        " AS rank
               FROM products p
              WHERE {LISTED} AND p.has_variants
                AND (p.shop_id IN (SELECT s.id FROM shops s JOIN users u ON u.id = s.owner_id
                                    WHERE {OPEN_SHOP}"
    ));
    if let Some(shop) = &query.shop {
        sql.push(" AND s.slug = ").push_bind(shop.clone());
    }
    // `IS TRUE` keeps PostgreSQL from turning the IN into a join: it stays
    // a hashed subplan, one hash probe per product whatever the number of
    // shops (a semi-join rescanned the shops for every row: 27 ms instead
    // of 8 for a page 50,000 rows deep).
    sql.push(")) IS TRUE");
    if let Some(q) = q {
        sql.push(" AND p.search @@ websearch_to_tsquery('english', ")
            .push_bind(q.to_string())
            .push(")");
    }
    if query.category.is_some() {
        sql.push(" AND p.category_id IN (SELECT id FROM subtree)");
    }
    if let Some(stars) = query.min_rating {
        sql.push(" AND p.rating_count > 0 AND p.rating_sum >= ")
            .push_bind(i64::from(stars))
            .push(" * p.rating_count");
    }
    sql
}

/// Each row of `source` with its price in force, sale flag, stock, shop
/// and main photo: `SELECT … FROM {source} m …`.
fn priced(source: &str) -> String {
    format!(
        "SELECT m.*, s.slug AS shop_slug, s.name AS shop_name, c.slug AS category,
                a.price_from, a.on_sale, a.available,
                (SELECT i.file FROM product_images i WHERE i.product_id = m.id
                  ORDER BY i.position, i.id LIMIT 1) AS image_file
           FROM {source} m
           JOIN shops s ON s.id = m.shop_id
           LEFT JOIN categories c ON c.id = m.category_id
          CROSS JOIN LATERAL (
                SELECT min(v.price_now_minor) AS price_from,
                       bool_or(v.price_now_minor < v.price_minor) AS on_sale,
                       sum(greatest(v.available, 0))::bigint AS available
                  FROM variants_now v WHERE v.product_id = m.id) a"
    )
}

/// `SELECT {select} FROM` the matches priced and filtered by price and
/// stock (the statement left open for an ORDER BY).
fn priced_matches(query: &CatalogQuery, q: Option<&str>, select: &str) -> QueryBuilder<Postgres> {
    let mut sql = matched(query, q);
    sql.push(format!(
        "), priced AS ({}) SELECT {select} FROM priced WHERE true",
        priced("matched")
    ));
    if let Some(min) = query.min_price {
        sql.push(" AND price_from >= ").push_bind(min);
    }
    if let Some(max) = query.max_price {
        sql.push(" AND price_from <= ").push_bind(max);
    }
    if query.in_stock == Some(true) {
        sql.push(" AND available > 0");
    }
    sql
}

async fn search(state: &AppState, query: &CatalogQuery) -> Result<Page<ProductSummary>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let q = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let sort = query.sort.unwrap_or_default();
    // Prices and stock are aggregated over variants (with the sale in
    // force). When neither a filter nor the sort needs them, the page is cut
    // first and only its rows are priced: 20 aggregates instead of the whole
    // catalog's.
    let needs_prices = query.min_price.is_some()
        || query.max_price.is_some()
        || query.in_stock == Some(true)
        || matches!(sort, Sort::PriceAsc | Sort::PriceDesc);
    let order = format!(" ORDER BY {}, id DESC", sort.order_by());
    // The unpriced list's total is kept per set of filters (whatever the
    // page or sort) as briefly as public answers are: while it is kept the
    // page stops after its rows; otherwise the same statement counts too.
    let counted = format!(
        "{:?}|{:?}|{:?}|{:?}",
        q, query.category, query.shop, query.min_rating
    );
    let known = (!needs_prices)
        .then(|| state.public.kept_count(&counted))
        .flatten();
    let mut sql = if needs_prices {
        let mut sql = priced_matches(query, q, "*, count(*) OVER () AS total");
        sql.push(&order)
            .push(" LIMIT ")
            .push_bind(paging.limit())
            .push(" OFFSET ")
            .push_bind(paging.offset());
        sql
    } else {
        // Only the sort's columns are read for the rows skipped; the page's
        // own rows are read whole afterwards (and sorted as one relation,
        // so the sort's names cannot meet the shop's columns).
        let mut sql = matched(query, q);
        let total = if known.is_some() {
            "0::bigint"
        } else {
            "(SELECT count(*) FROM matched)"
        };
        sql.push(format!(
            "), paged AS (SELECT id, rank, {total} AS total FROM matched"
        ))
        .push(&order)
        .push(" LIMIT ")
        .push_bind(paging.limit())
        .push(" OFFSET ")
        .push_bind(paging.offset())
        .push(format!(
            "), page AS (SELECT p.id, p.shop_id, p.category_id, p.title, p.rating_sum,
                                p.rating_count, p.sold_count, p.published_at, paged.rank, paged.total
                           FROM paged JOIN products p ON p.id = paged.id)
             SELECT * FROM ({}) priced {order}",
            priced("page")
        ));
        sql
    };
    let rows: Vec<SummaryRow> = sql.build_query_as().fetch_all(&state.pool).await?;
    let total = match (known, rows.first()) {
        (Some(n), _) => n,
        (None, Some(row)) => row.total,
        // Past the last page (or nothing matched): the total on its own.
        (None, None) if paging.offset() > 0 => {
            let mut count = if needs_prices {
                priced_matches(query, q, "count(*)")
            } else {
                let mut count = matched(query, q);
                count.push(") SELECT count(*) FROM matched");
                count
            };
            count.build_query_scalar().fetch_one(&state.pool).await?
        }
        (None, None) => 0,
    };
    if !needs_prices && known.is_none() {
        state.public.keep_count(counted, total);
    }
    let items = rows
        .into_iter()
        .map(|r| ProductSummary {
            id: r.id,
            title: r.title,
            category: r.category,
            shop: ShopRef {
                slug: r.shop_slug,
                name: r.shop_name,
            },
            image_url: r.image_file.map(|file| product_images::url(r.id, &file)),
            price_from_minor: r.price_from,
            on_sale: r.on_sale,
            sold_out: r.available <= 0,
            rating: Rating::new(r.rating_sum, r.rating_count),
            published_at: r.published_at,
        })
        .collect();
    Ok(paging.page(items, total))
}

/// Browse and search the catalog.
#[utoipa::path(
    get, path = "/products", tag = "catalog", params(CatalogQuery),
    responses(
        (status = 200, description = "a page of products (with ETag)", body = Page<ProductSummary>),
        (status = 304, description = "unchanged since the ETag in If-None-Match"),
        (status = 422, description = "a parameter is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    ValidQuery(query): ValidQuery<CatalogQuery>,
) -> Result<Response, ApiError> {
    let key = uri.to_string();
    state
        .public
        .answer(&headers, key, || search(&state, &query))
        .await
}

/// A shop's products (the storefront's shop page).
#[utoipa::path(
    get, path = "/shops/{slug}/products", tag = "catalog", params(("slug" = String, Path), CatalogQuery),
    responses(
        (status = 200, description = "a page of the shop's products (with ETag)", body = Page<ProductSummary>),
        (status = 304, description = "unchanged since the ETag in If-None-Match"),
        (status = 404, description = "no such shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn shop_products(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(slug): Path<String>,
    ValidQuery(query): ValidQuery<CatalogQuery>,
) -> Result<Response, ApiError> {
    let key = uri.to_string();
    state
        .public
        .answer(&headers, key, || shop_page(&state, slug, query))
        .await
}

async fn shop_page(
    state: &AppState,
    slug: String,
    mut query: CatalogQuery,
) -> Result<Page<ProductSummary>, ApiError> {
    let exists: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM shops s JOIN users u ON u.id = s.owner_id
          WHERE s.slug = $1 AND u.suspended_at IS NULL
            AND s.approved_at IS NOT NULL AND s.suspended_at IS NULL",
    )
    .bind(&slug)
    .fetch_optional(&state.pool)
    .await?;
    exists.ok_or(ApiError::NotFound)?;
    query.shop = Some(slug);
    search(state, &query).await
}

/// 404 unless the storefront shows this product.
pub async fn ensure_visible(state: &AppState, product: Uuid) -> Result<(), ApiError> {
    let visible: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM products p JOIN shops s ON s.id = p.shop_id JOIN users u ON u.id = s.owner_id
          WHERE p.id = $1 AND {VISIBLE}"
    )))
    .bind(product)
    .fetch_optional(&state.pool)
    .await?;
    visible.map(|_| ()).ok_or(ApiError::NotFound)
}

/// A variant as the storefront shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PublicVariant {
    pub id: Uuid,
    pub sku: String,
    pub title: String,
    /// The regular price, minor units.
    pub price_minor: i64,
    pub compare_at_minor: Option<i64>,
    /// The price in force now (a running sale's, else the regular one).
    pub price_now_minor: i64,
    /// When the running sale ends, if one runs.
    pub sale_ends_at: Option<DateTime<Utc>>,
    pub available: i32,
    pub sold_out: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductDetail {
    pub id: Uuid,
    pub title: String,
    pub description: String,
    pub category: Option<String>,
    pub tags: Vec<String>,
    pub shop: ShopRef,
    pub variants: Vec<PublicVariant>,
    /// In the seller's order; the first is the main photo.
    pub images: Vec<ProductImage>,
    pub rating: Rating,
    pub sold_out: bool,
    pub published_at: Option<DateTime<Utc>>,
}

/// A product page: variants with the prices in force now, stock and rating.
#[utoipa::path(
    get, path = "/products/{id}", tag = "catalog", params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the product (with ETag)", body = ProductDetail),
        (status = 304, description = "unchanged since the ETag in If-None-Match"),
        (status = 404, description = "no such product on the storefront", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    Path(id): Path<Uuid>,
) -> Result<Response, ApiError> {
    let key = uri.to_string();
    state
        .public
        .answer(&headers, key, || detail(&state, id))
        .await
}

async fn detail(state: &AppState, id: Uuid) -> Result<ProductDetail, ApiError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        title: String,
        description: String,
        category: Option<String>,
        tags: Vec<String>,
        shop_slug: String,
        shop_name: String,
        rating_sum: i64,
        rating_count: i64,
        published_at: Option<DateTime<Utc>>,
    }
    let row: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT p.title, p.description, c.slug AS category, p.tags, s.slug AS shop_slug,
                s.name AS shop_name, p.rating_sum, p.rating_count, p.published_at
           FROM products p
           JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
           LEFT JOIN categories c ON c.id = p.category_id
          WHERE p.id = $1 AND {VISIBLE}"
    )))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::NotFound)?;
    let variants: Vec<PublicVariant> = sqlx::query_as(
        "SELECT id, sku, title, price_minor, compare_at_minor, price_now_minor, sale_ends_at,
                greatest(available, 0) AS available, available <= 0 AS sold_out
           FROM variants_now WHERE product_id = $1 ORDER BY position, id",
    )
    .bind(id)
    .fetch_all(&state.pool)
    .await?;
    let detail = ProductDetail {
        id,
        title: row.title,
        description: row.description,
        category: row.category,
        tags: row.tags,
        shop: ShopRef {
            slug: row.shop_slug,
            name: row.shop_name,
        },
        sold_out: variants.iter().all(|v| v.sold_out),
        variants,
        images: product_images::of(&state.pool, id).await?,
        rating: Rating::new(row.rating_sum, row.rating_count),
        published_at: row.published_at,
    };
    Ok(detail)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Category {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    #[schema(no_recursion)]
    pub children: Vec<Category>,
}

/// The category tree.
#[utoipa::path(
    get, path = "/categories", tag = "catalog",
    responses(
        (status = 200, description = "root categories with their children (with ETag)", body = Vec<Category>),
        (status = 304, description = "unchanged since the ETag in If-None-Match"),
    )
)]
pub async fn categories(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    let key = uri.to_string();
    state.public.answer(&headers, key, || tree(&state)).await
}

async fn tree(state: &AppState) -> Result<Vec<Category>, ApiError> {
    let rows: Vec<(Uuid, Option<Uuid>, String, String)> =
        sqlx::query_as("SELECT id, parent_id, name, slug FROM categories ORDER BY position, name")
            .fetch_all(&state.pool)
            .await?;
    fn children(
        rows: &[(Uuid, Option<Uuid>, String, String)],
        parent: Option<Uuid>,
    ) -> Vec<Category> {
        rows.iter()
            .filter(|r| r.1 == parent)
            .map(|(id, _, name, slug)| Category {
                id: *id,
                name: name.clone(),
                slug: slug.clone(),
                children: children(rows, Some(*id)),
            })
            .collect()
    }
    Ok(children(&rows, None))
}
