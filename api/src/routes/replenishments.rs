//! Replenishment schedules: a customer's recurring order of chosen
//! variants, every so many days or on a cron expression, to one of their
//! addresses, paid off session with a saved card. The replenisher worker
//! places each due run through the normal pipeline; here the customer sets
//! schedules up, changes, pauses, resumes, skips and cancels them, and sees
//! the next runs and how the last ones went. Every query is scoped to the
//! caller: another customer's schedule answers 404, never its data.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::{
    catalog::VISIBLE,
    replenishment::{self, Cadence, Item, MIN_GAP, Reason, Tz},
};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Customer,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    idempotency::{self, Key, Keyed},
    routes::{
        catalog::{Page, Paging},
        payment_methods,
    },
    state::AppState,
};

/// Most schedules (not cancelled) one customer keeps.
const MAX_SCHEDULES: i64 = 20;
const MAX_ITEMS: usize = 50;
/// Due times shown ahead.
const NEXT_RUNS: usize = 5;
/// Past runs shown.
const RECENT_RUNS: i64 = 10;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemInput {
    pub variant_id: Uuid,
    pub quantity: i32,
}

/// What a run that cannot become a paid order does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Try again later (a few times), then give that delivery up.
    Retry,
    /// Give that delivery up and wait for the next one.
    #[default]
    Skip,
}

impl FailurePolicy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Skip => "skip",
        }
    }
}

fn default_limit() -> i32 {
    10
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSchedule {
    pub items: Vec<ItemInput>,
    /// Every so many days (1 to 365). Give this or `cron`.
    #[serde(default)]
    pub interval_days: Option<i32>,
    /// Five fields, days of the week by name, in `time_zone`: `0 9 * * MON`
    /// is Mondays at 09:00 there. Give this or `interval_days`.
    #[serde(default)]
    #[schema(example = "0 9 * * MON")]
    pub cron: Option<String>,
    /// The IANA zone the cadence is read in (`Europe/Berlin`), so a run
    /// keeps its wall time when the clocks change. Default `UTC`.
    #[serde(default)]
    #[schema(example = "Europe/Berlin")]
    pub time_zone: Option<String>,
    /// The first run (for `cron`, the first matching time from then).
    /// Default: one interval from now, or the next matching time.
    #[serde(default)]
    pub starts_at: Option<DateTime<Utc>>,
    /// One of the caller's addresses.
    pub address_id: Uuid,
    /// One of the caller's saved cards.
    pub payment_method_id: Uuid,
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// A run is not placed if an item's price rose more than this above the
    /// price when it was scheduled (0 to 1000). Default 10.
    #[serde(default = "default_limit")]
    pub price_increase_limit_percent: i32,
}

/// A change to a schedule: only the fields given change. New items take
/// their price now as the reference for the limit; items already in the
/// schedule keep theirs.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleChange {
    #[serde(default)]
    pub items: Option<Vec<ItemInput>>,
    /// Replaces the cadence (with `cron`, give only one of the two).
    #[serde(default)]
    pub interval_days: Option<i32>,
    #[serde(default)]
    pub cron: Option<String>,
    /// Reads the cadence in another zone; like a new cadence, it re-times
    /// the next run (from `starts_at`, or from now).
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Re-times the next run.
    #[serde(default)]
    pub starts_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub address_id: Option<Uuid>,
    #[serde(default)]
    pub payment_method_id: Option<Uuid>,
    #[serde(default)]
    pub on_failure: Option<FailurePolicy>,
    #[serde(default)]
    pub price_increase_limit_percent: Option<i32>,
}

fn items_errors(items: &[ItemInput]) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if items.is_empty() || items.len() > MAX_ITEMS {
        errors.push(FieldError::new(
            "items",
            format!("must list 1 to {MAX_ITEMS} items"),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        if !(1..=999).contains(&item.quantity) {
            errors.push(FieldError::new(
                format!("items[{i}].quantity"),
                "must be between 1 and 999",
            ));
        }
        if items[..i]
            .iter()
            .any(|earlier| earlier.variant_id == item.variant_id)
        {
            errors.push(FieldError::new(
                format!("items[{i}].variant_id"),
                "is listed twice; give one quantity",
            ));
        }
    }
    errors
}

/// The cadence given, if any; both at once is an error.
fn cadence(interval_days: Option<i32>, cron: Option<&str>) -> Result<Option<Cadence>, FieldError> {
    match (interval_days, cron) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(FieldError::new(
            "cron",
            "give interval_days or cron, not both",
        )),
        (Some(days), None) => Cadence::every_days(days)
            .map(Some)
            .map_err(|m| FieldError::new("interval_days", m)),
        (None, Some(expr)) => Cadence::cron(expr)
            .map(Some)
            .map_err(|m| FieldError::new("cron", m)),
    }
}

