//! Saved cards, for what is charged while the customer is away (membership
//! renewals, replenishment orders). Saving one is a Stripe SetupIntent: the
//! API asks for it, the payments worker makes it (with the account's Stripe
//! customer), the storefront confirms it with Stripe using the client secret,
//! and `confirm` (or Stripe's `setup_intent.succeeded`) has the payments
//! worker keep the card. Every query is scoped to the caller: another
//! account's card answers 404.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::{
    contracts::{PaymentMethodConfirmed, PaymentMethodRemoved, PaymentMethodSetupRequested},
    envelope::Envelope,
    outbox,
};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Customer,
    error::{ApiError, FieldError, Problem},
    extract::Path,
    middleware::RequestId,
    state::AppState,
};

/// Most cards one account keeps (saved or being saved).
const MAX_METHODS: i64 = 10;

/// A saved card, or one being saved.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PaymentMethod {
    pub id: Uuid,
    /// `pending` until the card is confirmed and kept; then `active`.
    #[schema(example = "active")]
    pub status: String,
    /// For the storefront to confirm the SetupIntent with Stripe; only while
    /// pending (and absent until the payments worker made the intent).
    pub client_secret: Option<String>,
    pub brand: Option<String>,
    pub last4: Option<String>,
    pub exp_month: Option<i32>,
    pub exp_year: Option<i32>,
    pub failure: Option<String>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, status, CASE WHEN status = 'pending' THEN client_secret END AS client_secret,
    brand, last4, exp_month, exp_year, failure, created_at";

async fn fetch(conn: &mut PgConnection, user: Uuid, id: Uuid) -> Result<PaymentMethod, ApiError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM payment_methods WHERE id = $1 AND user_id = $2 AND status <> 'removed'"
    )))
    .bind(id)
    .bind(user)
    .fetch_optional(conn)
    .await?
    .ok_or(ApiError::NotFound)
}

/// Refuses (422, naming `payment_method_id`) a card that is not the
/// caller's or not saved yet. The row is share-locked, so a concurrent
/// removal waits for the caller's transaction to commit and then sees it used.
pub async fn require_active(conn: &mut PgConnection, user: Uuid, id: Uuid) -> Result<(), ApiError> {
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM payment_methods WHERE id = $1 AND user_id = $2 FOR SHARE",
    )
    .bind(id)
    .bind(user)
    .fetch_optional(conn)
    .await?;
    match status.as_deref() {
        Some("active") => Ok(()),
        Some("pending") => Err(ApiError::Validation(vec![FieldError::new(
            "payment_method_id",
            "this card is not confirmed yet",
        )])),
        _ => Err(ApiError::Validation(vec![FieldError::new(
            "payment_method_id",
            "no such saved card",
        )])),
    }
}

/// Start saving a card. Answers 202; read it again for the client secret to
/// confirm with Stripe, then call `confirm`.
#[utoipa::path(
    post, path = "/me/payment-methods", tag = "recurring", security(("bearer" = [])),
    responses(
        (status = 202, description = "being set up", body = PaymentMethod),
        (status = 403, description = "not a customer, or the email is not verified", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "too many cards", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn start(
    State(state): State<AppState>,
    Customer(caller): Customer,
    request_id: RequestId,
) -> Result<(StatusCode, Json<PaymentMethod>), ApiError> {
    caller.require_verified()?;
    let mut tx = state.pool.begin().await?;
    // Serializes this account's cards, so the cap holds under concurrency.
    crate::auth::serialize_account(&mut tx, caller.id).await?;
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payment_methods WHERE user_id = $1 AND status IN ('pending', 'active')",
    )
    .bind(caller.id)
    .fetch_one(&mut *tx)
    .await?;
    if kept >= MAX_METHODS {
        return Err(ApiError::Validation(vec![FieldError::new(
            "payment_methods",
            format!("at most {MAX_METHODS} cards; remove one first"),
        )]));
    }
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO payment_methods (id, user_id) VALUES ($1, $2)")
        .bind(id)
        .bind(caller.id)
        .execute(&mut *tx)
        .await?;
    let requested = PaymentMethodSetupRequested {
        payment_method_id: id,
    };
    outbox::enqueue(&mut tx, &Envelope::new(&requested, request_id.0)).await?;
    let method = fetch(&mut tx, caller.id, id).await?;
    state.commit_with_messages(tx).await?;
    Ok((StatusCode::ACCEPTED, Json(method)))
}

/// The caller's cards, newest first.
#[utoipa::path(
    get, path = "/me/payment-methods", tag = "recurring", security(("bearer" = [])),
    responses((status = 200, description = "saved cards and cards being saved", body = Vec<PaymentMethod>))
)]
pub async fn list(
    State(state): State<AppState>,
    Customer(caller): Customer,
) -> Result<Json<Vec<PaymentMethod>>, ApiError> {
    let methods = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM payment_methods WHERE user_id = $1 AND status <> 'removed'
          ORDER BY created_at DESC"
    )))
    .bind(caller.id)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(methods))
}

