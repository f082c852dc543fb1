//! Refund requests (complaints): a customer asks for money back on a line
//! of a shipped or delivered seller order, with a reason and photos; the
//! seller approves or rejects with a reason, or an admin steps in. An
//! approval refunds those units through Stripe (their share of what was
//! paid, never more than is left), the ledger takes it back from the seller
//! and the commission, and, when chosen, the units go back in stock. Both
//! sides are told at every step.

use axum::{
    Json,
    extract::{Multipart, State},
    http::StatusCode,
    response::Response,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use souk_shared::{
    inventory::{self, Units},
    notify,
    orders::{
        notices,
        pricing::allocate,
        refunds::{self, Refund},
    },
};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{Admin, Caller, Role, Seller},
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    images::Gallery,
    middleware::RequestId,
    routes::{
        admin::{Reason, audit, reason_error},
        catalog::{Page, Paging},
    },
    state::AppState,
};

const PHOTOS: Gallery = Gallery {
    table: "refund_request_images",
    owner_column: "refund_request_id",
    owner_table: "refund_requests",
    folder: "refund-requests",
    field: "image",
    size: 1600,
    max_images: 5,
    private: true,
    shown: &["true"],
};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RefundRequest {
    pub id: Uuid,
    pub order_id: Uuid,
    pub seller_order_id: Uuid,
    pub shop: String,
    pub line_id: Uuid,
    pub title: String,
    pub variant_title: String,
    pub sku: String,
    /// Units asked for.
    pub quantity: i32,
    /// What those units were paid: the refund if approved.
    pub amount_minor: i64,
    pub currency: String,
    pub reason: String,
    /// `open`, `approved` or `rejected`.
    pub status: String,
    /// Whether the decider chose to put the approved units back in stock.
    pub restock: Option<bool>,
    /// Units this approval put back in stock: `quantity` with `restock`,
    /// fewer (down to 0) when earlier approvals of the line, whose refunds
    /// Stripe refused, already restocked them; 0 otherwise.
    pub restocked_units: i32,
    /// `seller` or `admin`.
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    /// The refund's state once approved: `requested`, `succeeded` or `failed`.
    pub refund_status: Option<String>,
    pub image_urls: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    order_id: Uuid,
    seller_order_id: Uuid,
    shop: String,
    line_id: Uuid,
    title: String,
    variant_title: String,
    sku: String,
    quantity: i32,
    amount_minor: i64,
    currency: String,
    reason: String,
    status: String,
    restock: Option<bool>,
    restocked_units: i32,
    decided_role: Option<String>,
    decision_reason: Option<String>,
    refund_status: Option<String>,
    images: Vec<String>,
    created_at: DateTime<Utc>,
    decided_at: Option<DateTime<Utc>>,
}

impl From<Row> for RefundRequest {
    fn from(r: Row) -> Self {
        let image_urls = r
            .images
            .iter()
            .map(|file| format!("/api/v1/refund-request-images/{}/{file}", r.id))
            .collect();
        Self {
            id: r.id,
            order_id: r.order_id,
            seller_order_id: r.seller_order_id,
            shop: r.shop,
            line_id: r.line_id,
            title: r.title,
            variant_title: r.variant_title,
            sku: r.sku,
            quantity: r.quantity,
            amount_minor: r.amount_minor,
            currency: r.currency,
            reason: r.reason,
            status: r.status,
            restock: r.restock,
            restocked_units: r.restocked_units,
            decided_by: r.decided_role,
            decision_reason: r.decision_reason,
            refund_status: r.refund_status,
            image_urls,
            created_at: r.created_at,
            decided_at: r.decided_at,
        }
    }
}

