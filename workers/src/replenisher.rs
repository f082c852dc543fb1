//! The replenisher: runs customers' replenishment schedules.
//!
//! Each poll it does three things, each row in its own transaction and
//! claimed with `FOR UPDATE SKIP LOCKED`, so any number of replenishers can
//! run side by side:
//!
//! 1. **Due schedules.** The schedule's due time becomes a run, keyed
//!    `UNIQUE (schedule_id, due_at)`; the schedule moves on to its next due
//!    time; the order is placed through [`place`], exactly as a checkout
//!    places one, paid off session with the saved card. All in one
//!    transaction: a replenisher killed mid-run leaves nothing behind, and
//!    one that overlaps another finds the run already there.
//! 2. **Retries.** A run that failed under a `retry` policy is tried again
//!    once its `retry_at` comes.
//! 3. **Follow-up.** An order placed for a run can still fail in the
//!    pipeline (its stock was taken meanwhile, the card was declined): the
//!    unpaid order is cancelled and the run follows the schedule's policy.
//!
//! Every failure tells the customer what happened and what comes next.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use souk_shared::{
    catalog::VISIBLE,
    config::{ConfigError, Env},
    notify,
    orders::{Actor, cancel, place},
    outbox,
    replenishment::{Cadence, Item, Reason},
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct ReplenisherConfig {
    /// How often due schedules, retries and placed orders are looked at.
    pub poll: Duration,
    /// How long after a failed run a `retry` schedule tries again.
    pub retry_after: Duration,
    /// Attempts per run (the first included) before it is given up.
    pub max_attempts: i32,
}

impl ReplenisherConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let max_attempts: i32 = env.or("REPLENISH_MAX_ATTEMPTS", 3)?;
        if !(1..=20).contains(&max_attempts) {
            return Err(ConfigError {
                var: "REPLENISH_MAX_ATTEMPTS".into(),
                reason: "must be between 1 and 20".into(),
            });
        }
        Ok(Self {
            poll: env.millis("REPLENISH_POLL_MS", 10_000)?,
            retry_after: env.millis("REPLENISH_RETRY_MS", 6 * 3600 * 1000)?,
            max_attempts,
        })
    }
}

/// Most rows of each kind handled per poll before the loop starts over.
const BATCH: usize = 50;

/// Runs until `shutdown`.
pub async fn run(pool: PgPool, config: ReplenisherConfig, shutdown: CancellationToken) {
    let waker = outbox::Waker::spawn(pool.clone());
    loop {
        match tick(&pool, &config).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(handled = n, "replenishment runs handled");
                waker.wake();
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "replenishment poll failed; will try again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.poll) => {}
        }
    }
}

/// One poll: due schedules, then due retries, then placed orders that
/// failed. Each row is its own transaction; a row whose handling fails is
/// rolled back and left for the next poll, so it never holds up the others.
/// Returns how many rows it handled.
pub async fn tick(pool: &PgPool, config: &ReplenisherConfig) -> anyhow::Result<usize> {
    let mut handled = 0;
    let mut failed: Vec<Uuid> = Vec::new();
    for step in [Step::Due, Step::Retry, Step::FollowUp] {
        for _ in 0..BATCH {
            let mut tx = pool.begin().await?;
            let Some(id) = step.claim(&mut tx, &failed).await? else {
                break;
            };
            match step.handle(&mut tx, config, id).await {
                Ok(()) => {
                    tx.commit().await?;
                    handled += 1;
                }
                Err(e) => {
                    // Dropping the transaction rolls the row back.
                    tracing::warn!(%id, step = ?step, error = %e, "replenishment row failed; will try again");
                    failed.push(id);
                }
            }
        }
    }
    Ok(handled)
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// A due schedule (its id).
    Due,
    /// A run whose retry is due (its id).
    Retry,
    /// A run whose order ended unpaid (the run's id).
    FollowUp,
}

