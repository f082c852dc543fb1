//! Workload B: outbox insert to committed consumer effect.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use souk_shared::{
    amqp, db,
    envelope::Envelope,
    outbox,
    topology::{self, Group, Names},
};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::{process::Child, sync::Mutex};
use uuid::Uuid;

use crate::{
    sink::{GROUP, Tick},
    stats::{self, Figure},
};

pub struct Options {
    pub messages: u64,
    pub producers: u64,
    pub rate: u64,
    pub seconds: u64,
    pub label: String,
    pub run: u32,
}

const PREFIX: &str = "soukbench";
const RETRY_DELAYS: &str = "1000,10000,60000";

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Commit times by message id, taken right after each commit returned.
type Commits = Arc<Mutex<HashMap<Uuid, DateTime<Utc>>>>;

/// Two figures: throughput (`B`, with its latency under that load) and
/// latency at a fixed rate below saturation (`B-latency`).
pub async fn run(opts: Options) -> anyhow::Result<Vec<Figure>> {
    let admin = env(
        "BENCH_ADMIN_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let amqp_url = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    // A database of its own: never the one a running system uses.
    let db_url = fresh_database(&admin, "souk_bench_backbone").await?;
    // Small pools: this runs beside a whole system (bench/run.sh) within
    // PostgreSQL's 100 connections.
    let pool = db::pool(&db_url, u32::try_from(opts.producers)? + 2)?;
    db::migrate(&pool).await?;
    sqlx::query(
        "CREATE TABLE bench_effects (message_id uuid NOT NULL, applied_at timestamptz NOT NULL)",
    )
    .execute(&pool)
    .await?;

    // A clean topology for the bench prefix.
    let conn = amqp::connect(&amqp_url, "souk-bench").await?;
    let channel = conn.create_channel().await?;
    let names = Names::new(PREFIX);
    let group = Group {
        name: GROUP,
        bindings: &["bench.*"],
        retry_delays_ms: RETRY_DELAYS
            .split(',')
            .map(|d| d.parse().unwrap())
            .collect(),
    };
    let _ = channel
        .queue_purge(names.queue(GROUP).as_str().into(), Default::default())
        .await;
    let channel = conn.create_channel().await?;
    topology::declare_group(&channel, &names, &group).await?;

    let mut children = vec![
        spawn("outbox-relay", &[], &db_url, &amqp_url, 4)?,
        spawn("souk-bench", &["sink"], &db_url, &amqp_url, 20)?,
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;

    eprintln!(
        "B: {} messages from {} producers, then {} msg/s for {} s",
        opts.messages, opts.producers, opts.rate, opts.seconds
    );
    let figure = |workload: &str, per_sec: f64, count: u64, (p50, p99): (f64, f64), notes| Figure {
        workload: workload.into(),
        label: opts.label.clone(),
        run: opts.run,
        at: stats::now(),
        throughput: per_sec,
        unit: "msg/s".into(),
        count,
        p50_ms: p50,
        p99_ms: p99,
        errors: 0,
        rss_mib: vec![],
        cores: stats::cores(),
        notes,
    };

    // Throughput: producers commit as fast as they can.
    let commits: Commits = Arc::default();
    let started = Instant::now();
    produce(&pool, &commits, opts.messages, opts.producers, None).await?;
    let produced_in = started.elapsed();
    wait_for_effects(&pool, opts.messages).await?;
    let (first_commit, last_effect) = span(&pool, &commits).await?;
    let total = (last_effect - first_commit).to_std()?.as_secs_f64();
    let note = format!(
        "producers alone: {:.0} commits/s",
        opts.messages as f64 / produced_in.as_secs_f64()
    );
    let mut figures = vec![figure(
        "B",
        opts.messages as f64 / total,
        opts.messages,
        latencies(&pool, &commits).await?,
        vec![note],
    )];

    // Latency at a fixed rate, below saturation.
    sqlx::query("TRUNCATE bench_effects").execute(&pool).await?;
    let paced: Commits = Arc::default();
    let n = opts.rate * opts.seconds;
    let started = Instant::now();
    produce(&pool, &paced, n, opts.producers, Some(opts.rate)).await?;
    wait_for_effects(&pool, n).await?;
    let per_sec = n as f64 / started.elapsed().as_secs_f64();
    let note = format!("paced at {} msg/s", opts.rate);
    figures.push(figure(
        "B-latency",
        per_sec,
        n,
        latencies(&pool, &paced).await?,
        vec![note],
    ));

    let mut rss = vec![];
    for (name, pid) in [
        ("outbox-relay", children[0].id()),
        ("bench-sink", children[1].id()),
    ] {
        if let Some(kib) = pid.and_then(peak_rss_kib) {
            rss.push((name.to_string(), kib as f64 / 1024.0));
        }
    }
    for f in &mut figures {
        f.rss_mib = rss.clone();
    }
    for child in &mut children {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        let _ = child.wait().await;
    }
    Ok(figures)
}

async fn fresh_database(admin: &str, name: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let (server, _) = admin
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("admin URL has no database"))?;
    Ok(format!("{server}/{name}"))
}

/// Starts a sibling binary (from the same target directory) as its own process.
fn spawn(
    bin: &str,
    args: &[&str],
    db_url: &str,
    amqp_url: &str,
    pool: u32,
) -> anyhow::Result<Child> {
    let path = std::env::current_exe()?.with_file_name(bin);
    tokio::process::Command::new(&path)
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("AMQP_URL", amqp_url)
        .env("AMQP_PREFIX", PREFIX)
        .env("OPS_ADDR", "127.0.0.1:0")
        .env("RETRY_DELAYS_MS", RETRY_DELAYS)
        .env("DATABASE_MAX_CONNECTIONS", pool.to_string())
        .env("CONSUMER_PREFETCH", env("BENCH_PREFETCH", "256"))
        .env("CONSUMER_CONCURRENCY", env("BENCH_CONCURRENCY", "16"))
        .env("RELAY_BATCH_SIZE", env("BENCH_RELAY_BATCH", "500"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e} (build it first)", path.display()))
}

/// Commits `n` messages, one per transaction, from `producers` tasks;
/// paced to `rate` per second when given.
async fn produce(
    pool: &PgPool,
    commits: &Commits,
    n: u64,
    producers: u64,
    rate: Option<u64>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let waker = outbox::Waker::spawn(pool.clone());
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (pool, commits, waker) = (pool.clone(), commits.clone(), waker.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = p;
            while seq < n {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(seq as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let envelope = Envelope::new(&Tick { seq }, "bench");
                let mut tx = pool.begin().await?;
                outbox::enqueue(&mut tx, &envelope).await?;
                tx.commit().await?;
                commits.lock().await.insert(envelope.id, Utc::now());
                waker.wake();
                seq += producers;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn wait_for_effects(pool: &PgPool, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_effects")
            .fetch_one(pool)
            .await?;
        if done as u64 >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {n} effects after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn effects(pool: &PgPool) -> anyhow::Result<Vec<(Uuid, DateTime<Utc>)>> {
    Ok(
        sqlx::query_as("SELECT message_id, applied_at FROM bench_effects")
            .fetch_all(pool)
            .await?,
    )
}

async fn span(pool: &PgPool, commits: &Commits) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
    let first = *commits
        .lock()
        .await
        .values()
        .min()
        .expect("messages were sent");
    let last = effects(pool)
        .await?
        .into_iter()
        .map(|(_, t)| t)
        .max()
        .expect("effects exist");
    Ok((first, last))
}

/// p50 and p99 of commit-to-effect, in milliseconds.
async fn latencies(pool: &PgPool, commits: &Commits) -> anyhow::Result<(f64, f64)> {
    let commits = commits.lock().await;
    let mut ms: Vec<f64> = effects(pool)
        .await?
        .into_iter()
        .filter_map(|(id, applied)| {
            commits
                .get(&id)
                .map(|c| (applied - *c).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
