//! What every worker process exposes to operators: `/health/live`,
//! `/health/ready` (database and broker) and Prometheus `/metrics`, plus the
//! shutdown signal.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Whether the worker's broker connection is up, set by its supervisor.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_broker(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
        metrics::gauge!("souk_broker_connected").set(if up { 1.0 } else { 0.0 });
    }
    pub fn broker(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct OpsState {
    pool: PgPool,
    readiness: Readiness,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// Serves the ops endpoints on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    pool: PgPool,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let state = OpsState {
        pool,
        readiness,
        metrics: souk_shared::telemetry::metrics_handle(),
    };
    let app = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route(
            "/metrics",
            get(|State(s): State<OpsState>| async move { s.metrics.render() }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(bound)
}

async fn ready(State(s): State<OpsState>) -> (StatusCode, String) {
    let db = souk_shared::db::ping(&s.pool).await;
    let broker = s.readiness.broker();
    let status = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("database={db} broker={broker}\n"))
}

/// A token cancelled on SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        souk_shared::signal::terminated().await;
        trigger.cancel();
    });
    token
}