impl Step {
    /// Locks one row of this kind that no other replenisher holds, other
    /// than `skip`. Accounts that are suspended are left alone until they
    /// are reinstated.
    async fn claim(
        self,
        tx: &mut PgConnection,
        skip: &[Uuid],
    ) -> Result<Option<Uuid>, sqlx::Error> {
        let sql = match self {
            Step::Due => {
                "SELECT s.id FROM replenishment_schedules s JOIN users u ON u.id = s.customer_id
                  WHERE s.status = 'active' AND s.next_run_at <= now() AND u.suspended_at IS NULL
                    AND s.id <> ALL($1)
                  ORDER BY s.next_run_at LIMIT 1
                  FOR UPDATE OF s SKIP LOCKED"
            }
            Step::Retry => {
                "SELECT r.id FROM replenishment_runs r
                   JOIN replenishment_schedules s ON s.id = r.schedule_id
                   JOIN users u ON u.id = s.customer_id
                  WHERE r.status = 'retrying' AND r.retry_at <= now() AND u.suspended_at IS NULL
                    AND r.id <> ALL($1)
                  ORDER BY r.retry_at LIMIT 1
                  FOR UPDATE OF r SKIP LOCKED"
            }
            Step::FollowUp => {
                "SELECT r.id FROM orders o JOIN replenishment_runs r ON r.order_id = o.id AND r.status = 'placed'
                  WHERE o.replenishment_run_id IS NOT NULL
                    AND o.status IN ('out_of_stock', 'payment_failed', 'expired')
                    AND r.id <> ALL($1)
                  LIMIT 1
                  FOR NO KEY UPDATE OF r, o SKIP LOCKED"
            }
        };
        sqlx::query_scalar(sql)
            .bind(skip)
            .fetch_optional(&mut *tx)
            .await
    }

    async fn handle(
        self,
        tx: &mut PgConnection,
        config: &ReplenisherConfig,
        id: Uuid,
    ) -> anyhow::Result<()> {
        match self {
            Step::Due => run_due(tx, config, id).await,
            Step::Retry => retry_due(tx, config, id).await,
            Step::FollowUp => follow_up(tx, config, id).await,
        }
    }
}

/// A schedule as a run needs it, locked.
#[derive(sqlx::FromRow)]
struct Schedule {
    id: Uuid,
    customer_id: Uuid,
    address_id: Option<Uuid>,
    payment_method_id: Uuid,
    currency: String,
    items: sqlx::types::Json<Vec<Item>>,
    interval_days: Option<i32>,
    cron: Option<String>,
    time_zone: String,
    on_failure: String,
    price_increase_limit_percent: i32,
    status: String,
    next_run_at: DateTime<Utc>,
}

/// Schedule `id`, locked (a no-op when the claim locked it already).
async fn lock_schedule(tx: &mut PgConnection, id: Uuid) -> Result<Schedule, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, customer_id, address_id, payment_method_id, currency, items, interval_days, cron,
                time_zone, on_failure, price_increase_limit_percent, status, next_run_at
           FROM replenishment_schedules WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await
}

/// A claimed due schedule: its run for the due time, the next due time, and
/// the attempt at the order.
async fn run_due(
    tx: &mut PgConnection,
    config: &ReplenisherConfig,
    id: Uuid,
) -> anyhow::Result<()> {
    let schedule = lock_schedule(tx, id).await?;
    let due = schedule.next_run_at;
    let next = Cadence::from_columns(
        schedule.interval_days,
        schedule.cron.as_deref(),
        &schedule.time_zone,
    )
    .ok()
    .and_then(|c| c.next_after(due, Utc::now()));
    match next {
        Some(next) => {
            sqlx::query("UPDATE replenishment_schedules SET next_run_at = $2, updated_at = now() WHERE id = $1")
                .bind(schedule.id)
                .bind(next)
                .execute(&mut *tx)
                .await?
        }
        // A cron expression that never matches again: nothing more to run.
        None => {
            sqlx::query("UPDATE replenishment_schedules SET status = 'paused', updated_at = now() WHERE id = $1")
                .bind(schedule.id)
                .execute(&mut *tx)
                .await?
        }
    };
    let run: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO replenishment_runs (id, schedule_id, due_at, status) VALUES ($1, $2, $3, 'placed')
         ON CONFLICT (schedule_id, due_at) DO NOTHING RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(schedule.id)
    .bind(due)
    .fetch_optional(&mut *tx)
    .await?;
    match run {
        Some(run) => attempt(tx, config, &schedule, run, 1).await?,
        None => tracing::info!(schedule = %schedule.id, %due, "this due time already has its run"),
    }
    Ok(())
}

