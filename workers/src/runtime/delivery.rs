//! Processing of one delivery: dedupe, handle, commit, ack; or retry / park.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
    types::FieldTable,
};
use souk_shared::{amqp, envelope::Envelope, outbox, topology::Names};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use super::{Failure, Handler};

/// What [`apply_once`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The effect was committed together with the processed-message record.
    Now,
    /// The message had been processed before; nothing was done.
    Before,
    /// Another consumer holds a live lease on the message (a copy of it is
    /// being handled right now): nothing was done. Not a failure of this
    /// message: the caller tries it again later without counting an attempt.
    Held,
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

async fn is_processed(pool: &PgPool, group: &str, envelope: &Envelope) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM processed_messages WHERE consumer = $1 AND message_id = $2)",
    )
    .bind(group)
    .bind(envelope.id)
    .fetch_one(pool)
    .await
}

/// What taking the lease found.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    /// This consumer holds the lease now, until the time given: that value
    /// identifies its claim (a later holder's ends later), so it releases
    /// only its own.
    Taken(DateTime<Utc>),
    /// Another consumer holds a live one.
    Held,
    /// The message was processed before: nothing to do, no lease taken.
    Done,
}

/// Takes the lease on a message, unless it was processed before or another
/// consumer holds a live lease.
///
/// Both questions are asked in one statement, so a processed message costs
/// one round trip. But that statement sees the processed rows of one
/// snapshot, taken before its insert may wait on a holder's claim: a holder
/// that commits its processed row (and deletes its claim) meanwhile lets the
/// insert through with the old snapshot still saying "not processed". So a
/// taken lease is followed by a second look in a new statement (a new
/// snapshot, which sees that commit), and given back if the message was
/// processed after all: otherwise this copy would repeat `prepare` (send the
/// mail again).
async fn claim(
    pool: &PgPool,
    group: &str,
    envelope: &Envelope,
    lease: Duration,
) -> sqlx::Result<Claim> {
    let (done, taken): (bool, Option<DateTime<Utc>>) = sqlx::query_as(
        "WITH done AS (
             SELECT EXISTS (SELECT 1 FROM processed_messages WHERE consumer = $1 AND message_id = $2) AS yes),
         taken AS (
             INSERT INTO message_claims (consumer, message_id, claimed_until)
             SELECT $1, $2, now() + make_interval(secs => $3) FROM done WHERE NOT done.yes
             ON CONFLICT (consumer, message_id) DO UPDATE SET claimed_until = EXCLUDED.claimed_until
             WHERE message_claims.claimed_until < now()
             RETURNING claimed_until)
         SELECT (SELECT yes FROM done), (SELECT claimed_until FROM taken)",
    )
    .bind(group)
    .bind(envelope.id)
    .bind(lease.as_secs_f64())
    .fetch_one(pool)
    .await?;
    let until = match (done, taken) {
        (true, _) => return Ok(Claim::Done),
        (false, None) => return Ok(Claim::Held),
        (false, Some(until)) => until,
    };
    if is_processed(pool, group, envelope).await? {
        let mut conn = pool.acquire().await?;
        release(&mut conn, group, envelope, until).await?;
        return Ok(Claim::Done);
    }
    Ok(Claim::Taken(until))
}

/// Deletes this holder's claim: the one ending at `until`. A holder whose
/// lease expired (and was taken over) finds nothing to delete and leaves the
/// new holder's claim alone.
async fn release(
    conn: &mut PgConnection,
    group: &str,
    envelope: &Envelope,
    until: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM message_claims WHERE consumer = $1 AND message_id = $2 AND claimed_until = $3",
    )
    .bind(group)
    .bind(envelope.id)
    .bind(until)
    .execute(conn)
    .await?;
    Ok(())
}

