//! The messaging backbone against real PostgreSQL and RabbitMQ: outbox,
//! relay, consumer runtime, retries, parking, reconnects.

mod common;

use std::time::Duration;

use common::{Harness, Recorded, Recorder};
use lapin::options::BasicGetOptions;
use souk_shared::{amqp, envelope::Envelope, parked};
use souk_testkit::{amqp_url, broker, count, proxy::Proxy, wait_until};
use souk_workers::runtime::{Applied, apply_once};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_committed_change_reaches_its_consumer_once_and_a_rolled_back_one_never() {
    let h = Harness::new().await;
    let (consumer, _) = h.spawn_consumer(4);
    let relay = h.spawn_relay(&amqp_url(), 100);

    let committed = h.commit(&Recorded::key("committed")).await;
    h.change(&Recorded::key("rolled-back"), false).await;

    wait_until("the committed change's effect", WAIT, || async {
        h.effects_for("committed").await == 1
    })
    .await;
    wait_until("the outbox row to be marked published", WAIT, || async {
        count(
            &h.db.pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        h.effects().await,
        1,
        "only the committed change has an effect, once"
    );
    assert_eq!(
        count(&h.db.pool, "SELECT count(*) FROM outbox").await,
        1,
        "the rolled-back row never existed"
    );
    let recorded: uuid::Uuid = sqlx::query_scalar("SELECT message_id FROM effects")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(recorded, committed.id);
    h.finish(vec![consumer, relay]).await;
}

#[tokio::test]
async fn the_same_message_delivered_twice_is_applied_once() {
    let h = Harness::new().await;
    // One at a time, so the marker is handled after both copies.
    let (consumer, _) = h.spawn_consumer(1);
    let twice = Envelope::new(&Recorded::key("twice"), "c");
    h.publish(&twice).await;
    h.publish(&twice).await;
    h.publish(&Envelope::new(&Recorded::key("marker"), "c"))
        .await;

    wait_until("the marker", WAIT, || async {
        h.effects_for("marker").await == 1
    })
    .await;
    assert_eq!(h.effects_for("twice").await, 1);
    assert_eq!(
        h.ready(&h.names.queue("recorder")).await,
        0,
        "both copies were acked"
    );
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn a_consumer_that_commits_then_dies_before_its_ack_does_not_apply_twice() {
    let h = Harness::new().await;
    let envelope = Envelope::new(&Recorded::key("crashy"), "c");
    h.publish(&envelope).await;

    // A consumer takes the message, commits its effect, and dies before acking:
    // its connection goes away with the message unacked.
    let doomed = amqp::connect(&amqp_url(), &format!("{}-doomed", h.prefix))
        .await
        .unwrap();
    let channel = doomed.create_channel().await.unwrap();
    let got = channel
        .basic_get(
            h.names.queue("recorder").as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("the message is in the queue");
    let taken = Envelope::from_bytes(&got.delivery.data).unwrap();
    assert_eq!(taken.id, envelope.id);
    assert_eq!(
        apply_once(&h.db.pool, &Recorder, &taken).await.unwrap(),
        Applied::Now
    );
    drop(got);
    doomed.close(320, "killed".into()).await.unwrap();

    // The broker redelivers it to the real consumer, which skips it.
    let (consumer, _) = h.spawn_consumer(1);
    h.publish(&Envelope::new(&Recorded::key("marker"), "c"))
        .await;
    wait_until("the marker", WAIT, || async {
        h.effects_for("marker").await == 1
    })
    .await;
    assert_eq!(
        h.effects_for("crashy").await,
        1,
        "the redelivery changed nothing"
    );
    assert_eq!(
        h.ready(&h.names.queue("recorder")).await,
        0,
        "the redelivery was acked"
    );
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn a_consumer_whose_connection_is_closed_by_the_broker_reconnects_and_loses_nothing() {
    let h = Harness::new().await;
    let (consumer, readiness) = h.spawn_consumer(4);
    h.publish(&Envelope::new(&Recorded::key("before"), "c"))
        .await;
    wait_until("the first message", WAIT, || async {
        h.effects_for("before").await == 1
    })
    .await;

    let closed = broker::close_connections_named(&format!("{}.recorder@", h.prefix)).await;
    assert_eq!(closed, 1, "the consumer's connection was found and closed");
    for i in 0..10 {
        h.publish(&Envelope::new(&Recorded::key(&format!("after-{i}")), "c"))
            .await;
    }
    wait_until("all ten later messages", WAIT, || async {
        h.effects().await == 11
    })
    .await;
    for i in 0..10 {
        assert_eq!(h.effects_for(&format!("after-{i}")).await, 1);
    }
    wait_until("readiness to recover", WAIT, || async {
        readiness.broker()
    })
    .await;
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn while_the_broker_is_unreachable_the_outbox_grows_and_drains_once_it_is_back() {
    let h = Harness::new().await;
    let target = "127.0.0.1:5672".parse().unwrap();
    let proxy = Proxy::start(target, false).await;
    let relay = h.spawn_relay(&proxy.amqp_url(), 7);
    let (consumer, _) = h.spawn_consumer(4);

    for i in 0..25 {
        h.commit(&Recorded::key(&format!("k{i}"))).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = "SELECT count(*) FROM outbox WHERE published_at IS NULL";
    assert_eq!(
        count(&h.db.pool, waiting).await,
        25,
        "every write was kept while the broker was away"
    );
    assert_eq!(h.effects().await, 0);

    proxy.set_up(true);
    wait_until("all 25 effects", WAIT, || async { h.effects().await == 25 }).await;
    wait_until("an empty outbox backlog", WAIT, || async {
        count(&h.db.pool, waiting).await == 0
    })
    .await;
    for i in 0..25 {
        assert_eq!(h.effects_for(&format!("k{i}")).await, 1);
    }
    h.finish(vec![relay, consumer]).await;
}

#[tokio::test]
async fn a_handler_that_fails_twice_then_succeeds_is_applied_once_with_its_attempts_visible() {
    let h = Harness::new().await;
    let (consumer, _) = h.spawn_consumer(2);
    let msg = Envelope::new(
        &Recorded {
            key: "flaky".into(),
            fail_attempts: 2,
            sleep_ms: 0,
        },
        "c",
    );
    h.publish(&msg).await;
    wait_until("the flaky message's effect", WAIT, || async {
        h.effects_for("flaky").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.effects_for("flaky").await, 1);
    let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM effects WHERE key = 'flaky'")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(attempt, 2, "applied on the third delivery");
    let recorded: i32 =
        sqlx::query_scalar("SELECT attempt FROM processed_messages WHERE message_id = $1")
            .bind(msg.id)
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(recorded, 2, "the processed record shows the attempts");
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn a_handler_that_always_fails_parks_the_message_with_its_error_and_replay_delivers_it() {
    let h = Harness::new().await;
    sqlx::query("INSERT INTO broken (key) VALUES ('poison')")
        .execute(&h.db.pool)
        .await
        .unwrap();
    let (consumer, _) = h.spawn_consumer(2);
    let msg = Envelope::new(&Recorded::key("poison"), "c");
    h.publish(&msg).await;

    let parked_queue = h.names.parking_queue("recorder");
    wait_until("the message to be parked", WAIT, || async {
        h.ready(&parked_queue).await == 1
    })
    .await;
    let listed = parked::list(&h.amqp, &h.names, "recorder", 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let p = &listed[0];
    assert_eq!(p.message_id.as_deref(), Some(msg.id.to_string().as_str()));
    assert_eq!(
        p.attempts,
        Some(common::DELAYS.len() as u32 + 1),
        "every attempt was used"
    );
    assert!(
        p.error
            .as_deref()
            .unwrap_or("")
            .contains("key poison is broken"),
        "{p:?}"
    );
    // Listing returns the messages when its channel closes.
    wait_until("listing to leave the message parked", WAIT, || async {
        h.ready(&parked_queue).await == 1
    })
    .await;
    assert_eq!(h.effects().await, 0);

    // The cause is fixed; an operator replays the message.
    sqlx::query("DELETE FROM broken")
        .execute(&h.db.pool)
        .await
        .unwrap();
    let replayed = parked::replay(&h.amqp, &h.names, "recorder", Some(&msg.id.to_string()))
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    wait_until("the replayed message's effect", WAIT, || async {
        h.effects_for("poison").await == 1
    })
    .await;
    assert_eq!(h.ready(&parked_queue).await, 0);
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn an_undecodable_message_is_parked_at_once() {
    let h = Harness::new().await;
    let (consumer, _) = h.spawn_consumer(1);
    h.publish_raw(b"this is not an envelope").await;
    let parked_queue = h.names.parking_queue("recorder");
    wait_until("the garbage to be parked", WAIT, || async {
        h.ready(&parked_queue).await == 1
    })
    .await;
    let listed = parked::list(&h.amqp, &h.names, "recorder", 10)
        .await
        .unwrap();
    assert!(
        listed[0]
            .error
            .as_deref()
            .unwrap_or("")
            .starts_with("undecodable envelope")
    );
    assert_eq!(listed[0].body, "this is not an envelope");
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn two_relays_publish_every_row_exactly_once() {
    let h = Harness::new().await;
    let mut tap = h.tap().await;
    const N: usize = 400;
    let mut tx = h.db.pool.begin().await.unwrap();
    for i in 0..N {
        let e = Envelope::new(&Recorded::key(&format!("r{i}")), "c");
        souk_shared::outbox::enqueue(&mut tx, &e).await.unwrap();
    }
    tx.commit().await.unwrap();
    let relays = vec![
        h.spawn_relay(&amqp_url(), 25),
        h.spawn_relay(&amqp_url(), 25),
    ];

    let ids = common::tapped(&mut tap, N).await;
    assert_eq!(ids.len(), N, "every row was published");
    assert!(ids.values().all(|&n| n == 1), "no row was published twice");
    assert_eq!(
        count(
            &h.db.pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        .await,
        0
    );
    h.finish(relays).await;
}

#[tokio::test]
async fn shutdown_lets_the_message_in_flight_finish_and_be_acked() {
    let h = Harness::new().await;
    let (consumer, _) = h.spawn_consumer(1);
    let slow = Recorded {
        key: "slow".into(),
        fail_attempts: 0,
        sleep_ms: 1500,
    };
    h.publish(&Envelope::new(&slow, "c")).await;
    let queue = h.names.queue("recorder");
    // Wait until the consumer holds it (no longer ready), then ask it to stop.
    wait_until("the consumer to take the message", WAIT, || async {
        h.ready(&queue).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.shutdown.cancel();
    tokio::time::timeout(WAIT, consumer)
        .await
        .expect("stops")
        .unwrap();
    assert_eq!(
        h.effects_for("slow").await,
        1,
        "the in-flight message finished"
    );
    assert_eq!(
        h.ready(&queue).await,
        0,
        "and was acked, not returned to the queue"
    );
    h.finish(vec![]).await;
}

#[tokio::test]
async fn a_burst_with_duplicates_and_a_bad_message_applies_each_good_one_once() {
    let h = Harness::new().await;
    sqlx::query("INSERT INTO broken (key) VALUES ('bad')")
        .execute(&h.db.pool)
        .await
        .unwrap();
    // Everything is queued before the consumer starts, so it arrives in batches.
    let mut sent = Vec::new();
    for i in 0..60 {
        let e = Envelope::new(&Recorded::key(&format!("b{i}")), "c");
        h.publish(&e).await;
        sent.push(e);
    }
    for e in sent.iter().step_by(7) {
        h.publish(e).await; // a second copy of every seventh
    }
    h.publish(&Envelope::new(&Recorded::key("bad"), "c")).await;
    let (consumer, _) = h.spawn_consumer(2);

    wait_until("all good messages", WAIT, || async {
        h.effects().await == 60
    })
    .await;
    let parked_queue = h.names.parking_queue("recorder");
    wait_until("the bad one to be parked", WAIT, || async {
        h.ready(&parked_queue).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_key: Vec<(String, i64)> =
        sqlx::query_as("SELECT key, count(*) FROM effects GROUP BY key HAVING count(*) > 1")
            .fetch_all(&h.db.pool)
            .await
            .unwrap();
    assert!(per_key.is_empty(), "applied twice: {per_key:?}");
    assert_eq!(h.effects().await, 60);
    assert_eq!(h.effects_for("bad").await, 0);
    // Messages of one batch share their transaction's start time.
    let transactions = count(
        &h.db.pool,
        "SELECT count(DISTINCT processed_at) FROM processed_messages",
    )
    .await;
    assert!(
        transactions <= 40,
        "the burst was applied in batches ({transactions} transactions for 60 messages)"
    );
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn old_processed_records_are_forgotten_and_recent_ones_kept() {
    use souk_workers::runtime::retention;
    let h = Harness::new().await;
    for (id, age_hours, consumer) in [
        (uuid::Uuid::now_v7(), 200, "recorder"),
        (uuid::Uuid::now_v7(), 1, "recorder"),
        (uuid::Uuid::now_v7(), 200, "someone-else"),
    ] {
        sqlx::query(
            "INSERT INTO processed_messages (consumer, message_id, attempt, processed_at)
             VALUES ($1, $2, 0, now() - make_interval(hours => $3))",
        )
        .bind(consumer)
        .bind(id)
        .bind(age_hours)
        .execute(&h.db.pool)
        .await
        .unwrap();
    }
    let purged = retention::purge(&h.db.pool, "recorder", Duration::from_secs(168 * 3600))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    let left: Vec<(String, bool)> = sqlx::query_as(
        "SELECT consumer, processed_at > now() - interval '2 hours' FROM processed_messages ORDER BY consumer",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        [
            ("recorder".to_string(), true),
            ("someone-else".to_string(), false)
        ]
    );
    h.finish(vec![]).await;
}
