//! Code every Souk binary shares: configuration, telemetry, database access,
//! the message envelope and contracts, the outbox and the AMQP topology.

pub mod amqp;
pub mod audit;
pub mod catalog;
pub mod config;
pub mod contracts;
pub mod coupons;
pub mod db;
pub mod envelope;
pub mod inventory;
pub mod ledger;
pub mod membership;
pub mod notify;
pub mod orders;
pub mod outbox;
pub mod parked;
pub mod password;
pub mod replenishment;
pub mod signal;
pub mod telemetry;
pub mod topology;
