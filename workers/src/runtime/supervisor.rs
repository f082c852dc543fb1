//! Keeps one consumer alive across broker restarts and dropped connections.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Channel, Connection,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::FieldTable,
};
use souk_shared::{
    amqp,
    topology::{self, Group, Names},
};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Handler, delivery};
use crate::ops::Readiness;

/// How a consumer connects and how much it takes on at once.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub amqp_url: String,
    pub names: Names,
    /// Messages the broker may send ahead of acks (basic.qos).
    pub prefetch: u16,
    /// Transactions run at the same time; each holds at most one pool connection.
    pub concurrency: usize,
    /// Most messages applied in one transaction when several are waiting.
    pub batch: usize,
    /// Delay before attempt N+1; after the last, the message is parked.
    pub retry_delays_ms: Vec<u64>,
    /// Shown in `rabbitmqctl list_connections`.
    pub connection_name: String,
    /// How long processed-message records are kept (see [`super::retention`]).
    pub processed_retention: Duration,
}

/// Backoff between reconnects: doubles from 250 ms up to 15 s.
struct Backoff(Duration);
impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(15);
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        now
    }
    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

/// A stranded session that had run at least this long was no tight loop:
/// the backoff starts over after it.
const STEADY: Duration = Duration::from_secs(60);

/// How a session that got as far as consuming ended.
enum Ended {
    /// Shutdown was asked for; the messages in flight were drained.
    Shutdown,
    /// The connection or the consumer channel went away.
    Lost(lapin::Error),
    /// A failed message could not be republished to its retry or parking
    /// queue (see [`delivery::Context::stranded`]); the session drained what
    /// it had in hand and closed its connection.
    Stranded,
}

