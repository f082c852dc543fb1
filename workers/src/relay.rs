//! The outbox relay: publishes committed outbox rows to the events exchange.
//!
//! Each batch is claimed with `FOR UPDATE SKIP LOCKED` (several relays split
//! the backlog), published with every confirm in flight at once, and marked
//! published in the same transaction only for the rows the broker acked. A
//! relay that dies mid-batch rolls back; the rows are published again by the
//! next claim, and consumers drop the duplicates by message id. A row no
//! queue is bound for is kept in `{prefix}.unrouted` rather than dropped.

use std::time::{Duration, Instant};

use lapin::{Channel, Confirmation, options::QueueDeclareOptions, types::FieldTable};
use souk_shared::{amqp, outbox, topology};
use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ops::Readiness;

/// How long the broker may take to confirm one batch.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a batch the broker confirmed none of, doubling up to the max.
const STALLED_FIRST: Duration = Duration::from_millis(200);
const STALLED_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub amqp_url: String,
    pub names: topology::Names,
    pub batch_size: i64,
    /// Fallback poll when no NOTIFY arrives (e.g. the listener reconnected).
    pub poll_interval: Duration,
    /// After a wake-up, how long to let more commits arrive before claiming:
    /// one claim for what several producers committed meanwhile.
    pub coalesce: Duration,
    /// Published rows older than this are deleted.
    pub retention_hours: i64,
    pub connection_name: String,
}

/// Runs until `shutdown`, reconnecting to the broker with backoff.
pub async fn run(
    pool: PgPool,
    settings: RelaySettings,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut wait = Duration::from_millis(250);
    while !shutdown.is_cancelled() {
        match session(&pool, &settings, &readiness, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                readiness.set_broker(false);
                warn!(error = %format!("{e:#}"), ?wait, "outbox relay lost a connection; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(15));
            }
        }
    }
    info!("outbox relay stopped");
}

async fn session(
    pool: &PgPool,
    settings: &RelaySettings,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // Listen before the first drain so no commit between the two is missed.
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(outbox::NOTIFY_CHANNEL).await?;

    let conn = amqp::connect(&settings.amqp_url, &settings.connection_name).await?;
    let channel = amqp::confirm_channel(&conn).await?;
    topology::declare_exchange(&channel, &settings.names).await?;
    for group in topology::GROUPS {
        topology::declare_queues(&channel, &settings.names, group.name, group.bindings).await?;
    }
    let unrouted = settings.names.unrouted_queue();
    channel
        .queue_declare(
            unrouted.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            amqp::string_header(FieldTable::default(), "x-queue-type", "quorum"),
        )
        .await?;
    readiness.set_broker(true);
    info!("outbox relay connected");

    let target = Target {
        exchange: settings.names.events_exchange(),
        unrouted,
    };
    let stop = || async {
        let _ = conn.close(200, "shutting down".into()).await;
        Ok(())
    };
    // Due at once, then hourly (purge) and every 5 s (backlog gauge).
    let (mut next_purge, mut next_gauge) = (Instant::now(), Instant::now());
    loop {
        // Drain the backlog, a batch at a time, until a batch comes back
        // short; a shutdown is honoured between batches, not after the
        // whole backlog.
        let mut stalled = STALLED_FIRST;
        loop {
            if shutdown.is_cancelled() {
                return stop().await;
            }
            let batch = publish_batch(pool, &channel, &target, settings.batch_size).await?;
            if batch.claimed > 0 && batch.confirmed == 0 {
                // The broker took none of them (every publish nacked): claiming
                // the same rows again at once would only spin. Wait, longer
                // each time it happens again.
                warn!(claimed = batch.claimed, wait = ?stalled, "the broker confirmed nothing of a batch; waiting");
                tokio::select! {
                    _ = shutdown.cancelled() => return stop().await,
                    _ = tokio::time::sleep(stalled) => {}
                }
                stalled = (stalled * 2).min(STALLED_MAX);
                continue;
            }
            stalled = STALLED_FIRST;
            if batch.claimed < settings.batch_size as usize {
                break;
            }
        }
        if Instant::now() >= next_purge {
            next_purge = Instant::now() + Duration::from_secs(3600);
            let purged = outbox::purge_published(pool, settings.retention_hours).await?;
            debug!(purged, "purged published outbox rows");
        }
        if Instant::now() >= next_gauge {
            next_gauge = Instant::now() + Duration::from_secs(5);
            if let Ok(n) = outbox::backlog(pool).await {
                metrics::gauge!("souk_outbox_backlog").set(n as f64);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return stop().await,
            note = listener.recv() => {
                note?;
                // Every wake-up already queued is answered by the one claim
                // that follows (each was sent after its commit, so the claim
                // sees those rows): one claim, not one per wake-up.
                while listener.next_buffered().is_some() {}
                if !settings.coalesce.is_zero() {
                    tokio::time::sleep(settings.coalesce).await;
                    while listener.next_buffered().is_some() {}
                }
            }
            _ = tokio::time::sleep(settings.poll_interval) => {}
        }
        if !conn.status().connected() {
            anyhow::bail!("broker connection closed");
        }
    }
}

/// Where the relay publishes.
pub struct Target {
    /// The events exchange, routed by message type.
    pub exchange: String,
    /// The queue a message no queue is bound for goes to instead.
    pub unrouted: String,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Rows claimed from the outbox.
    pub claimed: usize,
    /// Rows the broker confirmed, now marked published.
    pub confirmed: usize,
}

/// Claims, publishes and marks one batch.
pub async fn publish_batch(
    pool: &PgPool,
    channel: &Channel,
    target: &Target,
    batch_size: i64,
) -> anyhow::Result<Batch> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    let rows = outbox::claim_batch(&mut tx, batch_size).await?;
    if rows.is_empty() {
        return Ok(Batch {
            claimed: 0,
            confirmed: 0,
        });
    }
    // The claim's row locks are held while publishing: that is what lets
    // several relays run without publishing a row twice. The broker is given
    // a bounded time, so a hung broker never leaves the transaction open.
    let confirmed = tokio::time::timeout(PUBLISH_TIMEOUT, publish_rows(channel, target, &rows))
        .await
        .map_err(|_| {
            anyhow::anyhow!("broker did not confirm a batch within {PUBLISH_TIMEOUT:?}")
        })??;
    outbox::mark_published(&mut tx, &confirmed).await?;
    tx.commit().await?;
    metrics::counter!("souk_outbox_published_total").increment(confirmed.len() as u64);
    metrics::histogram!("souk_outbox_batch_seconds").record(started.elapsed().as_secs_f64());
    Ok(Batch {
        claimed: rows.len(),
        confirmed: confirmed.len(),
    })
}

