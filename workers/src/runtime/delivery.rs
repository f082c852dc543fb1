//! Processing of one delivery: dedupe, handle, commit, ack; or retry / park.

use std::time::{Duration, Instant};

use lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
    types::FieldTable,
};
use souk_shared::{amqp, envelope::Envelope, outbox, topology::Names};
use sqlx::{PgConnection, PgPool};
use tracing::{Instrument, info_span, warn};

use super::{Failure, Handler};

/// What [`apply_once`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The effect was committed together with the processed-message record.
    Now,
    /// The message had been processed before; nothing was done.
    Before,
}

/// Records the message as processed by `group`; false if it already was.
/// A concurrent transaction recording the same message blocks here until it
/// ends, so exactly one of them gets `true`.
async fn record_processed(
    conn: &mut PgConnection,
    group: &str,
    envelope: &Envelope,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "INSERT INTO processed_messages (consumer, message_id, attempt)
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(envelope.id)
    .bind(envelope.attempt as i32)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// What taking the lease found.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    /// This consumer holds the lease now.
    Taken,
    /// Another consumer holds a live one.
    Held,
    /// The message was processed before: nothing to do, no lease taken.
    Done,
}

/// Takes the lease on a message, unless it was processed before or another
/// consumer holds a live lease: one round trip for both questions. A holder
/// finishing meanwhile commits its processed row with its lease's removal,
/// so a lease taken on a message its snapshot saw unprocessed can at worst
/// repeat `prepare` (every outside call carries an idempotency key); the
/// processed row still lets only one transaction apply it.
async fn claim(
    pool: &PgPool,
    group: &str,
    envelope: &Envelope,
    lease: Duration,
) -> sqlx::Result<Claim> {
    let (done, taken): (bool, bool) = sqlx::query_as(
        "WITH done AS (
             SELECT EXISTS (SELECT 1 FROM processed_messages WHERE consumer = $1 AND message_id = $2) AS yes),
         taken AS (
             INSERT INTO message_claims (consumer, message_id, claimed_until)
             SELECT $1, $2, now() + make_interval(secs => $3) FROM done WHERE NOT done.yes
             ON CONFLICT (consumer, message_id) DO UPDATE SET claimed_until = EXCLUDED.claimed_until
             WHERE message_claims.claimed_until < now()
             RETURNING 1)
         SELECT (SELECT yes FROM done), EXISTS (SELECT 1 FROM taken)",
    )
    .bind(group)
    .bind(envelope.id)
    .bind(lease.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(match (done, taken) {
        (true, _) => Claim::Done,
        (false, true) => Claim::Taken,
        (false, false) => Claim::Held,
    })
}

async fn release(conn: &mut PgConnection, group: &str, envelope: &Envelope) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM message_claims WHERE consumer = $1 AND message_id = $2")
        .bind(group)
        .bind(envelope.id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Applies `envelope` through `handler` at most once per consumer group.
///
/// The processed-message row is inserted first in the handler's transaction:
/// a concurrent duplicate blocks on its primary key until the first commits,
/// then finds the row and backs off. Handlers with a [`Handler::prepare_lease`]
/// also claim the message before `prepare`, so a duplicate handled at the same
/// time never repeats the outside call.
pub async fn apply_once<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelope: &Envelope,
) -> Result<Applied, Failure> {
    let lease = handler.prepare_lease();
    if let Some(lease) = lease {
        match claim(pool, H::GROUP, envelope, lease).await? {
            Claim::Taken => {}
            Claim::Done => return Ok(Applied::Before),
            Claim::Held => {
                return Err(Failure::transient(anyhow::anyhow!(
                    "another consumer is handling this message"
                )));
            }
        }
    }
    let outcome = prepare_and_apply(pool, handler, envelope, lease.is_some()).await;
    if lease.is_some() && !matches!(outcome, Ok(Applied::Now)) {
        // Let a retry take it at once. (On success the claim went with the commit.)
        let mut conn = pool.acquire().await?;
        release(&mut conn, H::GROUP, envelope).await?;
    }
    outcome
}

async fn prepare_and_apply<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelope: &Envelope,
    claimed: bool,
) -> Result<Applied, Failure> {
    let prepared = handler.prepare(envelope).await?;

    let mut tx = pool.begin().await?;
    if !record_processed(&mut tx, H::GROUP, envelope).await? {
        return Ok(Applied::Before);
    }
    handler.apply(&mut tx, envelope, prepared).await?;
    if claimed {
        release(&mut tx, H::GROUP, envelope).await?;
    }
    tx.commit().await?;
    Ok(Applied::Now)
}