const SELECT: &str = "SELECT rr.id, rr.order_id, rr.seller_order_id, s.slug AS shop, rr.order_line_id AS line_id,
            l.title, l.variant_title, l.sku, rr.quantity, rr.amount_minor, o.currency, rr.reason, rr.status,
            rr.restock, rr.restocked_units, rr.decided_role, rr.decision_reason, rf.status AS refund_status,
            array(SELECT i.file FROM refund_request_images i WHERE i.refund_request_id = rr.id
                   ORDER BY i.position) AS images,
            rr.created_at, rr.decided_at
       FROM refund_requests rr
       JOIN orders o ON o.id = rr.order_id
       JOIN order_lines l ON l.id = rr.order_line_id
       JOIN shops s ON s.id = rr.shop_id
       LEFT JOIN refunds rf ON rf.id = rr.refund_id";

/// Who may see a request: its customer, its shop's seller, admins.
#[derive(Debug, Clone, Copy)]
enum Scope {
    Customer(Uuid),
    Shop(Uuid),
    Admin,
}

impl Scope {
    fn of(caller: &Caller, shop: Option<Uuid>) -> Self {
        match (caller.role, shop) {
            (Role::Admin, _) => Self::Admin,
            (Role::Seller, Some(shop)) => Self::Shop(shop),
            _ => Self::Customer(caller.id),
        }
    }
    fn binds(self) -> (Option<Uuid>, Option<Uuid>) {
        match self {
            Self::Customer(id) => (Some(id), None),
            Self::Shop(id) => (None, Some(id)),
            Self::Admin => (None, None),
        }
    }
}

const IN_SCOPE: &str =
    "($2::uuid IS NULL OR rr.customer_id = $2) AND ($3::uuid IS NULL OR rr.shop_id = $3)";

async fn one(conn: &mut PgConnection, id: Uuid, scope: Scope) -> Result<RefundRequest, ApiError> {
    let (customer, shop) = scope.binds();
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE rr.id = $1 AND {IN_SCOPE}"
    )))
    .bind(id)
    .bind(customer)
    .bind(shop)
    .fetch_optional(conn)
    .await?;
    row.map(RefundRequest::from).ok_or(ApiError::NotFound)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRefundRequest {
    /// A line of the order (`lines[].id`).
    pub line_id: Uuid,
    /// Units of that line; all of them if absent.
    #[serde(default)]
    pub quantity: Option<i32>,
    /// What is wrong, in the customer's words.
    pub reason: String,
}

impl Validate for NewRefundRequest {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.quantity.is_some_and(|q| q < 1) {
            errors.push(FieldError::new("quantity", "must be at least 1"));
        }
        let n = self.reason.trim().chars().count();
        if n == 0 || n > 2000 {
            errors.push(FieldError::new("reason", "must be 1 to 2000 characters"));
        }
        errors
    }
}

/// What the first `quantity` units of a line were paid: the line's total
/// less its share of the seller order's discount (shared by line totals,
/// largest remainder), pro rata for part of the line (rounded down). A
/// request is priced as what its units bring that to, less what the line's
/// other live requests already take, so one unit at a time still adds up
/// to the line's whole amount (333 + 333 + 334 of 1000), never more.
async fn paid_for(
    conn: &mut PgConnection,
    seller_order: Uuid,
    line: Uuid,
    quantity: i32,
) -> Result<i64, sqlx::Error> {
    let discount: i64 =
        sqlx::query_scalar("SELECT discount_minor FROM seller_orders WHERE id = $1")
            .bind(seller_order)
            .fetch_one(&mut *conn)
            .await?;
    let lines: Vec<(Uuid, i64, i32)> = sqlx::query_as(
        "SELECT l.id, l.unit_price_minor * l.quantity, l.quantity
           FROM order_lines l JOIN seller_orders so ON so.order_id = l.order_id AND so.shop_id = l.shop_id
          WHERE so.id = $1 ORDER BY l.id",
    )
    .bind(seller_order)
    .fetch_all(conn)
    .await?;
    let shares = allocate(
        discount,
        &lines.iter().map(|(_, total, _)| *total).collect::<Vec<_>>(),
    );
    let (i, (_, total, units)) = lines
        .iter()
        .enumerate()
        .find(|(_, (id, _, _))| *id == line)
        .expect("the line belongs to the seller order");
    let paid = total - shares[i];
    Ok(paid * i64::from(quantity) / i64::from(*units))
}