fn row_properties(row: &outbox::Pending, headers: FieldTable) -> lapin::BasicProperties {
    amqp::properties(
        &row.id.to_string(),
        &row.routing_key,
        &row.correlation_id,
        headers,
    )
}

/// Publishes every row, then awaits the confirms together (one round trip per
/// batch instead of one per message); returns the ids the broker acked.
///
/// A row no queue is bound for comes back (the publish is mandatory). It is
/// not marked published as it is, which would lose it without a trace: it is
/// sent to the unrouted queue, with why and where from in the headers the
/// parking queues use, and marked only once the broker confirmed that copy.
async fn publish_rows(
    channel: &Channel,
    target: &Target,
    rows: &[outbox::Pending],
) -> anyhow::Result<Vec<uuid::Uuid>> {
    let mut pending = Vec::with_capacity(rows.len());
    for row in rows {
        let props = row_properties(row, FieldTable::default());
        let confirm = amqp::publish(
            channel,
            &target.exchange,
            &row.routing_key,
            row.body.as_bytes(),
            props,
        )
        .await?;
        pending.push((row, confirm));
    }
    let mut confirmed = Vec::with_capacity(rows.len());
    let mut returned = Vec::new();
    for (row, confirm) in pending {
        match confirm.await? {
            Confirmation::Ack(None) => confirmed.push(row.id),
            Confirmation::Ack(Some(_)) => returned.push(row),
            Confirmation::Nack(_) => {
                warn!(id = %row.id, "broker nacked; will publish again");
            }
            Confirmation::NotRequested => unreachable!("the relay channel is in confirm mode"),
        }
    }

    let mut moved = Vec::with_capacity(returned.len());
    for row in returned {
        warn!(id = %row.id, routing_key = %row.routing_key, queue = %target.unrouted,
              "no queue takes this message type; keeping it in the unrouted queue");
        let error = format!("no queue is bound for routing key {}", row.routing_key);
        let headers = amqp::string_header(FieldTable::default(), amqp::ERROR_HEADER, &error);
        let headers = amqp::string_header(headers, amqp::ORIGIN_HEADER, &target.exchange);
        let props = row_properties(row, headers);
        let confirm =
            amqp::publish(channel, "", &target.unrouted, row.body.as_bytes(), props).await?;
        moved.push((row, confirm));
    }
    for (row, confirm) in moved {
        match confirm.await? {
            Confirmation::Ack(None) => {
                metrics::counter!("souk_outbox_unroutable_total").increment(1);
                confirmed.push(row.id);
            }
            Confirmation::Ack(Some(_)) => {
                warn!(id = %row.id, queue = %target.unrouted, "the unrouted queue is missing; will publish again");
            }
            Confirmation::Nack(_) => {
                warn!(id = %row.id, "broker nacked the unrouted copy; will publish again");
            }
            Confirmation::NotRequested => unreachable!("the relay channel is in confirm mode"),
        }
    }
    Ok(confirmed)
}
