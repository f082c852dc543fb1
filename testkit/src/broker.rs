//! Broker helpers: queue inspection, clean-up and closing a named connection
//! from the server side (as an operator or a network fault would).

use lapin::{
    Connection,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use souk_shared::topology::Names;

/// Messages ready in `queue` (not counting unacked ones).
pub async fn ready_count(conn: &Connection, queue: &str) -> u32 {
    let channel = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let n = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    let _ = channel.close(200, "done".into()).await;
    n
}

/// Deletes a group's queues (main, parked and the given retry delays).
pub async fn delete_group(conn: &Connection, names: &Names, group: &str, delays: &[u64]) {
    let channel = conn.create_channel().await.expect("channel");
    let mut queues = vec![names.queue(group), names.parking_queue(group)];
    queues.extend(delays.iter().map(|d| names.retry_queue(group, *d)));
    for q in queues {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel.close(200, "done".into()).await;
}

/// Closes, from the broker's side, every connection whose client-provided
/// name contains `needle`. Returns how many were closed.
pub async fn close_connections_named(needle: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .await
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(needle)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "closed by test"])
            .status()
            .await
            .expect("rabbitmqctl runs");
        if status.success() {
            closed += 1;
        }
    }
    closed
}
