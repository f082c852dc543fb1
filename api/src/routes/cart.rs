//! The cart: one per account, persistent, holding variants from many shops.
//! The client sends variants and quantities only; prices and availability
//! are read from the database every time the cart is shown.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Problem},
    extract::{ValidJson, Validate},
    routes::catalog::{ShopRef, VISIBLE},
    state::AppState,
};

const MAX_QUANTITY: i32 = 999;

/// Why a line cannot be bought as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LineProblem {
    /// The product was withdrawn, hidden or its shop closed.
    Unavailable,
    /// Fewer units are available than the line asks for.
    InsufficientStock,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CartLine {
    pub variant_id: Uuid,
    pub product_id: Uuid,
    pub title: String,
    pub variant_title: String,
    pub sku: String,
    pub quantity: i32,
    /// The price in force now, minor units.
    pub unit_price_minor: i64,
    pub line_total_minor: i64,
    pub available: i32,
    /// Set when the line cannot be bought as it is; such lines stay in the
    /// cart (flagged, never silently dropped) and count in no total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<LineProblem>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShopGroup {
    pub shop: ShopRef,
    pub lines: Vec<CartLine>,
    /// Lines without a problem, minor units.
    pub subtotal_minor: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cart {
    pub shops: Vec<ShopGroup>,
    pub total_minor: i64,
    pub item_count: i64,
    /// Whether every line can be bought as it is.
    pub ready_for_checkout: bool,
}

/// The caller's cart as it stands now.
pub async fn load(state: &AppState, user: Uuid) -> Result<Cart, ApiError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        variant_id: Uuid,
        product_id: Uuid,
        title: String,
        variant_title: String,
        sku: String,
        quantity: i32,
        price: i64,
        available: i32,
        visible: bool,
        shop_slug: String,
        shop_name: String,
    }
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT ci.variant_id, p.id AS product_id, p.title, v.title AS variant_title, v.sku,
                ci.quantity, v.price_now_minor AS price, greatest(v.available, 0) AS available,
                ({VISIBLE}) AS visible, s.slug AS shop_slug, s.name AS shop_name
           FROM cart_items ci
           JOIN variants_now v ON v.id = ci.variant_id
           JOIN products p ON p.id = v.product_id
           JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
          WHERE ci.user_id = $1
          ORDER BY s.name, s.slug, ci.added_at, ci.variant_id"
    )))
    .bind(user)
    .fetch_all(&state.pool)
    .await?;
    let mut shops: Vec<ShopGroup> = Vec::new();
    for r in rows {
        let problem = if !r.visible {
            Some(LineProblem::Unavailable)
        } else if r.quantity > r.available {
            Some(LineProblem::InsufficientStock)
        } else {
            None
        };
        let line = CartLine {
            variant_id: r.variant_id,
            product_id: r.product_id,
            title: r.title,
            variant_title: r.variant_title,
            sku: r.sku,
            quantity: r.quantity,
            unit_price_minor: r.price,
            line_total_minor: r.price * i64::from(r.quantity),
            available: r.available,
            problem,
        };
        match shops.last_mut() {
            Some(group) if group.shop.slug == r.shop_slug => group.lines.push(line),
            _ => shops.push(ShopGroup {
                shop: ShopRef {
                    slug: r.shop_slug,
                    name: r.shop_name,
                },
                lines: vec![line],
                subtotal_minor: 0,
            }),
        }
    }
    for group in &mut shops {
        group.subtotal_minor = group
            .lines
            .iter()
            .filter(|l| l.problem.is_none())
            .map(|l| l.line_total_minor)
            .sum();
    }
    let lines = || shops.iter().flat_map(|g| &g.lines);
    Ok(Cart {
        total_minor: shops.iter().map(|g| g.subtotal_minor).sum(),
        item_count: lines().map(|l| i64::from(l.quantity)).sum(),
        ready_for_checkout: lines().next().is_some() && lines().all(|l| l.problem.is_none()),
        shops,
    })
}

