//! Publishes committed outbox rows to RabbitMQ with publisher confirms.

use souk_shared::config::exit_on_error;
use souk_workers::{
    process::Process,
    relay::{self, RelaySettings},
    settings::connection_name,
};

#[tokio::main]
async fn main() {
    let p = Process::start("outbox-relay").await;
    let settings = exit_on_error((|| {
        Ok(RelaySettings {
            amqp_url: p.config.common.amqp_url.clone(),
            names: p.config.names(),
            batch_size: p.env.or("RELAY_BATCH_SIZE", 500)?,
            poll_interval: p.env.millis("RELAY_POLL_MS", 5_000)?,
            coalesce: p.env.millis("RELAY_COALESCE_MS", 2)?,
            retention_hours: p.env.or("OUTBOX_RETENTION_HOURS", 168)?,
            connection_name: connection_name(&p.config.common.amqp_prefix, "outbox-relay"),
        })
    })());
    relay::run(p.pool, settings, p.readiness, p.shutdown).await;
}
