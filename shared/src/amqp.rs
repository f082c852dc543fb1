//! AMQP connections and confirmed publishing.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// Persistent delivery mode: the broker writes the message to disk.
const PERSISTENT: u8 = 2;
/// Header carrying the last handler error on retried and parked messages.
pub const ERROR_HEADER: &str = "x-souk-error";
/// Header naming the queue a parked message came from.
pub const ORIGIN_HEADER: &str = "x-souk-origin";

/// Opens a connection named `name`, so operators (and tests) can find it in
/// `rabbitmqctl list_connections`. Fails fast rather than hanging when the
/// broker is down; the caller's supervisor retries with backoff.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props)).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out connecting to the broker",
        ))),
    }
}

/// Opens a channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// AMQP properties for an envelope: persistent JSON, ids copied into the
/// standard properties so tools show them without parsing the body.
pub fn properties(
    id: &str,
    kind: &str,
    correlation_id: &str,
    headers: FieldTable,
) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_message_id(id.into())
        .with_type(kind.into())
        .with_correlation_id(correlation_id.into())
        .with_headers(headers)
}

/// Publishes raw bytes and returns the pending confirm; await it (or many of
/// them together) before treating the message as handed over.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<PublisherConfirm, lapin::Error> {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            // `mandatory` so a message no queue would take comes back as a
            // returned message instead of vanishing.
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await
}

/// How long [`send_to_queue`] waits for the broker's confirm. A broker that
/// took the message but never answers (a blocked connection under a memory
/// or disk alarm does exactly that) would otherwise hold the caller, and the
/// message it is moving, forever; after this the caller treats the copy as
/// not handed over and reconnects.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes bytes straight to a queue (through the default exchange) and
/// waits for the broker's confirm, at most [`CONFIRM_TIMEOUT`]. Used for
/// retries, parking and replay.
pub async fn send_to_queue(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), lapin::Error> {
    let sent = async { publish(channel, "", queue, body, props).await?.await };
    let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, sent)
        .await
        .map_err(|_| {
            lapin::Error::from(std::io::Error::other(format!(
                "broker did not confirm the message for {queue} within {CONFIRM_TIMEOUT:?}"
            )))
        })??;
    if confirm.is_nack() {
        return Err(lapin::Error::from(std::io::Error::other(format!(
            "broker refused the message for {queue}"
        ))));
    }
    if confirm.take_message().is_some() {
        return Err(lapin::Error::from(std::io::Error::other(format!(
            "queue {queue} does not exist"
        ))));
    }
    Ok(())
}

/// A header table with one string entry.
pub fn string_header(mut table: FieldTable, key: &str, value: &str) -> FieldTable {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
    );
    table
}

/// Reads a string header, if present.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}
