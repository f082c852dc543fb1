//! Listing and replaying parked messages (for `souk-admin` and the admin API).
//!
//! Listing takes messages with `basic.get` without acking and then closes the
//! channel, which returns them all to the queue untouched. Replay sends a
//! message back to its group's main queue with its attempts reset, and acks
//! the parked copy only after the broker confirmed the new one.

use crate::{amqp, envelope::Envelope, topology::Names};
use lapin::{
    Connection,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde::Serialize;

/// The name under which operators list and replay the relay's unrouted
/// queue (outbox messages no queue was bound for) as if it were a group's
/// parking queue. Replaying one publishes it to the events exchange again,
/// by its type: once the missing binding exists it reaches its consumers.
pub const UNROUTED: &str = "unrouted";

/// The queue parked messages of `group` (or [`UNROUTED`]) wait in.
fn shelf(names: &Names, group: &str) -> String {
    if group == UNROUTED {
        names.unrouted_queue()
    } else {
        names.parking_queue(group)
    }
}

/// A parked message as an operator sees it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ParkedMessage {
    pub message_id: Option<String>,
    pub kind: Option<String>,
    pub attempts: Option<u32>,
    pub correlation_id: Option<String>,
    pub error: Option<String>,
    pub body: String,
}

impl ParkedMessage {
    fn from_get(msg: &BasicGetMessage) -> Self {
        let delivery = &msg.delivery;
        let envelope = Envelope::from_bytes(&delivery.data).ok();
        let props = &delivery.properties;
        Self {
            message_id: props.message_id().as_ref().map(|s| s.to_string()),
            kind: props.kind().as_ref().map(|s| s.to_string()),
            attempts: envelope.as_ref().map(|e| e.attempt),
            correlation_id: envelope.map(|e| e.correlation_id),
            error: amqp::header_str(props, amqp::ERROR_HEADER),
            body: String::from_utf8_lossy(&delivery.data).into_owned(),
        }
    }
}

async fn depth(channel: &lapin::Channel, queue: &str) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    Ok(channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?
        .message_count())
}

/// Up to `limit` parked messages of `group`, oldest first; the queue is left as it was.
pub async fn list(
    conn: &Connection,
    names: &Names,
    group: &str,
    limit: usize,
) -> Result<Vec<ParkedMessage>, lapin::Error> {
    let channel = conn.create_channel().await?;
    let queue = shelf(names, group);
    let mut out = Vec::new();
    while out.len() < limit {
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            Some(msg) => out.push(ParkedMessage::from_get(&msg)),
            None => break,
        }
    }
    // Closing without acking puts every message back.
    channel.close(200, "listed".into()).await?;
    Ok(out)
}

/// Sends parked messages of `group` back to its main queue (unrouted ones
/// to the events exchange): the one with `message_id`, or all of them when
/// `None`. Returns how many were replayed; an unrouted message that still
/// has no queue to go to stays where it is. Messages a concurrent [`list`]
/// holds at that moment are invisible to the broker's `basic.get`: they are
/// not replayed (they go back to the parking queue when the listing ends),
/// so "all" means all that were waiting.
pub async fn replay(
    conn: &Connection,
    names: &Names,
    group: &str,
    message_id: Option<&str>,
) -> Result<usize, lapin::Error> {
    Ok(replay_counted(conn, names, group, message_id).await?.0)
}

