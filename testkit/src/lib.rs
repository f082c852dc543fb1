//! Test helpers. Every test gets its own PostgreSQL database and its own
//! broker prefix, so tests run in parallel against the real services.

pub mod broker;
pub mod mail;
pub mod oidc;
pub mod proxy;
pub mod stripe;

use std::{future::Future, time::Duration};

use souk_shared::db;
use sqlx::{Connection, PgConnection, PgPool};

/// The server tests create their databases on.
pub fn pg_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// A broker prefix no other test uses; `souktest-` so leftovers are easy to find.
pub fn unique_prefix() -> String {
    format!("souktest-{}", short_id())
}

/// A new database with every migration applied.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

/// Logs of the code under test go to the test's output (shown when it
/// fails): warnings and errors, or what `RUST_LOG` asks for.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

impl TestDb {
    pub async fn new() -> Self {
        capture_logs();
        let name = format!("souk_test_{}", short_id());
        let admin = pg_admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL is reachable");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("can create a test database");
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("TEST_DATABASE_URL has no database part"),
        };
        let pool = db::pool(&url, 20).expect("pool");
        db::migrate(&pool).await.expect("migrations apply");
        Self { pool, url, name }
    }
}

/// Polls `check` every 50 ms until it returns true; panics after `timeout`
/// with `what` in the message.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `SELECT count(*)` of a query, for assertions.
pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count query runs")
}

/// A binary of the workspace (`outbox-relay`, `payments`, ...), built next
/// to the running test's own executable (`cargo nextest run --workspace`
/// builds every binary before it runs tests).
pub fn bin_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    // target/debug/deps/<test> -> target/debug/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .expect("a target directory");
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --bins` first",
        path.display()
    );
    path
}

/// A free TCP port on localhost (nothing listens on it once this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
