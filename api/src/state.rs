use metrics_exporter_prometheus::PrometheusHandle;
use souk_shared::outbox::Waker;
use sqlx::PgPool;

use std::sync::Arc;

use crate::{
    auth::{AuthConfig, Jwt},
    broker::BrokerProbe,
    ratelimit::RateLimiter,
    storage::StorageConfig,
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
    /// Uploaded files (avatars).
    pub storage: Arc<dyn object_store::ObjectStore>,
    pub storage_config: StorageConfig,
}

impl AppState {
    pub fn new(
        pool: PgPool,
        broker: BrokerProbe,
        metrics: PrometheusHandle,
        auth: AuthConfig,
        limiter: RateLimiter,
        (storage, storage_config): (Arc<dyn object_store::ObjectStore>, StorageConfig),
    ) -> Self {
        Self {
            limiter,
            storage,
            storage_config,
            outbox: Waker::spawn(pool.clone()),
            jwt: Arc::new(Jwt::new(&auth)),
            auth: Arc::new(auth),
            pool,
            broker,
            metrics,
        }
    }
}