/// A claimed run whose retry is due: attempted again, unless the schedule
/// was paused or cancelled meanwhile.
async fn retry_due(
    tx: &mut PgConnection,
    config: &ReplenisherConfig,
    run: Uuid,
) -> anyhow::Result<()> {
    let (schedule, attempts, due_at, reason, detail): (
        Uuid,
        i32,
        DateTime<Utc>,
        Option<String>,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT schedule_id, attempt, due_at, reason, detail FROM replenishment_runs WHERE id = $1",
    )
    .bind(run)
    .fetch_one(&mut *tx)
    .await?;
    let schedule = lock_schedule(tx, schedule).await?;
    if schedule.status != "active" {
        // The customer no longer wants it.
        sqlx::query(
            "UPDATE replenishment_runs SET status = 'skipped', retry_at = NULL, updated_at = now() WHERE id = $1",
        )
        .bind(run)
        .execute(&mut *tx)
        .await?;
        return Ok(());
    }
    // A retry is promised only before the next due time, but one that
    // waited (no replenisher ran for a while) can find the next delivery's
    // time come: that one stands, and this run is given up. (A later run
    // still ahead is a skip the customer asked for, not a delivery.)
    let superseded: bool = sqlx::query_scalar(
        "SELECT $3 <= now() OR EXISTS (SELECT 1 FROM replenishment_runs
                                        WHERE schedule_id = $1 AND due_at > $2 AND due_at <= now())",
    )
    .bind(schedule.id)
    .bind(due_at)
    .bind(schedule.next_run_at)
    .fetch_one(&mut *tx)
    .await?;
    if superseded {
        let reason = reason
            .as_deref()
            .and_then(Reason::parse)
            .unwrap_or(Reason::Unpaid);
        let detail = detail.unwrap_or_default();
        return failed(tx, config, &schedule, run, attempts, reason, &detail, false).await;
    }
    attempt(tx, config, &schedule, run, attempts + 1).await
}

/// A claimed run whose order ended unpaid. Stock taken meanwhile or a
/// declined card: what is left of the order is cancelled and the run
/// follows the policy. Expired (Souk could not learn in time whether the
/// card was charged): never retried, since a late payment may still make
/// that order paid, and a second order would charge twice.
async fn follow_up(
    tx: &mut PgConnection,
    config: &ReplenisherConfig,
    run: Uuid,
) -> anyhow::Result<()> {
    let (attempts, schedule, order, status, failure, corr): (
        i32,
        Uuid,
        Uuid,
        String,
        Option<String>,
        String,
    ) = sqlx::query_as(
        "SELECT r.attempt, r.schedule_id, o.id, o.status, o.failure_reason, o.correlation_id
               FROM replenishment_runs r JOIN orders o ON o.id = r.order_id WHERE r.id = $1",
    )
    .bind(run)
    .fetch_one(&mut *tx)
    .await?;
    let schedule = lock_schedule(tx, schedule).await?;
    let (reason, fallback) = match status.as_str() {
        "out_of_stock" => (
            Reason::OutOfStock,
            "an item sold out before it could be reserved",
        ),
        "payment_failed" => (Reason::PaymentDeclined, "the saved card was declined"),
        _ => (Reason::Unpaid, "the payment could not be confirmed in time"),
    };
    if status == "payment_failed" {
        // The stock is still held for it: give it back.
        cancel::cancel_order(tx, order, None, Actor::System, fallback, &corr).await?;
    }
    let detail = failure.unwrap_or_else(|| fallback.to_string());
    failed(tx, config, &schedule, run, attempts, reason, &detail, true).await
}

/// What an attempt found: an order placed, or why not.
enum Outcome {
    Placed(Uuid),
    Failed(Reason, String),
}