/// The zone given (UTC if none), or why it is not one.
fn zone(name: Option<&str>) -> Result<Tz, FieldError> {
    replenishment::time_zone(name.unwrap_or("UTC")).map_err(|m| FieldError::new("time_zone", m))
}

fn starts_at_error(starts_at: Option<DateTime<Utc>>) -> Option<FieldError> {
    let at = starts_at?;
    let now = Utc::now();
    // A few minutes' grace for clocks that disagree.
    (at < now - Duration::minutes(5) || at > now + Duration::days(366))
        .then(|| FieldError::new("starts_at", "must be from now to a year ahead"))
}

fn limit_error(limit: Option<i32>) -> Option<FieldError> {
    limit
        .filter(|l| !(0..=1000).contains(l))
        .map(|_| FieldError::new("price_increase_limit_percent", "must be between 0 and 1000"))
}

impl Validate for NewSchedule {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = items_errors(&self.items);
        match cadence(self.interval_days, self.cron.as_deref()) {
            Ok(Some(_)) => {}
            Ok(None) => errors.push(FieldError::new(
                "interval_days",
                "give interval_days or cron",
            )),
            Err(e) => errors.push(e),
        }
        errors.extend(zone(self.time_zone.as_deref()).err());
        // Not `starts_at`: it depends on the clock, and a retried create
        // answers what its first request made whenever it comes (the
        // handler checks it once the key was looked up).
        errors.extend(limit_error(Some(self.price_increase_limit_percent)));
        errors
    }
}

impl Validate for ScheduleChange {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.items.as_deref().map(items_errors).unwrap_or_default();
        errors.extend(cadence(self.interval_days, self.cron.as_deref()).err());
        errors.extend(self.time_zone.as_deref().and_then(|z| zone(Some(z)).err()));
        errors.extend(starts_at_error(self.starts_at));
        errors.extend(limit_error(self.price_increase_limit_percent));
        let nothing = self.items.is_none()
            && self.interval_days.is_none()
            && self.cron.is_none()
            && self.time_zone.is_none()
            && self.starts_at.is_none()
            && self.address_id.is_none()
            && self.payment_method_id.is_none()
            && self.on_failure.is_none()
            && self.price_increase_limit_percent.is_none();
        if nothing {
            errors.push(FieldError::new("body", "change at least one field"));
        }
        errors
    }
}

/// One run of a schedule: a due time and what came of it.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Run {
    pub id: Uuid,
    pub due_at: DateTime<Utc>,
    /// `placed` (the order exists; see it for payment and delivery),
    /// `retrying`, `skipped` or `failed`.
    #[schema(example = "placed")]
    pub status: String,
    pub attempt: i32,
    #[schema(value_type = Option<Reason>)]
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub order_id: Option<Uuid>,
    pub retry_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Schedule {
    pub id: Uuid,
    /// `active`, `paused` or `cancelled`.
    #[schema(example = "active")]
    pub status: String,
    pub items: Vec<Item>,
    pub interval_days: Option<i32>,
    pub cron: Option<String>,
    /// The IANA zone the cadence is read in; the due times below are UTC.
    #[schema(example = "Europe/Berlin")]
    pub time_zone: String,
    /// Absent once the address was deleted: runs fail until one is chosen.
    pub address_id: Option<Uuid>,
    pub payment_method_id: Uuid,
    pub on_failure: FailurePolicy,
    pub price_increase_limit_percent: i32,
    pub currency: String,
    /// The next due times (an overdue one first), without those the
    /// customer skipped; empty unless active.
    pub next_runs: Vec<DateTime<Utc>>,
    /// The latest runs, newest first.
    pub runs: Vec<Run>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    status: String,
    items: sqlx::types::Json<Vec<Item>>,
    interval_days: Option<i32>,
    cron: Option<String>,
    time_zone: String,
    address_id: Option<Uuid>,
    payment_method_id: Uuid,
    on_failure: String,
    price_increase_limit_percent: i32,
    currency: String,
    next_run_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl Row {
    fn cadence(&self) -> Result<Cadence, ApiError> {
        Cadence::from_columns(self.interval_days, self.cron.as_deref(), &self.time_zone)
            .map_err(|e| anyhow::anyhow!("schedule {} has a bad cadence: {e}", self.id).into())
    }
}

const COLUMNS: &str =
    "id, status, items, interval_days, cron, time_zone, address_id, payment_method_id, on_failure,
    price_increase_limit_percent, currency, next_run_at, created_at, updated_at";

/// The caller's schedule `id`, locked with `lock`; 404 for anyone else's.
async fn row(
    conn: &mut PgConnection,
    customer: Uuid,
    id: Uuid,
    lock: bool,
) -> Result<Row, ApiError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM replenishment_schedules WHERE id = $1 AND customer_id = $2 {}",
        if lock { "FOR NO KEY UPDATE" } else { "" }
    )))
    .bind(id)
    .bind(customer)
    .fetch_optional(conn)
    .await?
    .ok_or(ApiError::NotFound)
}