/// Runs `handler` until `shutdown` is cancelled, reconnecting as needed.
///
/// On shutdown it stops taking messages, lets the ones in flight finish and
/// be acked, then closes the connection.
pub async fn run<H: Handler>(
    handler: H,
    pool: PgPool,
    settings: ConsumerSettings,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let housekeeping =
        super::retention::spawn_hourly(pool.clone(), H::GROUP, settings.processed_retention);
    let lasting = Lasting {
        handler: Arc::new(handler),
        outbox: souk_shared::outbox::Waker::spawn(pool.clone()),
        pool,
        // One set of slots for the consumer's whole life, not one per
        // session: the tasks of a session whose connection was lost still
        // run (their acks will fail and the broker redeliver), and they keep
        // their slots, so the next session never has more than
        // `concurrency` messages in hand in all.
        slots: Arc::new(Semaphore::new(settings.concurrency)),
    };
    let mut backoff = Backoff(Backoff::FIRST);
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let result = session(&lasting, &settings, &readiness, &shutdown).await;
        readiness.set_broker(false);
        let wait = match result {
            Ok(Ended::Shutdown) => break,
            Ok(Ended::Lost(e)) => {
                // It had connected: the next attempt comes soon again.
                backoff.reset();
                let wait = backoff.next();
                warn!(group = H::GROUP, error = %e, ?wait, "consumer lost its broker; reconnecting");
                wait
            }
            Ok(Ended::Stranded) => {
                // Not reset at once: a broker that keeps refusing the
                // republish would otherwise have each failing message
                // handled (its outside call made) again every 250 ms.
                if started.elapsed() >= STEADY {
                    backoff.reset();
                }
                let wait = backoff.next();
                warn!(
                    group = H::GROUP,
                    ?wait,
                    "consumer could not republish a failed message; reconnecting"
                );
                wait
            }
            Err(e) => {
                let wait = backoff.next();
                warn!(group = H::GROUP, error = %e, ?wait, "consumer lost its broker; reconnecting");
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    housekeeping.abort();
    info!(group = H::GROUP, "consumer stopped");
}

/// What outlives a session: kept by [`run`] across reconnects.
struct Lasting<H> {
    handler: Arc<H>,
    pool: PgPool,
    outbox: souk_shared::outbox::Waker,
    /// Permits for the messages in hand, `concurrency` in all.
    slots: Arc<Semaphore>,
}

/// One connection's lifetime. `Err` means it never got to consuming.
async fn session<H: Handler>(
    lasting: &Lasting<H>,
    settings: &ConsumerSettings,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<Ended, lapin::Error> {
    let conn = amqp::connect(&settings.amqp_url, &settings.connection_name).await?;
    let publisher = amqp::confirm_channel(&conn).await?;
    let group = Group {
        name: H::GROUP,
        bindings: H::BINDINGS,
        retry_delays_ms: settings.retry_delays_ms.clone(),
    };
    topology::declare_group(&publisher, &settings.names, &group).await?;

    let channel = conn.create_channel().await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let queue = settings.names.queue(H::GROUP);
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            settings.connection_name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(group = H::GROUP, %queue, "consuming");
    readiness.set_broker(true);

    let depth = spawn_depth_gauge(publisher.clone(), queue.clone());
    let Lasting {
        handler,
        pool,
        outbox,
        slots,
    } = lasting;
    let ctx = Arc::new(delivery::Context {
        handler: handler.clone(),
        pool: pool.clone(),
        names: settings.names.clone(),
        retry_delays_ms: settings.retry_delays_ms.clone(),
        publisher,
        outbox: outbox.clone(),
        stranded: CancellationToken::new(),
    });

    // Handlers with an outside call take messages one at a time (each under
    // its own lease); the others take whatever is waiting, up to the batch size.
    let max_batch = if handler.prepare_lease().is_some() {
        1
    } else {
        settings.batch.max(1)
    };
    let ended = loop {
        // Biased: once stranded, a failed message's redelivered copy may be
        // waiting in the consumer already; it must not be taken.
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ended::Shutdown,
            _ = ctx.stranded.cancelled() => break Ended::Stranded,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => break Ended::Lost(e),
                None => break Ended::Lost(lapin::Error::from(std::io::Error::other("consumer was cancelled by the broker"))),
            }
        };
        // While every slot is busy, more messages arrive and the next batch grows.
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        if ctx.stranded.is_cancelled() {
            // Stranded while waiting for the slot: `first` is left unacked
            // and returns to the queue when the connection closes.
            break Ended::Stranded;
        }
        let mut batch = vec![first];
        let mut lost = None;
        while batch.len() < max_batch {
            match consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                Some(Some(Err(e))) => {
                    lost = Some(e);
                    break;
                }
                _ => break, // nothing more waiting
            }
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            delivery::process_batch(&ctx, batch).await;
            drop(permit);
        });
        if let Some(e) = lost {
            break Ended::Lost(e);
        }
    };
    depth.abort();
    match ended {
        // A stranded session's consumer channel still works: its messages
        // in flight finish and are acked (or requeued) as on shutdown, and
        // the connection is closed so nothing stays held by it.
        Ended::Shutdown | Ended::Stranded => drain(&channel, &conn, slots, settings).await,
        Ended::Lost(_) => {}
    }
    Ok(ended)
}

/// Graceful stop: cancel the consumer so nothing new arrives, wait for the
/// in-flight messages to be acked, then close. Unacked prefetched messages
/// return to the queue when the channel closes.
async fn drain(
    channel: &Channel,
    conn: &Connection,
    slots: &Semaphore,
    settings: &ConsumerSettings,
) {
    let _ = channel
        .basic_cancel(
            settings.connection_name.as_str().into(),
            BasicCancelOptions::default(),
        )
        .await;
    let _ = slots.acquire_many(settings.concurrency as u32).await;
    let _ = conn.close(200, "shutting down".into()).await;
}

/// Exports the queue's depth every few seconds, for autoscalers.
fn spawn_depth_gauge(channel: Channel, queue: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
            {
                Ok(q) => metrics::gauge!("souk_queue_depth", "queue" => queue.clone())
                    .set(q.message_count() as f64),
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
}
