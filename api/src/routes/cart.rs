//! The cart: one per account, persistent, holding variants from many shops.
//! The client sends variants and quantities only; prices and availability
//! are read from the database every time the cart is shown.

use axum::{Json, extract::State, http::StatusCode};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use souk_shared::{
    coupons::{self, Coupon},
    orders::place::{ACTIVE_MEMBERSHIP, BENEFIT_COLUMNS, Benefit},
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, Validate},
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
    /// For checkout's snapshot; the storefront knows shops by slug.
    #[serde(skip)]
    #[schema(ignore)]
    pub shop_id: Uuid,
    pub shop: ShopRef,
    pub lines: Vec<CartLine>,
    /// Lines without a problem, minor units.
    pub subtotal_minor: i64,
}

/// The coupon on the cart and what it takes off now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AppliedCoupon {
    #[serde(skip)]
    #[schema(ignore)]
    pub id: Uuid,
    pub code: String,
    /// The shop whose items it applies to; absent for a platform coupon
    /// (the whole cart).
    pub shop: Option<String>,
    pub discount_minor: i64,
    /// Why it takes nothing off right now (it stays on the cart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cart {
    pub shops: Vec<ShopGroup>,
    /// Every shop's subtotal, minor units.
    pub subtotal_minor: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coupon: Option<AppliedCoupon>,
    /// An active membership's percentage off what is left after the coupon.
    pub membership_discount_minor: i64,
    /// An active membership ships this order free.
    pub free_shipping: bool,
    /// Subtotal less the coupon's and the membership's discounts (shipping
    /// is added at checkout).
    pub total_minor: i64,
    pub item_count: i64,
    /// Whether every line can be bought as it is.
    pub ready_for_checkout: bool,
    /// For checkout: the membership the discount and free shipping come from.
    #[serde(skip)]
    #[schema(ignore)]
    pub benefit: Option<Benefit>,
}

/// Which coupon a cart is priced with.
#[derive(Debug, Clone, Copy)]
pub enum CouponOf {
    /// The one on the cart when it is read.
    Cart,
    /// This one (or none), whatever the cart holds by then: checkout's,
    /// read with its row locked, so the order is priced with the coupon
    /// checkout holds the lock of.
    Locked(Option<Uuid>),
}

/// The caller's cart as it stands now.
pub async fn load(state: &AppState, user: Uuid) -> Result<Cart, ApiError> {
    let mut conn = state.pool.acquire().await?;
    load_in(&mut conn, user, CouponOf::Cart).await
}

/// The cart read on `conn` (checkout reads it in its own transaction).
pub async fn load_in(
    conn: &mut sqlx::PgConnection,
    user: Uuid,
    coupon: CouponOf,
) -> Result<Cart, ApiError> {
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
        shop_id: Uuid,
        shop_slug: String,
        shop_name: String,
    }
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT ci.variant_id, p.id AS product_id, p.title, v.title AS variant_title, v.sku,
                ci.quantity, v.price_now_minor AS price, greatest(v.available, 0) AS available,
                ({VISIBLE}) AS visible, s.id AS shop_id, s.slug AS shop_slug, s.name AS shop_name
           FROM cart_items ci
           JOIN variants_now v ON v.id = ci.variant_id
           JOIN products p ON p.id = v.product_id
           JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
          WHERE ci.user_id = $1
          ORDER BY s.name, s.slug, ci.added_at, ci.variant_id"
    )))
    .bind(user)
    .fetch_all(&mut *conn)
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
                shop_id: r.shop_id,
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
    let subtotal: i64 = shops.iter().map(|g| g.subtotal_minor).sum();
    // The membership's benefit and which coupon is on the cart, in one read.
    let (membership_id, free_shipping, percent_off, coupon_id): (
        Option<Uuid>,
        Option<bool>,
        Option<i32>,
        Option<Uuid>,
    ) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {BENEFIT_COLUMNS}, (SELECT coupon_id FROM cart_coupons WHERE user_id = $1)
           FROM (SELECT) one LEFT JOIN ({ACTIVE_MEMBERSHIP}) ON true"
    )))
    .bind(user)
    .fetch_one(&mut *conn)
    .await?;
    let benefit = Benefit::from_row((membership_id, free_shipping, percent_off));
    let coupon_id = match coupon {
        CouponOf::Cart => coupon_id,
        CouponOf::Locked(id) => id,
    };
    let coupon = match coupon_id {
        Some(id) => {
            let stored: Coupon = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {} FROM coupons WHERE id = $1",
                coupons::COLUMNS
            )))
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
            Some(evaluate(conn, stored, user, &shops, subtotal).await?)
        }
        None => None,
    };
    let discount = coupon.as_ref().map_or(0, |c| c.discount_minor);
    let membership_discount = benefit.map_or(0, |b| b.discount(subtotal - discount));
    let lines = || shops.iter().flat_map(|g| &g.lines);
    Ok(Cart {
        subtotal_minor: subtotal,
        coupon,
        membership_discount_minor: membership_discount,
        free_shipping: benefit.is_some_and(|b| b.free_shipping),
        benefit,
        total_minor: subtotal - discount - membership_discount,
        item_count: lines().map(|l| i64::from(l.quantity)).sum(),
        ready_for_checkout: lines().next().is_some() && lines().all(|l| l.problem.is_none()),
        shops,
    })
}