/// The due times coming, as the replenisher will meet them: an overdue one
/// first (the next poll runs it, and moves on to the first due time after
/// now, not the missed ones), then the cadence's. Times the customer
/// skipped are left out: nothing is placed at them.
async fn next_runs(conn: &mut PgConnection, row: &Row) -> Result<Vec<DateTime<Utc>>, ApiError> {
    let cadence = row.cadence()?;
    let skipped: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT due_at FROM replenishment_runs WHERE schedule_id = $1 AND reason = $2 AND due_at >= $3",
    )
    .bind(row.id)
    .bind(Reason::SkippedByCustomer.as_str())
    .bind(row.next_run_at)
    .fetch_all(&mut *conn)
    .await?;
    let now = Utc::now();
    let (overdue, from) = if row.next_run_at <= now {
        (
            Some(row.next_run_at),
            cadence.next_after(row.next_run_at, now),
        )
    } else {
        (None, Some(row.next_run_at))
    };
    let coming = from
        .into_iter()
        .flat_map(|from| std::iter::successors(Some(from), |t| cadence.after(*t)));
    Ok(overdue
        .into_iter()
        .chain(coming)
        // Bounded: each skipped time hides at most one due time.
        .take(NEXT_RUNS + skipped.len())
        .filter(|t| !skipped.contains(t))
        .take(NEXT_RUNS)
        .collect())
}

async fn view(conn: &mut PgConnection, row: Row) -> Result<Schedule, ApiError> {
    let runs: Vec<Run> = sqlx::query_as(
        "SELECT id, due_at, status, attempt, reason, detail, order_id, retry_at FROM replenishment_runs
          WHERE schedule_id = $1 ORDER BY due_at DESC LIMIT $2",
    )
    .bind(row.id)
    .bind(RECENT_RUNS)
    .fetch_all(&mut *conn)
    .await?;
    let next_runs = if row.status == "active" {
        next_runs(conn, &row).await?
    } else {
        vec![]
    };
    Ok(Schedule {
        id: row.id,
        status: row.status,
        items: row.items.0,
        interval_days: row.interval_days,
        cron: row.cron,
        time_zone: row.time_zone,
        address_id: row.address_id,
        payment_method_id: row.payment_method_id,
        on_failure: if row.on_failure == "retry" {
            FailurePolicy::Retry
        } else {
            FailurePolicy::Skip
        },
        price_increase_limit_percent: row.price_increase_limit_percent,
        currency: row.currency,
        next_runs,
        runs,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

async fn show(
    conn: &mut PgConnection,
    customer: Uuid,
    id: Uuid,
) -> Result<Json<Schedule>, ApiError> {
    let row = row(conn, customer, id, false).await?;
    Ok(Json(view(conn, row).await?))
}

/// The items with their references for the price limit: a variant already
/// in `kept` keeps its reference, a new one takes its price now; 422 naming
/// each item that is not for sale.
async fn priced(
    conn: &mut PgConnection,
    items: &[ItemInput],
    kept: &[Item],
) -> Result<Vec<Item>, ApiError> {
    let offers: Vec<(Uuid, i64, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT v.id, v.price_now_minor, ({VISIBLE}) FROM variants_now v
           JOIN products p ON p.id = v.product_id
           JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
          WHERE v.id = ANY($1)"
    )))
    .bind(items.iter().map(|i| i.variant_id).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    let mut errors = Vec::new();
    let mut priced = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match offers
            .iter()
            .find(|(id, _, visible)| *id == item.variant_id && *visible)
        {
            Some((_, price, _)) => priced.push(Item {
                variant_id: item.variant_id,
                quantity: item.quantity,
                reference_price_minor: reference(kept, item.variant_id, *price),
            }),
            None => errors.push(FieldError::new(
                format!("items[{i}].variant_id"),
                "is not for sale",
            )),
        }
    }
    if errors.is_empty() {
        Ok(priced)
    } else {
        Err(ApiError::Validation(errors))
    }
}

/// The reference for the price limit of `variant`, priced `now`. One the
/// schedule already had stays: re-pricing it with every change (a quantity,
/// say) would let the reference follow the price up, and the customer's
/// limit would no longer hold against the price they chose at.
fn reference(kept: &[Item], variant: Uuid, now: i64) -> i64 {
    kept.iter()
        .find(|k| k.variant_id == variant)
        .map_or(now, |k| k.reference_price_minor)
}

async fn require_address(
    conn: &mut PgConnection,
    customer: Uuid,
    id: Uuid,
) -> Result<(), ApiError> {
    // Share-locked until the schedule that names it is written: a delete
    // of the address meanwhile waits, then clears it from the schedule as
    // from any that names it, rather than turning that write into a
    // foreign-key error (a 500).
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM addresses WHERE id = $1 AND user_id = $2 FOR KEY SHARE")
            .bind(id)
            .bind(customer)
            .fetch_optional(conn)
            .await?;
    found.map(|_| ()).ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new(
            "address_id",
            "no such address in your address book",
        )])
    })
}

