//! Runs customers' replenishment schedules: one order per schedule and due
//! time, placed through the normal pipeline and paid off session.

use souk_shared::config::exit_on_error;
use souk_workers::{
    process::Process,
    replenisher::{self, ReplenisherConfig},
};

#[tokio::main]
async fn main() {
    let process = Process::start("replenisher").await;
    let config = exit_on_error(ReplenisherConfig::from_env(&process.env));
    // It consumes nothing: its orders' messages go out through the outbox,
    // so it is ready whenever its database is.
    process.readiness.set_broker(true);
    replenisher::run(process.pool, config, process.shutdown).await;
}
