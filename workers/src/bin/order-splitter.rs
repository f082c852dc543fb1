//! Splits placed orders into one seller order per shop.

use souk_shared::config::exit_on_error;
use souk_workers::{
    process::Process,
    splitter::{OrderSplitter, SplitterConfig},
};

#[tokio::main]
async fn main() {
    let process = Process::start("order-splitter").await;
    let config = exit_on_error(SplitterConfig::from_env(&process.env));
    process.consume(OrderSplitter { config }).await;
}
