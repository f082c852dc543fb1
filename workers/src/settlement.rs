//! The settlement worker: keeps the ledger in step with the money. It posts
//! each captured payment, each delivered seller order's earnings (pending
//! for the hold period) and each refund that went through, and a sweep
//! releases earnings whose hold has passed. Every posting has its own
//! reference, so redeliveries and several settlement processes post each
//! event once.

use std::time::Duration;

use souk_shared::{
    config::{ConfigError, Env},
    contracts::{PaymentCaptured, RefundSucceeded, SellerOrderDelivered},
    envelope::Envelope,
    ledger::{self, PostError, postings},
    topology,
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::runtime::{Failure, Handler};

#[derive(Debug, Clone)]
pub struct SettlementConfig {
    /// How long earnings stay pending after delivery (returns, disputes).
    pub hold: Duration,
    /// How often the sweep looks for earnings whose hold has passed.
    pub release_poll: Duration,
}

impl SettlementConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            hold: Duration::from_secs(env.or("SETTLEMENT_HOLD_SECS", 7 * 24 * 3600)?),
            release_poll: env.millis("RELEASE_POLL_MS", 10_000)?,
        })
    }
}

pub struct Settlement {
    pub config: SettlementConfig,
}

impl From<PostError> for Failure {
    fn from(e: PostError) -> Self {
        match e {
            PostError::Db(e) => e.into(),
            unbalanced => Failure::permanent(unbalanced),
        }
    }
}

impl Handler for Settlement {
    type Prepared = ();
    const GROUP: &'static str = topology::SETTLEMENT.name;
    const BINDINGS: &'static [&'static str] = topology::SETTLEMENT.bindings;

    async fn prepare(&self, _: &Envelope) -> Result<(), Failure> {
        Ok(())
    }

    async fn apply(&self, tx: &mut PgConnection, msg: &Envelope, _: ()) -> Result<(), Failure> {
        let bad = |e| Failure::permanent(e);
        let posted = match msg.kind.as_str() {
            "payment.captured" => {
                let PaymentCaptured { payment_id } = msg.payload().map_err(bad)?;
                postings::payment(tx, payment_id).await?
            }
            "seller_order.delivered" => {
                let SellerOrderDelivered { seller_order_id } = msg.payload().map_err(bad)?;
                postings::earning(tx, seller_order_id, self.config.hold).await?
            }
            "refund.succeeded" => {
                let RefundSucceeded { refund_id } = msg.payload().map_err(bad)?;
                postings::refund(tx, refund_id).await?
            }
            other => {
                return Err(Failure::permanent(anyhow::anyhow!(
                    "settlement does not handle {other}"
                )));
            }
        };
        if !posted {
            tracing::debug!(kind = %msg.kind, "nothing new to post");
        }
        Ok(())
    }
}

/// Releases earnings whose hold has passed, a batch at a time, until
/// `shutdown`. Safe with several settlement processes: each takes the rows
/// no other holds (`SKIP LOCKED`), and each release is posted once.
pub async fn sweep_releases(pool: PgPool, poll: Duration, shutdown: CancellationToken) {
    loop {
        match release_batch(&pool, 100).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(released = n, "earnings released");
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "release sweep failed; will try again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Releases up to `limit` due earnings in one transaction, each in a
/// savepoint of its own so that one that fails (logged, tried again on a
/// later sweep) never holds back the rest; returns how many were released.
/// Only seller orders still delivered are due: one an admin moved back
/// waits for its next delivery.
pub async fn release_batch(pool: &PgPool, limit: i64) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let due: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
        "SELECT e.seller_order_id, e.shop_id, e.currency FROM seller_earnings e
           JOIN seller_orders so ON so.id = e.seller_order_id
          WHERE e.released_at IS NULL AND e.available_at <= now() AND so.status = 'delivered'
          ORDER BY e.available_at LIMIT $1
          FOR NO KEY UPDATE OF e, so SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    // Each release locks its shop's available account (so that a
    // withdrawal checking the balance sees it whole or not at all); the
    // batch spans shops, so it takes them all now, in one order, lest two
    // sweeps each hold one the other waits for.
    let mut accounts: Vec<(Uuid, &str)> = due
        .iter()
        .map(|(_, shop, currency)| (*shop, currency.as_str()))
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    for (shop, currency) in accounts {
        ledger::lock_available(&mut tx, shop, currency).await?;
    }
    let mut released = 0;
    for (seller_order, _, _) in &due {
        let mut one = sqlx::Connection::begin(&mut *tx).await?;
        match postings::release(&mut one, *seller_order).await {
            Ok(_) => {
                one.commit().await?;
                released += 1;
            }
            Err(e) => {
                tracing::warn!(%seller_order, error = %e, "release failed; will try again");
                one.rollback().await?;
            }
        }
    }
    tx.commit().await?;
    Ok(released)
}
