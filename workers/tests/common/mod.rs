//! A test consumer group and a harness around one test's database and broker prefix.
#![allow(dead_code)]

use std::time::Duration;

use lapin::{BasicProperties, Connection, types::FieldTable};
use serde::{Deserialize, Serialize};
use souk_shared::{
    amqp,
    envelope::{Contract, Envelope},
    outbox,
    topology::{self, Group, Names},
};
use souk_testkit::{TestDb, amqp_url, broker, unique_prefix};
use souk_workers::{
    ops::Readiness,
    relay::{self, RelaySettings},
    runtime::{self, ConsumerSettings, Failure, Handler},
};
use sqlx::PgConnection;
use tokio::{
    process::{Child, Command},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// The test contract: `fail_attempts` makes the handler fail that many
/// deliveries; `sleep_ms` keeps it busy inside its transaction.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Recorded {
    pub key: String,
    #[serde(default)]
    pub fail_attempts: u32,
    #[serde(default)]
    pub sleep_ms: u64,
}

impl Contract for Recorded {
    const TYPE: &'static str = "test.recorded";
    const VERSION: u16 = 1;
}

impl Recorded {
    pub fn key(key: &str) -> Self {
        Self {
            key: key.into(),
            ..Default::default()
        }
    }
}

/// Writes one `effects` row per applied message. The table has no unique
/// key, so a message applied twice shows up as two rows.
pub struct Recorder;

impl Handler for Recorder {
    type Prepared = ();
    const GROUP: &'static str = "recorder";
    const BINDINGS: &'static [&'static str] = &["test.*"];

    async fn prepare(&self, _: &Envelope) -> Result<(), Failure> {
        Ok(())
    }

    async fn apply(&self, tx: &mut PgConnection, msg: &Envelope, _: ()) -> Result<(), Failure> {
        let r: Recorded = msg.payload().map_err(Failure::permanent)?;
        if r.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(r.sleep_ms)).await;
        }
        if msg.attempt < r.fail_attempts {
            return Err(Failure::transient(anyhow::anyhow!(
                "planned failure on attempt {}",
                msg.attempt
            )));
        }
        let broken: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM broken WHERE key = $1)")
                .bind(&r.key)
                .fetch_one(&mut *tx)
                .await?;
        if broken {
            return Err(Failure::transient(anyhow::anyhow!(
                "key {} is broken",
                r.key
            )));
        }
        sqlx::query("INSERT INTO effects (message_id, key, attempt) VALUES ($1, $2, $3)")
            .bind(msg.id)
            .bind(&r.key)
            .bind(msg.attempt as i32)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

pub const DELAYS: &[u64] = &[100, 200];

pub struct Harness {
    pub db: TestDb,
    pub prefix: String,
    pub names: Names,
    /// The test's own broker connection (not the consumer's).
    pub amqp: Connection,
    pub shutdown: CancellationToken,
    /// Wakes the relays after [`Harness::change`] commits, as the API does.
    pub waker: outbox::Waker,
}

impl Harness {
    pub async fn new() -> Self {
        let db = TestDb::new().await;
        sqlx::query(
            "CREATE TABLE effects (message_id uuid NOT NULL, key text NOT NULL, attempt int NOT NULL,
                                   applied_at timestamptz NOT NULL DEFAULT clock_timestamp())",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("CREATE TABLE changes (key text PRIMARY KEY)")
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE broken (key text PRIMARY KEY)")
            .execute(&db.pool)
            .await
            .unwrap();
        let prefix = unique_prefix();
        let amqp = amqp::connect(&amqp_url(), &format!("{prefix}-test"))
            .await
            .unwrap();
        let names = Names::new(&prefix);
        // Declare up front so messages published before a consumer starts are kept.
        let channel = amqp.create_channel().await.unwrap();
        topology::declare_group(&channel, &names, &Self::group())
            .await
            .unwrap();
        Self {
            waker: outbox::Waker::spawn(db.pool.clone()),
            db,
            prefix,
            names,
            amqp,
            shutdown: CancellationToken::new(),
        }
    }

    pub fn group() -> Group {
        Group {
            name: Recorder::GROUP,
            bindings: Recorder::BINDINGS,
            retry_delays_ms: DELAYS.to_vec(),
        }
    }

    pub fn consumer_settings(&self, url: &str, concurrency: usize) -> ConsumerSettings {
        ConsumerSettings {
            amqp_url: url.into(),
            names: self.names.clone(),
            prefetch: 16,
            concurrency,
            batch: 8,
            retry_delays_ms: DELAYS.to_vec(),
            connection_name: format!("{}.recorder@test", self.prefix),
            processed_retention: Duration::from_secs(3600),
        }
    }

