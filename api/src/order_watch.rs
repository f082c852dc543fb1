//! Waiting for an order to change, without the storefront polling the API
//! (and the API the database) every few milliseconds.
//!
//! A request that asks to wait (`GET /orders/{id}?wait_for=paid`) parks
//! here with the status it last read. One task per API process reads the
//! statuses of every order anyone is waiting on in one indexed query every
//! `ORDER_WATCH_MS` and wakes the waiters whose order moved; with nobody
//! waiting it reads nothing. So a thousand waiting customers cost one small
//! query per period, not a thousand polls; and since each process watches
//! only its own waiters, API replicas share nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use souk_shared::orders::OrderStatus;
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

/// A parked request: the status it saw, and how to wake it with the new one.
struct Waiter {
    seen: OrderStatus,
    wake: oneshot::Sender<OrderStatus>,
}

#[derive(Clone)]
pub struct OrderWatch {
    waiting: Arc<Mutex<HashMap<Uuid, Vec<Waiter>>>>,
    notify: Arc<tokio::sync::Notify>,
    /// The watching task, started by the first wait.
    started: Arc<std::sync::Once>,
    pool: PgPool,
    period: Duration,
}

impl OrderWatch {
    /// Watches orders in `pool`, reading every `period` while anyone waits.
    pub fn new(pool: PgPool, period: Duration) -> Self {
        Self {
            waiting: Arc::default(),
            notify: Arc::default(),
            started: Arc::new(std::sync::Once::new()),
            pool,
            period,
        }
    }

    /// The status `order` moved to from `seen` (as the watcher reads it), or
    /// `None` after `timeout`, whichever comes first.
    pub async fn changed(
        &self,
        order: Uuid,
        seen: OrderStatus,
        timeout: Duration,
    ) -> Option<OrderStatus> {
        self.started.call_once(|| {
            let task = self.clone();
            tokio::spawn(task.run());
        });
        let (wake, woken) = oneshot::channel();
        self.waiting
            .lock()
            .expect("not poisoned")
            .entry(order)
            .or_default()
            .push(Waiter { seen, wake });
        self.notify.notify_one();
        // A waiter that timed out is dropped at the next read (its receiver
        // is gone), so nothing needs removing here.
        tokio::time::timeout(timeout, woken).await.ok()?.ok()
    }

    async fn run(self) {
        let (pool, period) = (self.pool.clone(), self.period);
        loop {
            let ids: Vec<Uuid> = {
                let mut waiting = self.waiting.lock().expect("not poisoned");
                waiting.retain(|_, waiters| {
                    waiters.retain(|w| !w.wake.is_closed());
                    !waiters.is_empty()
                });
                waiting.keys().copied().collect()
            };
            if ids.is_empty() {
                self.notify.notified().await;
                continue;
            }
            tokio::time::sleep(period).await;
            let now: Vec<(Uuid, String)> =
                match sqlx::query_as("SELECT id, status FROM orders WHERE id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&pool)
                    .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::warn!(error = %e, "order watch could not read; trying again");
                        continue;
                    }
                };
            let mut waiting = self.waiting.lock().expect("not poisoned");
            for (id, status) in now {
                let Some(status) = OrderStatus::parse(&status) else {
                    continue;
                };
                if let Some(waiters) = waiting.get_mut(&id) {
                    let (moved, still): (Vec<Waiter>, Vec<Waiter>) =
                        waiters.drain(..).partition(|w| w.seen != status);
                    *waiters = still;
                    for w in moved {
                        let _ = w.wake.send(status);
                    }
                }
            }
        }
    }
}
