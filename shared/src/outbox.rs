//! The transactional outbox.
//!
//! A change and the message announcing it are written in one transaction
//! ([`enqueue`]); after the commit the producer calls [`Waker::wake`] so a
//! relay picks the row up within milliseconds. The relay publishes committed
//! rows and marks them published only after the broker confirms
//! ([`claim_batch`], [`mark_published`]).

use std::sync::Arc;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::envelope::Envelope;

/// The NOTIFY channel relays listen on.
pub const NOTIFY_CHANNEL: &str = "outbox";

/// Wakes the outbox relays after commits, coalescing any number of wake-ups
/// into at most one `NOTIFY` in flight at a time. The `NOTIFY` runs in its
/// own statement, never in the producer's transaction: PostgreSQL serializes
/// the commits of transactions that notify. A lost wake-up only delays
/// delivery until the relay's fallback poll; it never loses a message.
#[derive(Clone)]
pub struct Waker(Arc<Notify>);

impl Waker {
    /// Starts the background task that sends the notifications.
    pub fn spawn(pool: PgPool) -> Self {
        let pending = Arc::new(Notify::new());
        let waiting = pending.clone();
        tokio::spawn(async move {
            loop {
                waiting.notified().await;
                if let Err(e) = sqlx::query("SELECT pg_notify('outbox', '')")
                    .execute(&pool)
                    .await
                {
                    tracing::debug!(error = %e, "could not wake the outbox relays; they will poll");
                }
            }
        });
        Self(pending)
    }

    /// Call after committing a transaction that enqueued messages.
    pub fn wake(&self) {
        // Stores at most one permit: wake-ups during a NOTIFY collapse into one more.
        self.0.notify_one();
    }
}

/// Writes `envelope` to the outbox inside the caller's transaction.
pub async fn enqueue(conn: &mut PgConnection, envelope: &Envelope) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox (id, routing_key, envelope, correlation_id, created_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(envelope.id)
    .bind(&envelope.kind)
    .bind(sqlx::types::Json(envelope))
    .bind(&envelope.correlation_id)
    .bind(envelope.occurred_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// One claimed, not yet published outbox row.
#[derive(Debug, sqlx::FromRow)]
pub struct Pending {
    pub id: Uuid,
    pub routing_key: String,
    pub correlation_id: String,
    /// The envelope as JSON text, published as-is.
    pub body: String,
}

/// Locks up to `limit` unpublished rows, oldest first, skipping rows another
/// relay holds, so several relays split the backlog without waiting.
pub async fn claim_batch(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
) -> Result<Vec<Pending>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, routing_key, correlation_id, envelope::text AS body
           FROM outbox
          WHERE published_at IS NULL
          ORDER BY created_at, id
          LIMIT $1
          FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// Marks rows published; call only with ids the broker confirmed.
pub async fn mark_published(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[Uuid],
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Rows still waiting to be published (exported as a gauge).
pub async fn backlog(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(pool)
        .await
}

/// Deletes published rows older than `hours`; returns how many went.
pub async fn purge_published(pool: &PgPool, hours: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM outbox
          WHERE published_at IS NOT NULL
            AND published_at < now() - make_interval(hours => $1::int)",
    )
    .bind(hours)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
