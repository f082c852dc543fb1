use metrics_exporter_prometheus::PrometheusHandle;
use souk_shared::outbox::Waker;
use sqlx::PgPool;

use std::sync::Arc;

use crate::{
    auth::{AuthConfig, Jwt},
    broker::BrokerProbe,
    ratelimit::RateLimiter,
};

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub broker: BrokerProbe,
    pub metrics: PrometheusHandle,
    /// Call `outbox.wake()` after committing outbox rows.
    pub outbox: Waker,
    pub auth: Arc<AuthConfig>,
    pub jwt: Arc<Jwt>,
    pub limiter: RateLimiter,
}

impl AppState {
    pub fn new(
        pool: PgPool,
        broker: BrokerProbe,
        metrics: PrometheusHandle,
        auth: AuthConfig,
        limiter: RateLimiter,
    ) -> Self {
        Self {
            limiter,
            outbox: Waker::spawn(pool.clone()),
            jwt: Arc::new(Jwt::new(&auth)),
            auth: Arc::new(auth),
            pool,
            broker,
            metrics,
        }
    }
}
