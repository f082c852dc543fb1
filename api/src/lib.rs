//! Souk's HTTP API: parse, authorize, write rows and outbox messages in one
//! transaction, answer. Everything slow or external happens in the workers.

pub mod app;
pub mod auth;
pub mod broker;
pub mod client_ip;
pub mod config;
pub mod error;
pub mod extract;
pub mod http_cache;
pub mod idempotency;
pub mod images;
pub mod market_config;
pub mod middleware;
pub mod order_views;
pub mod order_watch;
pub mod ratelimit;
pub mod routes;
pub mod sealed;
pub mod state;
pub mod storage;

pub use app::router;
