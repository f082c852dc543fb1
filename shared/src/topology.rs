//! The broker topology, declared idempotently by whichever process starts first.
//!
//! ```text
//! {prefix}.events            topic exchange, routing key = message type
//! {prefix}.{group}           quorum queue per consumer group, bound by pattern
//! {prefix}.{group}.retry.Nms quorum queue per delay: TTL N ms, then dead-letters
//!                            back to {prefix}.{group} (no delayed-message plugin)
//! {prefix}.{group}.parked    quorum queue for messages that used every attempt
//! {prefix}.unrouted          quorum queue for outbox messages no queue was bound for
//! ```
//!
//! A message that keeps crashing its consumer (never acked nor retried) is
//! moved to the parking queue by the broker after `DELIVERY_LIMIT` deliveries.

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// Broker-side redelivery cap for a message whose consumer dies every time.
const DELIVERY_LIMIT: i64 = 20;

/// Names under one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    pub fn queue(&self, group: &str) -> String {
        format!("{}.{group}", self.prefix)
    }
    pub fn retry_queue(&self, group: &str, delay_ms: u64) -> String {
        format!("{}.{group}.retry.{delay_ms}ms", self.prefix)
    }
    pub fn parking_queue(&self, group: &str) -> String {
        format!("{}.{group}.parked", self.prefix)
    }
    /// Where the relay puts an outbox message no queue is bound for, so it
    /// is kept for an operator instead of marked published and lost.
    pub fn unrouted_queue(&self) -> String {
        format!("{}.unrouted", self.prefix)
    }
}

/// A consumer group Souk runs: its name and the message types it takes.
#[derive(Debug, Clone, Copy)]
pub struct GroupSpec {
    pub name: &'static str,
    pub bindings: &'static [&'static str],
}

pub const MAILER: GroupSpec = GroupSpec {
    name: "mailer",
    bindings: &["notify.email"],
};
pub const ORDER_SPLITTER: GroupSpec = GroupSpec {
    name: "order-splitter",
    bindings: &["order.placed"],
};
pub const STOCK_RESERVER: GroupSpec = GroupSpec {
    name: "stock-reserver",
    bindings: &["order.split", "order.cancelled", "seller_order.cancelled"],
};
pub const PAYMENTS: GroupSpec = GroupSpec {
    name: "payments",
    bindings: &[
        "stock.reserved",
        "order.expired",
        "order.cancelled",
        "payment.intent_cancel_requested",
        "payment.refund_requested",
        "membership_plan.created",
        "payment_method.setup_requested",
        "payment_method.confirmed",
        "payment_method.removed",
        "membership.requested",
        "membership.cancel_requested",
    ],
};
pub const STRIPE_EVENTS: GroupSpec = GroupSpec {
    name: "stripe-events",
    bindings: &["stripe.event"],
};

pub const SETTLEMENT: GroupSpec = GroupSpec {
    name: "settlement",
    bindings: &[
        "payment.captured",
        "seller_order.delivered",
        "refund.succeeded",
    ],
};

/// Every group, so the relay can declare their queues before it publishes:
/// a message published before its consumer first started is kept, not
/// dropped as unroutable.
pub const GROUPS: &[GroupSpec] = &[
    MAILER,
    ORDER_SPLITTER,
    STOCK_RESERVER,
    PAYMENTS,
    STRIPE_EVENTS,
    SETTLEMENT,
];

/// A consumer group's place in the topology.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: &'static str,
    /// Topic patterns the group's queue is bound with, e.g. `notify.*`.
    pub bindings: &'static [&'static str],
    /// One retry queue per delay; attempt N waits `retry_delays_ms[N]`.
    pub retry_delays_ms: Vec<u64>,
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert(ShortString::from(*k), v.clone());
    }
    table
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Declares the events exchange.
pub async fn declare_exchange(channel: &Channel, names: &Names) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            names.events_exchange().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares the exchange and a group's main and parking queues and its
/// bindings (not its retry queues, which depend on the consumers' delays).
/// Safe to run concurrently from many processes.
pub async fn declare_queues(
    channel: &Channel,
    names: &Names,
    name: &str,
    bindings: &[&str],
) -> Result<(), lapin::Error> {
    declare_exchange(channel, names).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let main = names.queue(name);
    let parked = names.parking_queue(name);

    channel
        .queue_declare(
            parked.as_str().into(),
            durable,
            args(&[("x-queue-type", text("quorum"))]),
        )
        .await?;
    channel
        .queue_declare(
            main.as_str().into(),
            durable,
            args(&[
                ("x-queue-type", text("quorum")),
                ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&parked)),
            ]),
        )
        .await?;
    for pattern in bindings {
        channel
            .queue_bind(
                main.as_str().into(),
                names.events_exchange().into(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Declares the exchange and a group's main, retry and parking queues and
/// bindings. Safe to run concurrently from many processes.
pub async fn declare_group(
    channel: &Channel,
    names: &Names,
    group: &Group,
) -> Result<(), lapin::Error> {
    declare_queues(channel, names, group.name, group.bindings).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let main = names.queue(group.name);
    for delay in &group.retry_delays_ms {
        channel
            .queue_declare(
                names.retry_queue(group.name, *delay).into(),
                durable,
                args(&[
                    ("x-queue-type", text("quorum")),
                    ("x-message-ttl", AMQPValue::LongLongInt(*delay as i64)),
                    ("x-dead-letter-exchange", text("")),
                    ("x-dead-letter-routing-key", text(&main)),
                    // At-least-once dead-lettering: the message leaves the
                    // retry queue only once the main queue has confirmed it.
                    ("x-dead-letter-strategy", text("at-least-once")),
                    ("x-overflow", text("reject-publish")),
                ]),
            )
            .await?;
    }
    Ok(())
}
