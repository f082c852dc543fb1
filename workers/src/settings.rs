//! Worker settings from the environment, shared by every worker binary.

use std::net::SocketAddr;

use souk_shared::{
    config::{CommonConfig, ConfigError, Env},
    topology::Names,
};

use crate::runtime::ConsumerSettings;

/// What every worker process reads.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub common: CommonConfig,
    /// Where `/metrics` and `/health/*` are served.
    pub ops_addr: SocketAddr,
}

impl WorkerConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(env)?,
            ops_addr: env.or("OPS_ADDR", SocketAddr::from(([0, 0, 0, 0], 9100)))?,
        })
    }

    pub fn names(&self) -> Names {
        Names::new(&self.common.amqp_prefix)
    }

    /// Consumer settings for `group`; the connection is named after the
    /// group, host and process so operators can tell replicas apart.
    pub fn consumer(&self, env: &Env, group: &str) -> Result<ConsumerSettings, ConfigError> {
        let prefetch: u16 = env.or("CONSUMER_PREFETCH", 32)?;
        let concurrency: usize = env.or("CONSUMER_CONCURRENCY", 8)?;
        if concurrency == 0 || concurrency > prefetch as usize {
            return Err(ConfigError {
                var: "CONSUMER_CONCURRENCY".into(),
                reason: format!("must be between 1 and CONSUMER_PREFETCH ({prefetch})"),
            });
        }
        if concurrency as u32 >= self.common.database_max_connections {
            return Err(ConfigError {
                var: "CONSUMER_CONCURRENCY".into(),
                reason: format!(
                    "must stay below DATABASE_MAX_CONNECTIONS ({}) so handlers never starve the pool",
                    self.common.database_max_connections
                ),
            });
        }
        let batch: usize = env.or("CONSUMER_BATCH", 32)?;
        if batch == 0 || batch > prefetch as usize {
            return Err(ConfigError {
                var: "CONSUMER_BATCH".into(),
                reason: format!("must be between 1 and CONSUMER_PREFETCH ({prefetch})"),
            });
        }
        Ok(ConsumerSettings {
            amqp_url: self.common.amqp_url.clone(),
            names: self.names(),
            prefetch,
            concurrency,
            batch,
            retry_delays_ms: env.list("RETRY_DELAYS_MS", &[1_000, 10_000, 60_000])?,
            connection_name: connection_name(&self.common.amqp_prefix, group),
            processed_retention: std::time::Duration::from_secs(
                3600 * env.or::<u64>("PROCESSED_RETENTION_HOURS", 168)?,
            ),
        })
    }
}

/// `{prefix}.{group}@{host}#{pid}`.
pub fn connection_name(prefix: &str, group: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("{prefix}.{group}@{host}#{}", std::process::id())
}