/// Attempts run `run` of `schedule` (attempt number `attempt`): checks it
/// can be bought as the customer set it up, then places the order.
async fn attempt(
    tx: &mut PgConnection,
    config: &ReplenisherConfig,
    schedule: &Schedule,
    run: Uuid,
    attempt: i32,
) -> anyhow::Result<()> {
    // A run has at most one order that is not over; should one be live (a
    // late payment revived it), it is the run's order.
    let live: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM orders WHERE replenishment_run_id = $1
            AND status NOT IN ('out_of_stock', 'expired', 'cancelled', 'refunded')",
    )
    .bind(run)
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = match live {
        Some(order) => Outcome::Placed(order),
        None => order_for(tx, schedule, run).await?,
    };
    match outcome {
        Outcome::Placed(order) => {
            sqlx::query(
                "UPDATE replenishment_runs SET status = 'placed', order_id = $2, attempt = $3, reason = NULL,
                        detail = NULL, retry_at = NULL, updated_at = now()
                  WHERE id = $1",
            )
            .bind(run)
            .bind(order)
            .bind(attempt)
            .execute(&mut *tx)
            .await?;
            tracing::info!(schedule = %schedule.id, %run, %order, attempt, "replenishment order placed");
        }
        Outcome::Failed(reason, detail) => {
            failed(tx, config, schedule, run, attempt, reason, &detail, true).await?;
        }
    }
    Ok(())
}

async fn order_for(
    tx: &mut PgConnection,
    schedule: &Schedule,
    run: Uuid,
) -> anyhow::Result<Outcome> {
    let address = match schedule.address_id {
        Some(id) => place::shipping_address(tx, schedule.customer_id, Some(id)).await?,
        None => None,
    };
    let Some(address) = address else {
        let detail = "the schedule's shipping address was deleted".to_string();
        return Ok(Outcome::Failed(Reason::NoAddress, detail));
    };
    // Share-locked: a removal of the card waits for this order to be
    // committed and then refuses, having seen it (or this sees it removed).
    let card: Option<String> = sqlx::query_scalar(
        "SELECT status FROM payment_methods WHERE id = $1 AND user_id = $2 FOR SHARE",
    )
    .bind(schedule.payment_method_id)
    .bind(schedule.customer_id)
    .fetch_optional(&mut *tx)
    .await?;
    if card.as_deref() != Some("active") {
        let detail = "the schedule's saved card was removed".to_string();
        return Ok(Outcome::Failed(Reason::NoCard, detail));
    }

    #[derive(sqlx::FromRow)]
    struct Offer {
        variant_id: Uuid,
        product_id: Uuid,
        shop_id: Uuid,
        title: String,
        variant_title: String,
        sku: String,
        price: i64,
        available: i32,
        visible: bool,
    }
    let items = &schedule.items.0;
    let offers: Vec<Offer> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT v.id AS variant_id, p.id AS product_id, p.shop_id, p.title, v.title AS variant_title, v.sku,
                v.price_now_minor AS price, greatest(v.available, 0) AS available, ({VISIBLE}) AS visible
           FROM variants_now v
           JOIN products p ON p.id = v.product_id
           JOIN shops s ON s.id = p.shop_id
           JOIN users u ON u.id = s.owner_id
          WHERE v.id = ANY($1)"
    )))
    .bind(items.iter().map(|i| i.variant_id).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let mut lines = Vec::with_capacity(items.len());
    for item in items {
        let Some(offer) = offers
            .iter()
            .find(|o| o.variant_id == item.variant_id && o.visible)
        else {
            let detail = "an item of the schedule is no longer for sale".to_string();
            return Ok(Outcome::Failed(Reason::Unavailable, detail));
        };
        if offer.available < item.quantity {
            let detail = format!(
                "{} ({}): only {} left",
                offer.title, offer.variant_title, offer.available
            );
            return Ok(Outcome::Failed(Reason::OutOfStock, detail));
        }
        if item.beyond_limit(offer.price, schedule.price_increase_limit_percent) {
            let detail = format!(
                "{} ({}) now costs {} (minor units), up from {}; the limit is {}%",
                offer.title,
                offer.variant_title,
                offer.price,
                item.reference_price_minor,
                schedule.price_increase_limit_percent
            );
            return Ok(Outcome::Failed(Reason::PriceChanged, detail));
        }
        lines.push(place::Line {
            shop_id: offer.shop_id,
            product_id: offer.product_id,
            variant_id: offer.variant_id,
            title: offer.title.clone(),
            variant_title: offer.variant_title.clone(),
            sku: offer.sku.clone(),
            unit_price_minor: offer.price,
            quantity: item.quantity,
        });
    }
    let order = place::NewOrder {
        customer: schedule.customer_id,
        currency: schedule.currency.clone(),
        lines,
        coupon: None,
        benefit: place::benefit(tx, schedule.customer_id).await?,
        shipping_address: address,
        idempotency: None,
        payment_method: Some(schedule.payment_method_id),
        replenishment_run: Some(run),
        correlation_id: format!("replenishment-{run}"),
    };
    Ok(Outcome::Placed(place::place(tx, order).await?))
}