/// Ask for money back on a line of a shipped or delivered part of the order.
#[utoipa::path(
    post, path = "/orders/{id}/refund-requests", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = NewRefundRequest,
    responses(
        (status = 201, description = "opened; the seller is told", body = RefundRequest),
        (status = 404, description = "no such order of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not shipped yet, a request for this line is open, or nothing was paid for these units", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a line of the order, or more units than are left", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn open(
    State(state): State<AppState>,
    caller: Caller,
    request_id: RequestId,
    Path(order): Path<Uuid>,
    ValidJson(body): ValidJson<NewRefundRequest>,
) -> Result<(StatusCode, Json<RefundRequest>), ApiError> {
    let corr = request_id.0.as_str();
    let mut tx = state.pool.begin().await?;
    let mine: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM orders WHERE id = $1 AND customer_id = $2 FOR NO KEY UPDATE",
    )
    .bind(order)
    .bind(caller.id)
    .fetch_optional(&mut *tx)
    .await?;
    mine.ok_or(ApiError::NotFound)?;
    let line: Option<(Uuid, Uuid, String, i32, String, String)> = sqlx::query_as(
        "SELECT so.id, so.shop_id, so.status, l.quantity, l.title, l.variant_title
           FROM order_lines l JOIN seller_orders so ON so.order_id = l.order_id AND so.shop_id = l.shop_id
          WHERE l.id = $1 AND l.order_id = $2",
    )
    .bind(body.line_id)
    .bind(order)
    .fetch_optional(&mut *tx)
    .await?;
    let (seller_order, shop, part_status, units, title, variant_title) = line.ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new("line_id", "not a line of this order")])
    })?;
    if !matches!(part_status.as_str(), "shipped" | "delivered") {
        return Err(ApiError::Conflict(FieldError::new(
            "line_id",
            format!(
                "this part is {part_status}; ask for a refund once it has shipped (or cancel the order)"
            ),
        )));
    }
    // Units asked for or refunded: open requests, and approved ones unless
    // Stripe refused their refund (no money went back: the customer may ask
    // again for those units).
    let (asked, taken): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(rr.quantity), 0)::bigint, coalesce(sum(rr.amount_minor), 0)::bigint
           FROM refund_requests rr LEFT JOIN refunds r ON r.id = rr.refund_id
          WHERE rr.order_line_id = $1
            AND (rr.status = 'open'
                 OR (rr.status = 'approved' AND r.status IS DISTINCT FROM 'failed'))",
    )
    .bind(body.line_id)
    .fetch_one(&mut *tx)
    .await?;
    let left = i64::from(units) - asked;
    let quantity = body.quantity.unwrap_or(left as i32);
    if quantity < 1 || i64::from(quantity) > left {
        return Err(ApiError::Validation(vec![FieldError::new(
            "quantity",
            format!("{left} of {units} units of this line can still be asked for"),
        )]));
    }
    let units_after = (asked + i64::from(quantity)) as i32;
    let amount = paid_for(&mut tx, seller_order, body.line_id, units_after).await? - taken;
    if amount < 1 {
        return Err(ApiError::Conflict(FieldError::new(
            "quantity",
            "nothing was paid for these units (the order's discounts covered them)",
        )));
    }
    let id = Uuid::now_v7();
    let inserted = sqlx::query(
        "INSERT INTO refund_requests (id, order_id, seller_order_id, order_line_id, shop_id, customer_id, quantity,
                                      amount_minor, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(order)
    .bind(seller_order)
    .bind(body.line_id)
    .bind(shop)
    .bind(caller.id)
    .bind(quantity)
    .bind(amount)
    .bind(body.reason.trim())
    .execute(&mut *tx)
    .await;
    if let Err(e) = &inserted
        && e.as_database_error().and_then(|d| d.constraint()) == Some("refund_requests_one_open")
    {
        return Err(ApiError::Conflict(FieldError::new(
            "line_id",
            "a request for this line is already open",
        )));
    }
    inserted?;
    let request = json!({
        "id": id, "title": title, "variant_title": variant_title, "quantity": quantity,
        "amount_minor": amount, "reason": body.reason.trim(),
    });
    let extra = json!({ "request": request });
    notices::to_seller(
        &mut tx,
        seller_order,
        "refund_request_opened",
        "refund_request",
        extra.clone(),
        corr,
    )
    .await?;
    notices::to_customer(&mut tx, order, "refund_request_received", None, extra, corr).await?;
    state.commit_with_messages(tx).await?;
    let mut conn = state.pool.acquire().await?;
    Ok((
        StatusCode::CREATED,
        Json(one(&mut conn, id, Scope::Customer(caller.id)).await?),
    ))
}

