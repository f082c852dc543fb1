//! Memberships: plans admins define (each a Stripe plan, made by the
//! payments worker), and a customer's subscription to one. Subscribing and
//! cancelling are requests the payments worker carries out at Stripe; the
//! membership's status then follows Stripe's answers and webhooks (see
//! `souk_shared::membership`). Benefits apply at checkout while it is
//! active.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::{
    contracts::{MembershipCancelRequested, MembershipPlanCreated, MembershipRequested},
    envelope::Envelope,
    membership::MembershipStatus,
    orders::place::BENEFITS_APPLY,
    outbox,
};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::{Admin, Customer},
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, Validate},
    idempotency::{self, Key, Keyed},
    middleware::RequestId,
    routes::admin::{Reason, audit, reason_error},
    state::AppState,
};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanInterval {
    Month,
    Year,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPlan {
    pub name: String,
    /// The price per interval, minor units of the market's currency.
    pub amount_minor: i64,
    pub interval: PlanInterval,
    /// Members' orders ship free.
    #[serde(default)]
    pub free_shipping: bool,
    /// Taken off members' orders (after any coupon), 0 to 100.
    #[serde(default)]
    pub percent_off: i32,
    /// Why the plan is offered; kept in the audit log.
    pub reason: String,
}

impl Validate for NewPlan {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> = reason_error(&self.reason).into_iter().collect();
        let n = self.name.trim().chars().count();
        if n == 0 || n > 100 {
            errors.push(FieldError::new("name", "must be 1 to 100 characters"));
        }
        if !(1..=10_000_000).contains(&self.amount_minor) {
            errors.push(FieldError::new(
                "amount_minor",
                "must be between 1 and 10000000 minor units",
            ));
        }
        if !(0..=100).contains(&self.percent_off) {
            errors.push(FieldError::new("percent_off", "must be between 0 and 100"));
        } else if self.percent_off == 0 && !self.free_shipping {
            errors.push(FieldError::new(
                "percent_off",
                "a plan must give something: a percentage off, free shipping or both",
            ));
        }
        errors
    }
}

/// A membership plan. `pending` until it exists at Stripe; `retired` plans
/// take no new members (existing ones keep theirs).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Plan {
    pub id: Uuid,
    pub name: String,
    pub amount_minor: i64,
    pub currency: String,
    #[schema(example = "month")]
    pub interval: String,
    pub free_shipping: bool,
    pub percent_off: i32,
    #[schema(example = "active")]
    pub status: String,
    pub created_at: DateTime<Utc>,
}

const PLAN: &str =
    "id, name, amount_minor, currency, interval, free_shipping, percent_off, status, created_at";

async fn plan(conn: &mut PgConnection, id: Uuid) -> Result<Option<Plan>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PLAN} FROM membership_plans WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Define a membership plan; the payments worker makes it at Stripe, after
/// which it is `active` and open to members.
#[utoipa::path(
    post, path = "/admin/membership-plans", tag = "admin", security(("bearer" = [])), request_body = NewPlan,
    responses(
        (status = 201, description = "defined, pending until it exists at Stripe", body = Plan),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_plan(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    ValidJson(body): ValidJson<NewPlan>,
) -> Result<(StatusCode, Json<Plan>), ApiError> {
    let id = Uuid::now_v7();
    let interval = match body.interval {
        PlanInterval::Month => "month",
        PlanInterval::Year => "year",
    };
    let mut tx = state.pool.begin().await?;
    let created: Plan = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO membership_plans (id, name, amount_minor, currency, interval, free_shipping, percent_off, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {PLAN}"
    )))
    .bind(id)
    .bind(body.name.trim())
    .bind(body.amount_minor)
    .bind(&state.market.currency)
    .bind(interval)
    .bind(body.free_shipping)
    .bind(body.percent_off)
    .bind(admin.0.id)
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &admin,
        "membership_plan.create",
        ("membership_plan", id),
        body.reason.trim(),
    )
    .await?;
    let made = MembershipPlanCreated { plan_id: id };
    outbox::enqueue(&mut tx, &Envelope::new(&made, request_id.0)).await?;
    state.commit_with_messages(tx).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Every membership plan, whatever its status.
#[utoipa::path(
    get, path = "/admin/membership-plans", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "all plans, newest first", body = Vec<Plan>))
)]
pub async fn admin_plans(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<Plan>>, ApiError> {
    let plans = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PLAN} FROM membership_plans ORDER BY created_at DESC"
    )))
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(plans))
}

