use metrics_exporter_prometheus::PrometheusHandle;
use souk_shared::outbox::Waker;
use sqlx::PgPool;

use std::sync::Arc;

use crate::{
    auth::{AuthConfig, Jwt, oidc::OidcClient},
    broker::BrokerProbe,
    http_cache::PublicCache,
    market_config::MarketConfig,
    order_watch::OrderWatch,
    ratelimit::RateLimiter,
    storage::StorageConfig,
};

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub broker: BrokerProbe,
    pub metrics: PrometheusHandle,
    /// Woken by [`AppState::commit_with_messages`].
    pub outbox: Waker,
    pub auth: Arc<AuthConfig>,
    pub jwt: Arc<Jwt>,
    pub limiter: RateLimiter,
    /// Uploaded files (avatars).
    pub storage: Arc<dyn object_store::ObjectStore>,
    pub storage_config: StorageConfig,
    /// Single sign-on; `None` when no provider is configured.
    pub oidc: Option<Arc<OidcClient>>,
    pub market: Arc<MarketConfig>,
    /// Public catalog answers, kept briefly (off unless configured).
    pub public: PublicCache,
    /// Requests waiting for an order to change.
    pub orders: OrderWatch,
}

impl AppState {
    pub fn new(
        pool: PgPool,
        broker: BrokerProbe,
        metrics: PrometheusHandle,
        auth: AuthConfig,
        limiter: RateLimiter,
        (storage, storage_config): (Arc<dyn object_store::ObjectStore>, StorageConfig),
        market: MarketConfig,
    ) -> Self {
        Self {
            orders: OrderWatch::new(pool.clone(), std::time::Duration::from_millis(25)),
            market: Arc::new(market),
            limiter,
            storage,
            storage_config,
            oidc: None,
            public: PublicCache::new(std::time::Duration::ZERO),
            outbox: Waker::spawn(pool.clone()),
            jwt: Arc::new(Jwt::new(&auth)),
            auth: Arc::new(auth),
            pool,
            broker,
            metrics,
        }
    }

    /// Keeps public catalog answers for `ttl` (zero: not at all).
    pub fn with_public_cache(mut self, ttl: std::time::Duration) -> Self {
        self.public = PublicCache::new(ttl);
        self
    }

    /// Reads waited-on orders every `period` (`ORDER_WATCH_MS`).
    pub fn with_order_watch(mut self, period: std::time::Duration) -> Self {
        self.orders = OrderWatch::new(self.pool.clone(), period);
        self
    }

    /// Turns single sign-on on with this provider.
    pub fn with_oidc(mut self, client: Option<OidcClient>) -> Self {
        self.oidc = client.map(Arc::new);
        self
    }

    /// Commits a transaction that wrote outbox rows, then wakes the relays so
    /// the messages go out within milliseconds instead of at the next poll.
    pub async fn commit_with_messages(
        &self,
        tx: sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<(), sqlx::Error> {
        tx.commit().await?;
        self.outbox.wake();
        Ok(())
    }
}
