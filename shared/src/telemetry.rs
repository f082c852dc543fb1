//! Logging and metrics set-up shared by the API and every worker.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global tracing subscriber. `RUST_LOG` filters (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // The relay logs an unroutable message in one line of its own; lapin
        // would dump its bytes.
        .add_directive("lapin::returned_messages=error".parse().expect("valid"))
        // Only the webhook crate's signature check is used; its typed parse
        // of events from other API versions fails loudly and means nothing.
        .add_directive("stripe_webhook=off".parse().expect("valid"));
    let registry = tracing_subscriber::registry().with(filter);
    // `try_init` so tests that build several apps in one process don't panic.
    let _ = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer().compact()).try_init(),
    };
}

/// Installs the process-wide Prometheus recorder once and returns its handle,
/// which renders the text exposition format for `/metrics`.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .expect("static buckets are valid")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            // Upkeep drains histograms so memory stays bounded between scrapes.
            let upkeep = handle.clone();
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}