/// Close a plan to new members. Existing members keep it until they cancel.
#[utoipa::path(
    post, path = "/admin/membership-plans/{id}/retire", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 200, description = "retired", body = Plan),
        (status = 404, description = "no such plan", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn retire_plan(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<Plan>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let retired: Option<Plan> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE membership_plans SET status = 'retired' WHERE id = $1 RETURNING {PLAN}"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let retired = retired.ok_or(ApiError::NotFound)?;
    audit(
        &mut tx,
        &admin,
        "membership_plan.retire",
        ("membership_plan", id),
        body.reason.trim(),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(retired))
}

/// The plans customers can join.
#[utoipa::path(
    get, path = "/membership-plans", tag = "recurring",
    responses((status = 200, description = "plans open to members, cheapest first", body = Vec<Plan>))
)]
pub async fn plans(State(state): State<AppState>) -> Result<Json<Vec<Plan>>, ApiError> {
    let plans = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PLAN} FROM membership_plans WHERE status = 'active' ORDER BY amount_minor, name"
    )))
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(plans))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRequest {
    pub plan_id: Uuid,
    /// One of the caller's saved cards (`/me/payment-methods`), charged each
    /// period.
    pub payment_method_id: Uuid,
}

impl Validate for SubscribeRequest {
    fn validate(&self) -> Vec<FieldError> {
        vec![]
    }
}

/// A customer's membership.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Membership {
    pub id: Uuid,
    pub plan: Plan,
    pub status: MembershipStatus,
    pub payment_method_id: Uuid,
    /// Whether the plan's benefits apply to orders placed now: active and
    /// no more than three days past `current_period_end` (not past it at
    /// all once `cancel_at_period_end`: no renewal is coming).
    pub benefits_active: bool,
    /// It ends when the current period does.
    pub cancel_at_period_end: bool,
    /// The member asked to cancel; Stripe has yet to confirm if
    /// `cancel_at_period_end` is still false.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    /// Why the subscription could not be made.
    pub failure: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The caller's live membership, else the latest one that ended.
async fn current(
    conn: &mut PgConnection,
    user: Uuid,
    lock: bool,
) -> Result<Option<Membership>, ApiError> {
    read(conn, Which::Current(user), lock).await
}

enum Which {
    /// The account's live membership, else the latest that ended.
    Current(Uuid),
    Id(Uuid),
}

async fn read(
    conn: &mut PgConnection,
    which: Which,
    lock: bool,
) -> Result<Option<Membership>, ApiError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: Uuid,
        plan_id: Uuid,
        status: String,
        payment_method_id: Uuid,
        cancel_at_period_end: bool,
        cancel_requested_at: Option<DateTime<Utc>>,
        current_period_end: Option<DateTime<Utc>>,
        failure: Option<String>,
        created_at: DateTime<Utc>,
        benefits_active: bool,
    }
    let (filter, id) = match which {
        Which::Current(user) => ("user_id = $1", user),
        Which::Id(id) => ("id = $1", id),
    };
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, plan_id, status, payment_method_id, cancel_at_period_end, cancel_requested_at,
                current_period_end, failure, created_at, {BENEFITS_APPLY} AS benefits_active
           FROM memberships m WHERE {filter}
          ORDER BY status IN ('requested', 'incomplete', 'active', 'past_due') DESC, created_at DESC
          LIMIT 1 {}",
        if lock { "FOR NO KEY UPDATE" } else { "" }
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let plan = plan(conn, row.plan_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("membership without plan"))?;
    let status = MembershipStatus::parse(&row.status)
        .ok_or_else(|| anyhow::anyhow!("unknown membership status"))?;
    Ok(Some(Membership {
        id: row.id,
        plan,
        benefits_active: row.benefits_active,
        status,
        payment_method_id: row.payment_method_id,
        cancel_at_period_end: row.cancel_at_period_end,
        cancel_requested_at: row.cancel_requested_at,
        current_period_end: row.current_period_end,
        failure: row.failure,
        created_at: row.created_at,
    }))
}

