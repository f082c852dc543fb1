//! Keeps the ledger: payments, sellers' earnings on delivery, refunds; and
//! releases earnings once their hold period has passed.

use souk_shared::config::exit_on_error;
use souk_workers::{
    process::Process,
    settlement::{self, Settlement, SettlementConfig},
};

#[tokio::main]
async fn main() {
    let process = Process::start("settlement").await;
    let config = exit_on_error(SettlementConfig::from_env(&process.env));
    let sweep = settlement::sweep_releases(
        process.pool.clone(),
        config.release_poll,
        process.shutdown.clone(),
    );
    tokio::join!(process.consumer(Settlement { config }), sweep);
}