    /// Runs the recorder consumer until the harness shuts down.
    pub fn spawn_consumer(&self, concurrency: usize) -> (JoinHandle<()>, Readiness) {
        self.spawn_handler(Recorder, self.consumer_settings(&amqp_url(), concurrency))
    }

    pub fn spawn_handler<H: Handler>(
        &self,
        handler: H,
        settings: ConsumerSettings,
    ) -> (JoinHandle<()>, Readiness) {
        let readiness = Readiness::default();
        let task = tokio::spawn(runtime::run(
            handler,
            self.db.pool.clone(),
            settings,
            readiness.clone(),
            self.shutdown.clone(),
        ));
        (task, readiness)
    }

    pub fn relay_settings(&self, url: &str, batch_size: i64) -> RelaySettings {
        RelaySettings {
            amqp_url: url.into(),
            names: self.names.clone(),
            batch_size,
            poll_interval: Duration::from_secs(2),
            coalesce: Duration::ZERO,
            retention_hours: 24,
            connection_name: format!("{}.relay@test", self.prefix),
        }
    }

    pub fn spawn_relay(&self, url: &str, batch_size: i64) -> JoinHandle<()> {
        tokio::spawn(relay::run(
            self.db.pool.clone(),
            self.relay_settings(url, batch_size),
            Readiness::default(),
            self.shutdown.clone(),
        ))
    }

    /// Writes a domain row (`changes`) and its outbox message in one
    /// transaction, then commits it or rolls it back.
    pub async fn change(&self, payload: &Recorded, commit: bool) -> Envelope {
        let envelope = Envelope::new(payload, "test-correlation");
        let mut tx = self.db.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO changes (key) VALUES ($1)")
            .bind(&payload.key)
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox::enqueue(&mut tx, &envelope).await.unwrap();
        if commit {
            tx.commit().await.unwrap();
            self.waker.wake();
        } else {
            tx.rollback().await.unwrap();
        }
        envelope
    }

    pub async fn commit(&self, payload: &Recorded) -> Envelope {
        self.change(payload, true).await
    }