/// The first due time of a cadence from `starts_at`, if it has one.
fn first_run(
    cadence: &Cadence,
    starts_at: Option<DateTime<Utc>>,
) -> Result<DateTime<Utc>, ApiError> {
    cadence.first(Utc::now(), starts_at).ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new("cron", "never matches from then on")])
    })
}

/// Schedule a recurring order.
#[utoipa::path(
    post, path = "/me/replenishments", tag = "recurring", security(("bearer" = [])), request_body = NewSchedule,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes retries safe: the same key answers the same schedule")),
    responses(
        (status = 201, description = "scheduled (or, for a retried key, scheduled before)", body = Schedule),
        (status = 403, description = "not a customer, or the email is not verified", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid: an item not for sale, a bad cadence, an address or card not the caller's, too many schedules, or an Idempotency-Key used for another request", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Customer(caller): Customer,
    headers: HeaderMap,
    ValidJson(body): ValidJson<NewSchedule>,
) -> Result<(StatusCode, Json<Schedule>), ApiError> {
    caller.require_verified()?;
    let key = Key::from_request(&headers, &body)?;
    let zone = zone(body.time_zone.as_deref()).map_err(|e| ApiError::Validation(vec![e]))?;
    let cadence = cadence(body.interval_days, body.cron.as_deref())
        .map_err(|e| ApiError::Validation(vec![e]))?
        .expect("validated")
        .in_zone(zone);
    let mut tx = state.pool.begin().await?;
    // Serializes this customer's schedule changes, so the cap holds.
    crate::auth::serialize_account(&mut tx, caller.id).await?;
    if let Some(key) = &key
        && let Some(id) = idempotency::earlier(&mut tx, Keyed::Schedules, caller.id, key).await?
    {
        let earlier = show(&mut tx, caller.id, id).await?;
        return Ok((StatusCode::CREATED, earlier));
    }
    // Only after the key: a retry comes whenever the client gets to it, and
    // the `starts_at` that was ahead for the first request may be past by
    // then; it still answers the schedule that request made.
    if let Some(e) = starts_at_error(body.starts_at) {
        return Err(ApiError::Validation(vec![e]));
    }
    let next_run_at = first_run(&cadence, body.starts_at)?;
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM replenishment_schedules WHERE customer_id = $1 AND status <> 'cancelled'",
    )
    .bind(caller.id)
    .fetch_one(&mut *tx)
    .await?;
    if kept >= MAX_SCHEDULES {
        return Err(ApiError::Validation(vec![FieldError::new(
            "replenishments",
            format!("at most {MAX_SCHEDULES} schedules; cancel one first"),
        )]));
    }
    let items = priced(&mut tx, &body.items, &[]).await?;
    require_address(&mut tx, caller.id, body.address_id).await?;
    payment_methods::require_active(&mut tx, caller.id, body.payment_method_id).await?;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO replenishment_schedules (id, customer_id, address_id, payment_method_id, currency, items,
                                             interval_days, cron, time_zone, on_failure,
                                             price_increase_limit_percent, next_run_at, idempotency_key,
                                             request_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(id)
    .bind(caller.id)
    .bind(body.address_id)
    .bind(body.payment_method_id)
    .bind(&state.market.currency)
    .bind(sqlx::types::Json(&items))
    .bind(body.interval_days)
    .bind(body.cron.as_deref().map(normalized))
    .bind(zone.name())
    .bind(body.on_failure.as_str())
    .bind(body.price_increase_limit_percent)
    .bind(next_run_at)
    .bind(key.as_ref().map(|k| &k.key))
    .bind(key.as_ref().map(|k| &k.hash))
    .execute(&mut *tx)
    .await?;
    let created = show(&mut tx, caller.id, id).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, created))
}

