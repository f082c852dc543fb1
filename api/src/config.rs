//! API settings from the environment.

use std::net::SocketAddr;

use souk_shared::config::{CommonConfig, ConfigError, Env};

use crate::{
    auth::{AuthConfig, oidc::OidcConfig},
    market_config::MarketConfig,
    ratelimit::Limits,
    storage::StorageConfig,
};

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub common: CommonConfig,
    pub http_addr: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    pub auth: AuthConfig,
    /// Rate-limit counters live here, shared by every API replica.
    pub redis_url: String,
    pub limits: Limits,
    pub storage: StorageConfig,
    /// Single sign-on with an OpenID Connect provider, if configured.
    pub oidc: Option<OidcConfig>,
    pub market: MarketConfig,
    /// How long public catalog answers are kept in the process.
    pub public_cache: std::time::Duration,
    /// How often orders someone waits on are read.
    pub order_watch: std::time::Duration,
}

impl ApiConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(env)?,
            http_addr: env.or("HTTP_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            body_limit: env.or("HTTP_BODY_LIMIT_BYTES", 1 << 20)?,
            auth: AuthConfig::from_env(env)?,
            redis_url: env.or("REDIS_URL", "redis://127.0.0.1:6379".to_string())?,
            limits: Limits::from_env(env)?,
            storage: StorageConfig::from_env(env)?,
            oidc: OidcConfig::from_env(env)?,
            market: MarketConfig::from_env(env)?,
            public_cache: env.millis("PUBLIC_CACHE_MS", 1_000)?,
            order_watch: match env.millis("ORDER_WATCH_MS", 25)? {
                zero if zero.is_zero() => {
                    return Err(ConfigError {
                        var: "ORDER_WATCH_MS".into(),
                        reason: "must be at least 1".into(),
                    });
                }
                period => period,
            },
        })
    }
}