/// How often the apply transaction is tried after a `prepare` under a
/// lease succeeded, and the first pause between tries (doubling).
const APPLY_TRIES: u32 = 3;
const APPLY_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Applies `envelope` through `handler` at most once per consumer group.
///
/// The processed-message row is inserted first in the handler's transaction:
/// a concurrent duplicate blocks on its primary key until the first commits,
/// then finds the row and backs off. Handlers with a [`Handler::prepare_lease`]
/// also claim the message before `prepare`, so a duplicate handled at the same
/// time never repeats the outside call: it gets [`Applied::Held`].
pub async fn apply_once<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelope: &Envelope,
) -> Result<Applied, Failure> {
    let Some(lease) = handler.prepare_lease() else {
        let prepared = handler.prepare(envelope).await?;
        return apply_tx(pool, handler, envelope, None, prepared)
            .await
            .map_err(|(failure, _)| failure);
    };
    let until = match claim(pool, H::GROUP, envelope, lease).await? {
        Claim::Taken(until) => until,
        Claim::Done => return Ok(Applied::Before),
        Claim::Held => return Ok(Applied::Held),
    };
    let outcome = prepare_and_apply(pool, handler, envelope, until).await;
    if !matches!(outcome, Ok(Applied::Now)) {
        // Let a retry take it at once. (On success the claim went with the
        // commit.) If even this fails, the lease simply runs out.
        let released = async {
            let mut conn = pool.acquire().await?;
            release(&mut conn, H::GROUP, envelope, until).await
        };
        if let Err(e) = released.await {
            warn!(group = H::GROUP, error = %e, "could not release a claim; it will expire");
        }
    }
    outcome
}

/// `prepare` under the lease ending at `until`, then the apply transaction.
/// Once `prepare` made its outside call, giving the message up over a
/// database hiccup would have its retry make the call again (send the mail
/// twice): the transaction is tried again in place, with the same prepared
/// value, a few times first.
async fn prepare_and_apply<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelope: &Envelope,
    until: DateTime<Utc>,
) -> Result<Applied, Failure> {
    let mut prepared = handler.prepare(envelope).await?;
    let mut pause = APPLY_RETRY_PAUSE;
    let mut tries = 1;
    loop {
        let spare = handler.copy_prepared(&prepared);
        let (failure, back) = match apply_tx(pool, handler, envelope, Some(until), prepared).await {
            Ok(applied) => return Ok(applied),
            Err(failed) => failed,
        };
        match back.or(spare) {
            Some(again) if tries < APPLY_TRIES && is_database(&failure) => {
                warn!(
                    group = H::GROUP,
                    error = %failure.error(),
                    tries,
                    "the effect of a prepared message could not be written; trying again"
                );
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
                prepared = again;
            }
            _ => return Err(failure),
        }
    }
}

/// A failure from the database itself (connection lost, pool exhausted,
/// serialization failure): worth trying the same transaction again at once.
/// A handler's own refusal, transient or not, is not.
fn is_database(failure: &Failure) -> bool {
    matches!(failure, Failure::Transient(e) if e.downcast_ref::<sqlx::Error>().is_some())
}

/// One apply transaction: the processed row, the handler's effect and (for a
/// claimed message) the claim's removal, committed together. A failure before
/// `apply` took the prepared value hands it back, so it can be tried again.
async fn apply_tx<H: Handler>(
    pool: &PgPool,
    handler: &H,
    envelope: &Envelope,
    claim: Option<DateTime<Utc>>,
    prepared: H::Prepared,
) -> Result<Applied, (Failure, Option<H::Prepared>)> {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return Err((e.into(), Some(prepared))),
    };
    match record_processed(&mut tx, H::GROUP, envelope).await {
        Ok(true) => {}
        Ok(false) => return Ok(Applied::Before),
        Err(e) => return Err((e.into(), Some(prepared))),
    }
    let effect = async move {
        // A message alone takes its batch locks too where `apply` counts on
        // them whichever way the message came (`Handler::LOCKS_ALONE`).
        if H::LOCKS_ALONE {
            handler.lock_batch(&mut tx, &[envelope]).await?;
        }
        handler.apply(&mut tx, envelope, prepared).await?;
        if let Some(until) = claim {
            release(&mut tx, H::GROUP, envelope, until).await?;
        }
        tx.commit().await?;
        Ok(Applied::Now)
    };
    effect.await.map_err(|failure| (failure, None))
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
                    Applied::Held => unreachable!("batches are only for handlers without a lease"),
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
    /// Cancelled by [`republish`] once a failed message could not be handed
    /// to its retry or parking queue. The session watches it and ends, so the
    /// supervisor reconnects with fresh channels and a redeclared topology.
    pub stranded: CancellationToken,
}

