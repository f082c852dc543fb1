//! Talks to Stripe (PaymentIntents, cancellations, refunds) and applies
//! Stripe's webhook events to orders: two consumer groups, one process.

use souk_shared::config::exit_on_error;
use souk_workers::{
    payments::{Payments, PaymentsConfig, events::StripeEvents},
    process::Process,
};

#[tokio::main]
async fn main() {
    let process = Process::start("payments").await;
    let config = exit_on_error(PaymentsConfig::from_env(&process.env));
    let payments = Payments::new(&config, process.pool.clone()).unwrap_or_else(|e| {
        eprintln!("error: invalid configuration: STRIPE_API_BASE: {e}");
        std::process::exit(2)
    });
    tokio::join!(process.consumer(payments), process.consumer(StripeEvents));
}