/// One of the caller's cards.
#[utoipa::path(
    get, path = "/me/payment-methods/{id}", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the card", body = PaymentMethod),
        (status = 404, description = "no such card of the caller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Customer(caller): Customer,
    Path(id): Path<Uuid>,
) -> Result<Json<PaymentMethod>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(fetch(&mut conn, caller.id, id).await?))
}

/// Tell Souk the storefront confirmed the SetupIntent; the payments worker
/// checks it with Stripe and keeps the card (`active`). Answers 202.
#[utoipa::path(
    post, path = "/me/payment-methods/{id}/confirm", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 202, description = "being kept", body = PaymentMethod),
        (status = 404, description = "no such card of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not pending, or its SetupIntent is not made yet", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn confirm(
    State(state): State<AppState>,
    Customer(caller): Customer,
    request_id: RequestId,
    Path(id): Path<Uuid>,
) -> Result<(StatusCode, Json<PaymentMethod>), ApiError> {
    let mut tx = state.pool.begin().await?;
    let method = fetch(&mut tx, caller.id, id).await?;
    if method.status != "pending" {
        return Err(ApiError::Conflict(FieldError::new(
            "status",
            format!(
                "this card is {}, not waiting for confirmation",
                method.status
            ),
        )));
    }
    if method.client_secret.is_none() {
        return Err(ApiError::Conflict(FieldError::new(
            "client_secret",
            "the card form is not ready yet; try again in a moment",
        )));
    }
    let confirmed = PaymentMethodConfirmed {
        payment_method_id: id,
    };
    outbox::enqueue(&mut tx, &Envelope::new(&confirmed, request_id.0)).await?;
    state.commit_with_messages(tx).await?;
    Ok((StatusCode::ACCEPTED, Json(method)))
}

/// Remove a card: it is detached at Stripe, which charges it no more. One
/// still being saved has its SetupIntent cancelled, so the card form cannot
/// save it any more (a card it saved anyway is detached too).
/// Refused while a membership or a replenishment schedule still charges
/// it, or an order placed on it is not paid yet (a replenishment placed
/// before its schedule moved to another card): change those first, or wait
/// for that order.
#[utoipa::path(
    delete, path = "/me/payment-methods/{id}", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 204, description = "removed"),
        (status = 404, description = "no such card of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a membership, a schedule or an unpaid order uses it", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    Customer(caller): Customer,
    request_id: RequestId,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    let locked: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM payment_methods WHERE id = $1 AND user_id = $2 AND status <> 'removed' FOR NO KEY UPDATE",
    )
    .bind(id)
    .bind(caller.id)
    .fetch_optional(&mut *tx)
    .await?;
    locked.ok_or(ApiError::NotFound)?;
    // The replenisher reads the card share-locked before placing an order
    // on it, so an order placed concurrently is committed (and seen here)
    // before this lock is granted, or sees the card removed.
    let (membership, schedules, order): (bool, bool, Option<Uuid>) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM memberships WHERE payment_method_id = $1
                          AND status IN ('requested', 'incomplete', 'active', 'past_due')),
                EXISTS (SELECT 1 FROM replenishment_schedules WHERE payment_method_id = $1
                          AND status <> 'cancelled'),
                (SELECT id FROM orders WHERE payment_method_id = $1 AND paid_at IS NULL
                    AND status IN ('pending', 'reserved', 'awaiting_payment')
                  ORDER BY created_at LIMIT 1)",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if membership || schedules {
        let what = if membership {
            "your membership"
        } else {
            "a replenishment schedule"
        };
        return Err(ApiError::Conflict(FieldError::new(
            "id",
            format!("{what} is charged to this card; change or cancel it first"),
        )));
    }
    if let Some(order) = order {
        return Err(ApiError::Conflict(FieldError::new(
            "id",
            format!(
                "order {order} is still to be charged to this card; remove it once that order is paid or ended"
            ),
        )));
    }
    sqlx::query(
        "UPDATE payment_methods SET status = 'removed', client_secret = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let removed = PaymentMethodRemoved {
        payment_method_id: id,
    };
    outbox::enqueue(&mut tx, &Envelope::new(&removed, request_id.0)).await?;
    state.commit_with_messages(tx).await?;
    Ok(StatusCode::NO_CONTENT)
}
