//! Forgetting old processed-message records.
//!
//! A processed row only has to outlive the window in which a copy of its
//! message can still arrive: relay re-publishes and broker redeliveries come
//! within minutes, and a parked message never got a row (it failed), so a
//! replay days later is still applied. Rows older than the retention are
//! deleted, as are claims that expired long ago (their holder died and the
//! message ended elsewhere).

use std::time::Duration;

use sqlx::PgPool;

/// Deletes `group`'s processed rows older than `retention`; returns how many.
pub async fn purge(pool: &PgPool, group: &str, retention: Duration) -> sqlx::Result<u64> {
    let secs = retention.as_secs_f64();
    let processed = sqlx::query(
        "DELETE FROM processed_messages
          WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2)",
    )
    .bind(group)
    .bind(secs)
    .execute(pool)
    .await?
    .rows_affected();
    sqlx::query(
        "DELETE FROM message_claims
          WHERE consumer = $1 AND claimed_until < now() - make_interval(secs => $2)",
    )
    .bind(group)
    .bind(secs)
    .execute(pool)
    .await?;
    Ok(processed)
}

/// Purges once an hour until the task is dropped.
pub fn spawn_hourly(
    pool: PgPool,
    group: &'static str,
    retention: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut hourly = tokio::time::interval(Duration::from_secs(3600));
        loop {
            hourly.tick().await;
            match purge(&pool, group, retention).await {
                Ok(n) => tracing::debug!(group, purged = n, "purged old processed-message records"),
                Err(e) => {
                    tracing::warn!(group, error = %e, "could not purge processed-message records")
                }
            }
        }
    })
}
