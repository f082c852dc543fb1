//! The Souk HTTP API.

use std::net::SocketAddr;

use souk_api::{
    auth::oidc::OidcClient, broker::BrokerProbe, config::ApiConfig, ratelimit::RateLimiter, router,
    state::AppState,
};
use souk_shared::{
    config::{Env, exit_on_error},
    telemetry,
};
use tracing::info;

#[tokio::main]
async fn main() {
    let config = exit_on_error(ApiConfig::from_env(&Env::load()));
    telemetry::init_tracing(config.common.log_format);
    let pool = exit_on_error(config.common.pool());
    let state = AppState::new(
        pool,
        BrokerProbe::new(
            config.common.amqp_url.clone(),
            format!("{}.api#{}", config.common.amqp_prefix, std::process::id()),
            &config.common.amqp_prefix,
        ),
        telemetry::metrics_handle(),
        config.auth.clone(),
        exit_on_error(RateLimiter::new(
            &config.redis_url,
            &config.common.amqp_prefix,
            config.limits.clone(),
        )),
        (exit_on_error(config.storage.open()), config.storage.clone()),
        config.market.clone(),
    )
    .with_oidc(config.oidc.clone().map(OidcClient::new))
    .with_public_cache(config.public_cache)
    .with_order_watch(config.order_watch);
    let app = router(state, config.body_limit, config.storage.image_max_bytes);
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .unwrap_or_else(|e| {
            eprintln!(
                "error: cannot listen on HTTP_ADDR={}: {e}",
                config.http_addr
            );
            std::process::exit(2)
        });
    info!(addr = %config.http_addr, "API listening; docs at /docs");
    // Peer addresses feed the per-IP limits.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(souk_shared::signal::terminated())
    .await
    .expect("server error");
}
