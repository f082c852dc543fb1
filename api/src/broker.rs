//! The API's view of RabbitMQ: readiness, and the admins' parking queues.
//!
//! The API never publishes events (it writes the outbox), so it keeps one
//! idle connection to answer `/health/ready`, reconnecting on demand, and
//! opens a short-lived one when an admin lists or replays parked messages.

use std::{sync::Arc, time::Duration};

use lapin::Connection;
use souk_shared::topology::Names;
use tokio::sync::Mutex;

#[derive(Clone)]
pub struct BrokerProbe {
    url: String,
    name: String,
    names: Names,
    conn: Arc<Mutex<Option<Connection>>>,
}

impl BrokerProbe {
    pub fn new(url: impl Into<String>, name: impl Into<String>, prefix: &str) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            names: Names::new(prefix),
            conn: Arc::default(),
        }
    }

    /// The broker's names under this deployment's prefix.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// A connection of its own, for an admin's errand; closed when dropped.
    pub async fn connect(&self) -> Result<Connection, lapin::Error> {
        souk_shared::amqp::connect(&self.url, &format!("{}.admin", self.name)).await
    }

    /// True when a broker connection is (or can now be) open.
    pub async fn is_up(&self) -> bool {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| c.status().connected()) {
            return true;
        }
        let attempt = souk_shared::amqp::connect(&self.url, &self.name);
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(conn)) => {
                *slot = Some(conn);
                true
            }
            _ => {
                *slot = None;
                false
            }
        }
    }
}