/// Applies the schedule's policy to a run that failed, and tells the
/// customer: `retry` tries again after `retry_after` (up to the attempts
/// allowed, only where waiting can help, and only while that is before the
/// schedule's next due time: the next run is the next delivery, and a retry
/// after it would make two orders where the customer wanted one); `skip`
/// waits for the next due time. A schedule paused or cancelled since the
/// order was placed skips the run whatever its policy: a retry would only
/// be skipped when it came (see [`retry_due`]), so promising one would be a
/// promise broken. `may_retry` false gives the run up whatever the policy.
#[allow(clippy::too_many_arguments)]
async fn failed(
    tx: &mut PgConnection,
    config: &ReplenisherConfig,
    schedule: &Schedule,
    run: Uuid,
    attempt: i32,
    reason: Reason,
    detail: &str,
    may_retry: bool,
) -> anyhow::Result<()> {
    let retry = schedule.status == "active" && schedule.on_failure == "retry";
    // The schedule as it is now: a due run has moved it on already.
    let next_run_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT next_run_at FROM replenishment_schedules WHERE id = $1")
            .bind(schedule.id)
            .fetch_one(&mut *tx)
            .await?;
    let retry_at = Some(Utc::now() + config.retry_after).filter(|at| {
        may_retry
            && retry
            && reason.retryable()
            && attempt < config.max_attempts
            && *at < next_run_at
    });
    let status = match (retry_at, retry) {
        (Some(_), _) => "retrying",
        (None, true) => "failed",
        (None, false) => "skipped",
    };
    let (run_status, due_at): (String, DateTime<Utc>) = sqlx::query_as(
        "UPDATE replenishment_runs SET status = $2, reason = $3, detail = $4, attempt = $5, retry_at = $6,
                updated_at = now()
          WHERE id = $1
         RETURNING status, due_at",
    )
    .bind(run)
    .bind(status)
    .bind(reason.as_str())
    .bind(detail)
    .bind(attempt)
    .bind(retry_at)
    .fetch_one(&mut *tx)
    .await?;
    tracing::info!(schedule = %schedule.id, %run, attempt, reason = reason.as_str(), status = run_status, "replenishment run failed");
    let (email, name): (String, String) =
        sqlx::query_as("SELECT email, name FROM users WHERE id = $1")
            .bind(schedule.customer_id)
            .fetch_one(&mut *tx)
            .await?;
    let data = json!({
        "name": name,
        "schedule_id": schedule.id,
        "run_id": run,
        "due_at": due_at,
        "reason": reason.as_str(),
        "detail": detail,
        "outcome": status,
        "schedule_status": schedule.status,
        "attempt": attempt,
        "retry_at": retry_at,
        "next_run_at": (schedule.status == "active").then_some(next_run_at),
    });
    notify::in_app(tx, schedule.customer_id, "replenishment_failed", &data).await?;
    notify::email(
        tx,
        &email,
        "replenishment_failed",
        data,
        &format!("replenishment-{run}"),
    )
    .await?;
    Ok(())
}
