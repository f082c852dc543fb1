//! Reserves, releases and restocks orders' stock; expires reservations that
//! ran out unpaid.

use souk_shared::config::exit_on_error;
use souk_workers::{
    process::Process,
    reserver::{self, ReserverConfig, StockReserver},
};

#[tokio::main]
async fn main() {
    let process = Process::start("stock-reserver").await;
    let config = exit_on_error(ReserverConfig::from_env(&process.env));
    let sweep = reserver::sweep_expired(
        process.pool.clone(),
        config.expiry_poll,
        process.shutdown.clone(),
    );
    tokio::join!(process.consumer(StockReserver { config }), sweep);
}
