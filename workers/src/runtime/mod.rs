//! The consumer runtime every worker binary uses.
//!
//! - [`supervisor`] keeps a broker connection alive: connect, declare the
//!   topology, consume; on any connection error reconnect with backoff (lapin
//!   does not reconnect by itself), and likewise once a failed message could
//!   not be republished (the session's publisher is of no more use).
//! - [`delivery`] processes one message: skip if already processed, run the
//!   handler, record (consumer, message id) in the handler's transaction,
//!   ack only after commit; on failure republish to the next retry queue, or
//!   to the parking queue once attempts are used up.

mod delivery;
pub mod retention;
mod supervisor;

use std::future::Future;

use souk_shared::envelope::Envelope;
use sqlx::PgConnection;

pub use delivery::{Applied, apply_once};
pub use supervisor::{ConsumerSettings, run};

/// Why a handler did not apply a message.
#[derive(Debug)]
pub enum Failure {
    /// Worth retrying later: a dependency was down or busy.
    Transient(anyhow::Error),
    /// Retrying cannot help (bad payload, unknown template, rejected address):
    /// the message goes straight to the parking queue.
    Permanent(anyhow::Error),
}

impl Failure {
    pub fn transient(e: impl Into<anyhow::Error>) -> Self {
        Self::Transient(e.into())
    }
    pub fn permanent(e: impl Into<anyhow::Error>) -> Self {
        Self::Permanent(e.into())
    }
    fn error(&self) -> &anyhow::Error {
        match self {
            Self::Transient(e) | Self::Permanent(e) => e,
        }
    }
}

/// Database errors are transient: the transaction rolled back and the
/// message will be tried again.
impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Self::Transient(e.into())
    }
}

/// A transition the order state machines refuse is a bug or a race already
/// lost: retrying cannot help, so the message is parked with the reason.
impl From<souk_shared::orders::MoveError> for Failure {
    fn from(e: souk_shared::orders::MoveError) -> Self {
        match e {
            souk_shared::orders::MoveError::Db(e) => e.into(),
            other => Self::Permanent(other.into()),
        }
    }
}

impl From<souk_shared::orders::cancel::CancelError> for Failure {
    fn from(e: souk_shared::orders::cancel::CancelError) -> Self {
        use souk_shared::orders::{MoveError, cancel::CancelError};
        match e {
            CancelError::Db(e) | CancelError::Move(MoveError::Db(e)) => e.into(),
            other => Self::Permanent(other.into()),
        }
    }
}

/// A consumer group's message handler.
///
/// Work is split in two so that no database transaction is ever held across
/// a network call: [`prepare`](Handler::prepare) runs outside any
/// transaction (SMTP, Stripe), then [`apply`](Handler::apply) writes the
/// effect inside the transaction that also records the message as processed.
/// Handlers with no outside call make `prepare` a no-op.
pub trait Handler: Send + Sync + 'static {
    type Prepared: Send;

    /// The consumer group: names the queue and the processed-messages key.
    const GROUP: &'static str;
    /// Topic patterns the group's queue is bound with.
    const BINDINGS: &'static [&'static str];
    /// Message types `apply` may write to the outbox. When not empty, the
    /// runtime wakes the relays after each commit.
    const EMITS: &'static [&'static str] = &[];
    /// For handlers whose `prepare` has an outside effect: how long a
    /// consumer may hold a message before a duplicate may take it over. While
    /// held, a concurrent duplicate is retried later instead of repeating the
    /// outside call. Make it longer than `prepare` can take.
    fn prepare_lease(&self) -> Option<std::time::Duration> {
        None
    }

    fn prepare(
        &self,
        msg: &Envelope,
    ) -> impl Future<Output = Result<Self::Prepared, Failure>> + Send;

    /// A copy of what `prepare` returned, for handlers with a lease whose
    /// `Prepared` can be cloned (return `Some(prepared.clone())`). When the
    /// apply transaction fails on the database after `apply` took the value,
    /// the runtime retries the transaction in place with the copy instead of
    /// giving the message up and repeating the outside call on its retry.
    /// `None` (the default): only failures before `apply` took the value are
    /// retried in place.
    fn copy_prepared(&self, prepared: &Self::Prepared) -> Option<Self::Prepared> {
        let _ = prepared;
        None
    }

    /// First in the transaction of a batch (several messages applied
    /// together), with all of them: a handler whose effects lock rows that
    /// other messages share (stock) takes those locks here, all at once and
    /// in one order. Each message alone locks its rows in order already
    /// (unless [`Self::LOCKS_ALONE`]); across a batch only this keeps two
    /// batches from waiting on each other in a circle.
    /// Whether a message applied alone takes [`Self::lock_batch`] too,
    /// for an `apply` that counts on those locks being held however the
    /// message came (the stock-reserver's visibility check does). Off by
    /// default: for the others it would be statements spent twice.
    const LOCKS_ALONE: bool = false;

    fn lock_batch(
        &self,
        tx: &mut PgConnection,
        msgs: &[&Envelope],
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        let _ = (tx, msgs);
        async { Ok(()) }
    }

    fn apply(
        &self,
        tx: &mut PgConnection,
        msg: &Envelope,
        prepared: Self::Prepared,
    ) -> impl Future<Output = Result<(), Failure>> + Send;
}