/// Applies several messages in one transaction: one commit instead of one
/// per message. Any failure rolls the whole batch back and the caller falls
/// back to one message at a time, so a bad message only costs its batch a
/// second try. Only for handlers without a lease.
async fn apply_batch<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelopes: &[&Envelope],
) -> Result<Vec<Applied>, Failure> {
    let mut prepared = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        prepared.push(handler.prepare(envelope).await?);
    }
    let mut tx = pool.begin().await?;
    // Every message recorded in one statement (in id order, as the caller
    // sorted them); the ones recorded before are skipped.
    let ids: Vec<uuid::Uuid> = envelopes.iter().map(|e| e.id).collect();
    let mut new: std::collections::HashSet<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO processed_messages (consumer, message_id, attempt)
         SELECT $1, id, 0 FROM unnest($2::uuid[]) AS id
         ON CONFLICT DO NOTHING RETURNING message_id",
    )
    .bind(H::GROUP)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    handler.lock_batch(&mut tx, envelopes).await?;
    let mut applied = Vec::with_capacity(envelopes.len());
    for (envelope, prepared) in envelopes.iter().zip(prepared) {
        // `remove`: a copy of one message twice in a batch applies once.
        if new.remove(&envelope.id) {
            handler.apply(&mut tx, envelope, prepared).await?;
            applied.push(Applied::Now);
        } else {
            applied.push(Applied::Before);
        }
    }
    tx.commit().await?;
    Ok(applied)
}

/// Handles deliveries that arrived together: in one transaction when they
/// all apply, otherwise each on its own through [`process`].
pub(super) async fn process_batch<H: Handler>(ctx: &Context<H>, deliveries: Vec<Delivery>) {
    if deliveries.len() == 1 {
        for delivery in deliveries {
            process(ctx, delivery).await;
        }
        return;
    }
    let started = Instant::now();
    let mut decoded: Vec<(Envelope, Delivery)> = Vec::with_capacity(deliveries.len());
    let mut single = Vec::new();
    for delivery in deliveries {
        match Envelope::from_bytes(&delivery.data) {
            // A retried message failed before and may again: it goes alone
            // rather than costing a whole batch a rollback.
            Ok(envelope) if envelope.attempt == 0 => decoded.push((envelope, delivery)),
            _ => single.push(delivery),
        }
    }
    // Same order in every batch, so two batches holding the same ids never
    // wait on each other's processed-message rows in opposite orders.
    decoded.sort_by_key(|(envelope, _)| envelope.id);
    let envelopes: Vec<&Envelope> = decoded.iter().map(|(e, _)| e).collect();
    match apply_batch(&ctx.pool, ctx.handler.as_ref(), &envelopes).await {
        Ok(applied) => {
            if applied.contains(&Applied::Now) && !H::EMITS.is_empty() {
                ctx.outbox.wake();
            }
            let seconds = started.elapsed().as_secs_f64();
            for ((_, delivery), outcome) in decoded.iter().zip(applied) {
                settle(delivery, true).await;
                let outcome = match outcome {
                    Applied::Now => "applied",
                    Applied::Before => "duplicate",
                };
                metrics::counter!("souk_messages_total", "group" => H::GROUP, "outcome" => outcome)
                    .increment(1);
                metrics::histogram!("souk_message_duration_seconds", "group" => H::GROUP)
                    .record(seconds);
            }
            metrics::histogram!("souk_batch_size", "group" => H::GROUP)
                .record(decoded.len() as f64);
        }
        Err(failure) => {
            tracing::debug!(
                group = H::GROUP,
                error = %failure.error(),
                size = decoded.len(),
                "batch failed; handling its messages one by one"
            );
            single.extend(decoded.into_iter().map(|(_, delivery)| delivery));
        }
    }
    for delivery in single {
        process(ctx, delivery).await;
    }
}

/// Where a failed message goes next.
enum Next {
    Retry { queue: String, delay_ms: u64 },
    Park { queue: String },
}

fn next_hop(names: &Names, group: &str, delays: &[u64], failure: &Failure, attempt: u32) -> Next {
    let park = Next::Park {
        queue: names.parking_queue(group),
    };
    match (failure, delays.get(attempt as usize)) {
        (Failure::Permanent(_), _) | (_, None) => park,
        (Failure::Transient(_), Some(&delay_ms)) => Next::Retry {
            queue: names.retry_queue(group, delay_ms),
            delay_ms,
        },
    }
}

/// Everything a delivery task needs, shared by the tasks of one session.
pub(super) struct Context<H> {
    pub handler: std::sync::Arc<H>,
    pub pool: PgPool,
    pub names: Names,
    pub retry_delays_ms: Vec<u64>,
    /// Confirm-mode channel for retries and parking.
    pub publisher: Channel,
    pub outbox: outbox::Waker,
}