/// The caller's cart, grouped by shop, with prices in force now.
#[utoipa::path(
    get, path = "/cart", tag = "cart", security(("bearer" = [])),
    responses(
        (status = 200, description = "the cart", body = Cart),
        (status = 401, description = "not signed in", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(State(state): State<AppState>, caller: Caller) -> Result<Json<Cart>, ApiError> {
    Ok(Json(load(&state, caller.id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCartItem {
    pub variant_id: Uuid,
    /// Added to what the cart already holds of this variant.
    pub quantity: i32,
}

fn check_quantity(quantity: i32) -> Vec<FieldError> {
    if (1..=MAX_QUANTITY).contains(&quantity) {
        vec![]
    } else {
        vec![FieldError::new("quantity", format!("must be 1 to {MAX_QUANTITY}"))]
    }
}

impl Validate for NewCartItem {
    fn validate(&self) -> Vec<FieldError> {
        check_quantity(self.quantity)
    }
}

/// Units of a variant the storefront can sell now; `None` if it cannot be
/// sold at all.
async fn sellable(state: &AppState, variant: Uuid) -> Result<Option<i32>, ApiError> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT greatest(v.available, 0) FROM variants_now v
           JOIN products p ON p.id = v.product_id
           JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
          WHERE v.id = $1 AND {VISIBLE}"
    )))
    .bind(variant)
    .fetch_optional(&state.pool)
    .await?)
}

fn too_many(available: i32) -> ApiError {
    ApiError::Conflict(FieldError::new(
        "quantity",
        format!("only {available} available"),
    ))
}

/// Put a variant in the cart; one already there gets the quantities merged.
#[utoipa::path(
    post, path = "/cart/items", tag = "cart", security(("bearer" = [])), request_body = NewCartItem,
    responses(
        (status = 200, description = "the cart", body = Cart),
        (status = 409, description = "more than is available", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "unknown or unavailable variant, or a bad quantity", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn add(
    State(state): State<AppState>,
    caller: Caller,
    ValidJson(body): ValidJson<NewCartItem>,
) -> Result<Json<Cart>, ApiError> {
    let available = sellable(&state, body.variant_id).await?.ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new("variant_id", "no such variant for sale")])
    })?;
    let mut tx = state.pool.begin().await?;
    let quantity: i32 = sqlx::query_scalar(
        "INSERT INTO cart_items (user_id, variant_id, quantity) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, variant_id)
         DO UPDATE SET quantity = least(cart_items.quantity + excluded.quantity, $4)
         RETURNING quantity",
    )
    .bind(caller.id)
    .bind(body.variant_id)
    .bind(body.quantity)
    .bind(MAX_QUANTITY)
    .fetch_one(&mut *tx)
    .await?;
    if quantity > available {
        return Err(too_many(available));
    }
    tx.commit().await?;
    Ok(Json(load(&state, caller.id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CartItemUpdate {
    pub quantity: i32,
}

impl Validate for CartItemUpdate {
    fn validate(&self) -> Vec<FieldError> {
        check_quantity(self.quantity)
    }
}

/// Set the quantity of a line.
#[utoipa::path(
    put, path = "/cart/items/{variant_id}", tag = "cart", security(("bearer" = [])),
    params(("variant_id" = Uuid, Path)), request_body = CartItemUpdate,
    responses(
        (status = 200, description = "the cart", body = Cart),
        (status = 404, description = "not in the cart", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "more than is available", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(variant): Path<Uuid>,
    ValidJson(body): ValidJson<CartItemUpdate>,
) -> Result<Json<Cart>, ApiError> {
    // An unavailable product can still be lowered or removed, not raised.
    let available = sellable(&state, variant).await?.unwrap_or(0);
    if body.quantity > available {
        return Err(too_many(available));
    }
    let updated = sqlx::query(
        "UPDATE cart_items SET quantity = $3 WHERE user_id = $1 AND variant_id = $2",
    )
    .bind(caller.id)
    .bind(variant)
    .bind(body.quantity)
    .execute(&state.pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(Json(load(&state, caller.id).await?))
}

/// Take a line out of the cart.
#[utoipa::path(
    delete, path = "/cart/items/{variant_id}", tag = "cart", security(("bearer" = [])),
    params(("variant_id" = Uuid, Path)),
    responses(
        (status = 204, description = "removed"),
        (status = 404, description = "not in the cart", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(variant): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let deleted = sqlx::query("DELETE FROM cart_items WHERE user_id = $1 AND variant_id = $2")
        .bind(caller.id)
        .bind(variant)
        .execute(&state.pool)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}