    /// Publishes straight to the events exchange, bypassing the outbox.
    pub async fn publish(&self, envelope: &Envelope) {
        let channel = amqp::confirm_channel(&self.amqp).await.unwrap();
        let props = amqp::properties(
            &envelope.id.to_string(),
            &envelope.kind,
            &envelope.correlation_id,
            FieldTable::default(),
        );
        let confirm = amqp::publish(
            &channel,
            &self.names.events_exchange(),
            &envelope.kind,
            &envelope.to_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
        assert!(confirm.is_ack());
        channel.close(200, "done".into()).await.unwrap();
    }

    /// Publishes raw bytes to the group's queue.
    pub async fn publish_raw(&self, body: &[u8]) {
        let channel = amqp::confirm_channel(&self.amqp).await.unwrap();
        amqp::send_to_queue(
            &channel,
            &self.names.queue(Recorder::GROUP),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }

    pub async fn effects_for(&self, key: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE key = $1")
            .bind(key)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    pub async fn effects(&self) -> i64 {
        souk_testkit::count(&self.db.pool, "SELECT count(*) FROM effects").await
    }

    pub async fn ready(&self, queue: &str) -> u32 {
        broker::ready_count(&self.amqp, queue).await
    }

    /// A queue that sees every `test.*` publish on the events exchange,
    /// duplicates included (nothing de-duplicates there), already consuming.
    pub async fn tap(&self) -> lapin::Consumer {
        use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
        let channel = self.amqp.create_channel().await.unwrap();
        let queue = format!("{}.tap", self.prefix);
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), exclusive, FieldTable::default())
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                self.names.events_exchange().into(),
                "test.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        channel
            .basic_consume(
                queue.as_str().into(),
                "tap".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    /// Stops every task the harness started and removes the test's queues.
    pub async fn finish(self, tasks: Vec<JoinHandle<()>>) {
        self.shutdown.cancel();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        broker::delete_group(&self.amqp, &self.names, Recorder::GROUP, DELAYS).await;
        let _ = self.amqp.close(200, "done".into()).await;
    }
}

/// Starts a real worker binary against the harness's database and prefix,
/// with nothing from the environment but what is given here.
pub fn spawn(bin: &str, h: &Harness, extra: &[(&str, String)]) -> Child {
    Command::new(bin)
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env("DATABASE_URL", &h.db.url)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_PREFIX", &h.prefix)
        .env("OPS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts")
}

/// Counts message ids from a [`Harness::tap`] until `n` distinct ids came
/// and then nothing more for 700 ms (so late duplicates are counted too).
pub async fn tapped(
    tap: &mut lapin::Consumer,
    n: usize,
) -> std::collections::HashMap<String, usize> {
    use futures_util::StreamExt;
    let mut ids = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let idle = if ids.len() < n {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(700)
        };
        match tokio::time::timeout(idle, tap.next()).await {
            Ok(Some(Ok(d))) => {
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .expect("message id")
                    .to_string();
                *ids.entry(id).or_default() += 1;
            }
            _ if ids.len() >= n || tokio::time::Instant::now() > deadline => return ids,
            _ => {}
        }
    }
}

/// The recorder's group as a handler with an outside call: it holds a lease
/// while it prepares, counts its prepares (the outside calls), and can be
/// made to sleep in `prepare` or to fail its transaction.
#[derive(Clone, Default)]
pub struct Leased {
    pub lease: Duration,
    /// How long each `prepare` takes.
    pub prepare_sleep: Duration,
    /// `prepare` sleeps, then fails transiently.
    pub prepare_fails: bool,
    /// The next this many `apply`s fail on the database.
    pub db_failures: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Every `apply` fails permanently.
    pub apply_refuses: bool,
    pub prepares: std::sync::Arc<std::sync::atomic::AtomicU32>,
    pub applies: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Leased {
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            ..Default::default()
        }
    }

    pub fn prepares(&self) -> u32 {
        self.prepares.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn applies(&self) -> u32 {
        self.applies.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Handler for Leased {
    /// Which prepare this was (1, 2, ...).
    type Prepared = u32;
    const GROUP: &'static str = Recorder::GROUP;
    const BINDINGS: &'static [&'static str] = Recorder::BINDINGS;

    fn prepare_lease(&self) -> Option<Duration> {
        Some(self.lease)
    }

    async fn prepare(&self, _: &Envelope) -> Result<u32, Failure> {
        use std::sync::atomic::Ordering;
        let n = self.prepares.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(self.prepare_sleep).await;
        if self.prepare_fails {
            return Err(Failure::transient(anyhow::anyhow!(
                "planned prepare failure"
            )));
        }
        Ok(n)
    }

    fn copy_prepared(&self, n: &u32) -> Option<u32> {
        Some(*n)
    }

    async fn apply(&self, tx: &mut PgConnection, msg: &Envelope, _: u32) -> Result<(), Failure> {
        use std::sync::atomic::Ordering;
        self.applies.fetch_add(1, Ordering::SeqCst);
        if self.apply_refuses {
            return Err(Failure::permanent(anyhow::anyhow!("planned refusal")));
        }
        let fail = self
            .db_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            // A real error from the database, as a dropped connection gives.
            sqlx::query("SELECT 1 / 0").execute(&mut *tx).await?;
        }
        Recorder.apply(tx, msg, ()).await
    }
}

/// The recorder's group, counting how many messages it has in hand at once:
/// each `prepare` sleeps the message's `sleep_ms` (outside any transaction,
/// before the duplicate check, so a redelivered copy counts too) and, when
/// [`Overlap::gated`], then waits for [`Overlap::open`], so a test can act
/// while a message is surely in hand however slow the machine is.
#[derive(Clone, Default)]
pub struct Overlap {
    now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: Option<CancellationToken>,
}

impl Overlap {
    pub fn gated() -> Self {
        Self {
            gate: Some(CancellationToken::new()),
            ..Self::default()
        }
    }
    /// Lets every handling held at the gate, and every later one, go on.
    pub fn open(&self) {
        if let Some(gate) = &self.gate {
            gate.cancel();
        }
    }
    pub fn now(&self) -> usize {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// The most it ever had in hand at once.
    pub fn most(&self) -> usize {
        self.most.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Handler for Overlap {
    type Prepared = ();
    const GROUP: &'static str = Recorder::GROUP;
    const BINDINGS: &'static [&'static str] = Recorder::BINDINGS;

    async fn prepare(&self, msg: &Envelope) -> Result<(), Failure> {
        use std::sync::atomic::Ordering;
        let r: Recorded = msg.payload().map_err(Failure::permanent)?;
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(r.sleep_ms)).await;
        if let Some(gate) = &self.gate {
            gate.cancelled().await;
        }
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    async fn apply(&self, tx: &mut PgConnection, msg: &Envelope, _: ()) -> Result<(), Failure> {
        sqlx::query("INSERT INTO effects (message_id, key, attempt) VALUES ($1, $2, $3)")
            .bind(msg.id)
            .bind(msg.payload::<Recorded>().map_err(Failure::permanent)?.key)
            .bind(msg.attempt as i32)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// The broker's ids (Erlang pids) of the connections whose client-provided
/// name contains `needle`: a consumer that reconnected shows a new one.
pub async fn connection_pids(needle: &str) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .await
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}