/// A cron expression with single spaces between its fields.
fn normalized(expr: &str) -> String {
    expr.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleStatus {
    Active,
    Paused,
    Cancelled,
}

impl ScheduleStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ScheduleQuery {
    /// Only schedules in this status.
    pub status: Option<ScheduleStatus>,
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100; 20 if absent.
    pub per_page: Option<u32>,
}

impl Validate for ScheduleQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// The caller's schedules: running and paused ones first, then cancelled
/// ones, each newest first.
#[utoipa::path(
    get, path = "/me/replenishments", tag = "recurring", security(("bearer" = [])), params(ScheduleQuery),
    responses(
        (status = 200, description = "a page of the caller's schedules, cancelled ones included", body = Page<Schedule>),
        (status = 422, description = "bad paging or status", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Customer(caller): Customer,
    ValidQuery(query): ValidQuery<ScheduleQuery>,
) -> Result<Json<Page<Schedule>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let status = query.status.map(ScheduleStatus::as_str);
    let mut conn = state.pool.acquire().await?;
    // One statement: the page and (on every row) the total; past the last
    // page, the count alone.
    #[derive(sqlx::FromRow)]
    struct Counted {
        total: i64,
        #[sqlx(flatten)]
        row: Row,
    }
    const MATCHED: &str = "FROM replenishment_schedules
          WHERE customer_id = $1 AND ($2::text IS NULL OR status = $2)";
    let rows: Vec<Counted> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) OVER () AS total, {COLUMNS} {MATCHED}
          ORDER BY status = 'cancelled', created_at DESC, id DESC LIMIT $3 OFFSET $4"
    )))
    .bind(caller.id)
    .bind(status)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&mut *conn)
    .await?;
    let count = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) {MATCHED}")))
        .bind(caller.id)
        .bind(status)
        .fetch_one(&state.pool);
    let total = paging.total(rows.first().map(|r| r.total), count).await?;
    let mut schedules = Vec::with_capacity(rows.len());
    for counted in rows {
        schedules.push(view(&mut conn, counted.row).await?);
    }
    Ok(Json(paging.page(schedules, total)))
}

/// One of the caller's schedules, with its next due times and latest runs.
#[utoipa::path(
    get, path = "/me/replenishments/{id}", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the schedule", body = Schedule),
        (status = 404, description = "no such schedule of the caller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Customer(caller): Customer,
    Path(id): Path<Uuid>,
) -> Result<Json<Schedule>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    show(&mut conn, caller.id, id).await
}

fn refuse_if_cancelled(row: &Row) -> Result<(), ApiError> {
    if row.status == "cancelled" {
        return Err(ApiError::Conflict(FieldError::new(
            "status",
            "the schedule is cancelled",
        )));
    }
    Ok(())
}

