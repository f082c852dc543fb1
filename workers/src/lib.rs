//! Souk's workers: one consumer runtime ([`runtime`]) that every worker
//! binary in `src/bin` runs its handler on, plus the outbox relay.

pub mod demo;
pub mod mailer;
pub mod ops;
pub mod payments;
pub mod process;
pub mod relay;
pub mod replenisher;
pub mod reserver;
pub mod runtime;
pub mod settings;
pub mod settlement;
pub mod splitter;
