//! Start-up shared by every worker binary: configuration (exiting with one
//! line naming a bad variable), logging, metrics, the database pool, the ops
//! endpoints and the shutdown signal.

use souk_shared::{
    config::{Env, exit_on_error},
    telemetry,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    ops::{self, Readiness},
    runtime::{self, Handler},
    settings::WorkerConfig,
};

pub struct Process {
    pub env: Env,
    pub config: WorkerConfig,
    pub pool: PgPool,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
}

impl Process {
    /// Reads the configuration and starts the ops endpoints for worker `name`.
    pub async fn start(name: &str) -> Self {
        let env = Env::load();
        let config = exit_on_error(WorkerConfig::from_env(&env));
        telemetry::init_tracing(config.common.log_format);
        let pool = exit_on_error(config.common.pool());
        let readiness = Readiness::default();
        readiness.set_broker(false);
        let shutdown = ops::shutdown_on_signal();
        let ops_addr = ops::serve(
            config.ops_addr,
            pool.clone(),
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap_or_else(|e| {
            eprintln!("error: cannot serve OPS_ADDR={}: {e}", config.ops_addr);
            std::process::exit(2)
        });
        info!(worker = name, %ops_addr, "started; /metrics and /health/* are up");
        Self {
            env,
            config,
            pool,
            readiness,
            shutdown,
        }
    }

    /// Runs a consumer group's handler until SIGTERM/SIGINT.
    pub async fn consume<H: Handler>(self, handler: H) {
        self.consumer(handler).await
    }

    /// A consumer group's handler on this process's settings, to run
    /// beside other work of the same process (until SIGTERM/SIGINT).
    pub fn consumer<H: Handler>(&self, handler: H) -> impl Future<Output = ()> + use<H> {
        let settings = exit_on_error(self.config.consumer(&self.env, H::GROUP));
        runtime::run(
            handler,
            self.pool.clone(),
            settings,
            self.readiness.clone(),
            self.shutdown.clone(),
        )
    }
}
