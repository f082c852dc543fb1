use metrics_exporter_prometheus::PrometheusHandle;
use souk_shared::outbox::Waker;
use sqlx::PgPool;

use crate::broker::BrokerProbe;

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub broker: BrokerProbe,
    pub metrics: PrometheusHandle,
    /// Call `outbox.wake()` after committing outbox rows.
    pub outbox: Waker,
}