/// What `coupon` takes off this cart for `user`, or why it takes nothing.
async fn evaluate(
    conn: &mut sqlx::PgConnection,
    coupon: Coupon,
    user: Uuid,
    shops: &[ShopGroup],
    subtotal: i64,
) -> Result<AppliedCoupon, ApiError> {
    let shop = match coupon.shop_id {
        None => None,
        Some(id) => Some(
            sqlx::query_scalar::<_, String>("SELECT slug FROM shops WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *conn)
                .await?,
        ),
    };
    let eligible = match &shop {
        Some(slug) => shops
            .iter()
            .filter(|g| &g.shop.slug == slug)
            .map(|g| g.subtotal_minor)
            .sum(),
        None => subtotal,
    };
    // Uses paid for, plus orders placed with it and not yet paid.
    let (held, held_by_user) = coupons::in_flight(conn, coupon.id, user).await?;
    let uses = coupons::customer_uses(conn, coupon.id, user).await? + held_by_user;
    let coupon = Coupon {
        uses: coupon
            .uses
            .saturating_add(i32::try_from(held).unwrap_or(i32::MAX)),
        ..coupon
    };
    let (discount_minor, problem) = match coupon.discount(Utc::now(), uses, eligible) {
        Ok(discount) => (discount, None),
        Err(refusal) => (0, Some(refusal.to_string())),
    };
    Ok(AppliedCoupon {
        id: coupon.id,
        code: coupon.code,
        shop,
        discount_minor,
        problem,
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CouponCode {
    pub code: String,
}

impl Validate for CouponCode {
    fn validate(&self) -> Vec<FieldError> {
        if (1..=32).contains(&self.code.trim().len()) {
            vec![]
        } else {
            vec![FieldError::new("code", "must be a coupon code")]
        }
    }
}

/// Put a coupon on the cart (replacing any other). It must apply to the
/// cart as it is now.
#[utoipa::path(
    put, path = "/cart/coupon", tag = "cart", security(("bearer" = [])), request_body = CouponCode,
    responses(
        (status = 200, description = "the cart with the coupon's discount", body = Cart),
        (status = 422, description = "no such coupon, or it does not apply (the detail says why)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn apply_coupon(
    State(state): State<AppState>,
    caller: Caller,
    ValidJson(body): ValidJson<CouponCode>,
) -> Result<Json<Cart>, ApiError> {
    let refuse = |message: String| ApiError::Validation(vec![FieldError::new("code", message)]);
    // Judged against the cart as it is, exactly as the cart will show it;
    // a refused coupon writes nothing.
    let cart = load(&state, caller.id).await?;
    let mut conn = state.pool.acquire().await?;
    let coupon = coupons::by_code(&mut conn, body.code.trim())
        .await?
        .ok_or_else(|| refuse("no such coupon".into()))?;
    let id = coupon.id;
    let applied = evaluate(
        &mut conn,
        coupon,
        caller.id,
        &cart.shops,
        cart.subtotal_minor,
    )
    .await?;
    if let Some(problem) = applied.problem {
        return Err(refuse(problem));
    }
    sqlx::query(
        "INSERT INTO cart_coupons (user_id, coupon_id) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET coupon_id = excluded.coupon_id, added_at = now()",
    )
    .bind(caller.id)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    drop(conn);
    Ok(Json(load(&state, caller.id).await?))
}

/// Take the coupon off the cart.
#[utoipa::path(
    delete, path = "/cart/coupon", tag = "cart", security(("bearer" = [])),
    responses((status = 200, description = "the cart without a coupon", body = Cart))
)]
pub async fn remove_coupon(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Cart>, ApiError> {
    sqlx::query("DELETE FROM cart_coupons WHERE user_id = $1")
        .bind(caller.id)
        .execute(&state.pool)
        .await?;
    Ok(Json(load(&state, caller.id).await?))
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
        vec![FieldError::new(
            "quantity",
            format!("must be 1 to {MAX_QUANTITY}"),
        )]
    }
}

impl Validate for NewCartItem {
    fn validate(&self) -> Vec<FieldError> {
        check_quantity(self.quantity)
    }
}

/// The units of the variant `$n` the storefront can sell now, as a query
/// (no row if it cannot be sold at all).
fn sellable_sql(variant_param: &str) -> String {
    format!(
        "SELECT greatest(v.available, 0) AS available FROM variants_now v
           JOIN products p ON p.id = v.product_id
           JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
          WHERE v.id = {variant_param} AND {VISIBLE}"
    )
}

/// Units of a variant the storefront can sell now; `None` if it cannot be
/// sold at all.
async fn sellable(state: &AppState, variant: Uuid) -> Result<Option<i32>, ApiError> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sellable_sql("$1")))
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
    // One statement: what can be sold now, and the line merged only if the
    // cart then holds no more than that, judged on the line as it is when
    // its row is locked (a refused add writes nothing).
    let (available, quantity): (Option<i32>, Option<i32>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH sellable AS ({}),
             merged AS (
                 INSERT INTO cart_items (user_id, variant_id, quantity)
                 SELECT $1, $2, least($3, $4) FROM sellable WHERE least($3, $4) <= available
                 ON CONFLICT (user_id, variant_id)
                 DO UPDATE SET quantity = least(cart_items.quantity + $3, $4)
                  WHERE least(cart_items.quantity + $3, $4) <= (SELECT available FROM sellable)
                 RETURNING quantity)
             SELECT (SELECT available FROM sellable), (SELECT quantity FROM merged)",
            sellable_sql("$2")
        )))
        .bind(caller.id)
        .bind(body.variant_id)
        .bind(body.quantity)
        .bind(MAX_QUANTITY)
        .fetch_one(&state.pool)
        .await?;
    let available = available.ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new(
            "variant_id",
            "no such variant for sale",
        )])
    })?;
    if quantity.is_none() {
        return Err(too_many(available));
    }
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
    // Lowering is always allowed (even for a line that became unavailable
    // or short); raising only up to what is available now.
    let available = sellable(&state, variant).await?.unwrap_or(0);
    let updated: Option<i32> = sqlx::query_scalar(
        "UPDATE cart_items SET quantity = $3
          WHERE user_id = $1 AND variant_id = $2 AND ($3 <= quantity OR $3 <= $4)
         RETURNING quantity",
    )
    .bind(caller.id)
    .bind(variant)
    .bind(body.quantity)
    .bind(available)
    .fetch_optional(&state.pool)
    .await?;
    if updated.is_none() {
        let held: Option<i32> = sqlx::query_scalar(
            "SELECT quantity FROM cart_items WHERE user_id = $1 AND variant_id = $2",
        )
        .bind(caller.id)
        .bind(variant)
        .fetch_optional(&state.pool)
        .await?;
        return Err(match held {
            Some(_) => too_many(available),
            None => ApiError::NotFound,
        });
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