/// Change a schedule: its items, cadence, next run, address, card or policy.
#[utoipa::path(
    patch, path = "/me/replenishments/{id}", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = ScheduleChange,
    responses(
        (status = 200, description = "changed", body = Schedule),
        (status = 404, description = "no such schedule of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the schedule is cancelled", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Customer(caller): Customer,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<ScheduleChange>,
) -> Result<Json<Schedule>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let row = row(&mut tx, caller.id, id, true).await?;
    refuse_if_cancelled(&row)?;
    let items = match &body.items {
        Some(items) => Some(sqlx::types::Json(
            priced(&mut tx, items, &row.items.0).await?,
        )),
        None => None,
    };
    if let Some(address) = body.address_id {
        require_address(&mut tx, caller.id, address).await?;
    }
    if let Some(card) = body.payment_method_id {
        payment_methods::require_active(&mut tx, caller.id, card).await?;
    }
    let invalid = |e| ApiError::Validation(vec![e]);
    let new_zone = body
        .time_zone
        .as_deref()
        .map(|z| zone(Some(z)))
        .transpose()
        .map_err(invalid)?;
    let time_zone = new_zone.map_or(row.time_zone.clone(), |z| z.name().to_string());
    let new_cadence = cadence(body.interval_days, body.cron.as_deref()).map_err(invalid)?;
    let (interval_days, cron) = match &new_cadence {
        Some(_) => (body.interval_days, body.cron.as_deref().map(normalized)),
        None => (row.interval_days, row.cron.clone()),
    };
    // A new cadence or zone starts afresh (from `starts_at`, or from now),
    // as the schedule it makes would.
    let retimed = new_cadence.is_some() || new_zone.is_some();
    let next_run_at = match (retimed, body.starts_at) {
        (false, None) => row.next_run_at,
        (_, starts_at) => {
            let cadence = Cadence::from_columns(interval_days, cron.as_deref(), &time_zone)
                .map_err(|e| anyhow::anyhow!("schedule {id}: {e}"))?;
            first_run(&cadence, starts_at)?
        }
    };
    // Re-timing never brings a run closer than the minimum gap to the last
    // one that ran: a schedule is not a way to order every few minutes.
    let last: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT max(due_at) FROM replenishment_runs
              WHERE schedule_id = $1 AND reason IS DISTINCT FROM $2",
    )
    .bind(id)
    .bind(Reason::SkippedByCustomer.as_str())
    .fetch_one(&mut *tx)
    .await?;
    if let Some(last) = last.filter(|last| next_run_at < *last + MIN_GAP) {
        let message = format!("the next run must be at least an hour after the last one ({last})");
        return Err(ApiError::Validation(vec![FieldError::new(
            "starts_at",
            message,
        )]));
    }
    sqlx::query(
        "UPDATE replenishment_schedules
            SET items = coalesce($2, items), interval_days = $3, cron = $4, next_run_at = $5,
                time_zone = $10,
                address_id = coalesce($6, address_id), payment_method_id = coalesce($7, payment_method_id),
                on_failure = coalesce($8, on_failure),
                price_increase_limit_percent = coalesce($9, price_increase_limit_percent), updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(items)
    .bind(interval_days)
    .bind(cron)
    .bind(next_run_at)
    .bind(body.address_id)
    .bind(body.payment_method_id)
    .bind(body.on_failure.map(FailurePolicy::as_str))
    .bind(body.price_increase_limit_percent)
    .bind(&time_zone)
    .execute(&mut *tx)
    .await?;
    // Only a change that moved the next run can land it on a skip: one of
    // items, address, card or policy leaves every skip as it was (the next
    // run may already sit on a later skip the view leaves out).
    if retimed || body.starts_at.is_some() {
        unskip_next(&mut tx, id).await?;
    }
    let changed = show(&mut tx, caller.id, id).await?;
    tx.commit().await?;
    Ok(changed)
}