/// Handles one delivery end to end. Never panics on broker errors: a failed
/// ack leaves the message unacked and the broker redelivers it, which the
/// processed-messages record makes harmless.
pub(super) async fn process<H: Handler>(ctx: &Context<H>, delivery: Delivery) {
    if ctx.stranded.is_cancelled() {
        // This session can no longer move a failure on, and is ending:
        // handling the message here could only repeat its outside call for
        // nothing. It is handled again after the reconnect.
        settle(&delivery, false).await;
        return;
    }
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
            let sent = republish(ctx, &parked, &delivery.data, props).await;
            if let Err(e) = &sent {
                warn!(group, error = %e, "could not park an undecodable message; requeueing it");
            }
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
            Ok(Applied::Held) => defer(ctx, &delivery, envelope.clone()).await,
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
/// the message is never dropped, and the session ends (see [`republish`]).
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
    let sent = republish_envelope(ctx, queue, &envelope, headers).await;
    if let Err(e) = &sent {
        warn!(error = %e, "could not republish failed message; requeueing it");
    }
    settle(delivery, sent.is_ok()).await;
    outcome
}

/// Sends a message another consumer holds the lease on to the retry queue
/// of its current attempt, with its attempt unchanged: the copy being handled
/// is no failure of this one, so however long it takes this copy never uses
/// up its attempts and is never parked for it (a parked copy, replayed after
/// the processed record was purged, would be applied a second time). When it
/// comes back the holder has finished (it is acked as a duplicate) or died
/// (its lease ran out and this copy takes over).
async fn defer<H: Handler>(
    ctx: &Context<H>,
    delivery: &Delivery,
    envelope: Envelope,
) -> &'static str {
    let delays = &ctx.retry_delays_ms;
    let Some(&delay_ms) = delays.get(envelope.attempt as usize).or(delays.last()) else {
        // No retry queues at all: nowhere to wait but the failure path.
        let failure =
            Failure::transient(anyhow::anyhow!("another consumer is handling this message"));
        return route_failure(ctx, delivery, envelope, failure).await;
    };
    tracing::info!(
        delay_ms,
        "another consumer holds this message; will look again"
    );
    let queue = ctx.names.retry_queue(H::GROUP, delay_ms);
    let headers = amqp::string_header(
        FieldTable::default(),
        amqp::ERROR_HEADER,
        "another consumer is handling this message",
    );
    let headers = amqp::string_header(headers, amqp::ORIGIN_HEADER, &ctx.names.queue(H::GROUP));
    let sent = republish_envelope(ctx, &queue, &envelope, headers).await;
    if let Err(e) = &sent {
        warn!(error = %e, "could not republish a held message; requeueing it");
    }
    settle(delivery, sent.is_ok()).await;
    "held"
}

/// Hands a message to a retry or parking queue on the session's publisher
/// channel, confirmed. When that channel is closed or the send is refused
/// (or comes back unroutable) while the consumer channel lives on, the
/// caller requeues the original, the broker redelivers it at once, and it
/// would fail the same way again: a tight loop repeating the handler's
/// outside call (another mail sent) until the broker's delivery limit parks
/// the message without its error. So the first such failure marks the
/// session stranded: it takes nothing more and ends, and the supervisor
/// reconnects, with new channels and the topology (retry and parking queues
/// included) declared again.
async fn republish<H>(
    ctx: &Context<H>,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), lapin::Error> {
    let sent = if ctx.publisher.status().connected() {
        amqp::send_to_queue(&ctx.publisher, queue, body, props).await
    } else {
        Err(lapin::Error::from(std::io::Error::other(
            "the publisher channel is closed",
        )))
    };
    if sent.is_err() {
        // Before the caller's nack: the session loop must see it before the
        // redelivered copy.
        ctx.stranded.cancel();
    }
    sent
}

/// [`republish`] for an envelope, with its standard properties.
async fn republish_envelope<H>(
    ctx: &Context<H>,
    queue: &str,
    envelope: &Envelope,
    headers: FieldTable,
) -> Result<(), lapin::Error> {
    let id = envelope.id.to_string();
    let props = amqp::properties(&id, &envelope.kind, &envelope.correlation_id, headers);
    republish(ctx, queue, &envelope.to_bytes(), props).await
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
