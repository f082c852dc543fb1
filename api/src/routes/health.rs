//! Liveness, readiness and metrics.

use axum::{Json, extract::State, http::StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub database: bool,
    pub broker: bool,
}

/// The process is running.
#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, description = "alive")))]
pub async fn live() -> &'static str {
    "ok"
}

/// PostgreSQL and RabbitMQ are both reachable.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    responses(
        (status = 200, description = "ready", body = Readiness),
        (status = 503, description = "a dependency is down", body = Readiness),
    )
)]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (database, broker) = tokio::join!(souk_shared::db::ping(&state.pool), state.broker.is_up());
    let status = if database && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { database, broker }))
}

/// Prometheus metrics in the text exposition format.
pub async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}