/// The refund requests on one of the caller's orders.
#[utoipa::path(
    get, path = "/orders/{id}/refund-requests", tag = "orders", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the requests, oldest first", body = Vec<RefundRequest>),
        (status = 404, description = "no such order of yours", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn of_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(order): Path<Uuid>,
) -> Result<Json<Vec<RefundRequest>>, ApiError> {
    let mine: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1 AND customer_id = $2)",
    )
    .bind(order)
    .bind(caller.id)
    .fetch_one(&state.pool)
    .await?;
    if !mine {
        return Err(ApiError::NotFound);
    }
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE rr.order_id = $1 ORDER BY rr.created_at, rr.id"
    )))
    .bind(order)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(rows.into_iter().map(RefundRequest::from).collect()))
}

/// Add a photo to an open request of the caller's (multipart `image`; at most 5).
#[utoipa::path(
    post, path = "/refund-requests/{id}/images", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    request_body(content_type = "multipart/form-data", description = "field `image`: the photo"),
    responses(
        (status = 201, description = "the request with its photos", body = RefundRequest),
        (status = 404, description = "no such open request of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already 5 photos", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a JPEG, PNG or WebP image", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn add_image(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    mut multipart: Multipart,
) -> Result<(StatusCode, Json<RefundRequest>), ApiError> {
    let open: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM refund_requests WHERE id = $1 AND customer_id = $2 AND status = 'open')",
    )
    .bind(id)
    .bind(caller.id)
    .fetch_one(&state.pool)
    .await?;
    if !open {
        return Err(ApiError::NotFound);
    }
    PHOTOS.append(&state, id, &mut multipart).await?;
    let mut conn = state.pool.acquire().await?;
    Ok((
        StatusCode::CREATED,
        Json(one(&mut conn, id, Scope::Customer(caller.id)).await?),
    ))
}

/// A request's photo: for its customer, its shop's seller and admins only.
#[utoipa::path(
    get, path = "/refund-request-images/{request}/{file}", tag = "orders", security(("bearer" = [])),
    params(("request" = Uuid, Path), ("file" = String, Path)),
    responses(
        (status = 200, description = "the photo", content_type = "image/png"),
        (status = 404, description = "no such photo you may see", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn serve_image(
    State(state): State<AppState>,
    caller: Caller,
    Path((request, file)): Path<(Uuid, String)>,
) -> Result<Response, ApiError> {
    let shop: Option<Uuid> = sqlx::query_scalar("SELECT id FROM shops WHERE owner_id = $1")
        .bind(caller.id)
        .fetch_optional(&state.pool)
        .await?;
    let (customer, shop) = Scope::of(&caller, shop).binds();
    let visible: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM refund_requests rr WHERE rr.id = $1 AND {IN_SCOPE})"
    )))
    .bind(request)
    .bind(customer)
    .bind(shop)
    .fetch_one(&state.pool)
    .await?;
    if !visible {
        return Err(ApiError::NotFound);
    }
    PHOTOS.serve(&state, request, &file).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RefundRequestQuery {
    /// `open`, `approved` or `rejected`.
    pub status: Option<String>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for RefundRequestQuery {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Paging::check(self.page, self.per_page);
        if self
            .status
            .as_deref()
            .is_some_and(|s| !matches!(s, "open" | "approved" | "rejected"))
        {
            errors.push(FieldError::new(
                "status",
                "must be open, approved or rejected",
            ));
        }
        errors
    }
}

