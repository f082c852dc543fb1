//! The API's view of RabbitMQ, for readiness only.
//!
//! The API never publishes (it writes the outbox), so it keeps one idle
//! connection purely to answer `/health/ready`, reconnecting on demand.

use std::{sync::Arc, time::Duration};

use lapin::Connection;
use tokio::sync::Mutex;

#[derive(Clone)]
pub struct BrokerProbe {
    url: String,
    name: String,
    conn: Arc<Mutex<Option<Connection>>>,
}

impl BrokerProbe {
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            conn: Arc::default(),
        }
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