/// Handles one delivery end to end. Never panics on broker errors: a failed
/// ack leaves the message unacked and the broker redelivers it, which the
/// processed-messages record makes harmless.
pub(super) async fn process<H: Handler>(ctx: &Context<H>, delivery: Delivery) {
    let started = Instant::now();
    let group = H::GROUP;
    let envelope = match Envelope::from_bytes(&delivery.data) {
        Ok(envelope) => envelope,
        Err(e) => {
            // Nothing to retry about bytes that do not parse: park them as-is.
            let error = format!("undecodable envelope: {e}");
            warn!(group, %error, "parking message");
            let headers = amqp::string_header(FieldTable::default(), amqp::ERROR_HEADER, &error);
            let props = delivery.properties.clone().with_headers(headers);
            let parked = ctx.names.parking_queue(group);
            let sent = amqp::send_to_queue(&ctx.publisher, &parked, &delivery.data, props).await;
            settle(&delivery, sent.is_ok()).await;
            metrics::counter!("souk_messages_total", "group" => group, "outcome" => "parked")
                .increment(1);
            return;
        }
    };

    let span = info_span!(
        "message",
        group,
        id = %envelope.id,
        r#type = %envelope.kind,
        attempt = envelope.attempt,
        correlation_id = %envelope.correlation_id,
    );
    let outcome = async {
        match apply_once(&ctx.pool, ctx.handler.as_ref(), &envelope).await {
            Ok(Applied::Now) => {
                tracing::debug!("applied");
                if !H::EMITS.is_empty() {
                    ctx.outbox.wake();
                }
                settle(&delivery, true).await;
                "applied"
            }
            Ok(Applied::Before) => {
                tracing::info!("duplicate delivery skipped");
                settle(&delivery, true).await;
                "duplicate"
            }
            Err(failure) => route_failure(ctx, &delivery, envelope.clone(), failure).await,
        }
    }
    .instrument(span)
    .await;

    metrics::counter!("souk_messages_total", "group" => group, "outcome" => outcome).increment(1);
    metrics::histogram!("souk_message_duration_seconds", "group" => group)
        .record(started.elapsed().as_secs_f64());
}

/// Republishes a failed message to its next hop, then acks the original.
/// If the republish is not confirmed the original is requeued instead, so
/// the message is never dropped.
async fn route_failure<H: Handler>(
    ctx: &Context<H>,
    delivery: &Delivery,
    mut envelope: Envelope,
    failure: Failure,
) -> &'static str {
    let error = format!("{:#}", failure.error());
    let hop = next_hop(
        &ctx.names,
        H::GROUP,
        &ctx.retry_delays_ms,
        &failure,
        envelope.attempt,
    );
    envelope.attempt += 1;
    let headers = amqp::string_header(FieldTable::default(), amqp::ERROR_HEADER, &error);
    let (queue, outcome) = match &hop {
        Next::Retry { queue, delay_ms } => {
            warn!(%error, delay_ms, next_attempt = envelope.attempt, "handler failed; will retry");
            (queue, "retried")
        }
        Next::Park { queue } => {
            warn!(%error, attempts = envelope.attempt, "handler failed; parking message");
            (queue, "parked")
        }
    };
    let headers = amqp::string_header(headers, amqp::ORIGIN_HEADER, &ctx.names.queue(H::GROUP));
    let sent = amqp::send_envelope(&ctx.publisher, queue, &envelope, headers).await;
    if let Err(e) = &sent {
        warn!(error = %e, "could not republish failed message; requeueing it");
    }
    settle(delivery, sent.is_ok()).await;
    outcome
}

/// Acks the delivery, or nacks it back onto its queue.
async fn settle(delivery: &Delivery, ack: bool) {
    let result = if ack {
        delivery.ack(BasicAckOptions::default()).await
    } else {
        delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
    };
    if let Err(e) = result {
        // The channel is gone; the broker will redeliver and dedupe absorbs it.
        warn!(error = %e, "could not settle delivery; it will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_walk_the_delays_then_park() {
        let names = Names::new("t");
        let delays = [100, 1000];
        let transient = || Failure::transient(anyhow::anyhow!("down"));
        let queue_of = |hop: Next| match hop {
            Next::Retry { queue, .. } => format!("retry:{queue}"),
            Next::Park { queue } => format!("park:{queue}"),
        };
        assert_eq!(
            queue_of(next_hop(&names, "g", &delays, &transient(), 0)),
            "retry:t.g.retry.100ms"
        );
        assert_eq!(
            queue_of(next_hop(&names, "g", &delays, &transient(), 1)),
            "retry:t.g.retry.1000ms"
        );
        assert_eq!(
            queue_of(next_hop(&names, "g", &delays, &transient(), 2)),
            "park:t.g.parked"
        );
        let permanent = Failure::permanent(anyhow::anyhow!("bad"));
        assert_eq!(
            queue_of(next_hop(&names, "g", &delays, &permanent, 0)),
            "park:t.g.parked"
        );
    }
}