/// Drops the customer's skip of the schedule's next due time, should its
/// timing (new, or resumed) land on one. The schedule shows that time as
/// the next run, and a due time has one run: a skipped run kept there would
/// make the replenisher place nothing at that time, and tell no one. The
/// latest word wins: re-timing onto a skipped time asks for that delivery
/// after all. Skips of later due times stand (the schedule leaves them out
/// of its next runs): the customer asked for those deliveries to be skipped
/// and moving the next run asked nothing about them.
async fn unskip_next(conn: &mut PgConnection, id: Uuid) -> Result<(), ApiError> {
    // Compared as stored (in microseconds), as the replenisher will.
    sqlx::query(
        "DELETE FROM replenishment_runs r USING replenishment_schedules s
          WHERE s.id = $1 AND r.schedule_id = s.id AND r.reason = $2 AND r.due_at = s.next_run_at",
    )
    .bind(id)
    .bind(Reason::SkippedByCustomer.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What a status action does to a locked schedule.
enum Action {
    Pause,
    Resume,
    SkipNext,
    Cancel,
}

async fn act(
    state: &AppState,
    customer: Uuid,
    id: Uuid,
    action: Action,
) -> Result<Json<Schedule>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let row = row(&mut tx, customer, id, true).await?;
    refuse_if_cancelled(&row).or_else(|e| match action {
        Action::Cancel => Ok(()),
        _ => Err(e),
    })?;
    let now = Utc::now();
    let (status, next_run_at) = match action {
        Action::Pause => ("paused", row.next_run_at),
        Action::Cancel => ("cancelled", row.next_run_at),
        // Resuming does not make up for the runs missed while paused; the
        // cadence keeps its phase. An active schedule is left as it is (its
        // due run may be waiting for the replenisher).
        Action::Resume if row.status == "paused" && row.next_run_at <= now => (
            "active",
            row.cadence()?
                .next_after(row.next_run_at, now)
                .unwrap_or(row.next_run_at),
        ),
        Action::Resume => ("active", row.next_run_at),
        Action::SkipNext => {
            if row.status != "active" {
                return Err(ApiError::Conflict(FieldError::new(
                    "status",
                    "only an active schedule has a next run to skip",
                )));
            }
            // The skipped due time keeps its run, so it is never placed.
            sqlx::query(
                "INSERT INTO replenishment_runs (id, schedule_id, due_at, status, reason)
                 VALUES ($1, $2, $3, 'skipped', $4) ON CONFLICT (schedule_id, due_at) DO NOTHING",
            )
            .bind(Uuid::now_v7())
            .bind(id)
            .bind(row.next_run_at)
            .bind(Reason::SkippedByCustomer.as_str())
            .execute(&mut *tx)
            .await?;
            let cadence = row.cadence()?;
            let mut next = cadence
                .next_after(row.next_run_at, now)
                .unwrap_or(row.next_run_at);
            // Past the times skipped already: the next run is one that
            // will be placed, so skipping it again skips another delivery.
            let skipped: Vec<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT due_at FROM replenishment_runs
                  WHERE schedule_id = $1 AND reason = $2 AND due_at > $3",
            )
            .bind(id)
            .bind(Reason::SkippedByCustomer.as_str())
            .bind(row.next_run_at)
            .fetch_all(&mut *tx)
            .await?;
            while skipped.contains(&next) {
                match cadence.after(next) {
                    Some(after) => next = after,
                    None => break,
                }
            }
            ("active", next)
        }
    };
    sqlx::query(
        "UPDATE replenishment_schedules SET status = $2, next_run_at = $3, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(next_run_at)
    .execute(&mut *tx)
    .await?;
    // Resuming an active schedule changes nothing, its skips included.
    if matches!(action, Action::Resume) && row.status == "paused" {
        unskip_next(&mut tx, id).await?;
    }
    let changed = show(&mut tx, customer, id).await?;
    tx.commit().await?;
    Ok(changed)
}

/// Pause a schedule: no runs until it is resumed.
#[utoipa::path(
    post, path = "/me/replenishments/{id}/pause", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "paused", body = Schedule),
        (status = 404, description = "no such schedule of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "cancelled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn pause(
    State(state): State<AppState>,
    Customer(caller): Customer,
    Path(id): Path<Uuid>,
) -> Result<Json<Schedule>, ApiError> {
    act(&state, caller.id, id, Action::Pause).await
}

/// Resume a paused schedule from its next due time after now.
#[utoipa::path(
    post, path = "/me/replenishments/{id}/resume", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "active", body = Schedule),
        (status = 404, description = "no such schedule of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "cancelled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    Customer(caller): Customer,
    Path(id): Path<Uuid>,
) -> Result<Json<Schedule>, ApiError> {
    act(&state, caller.id, id, Action::Resume).await
}

/// Skip the next run; the one after it is next.
#[utoipa::path(
    post, path = "/me/replenishments/{id}/skip-next", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "skipped", body = Schedule),
        (status = 404, description = "no such schedule of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not active", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn skip_next(
    State(state): State<AppState>,
    Customer(caller): Customer,
    Path(id): Path<Uuid>,
) -> Result<Json<Schedule>, ApiError> {
    act(&state, caller.id, id, Action::SkipNext).await
}

/// Cancel a schedule for good. Orders already placed go on.
#[utoipa::path(
    post, path = "/me/replenishments/{id}/cancel", tag = "recurring", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "cancelled", body = Schedule),
        (status = 404, description = "no such schedule of the caller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    Customer(caller): Customer,
    Path(id): Path<Uuid>,
) -> Result<Json<Schedule>, ApiError> {
    act(&state, caller.id, id, Action::Cancel).await
}