/// Subscribe to a plan, paid with a saved card. Answers 202: the payments
/// worker makes the subscription at Stripe, and the status follows.
#[utoipa::path(
    post, path = "/me/membership", tag = "recurring", security(("bearer" = [])), request_body = SubscribeRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes retries safe: the same key answers the same membership")),
    responses(
        (status = 202, description = "requested", body = Membership),
        (status = 403, description = "not a customer, or the email is not verified", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a membership that has not ended already", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no such open plan, no such saved card, or an Idempotency-Key used for another request", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn subscribe(
    State(state): State<AppState>,
    Customer(caller): Customer,
    request_id: RequestId,
    headers: HeaderMap,
    ValidJson(body): ValidJson<SubscribeRequest>,
) -> Result<(StatusCode, Json<Membership>), ApiError> {
    caller.require_verified()?;
    let key = Key::from_request(&headers, &body)?;
    let mut tx = state.pool.begin().await?;
    // This customer's subscribe requests queue here, so a retry finds what
    // the first one made.
    crate::auth::serialize_account(&mut tx, caller.id).await?;
    if let Some(key) = &key
        && let Some(id) = idempotency::earlier(&mut tx, Keyed::Memberships, caller.id, key).await?
    {
        let earlier = read(&mut tx, Which::Id(id), false)
            .await?
            .expect("just found");
        return Ok((StatusCode::ACCEPTED, Json(earlier)));
    }
    let open: Option<String> =
        sqlx::query_scalar("SELECT status FROM membership_plans WHERE id = $1")
            .bind(body.plan_id)
            .fetch_optional(&mut *tx)
            .await?;
    if open.as_deref() != Some("active") {
        return Err(ApiError::Validation(vec![FieldError::new(
            "plan_id",
            "no such plan open to members",
        )]));
    }
    crate::routes::payment_methods::require_active(&mut tx, caller.id, body.payment_method_id)
        .await?;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO memberships (id, user_id, plan_id, payment_method_id, idempotency_key, request_hash)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(caller.id)
    .bind(body.plan_id)
    .bind(body.payment_method_id)
    .bind(key.as_ref().map(|k| &k.key))
    .bind(key.as_ref().map(|k| &k.hash))
    .execute(&mut *tx)
    .await?;
    let requested = MembershipRequested { membership_id: id };
    outbox::enqueue(&mut tx, &Envelope::new(&requested, request_id.0)).await?;
    let membership = current(&mut tx, caller.id, false)
        .await?
        .expect("just made");
    state.commit_with_messages(tx).await?;
    Ok((StatusCode::ACCEPTED, Json(membership)))
}

/// The caller's membership: the live one, else the latest that ended.
#[utoipa::path(
    get, path = "/me/membership", tag = "recurring", security(("bearer" = [])),
    responses(
        (status = 200, description = "the membership", body = Membership),
        (status = 404, description = "never a member", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn mine(
    State(state): State<AppState>,
    Customer(caller): Customer,
) -> Result<Json<Membership>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(
        current(&mut conn, caller.id, false)
            .await?
            .ok_or(ApiError::NotFound)?,
    ))
}

/// How long a cancel request waits for Stripe's confirmation before a
/// repeated cancel asks again.
const CANCEL_RETRY_AFTER: chrono::Duration = chrono::Duration::minutes(5);

/// Cancel the membership at the end of the period paid for; its benefits
/// last until then. An incomplete membership (first payment not through)
/// ends at once. Answers 202: Stripe confirms through the payments worker.
/// Asked again while a request is unconfirmed, it is sent again once that
/// request is a few minutes old.
#[utoipa::path(
    post, path = "/me/membership/cancel", tag = "recurring", security(("bearer" = [])),
    responses(
        (status = 202, description = "cancellation requested (or already)", body = Membership),
        (status = 404, description = "no membership", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "still being set up, or already ended", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    Customer(caller): Customer,
    request_id: RequestId,
) -> Result<(StatusCode, Json<Membership>), ApiError> {
    let mut tx = state.pool.begin().await?;
    let membership = current(&mut tx, caller.id, true)
        .await?
        .ok_or(ApiError::NotFound)?;
    let conflict = |message: &str| Err(ApiError::Conflict(FieldError::new("status", message)));
    match membership.status {
        MembershipStatus::Requested => {
            return conflict("the membership is still being set up; try again in a moment");
        }
        MembershipStatus::Canceled | MembershipStatus::Failed => {
            return conflict("the membership has already ended");
        }
        _ => {}
    }
    // A request still in flight is not asked again; one Stripe has not
    // confirmed for a while (its message parked after Stripe stayed down)
    // is, or the member could never cancel.
    let in_flight = membership
        .cancel_requested_at
        .is_some_and(|at| at > Utc::now() - CANCEL_RETRY_AFTER);
    if membership.cancel_at_period_end || in_flight {
        return Ok((StatusCode::ACCEPTED, Json(membership)));
    }
    sqlx::query(
        "UPDATE memberships SET cancel_requested_at = now(), updated_at = now() WHERE id = $1",
    )
    .bind(membership.id)
    .execute(&mut *tx)
    .await?;
    let requested = MembershipCancelRequested {
        membership_id: membership.id,
    };
    outbox::enqueue(&mut tx, &Envelope::new(&requested, request_id.0)).await?;
    let membership = current(&mut tx, caller.id, false)
        .await?
        .expect("still there");
    state.commit_with_messages(tx).await?;
    Ok((StatusCode::ACCEPTED, Json(membership)))
}