/// As [`replay`], and also how many of the messages waiting when it began
/// are still parked: those not asked for, and unrouted ones with still
/// nowhere to go. Any a concurrent listing held are in neither count: the
/// queue's depth leaves out messages delivered and not yet acked.
/// Counted from the replay's own work, not by asking the queue after it: a
/// quorum queue may not yet show the messages it is putting back.
pub async fn replay_counted(
    conn: &Connection,
    names: &Names,
    group: &str,
    message_id: Option<&str>,
) -> Result<(usize, u32), lapin::Error> {
    let channel = amqp::confirm_channel(conn).await?;
    let queue = shelf(names, group);
    let main = names.queue(group);
    // Look at each message at most once, even those we put back.
    let waiting = depth(&channel, &queue).await?;
    let mut remaining = waiting;
    let mut replayed = 0;
    while remaining > 0 {
        remaining -= 1;
        let Some(msg) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = &msg.delivery;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string());
        if message_id.is_some_and(|wanted| id.as_deref() != Some(wanted)) {
            continue; // stays unacked: returns to the queue when the channel closes
        }
        let body = match Envelope::from_bytes(&delivery.data) {
            Ok(mut envelope) => {
                envelope.attempt = 0;
                envelope.to_bytes()
            }
            Err(_) => delivery.data.clone(),
        };
        let props = delivery
            .properties
            .clone()
            .with_headers(FieldTable::default());
        if group == UNROUTED {
            let kind = delivery.properties.kind().as_ref().map(|k| k.to_string());
            let exchange = names.events_exchange();
            let routing_key = kind.unwrap_or_default();
            let confirm = amqp::publish(&channel, &exchange, &routing_key, &body, props)
                .await?
                .await?;
            if confirm.is_nack() || confirm.take_message().is_some() {
                continue; // still nowhere to go (or refused): it stays, unacked
            }
        } else {
            amqp::send_to_queue(&channel, &main, &body, props).await?;
        }
        delivery.ack(BasicAckOptions::default()).await?;
        replayed += 1;
    }
    channel.close(200, "replayed".into()).await?;
    Ok((replayed, waiting.saturating_sub(replayed as u32)))
}

/// The audit action of a replay of `group`'s parked messages, and its target
/// (the message, or the nil id for all of them).
pub fn replay_entry(
    group: &str,
    message_id: Option<uuid::Uuid>,
) -> (String, (&'static str, uuid::Uuid)) {
    (
        format!("parked.replay.{group}"),
        ("message", message_id.unwrap_or(uuid::Uuid::nil())),
    )
}

/// Keeps what a replay did, after it: `parked.replay.<group>.done` with the
/// count, or `.failed` with the error. The request itself was kept before
/// (see [`audited_replay`]); this entry is written whatever became of the
/// actor meanwhile, since the replay has happened (or failed) either way.
pub async fn record_replay_outcome<E: std::fmt::Display>(
    conn: &mut sqlx::PgConnection,
    admin: uuid::Uuid,
    group: &str,
    message_id: Option<uuid::Uuid>,
    outcome: Result<usize, E>,
) -> Result<(), sqlx::Error> {
    let (action, target) = replay_entry(group, message_id);
    let (suffix, said) = match outcome {
        Ok(n) => ("done", format!("{n} message(s) replayed")),
        Err(e) => ("failed", format!("not replayed: {e}")),
    };
    crate::audit::record(conn, admin, &format!("{action}.{suffix}"), target, &said).await
}

/// A replay as the admin action it is: kept in the audit log before it is
/// done (`parked.replay.<group>`, so none happens without its entry), and
/// what it did kept after it ([`record_replay_outcome`]), so the log tells
/// an operator whether the messages went back, not only that someone asked.
/// `replay` connects and replays; its own error is handed back unchanged.
///
/// The caller has checked that `admin` is one. (The admin API records the
/// request itself, re-checking its caller in the same transaction, and then
/// calls [`record_replay_outcome`].)
pub async fn audited_replay<E: std::fmt::Display>(
    pool: &sqlx::PgPool,
    admin: uuid::Uuid,
    group: &str,
    message_id: Option<uuid::Uuid>,
    reason: &str,
    replay: impl std::future::Future<Output = Result<usize, E>>,
) -> Result<Result<usize, E>, sqlx::Error> {
    let (action, target) = replay_entry(group, message_id);
    let mut conn = pool.acquire().await?;
    crate::audit::record(&mut conn, admin, &action, target, reason).await?;
    let outcome = replay.await;
    let n = match &outcome {
        Ok(n) => Ok(*n),
        Err(e) => Err(e.to_string()),
    };
    record_replay_outcome(&mut conn, admin, group, message_id, n).await?;
    Ok(outcome)
}