async fn list(
    state: &AppState,
    scope: Scope,
    query: &RefundRequestQuery,
) -> Result<Page<RefundRequest>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let (customer, shop) = scope.binds();
    let filter = format!("($1::text IS NULL OR rr.status = $1) AND {IN_SCOPE}");
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE {filter} ORDER BY rr.created_at DESC, rr.id DESC LIMIT $4 OFFSET $5"
    )))
    .bind(&query.status)
    .bind(customer)
    .bind(shop)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM refund_requests rr WHERE {filter}"
    )))
    .bind(&query.status)
    .bind(customer)
    .bind(shop)
    .fetch_one(&state.pool)
    .await?;
    Ok(paging.page(rows.into_iter().map(RefundRequest::from).collect(), total))
}

/// Requests on the shop's orders, newest first.
#[utoipa::path(
    get, path = "/seller/refund-requests", tag = "seller", security(("bearer" = [])), params(RefundRequestQuery),
    responses(
        (status = 200, description = "a page of requests", body = Page<RefundRequest>),
        (status = 403, description = "not a seller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn shop_list(
    State(state): State<AppState>,
    seller: Seller,
    ValidQuery(query): ValidQuery<RefundRequestQuery>,
) -> Result<Json<Page<RefundRequest>>, ApiError> {
    Ok(Json(
        list(&state, Scope::Shop(seller.shop_id), &query).await?,
    ))
}

/// Every request, newest first (`status=open`: the disputes to watch).
#[utoipa::path(
    get, path = "/admin/refund-requests", tag = "admin", security(("bearer" = [])), params(RefundRequestQuery),
    responses(
        (status = 200, description = "a page of requests", body = Page<RefundRequest>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn admin_list(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<RefundRequestQuery>,
) -> Result<Json<Page<RefundRequest>>, ApiError> {
    Ok(Json(list(&state, Scope::Admin, &query).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Put the returned units back in stock.
    pub restock: bool,
    /// Told to the customer.
    #[serde(default)]
    pub note: Option<String>,
}

impl Validate for Approval {
    fn validate(&self) -> Vec<FieldError> {
        match self
            .note
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            Some(note) => reason_error(note)
                .map(|_| FieldError::new("note", "must be at most 500 characters"))
                .into_iter()
                .collect(),
            None => vec![],
        }
    }
}

/// Who decides, for the record and for who is told.
#[derive(Debug, Clone)]
enum Decider {
    Seller(Uuid, Uuid),
    Admin(Admin),
}

/// Approves or rejects an open request, under the order's lock.
async fn decide(
    state: &AppState,
    id: Uuid,
    decider: Decider,
    approval: Option<&Approval>,
    reason: Option<&str>,
    corr: &str,
) -> Result<(Uuid, Scope), ApiError> {
    let mut tx = state.pool.begin().await?;
    let shop_scope = match &decider {
        Decider::Seller(_, shop) => Some(*shop),
        Decider::Admin(_) => None,
    };
    let found: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT order_id, seller_order_id FROM refund_requests WHERE id = $1 AND ($2::uuid IS NULL OR shop_id = $2)",
    )
    .bind(id)
    .bind(shop_scope)
    .fetch_optional(&mut *tx)
    .await?;
    let (order, seller_order) = found.ok_or(ApiError::NotFound)?;
    // The order's row first: refunds are decided under it.
    sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR NO KEY UPDATE")
        .bind(order)
        .execute(&mut *tx)
        .await?;
    // `units_left`: the line's units not yet refunded by another approved
    // request (one whose refund Stripe refused gave nothing back, so its
    // units are left). A customer may ask again after a seller's rejection,
    // so an admin overturning that rejection must not refund the same units
    // twice.
    let (status, decided_role, amount, quantity, variant, title, units, units_left): (
        String,
        Option<String>,
        i64,
        i32,
        Uuid,
        String,
        i32,
        i64,
    ) = sqlx::query_as(
        "SELECT rr.status, rr.decided_role, rr.amount_minor, rr.quantity, l.variant_id, l.title, l.quantity,
                l.quantity - (SELECT coalesce(sum(o.quantity), 0) FROM refund_requests o
                                 LEFT JOIN refunds r ON r.id = o.refund_id
                               WHERE o.order_line_id = rr.order_line_id AND o.status = 'approved' AND o.id <> rr.id
                                 AND r.status IS DISTINCT FROM 'failed')
           FROM refund_requests rr JOIN order_lines l ON l.id = rr.order_line_id
          WHERE rr.id = $1 FOR NO KEY UPDATE OF rr",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    // A dispute: the customer disagrees with the seller's rejection, and an
    // admin may overturn it (approve). Nothing else is decided twice.
    let overturn = status == "rejected"
        && decided_role.as_deref() == Some("seller")
        && matches!(decider, Decider::Admin(_))
        && approval.is_some();
    if status != "open" && !overturn {
        return Err(ApiError::Conflict(FieldError::new(
            "status",
            format!("this request was already {status}"),
        )));
    }
    let (decider_id, role) = match &decider {
        Decider::Seller(user, _) => (*user, "seller"),
        Decider::Admin(admin) => (admin.0.id, "admin"),
    };
    let mut refund_id = None;
    let mut restocked = 0;
    let note = match (approval, reason) {
        (Some(a), _) => a
            .note
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string),
        (None, reason) => reason.map(str::to_string),
    };
    if let Some(approval) = approval {
        if i64::from(quantity) > units_left {
            return Err(ApiError::Conflict(FieldError::new(
                "quantity",
                format!(
                    "{} of {units} units of this line are left to refund; another request already refunded the rest",
                    units_left.max(0)
                ),
            )));
        }
        let payment = refunds::order_payment(&mut tx, order)
            .await?
            .ok_or_else(|| anyhow::anyhow!("a shipped order {order} without a payment"))?;
        let refund = Refund {
            order,
            payment,
            seller_order: Some(seller_order),
            amount_minor: amount,
            reason: "refund request approved",
        };
        refund_id = Some(
            refunds::request(&mut tx, refund, corr)
                .await?
                .ok_or_else(|| {
                    ApiError::Conflict(FieldError::new(
                        "amount_minor",
                        "more than is left of what was paid for this part of the order",
                    ))
                })?,
        );
        // A restock puts back at most the line's units no earlier approval
        // restocked, whatever became of its refund. An approval restocks at
        // once, but Stripe may refuse its refund afterwards; its units then
        // count as not refunded (`units_left`), so the customer may ask for
        // them again, yet they are already on the shelf. Restocking them
        // again would show units that do not exist, to be sold twice.
        // (Other approvals of the line are decided under the order's lock,
        // held here, so none can restock in between.)
        if approval.restock {
            let restocked_before: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(restocked_units), 0)::bigint FROM refund_requests
                  WHERE order_line_id = (SELECT order_line_id FROM refund_requests WHERE id = $1)
                    AND status = 'approved' AND id <> $1",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            restocked = i64::from(quantity)
                .min(i64::from(units) - restocked_before)
                .max(0) as i32;
        }
        if restocked > 0 {
            let returned = [Units {
                variant_id: variant,
                quantity: restocked,
            }];
            inventory::restock(
                &mut tx,
                &returned,
                &format!("returned: refund request {id}"),
                corr,
            )
            .await?;
        }
    }
    let decision = if approval.is_some() {
        "approved"
    } else {
        "rejected"
    };
    sqlx::query(
        "UPDATE refund_requests SET status = $2, restock = $3, decided_by = $4, decided_role = $5,
                decision_reason = $6, refund_id = $7, restocked_units = $8, decided_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(decision)
    .bind(approval.map(|a| a.restock))
    .bind(decider_id)
    .bind(role)
    .bind(&note)
    .bind(refund_id)
    .bind(restocked)
    .execute(&mut *tx)
    .await?;
    let extra = json!({
        "decision": decision, "decided_by": role, "note": note,
        "request": {"id": id, "title": title, "quantity": quantity, "amount_minor": amount,
                    "restocked_units": restocked},
    });
    notices::to_customer(
        &mut tx,
        order,
        "refund_request_decided",
        Some("refund_request_decided"),
        extra.clone(),
        corr,
    )
    .await?;
    let scope = match &decider {
        // The seller hears of an admin's decision on its order; the admins
        // of a seller's, so disputes can be watched.
        Decider::Admin(admin) => {
            notices::to_seller(
                &mut tx,
                seller_order,
                "refund_request_decided",
                "refund_request_decided",
                extra,
                corr,
            )
            .await?;
            let why = note.as_deref().unwrap_or_default();
            audit(
                &mut tx,
                admin,
                &format!("refund_request.{decision}"),
                ("refund_request", id),
                why,
            )
            .await?;
            Scope::Admin
        }
        Decider::Seller(_, shop) => {
            let data = json!({ "refund_request_id": id, "decision": decision });
            notify::admins(&mut tx, "refund_request_decided", &data).await?;
            Scope::Shop(*shop)
        }
    };
    state.commit_with_messages(tx).await?;
    Ok((id, scope))
}

async fn answer(
    state: &AppState,
    (id, scope): (Uuid, Scope),
) -> Result<Json<RefundRequest>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(one(&mut conn, id, scope).await?))
}

/// Approve a request on the shop's order: those units are refunded through
/// Stripe and, with `restock`, put back in stock (those of the line not
/// already back through an earlier approval: `restocked_units`).
#[utoipa::path(
    post, path = "/seller/refund-requests/{id}/approve", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Approval,
    responses(
        (status = 200, description = "approved; the refund follows within seconds", body = RefundRequest),
        (status = 404, description = "no such request on your shop's orders", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already decided, or more than is left of what was paid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn seller_approve(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Approval>,
) -> Result<Json<RefundRequest>, ApiError> {
    let decider = Decider::Seller(seller.caller.id, seller.shop_id);
    answer(
        &state,
        decide(&state, id, decider, Some(&body), None, &request_id.0).await?,
    )
    .await
}

/// Reject a request on the shop's order, with a reason the customer sees.
#[utoipa::path(
    post, path = "/seller/refund-requests/{id}/reject", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 200, description = "rejected", body = RefundRequest),
        (status = 404, description = "no such request on your shop's orders", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already decided", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn seller_reject(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<RefundRequest>, ApiError> {
    let decider = Decider::Seller(seller.caller.id, seller.shop_id);
    answer(
        &state,
        decide(
            &state,
            id,
            decider,
            None,
            Some(body.reason.trim()),
            &request_id.0,
        )
        .await?,
    )
    .await
}

/// Step in: approve an open request, or overturn a seller's rejection (a
/// dispute). The note is required: it is the reason kept in the audit log
/// and told to both sides.
#[utoipa::path(
    post, path = "/admin/refund-requests/{id}/approve", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Approval,
    responses(
        (status = 200, description = "approved; the refund follows within seconds", body = RefundRequest),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already approved or decided by an admin, the line's units already refunded by another request, or more than is left of what was paid", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no note (the admin's reason)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn admin_approve(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Approval>,
) -> Result<Json<RefundRequest>, ApiError> {
    if body.note.as_deref().is_none_or(|n| n.trim().is_empty()) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "note",
            "give the reason for stepping in",
        )]));
    }
    let decider = Decider::Admin(admin);
    answer(
        &state,
        decide(&state, id, decider, Some(&body), None, &request_id.0).await?,
    )
    .await
}

/// Step in: reject a request with a reason (kept in the audit log).
#[utoipa::path(
    post, path = "/admin/refund-requests/{id}/reject", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 200, description = "rejected", body = RefundRequest),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already decided", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn admin_reject(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<RefundRequest>, ApiError> {
    let decider = Decider::Admin(admin);
    answer(
        &state,
        decide(
            &state,
            id,
            decider,
            None,
            Some(body.reason.trim()),
            &request_id.0,
        )
        .await?,
    )
    .await
}
