//! The messaging backbone against real PostgreSQL and RabbitMQ: outbox,
//! relay, consumer runtime, retries, parking, reconnects.

mod common;

use std::time::Duration;

use common::{Harness, Leased, Overlap, Recorded, Recorder};
use lapin::options::BasicGetOptions;
use souk_shared::{amqp, envelope::Envelope, outbox, parked};
use souk_testkit::{amqp_url, broker, count, proxy::Proxy, wait_until};
use souk_workers::runtime::{Applied, Failure, apply_once};

const WAIT: Duration = Duration::from_secs(20);

/// Outbox rows the relay has published.
const PUBLISHED: &str = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL";
/// Outbox rows still waiting for the relay.
const UNPUBLISHED: &str = "SELECT count(*) FROM outbox WHERE published_at IS NULL";

/// The attempt `msg`'s processed record shows.
async fn processed_attempt(h: &Harness, msg: &Envelope) -> i32 {
    sqlx::query_scalar("SELECT attempt FROM processed_messages WHERE message_id = $1")
        .bind(msg.id)
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
}

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
        count(&h.db.pool, PUBLISHED).await == 1
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
    assert_eq!(
        count(&h.db.pool, UNPUBLISHED).await,
        25,
        "every write was kept while the broker was away"
    );
    assert_eq!(h.effects().await, 0);

    proxy.set_up(true);
    wait_until("all 25 effects", WAIT, || async { h.effects().await == 25 }).await;
    wait_until("an empty outbox backlog", WAIT, || async {
        count(&h.db.pool, UNPUBLISHED).await == 0
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
    assert_eq!(
        processed_attempt(&h, &msg).await,
        2,
        "the processed record shows the attempts"
    );
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
    assert_eq!(count(&h.db.pool, UNPUBLISHED).await, 0);
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

const CLAIMS: &str = "SELECT count(*) FROM message_claims";

/// Runs `apply_once` on its own task, as a second consumer would.
fn apply_elsewhere(
    h: &Harness,
    handler: &Leased,
    msg: &Envelope,
) -> tokio::task::JoinHandle<Result<Applied, Failure>> {
    let (pool, handler, msg) = (h.db.pool.clone(), handler.clone(), msg.clone());
    tokio::spawn(async move { apply_once(&pool, &handler, &msg).await })
}

#[tokio::test]
async fn a_copy_claiming_while_the_holder_commits_finds_it_processed_and_does_not_prepare_again() {
    let h = Harness::new().await;
    let pool = &h.db.pool;
    let handler = Leased::new(Duration::from_secs(30));
    let msg = Envelope::new(&Recorded::key("raced"), "c");
    // Copy A holds the claim and is committing: its processed row and the
    // claim's removal are written but not committed yet.
    sqlx::query(
        "INSERT INTO message_claims (consumer, message_id, claimed_until)
         VALUES ('recorder', $1, now() + interval '1 minute')",
    )
    .bind(msg.id)
    .execute(pool)
    .await
    .unwrap();
    let mut a = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO processed_messages (consumer, message_id, attempt) VALUES ('recorder', $1, 0)",
    )
    .bind(msg.id)
    .execute(&mut *a)
    .await
    .unwrap();
    sqlx::query("DELETE FROM message_claims WHERE message_id = $1")
        .bind(msg.id)
        .execute(&mut *a)
        .await
        .unwrap();

    // Copy B asks meanwhile: its snapshot has the message unprocessed, and
    // its claim waits for A's transaction.
    let b = apply_elsewhere(&h, &handler, &msg);
    wait_until("B's claim to wait for A", WAIT, || async {
        count(
            pool,
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;
    a.commit().await.unwrap();

    assert_eq!(b.await.unwrap().unwrap(), Applied::Before);
    assert_eq!(handler.prepares(), 0, "B did not repeat the outside call");
    assert_eq!(count(pool, CLAIMS).await, 0, "nor kept a claim");
    h.finish(vec![]).await;
}

#[tokio::test]
async fn a_database_failure_after_an_outside_call_retries_the_transaction_not_the_call() {
    let h = Harness::new().await;
    let pool = &h.db.pool;
    let handler = Leased::new(Duration::from_secs(30));
    handler
        .db_failures
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let msg = Envelope::new(&Recorded::key("hiccup"), "c");
    assert_eq!(
        apply_once(pool, &handler, &msg).await.unwrap(),
        Applied::Now
    );
    assert_eq!(handler.prepares(), 1, "one outside call");
    assert_eq!(handler.applies(), 3, "its effect written on the third try");
    assert_eq!(h.effects_for("hiccup").await, 1);
    assert_eq!(count(pool, CLAIMS).await, 0);

    // A database that stays down: a few tries, then the message fails as before.
    let down = Leased::new(Duration::from_secs(30));
    down.db_failures
        .store(100, std::sync::atomic::Ordering::SeqCst);
    let msg = Envelope::new(&Recorded::key("down"), "c");
    let outcome = apply_once(pool, &down, &msg).await;
    assert!(matches!(outcome, Err(Failure::Transient(_))), "{outcome:?}");
    assert_eq!((down.prepares(), down.applies()), (1, 3));
    assert_eq!(count(pool, CLAIMS).await, 0, "the claim is given back");

    // A handler's own refusal is not tried again.
    let refusing = Leased {
        apply_refuses: true,
        ..Leased::new(Duration::from_secs(30))
    };
    let msg = Envelope::new(&Recorded::key("refused"), "c");
    let outcome = apply_once(pool, &refusing, &msg).await;
    assert!(matches!(outcome, Err(Failure::Permanent(_))), "{outcome:?}");
    assert_eq!((refusing.prepares(), refusing.applies()), (1, 1));
    h.finish(vec![]).await;
}

#[tokio::test]
async fn a_copy_held_by_another_consumer_waits_without_using_up_its_attempts() {
    let h = Harness::new().await;
    let msg = Envelope::new(&Recorded::key("held"), "c");
    // Another consumer holds the message for 1.5 s: several times what the
    // retry delays (100 ms, 200 ms) would allow before parking it.
    sqlx::query(
        "INSERT INTO message_claims (consumer, message_id, claimed_until)
         VALUES ('recorder', $1, now() + interval '1.5 seconds')",
    )
    .bind(msg.id)
    .execute(&h.db.pool)
    .await
    .unwrap();
    let handler = Leased::new(Duration::from_secs(30));
    let (consumer, _) = h.spawn_handler(handler.clone(), h.consumer_settings(&amqp_url(), 2));
    h.publish(&msg).await;

    // Once the other's lease ran out this copy takes over.
    wait_until("the held message's effect", WAIT, || async {
        h.effects_for("held").await == 1
    })
    .await;
    assert_eq!(
        h.ready(&h.names.parking_queue("recorder")).await,
        0,
        "never parked"
    );
    assert_eq!(
        processed_attempt(&h, &msg).await,
        0,
        "waiting for the holder used no attempt"
    );
    assert_eq!(handler.prepares(), 1);
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn a_holder_whose_lease_was_taken_over_leaves_the_new_holders_claim_alone() {
    let h = Harness::new().await;
    let pool = &h.db.pool;
    // A's lease runs out while it is still preparing, which then fails.
    let slow = Leased {
        prepare_sleep: Duration::from_millis(800),
        prepare_fails: true,
        ..Leased::new(Duration::from_millis(200))
    };
    let msg = Envelope::new(&Recorded::key("taken-over"), "c");
    let a = apply_elsewhere(&h, &slow, &msg);
    wait_until("A's claim", WAIT, || async {
        count(pool, CLAIMS).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // B takes the expired claim over, as `claim` does.
    let taken = sqlx::query(
        "UPDATE message_claims SET claimed_until = now() + interval '1 minute'
          WHERE message_id = $1 AND claimed_until < now()",
    )
    .bind(msg.id)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(taken.rows_affected(), 1, "A's lease had run out");

    let outcome = a.await.unwrap();
    assert!(matches!(outcome, Err(Failure::Transient(_))), "{outcome:?}");
    assert_eq!(
        count(pool, CLAIMS).await,
        1,
        "A gave back only its own claim, not B's"
    );
    h.finish(vec![]).await;
}

#[tokio::test]
async fn after_a_reconnect_the_lost_sessions_messages_still_count_against_the_concurrency() {
    let h = Harness::new().await;
    // The first handling is held until the new session is surely consuming
    // and holds the broker's second copy: a reconnect slower than any fixed
    // handling time cannot make this pass without proving anything.
    let overlap = Overlap::gated();
    let mut settings = h.consumer_settings(&amqp_url(), 1);
    settings.batch = 1;
    let (consumer, readiness) = h.spawn_handler(overlap.clone(), settings);
    h.publish(&Envelope::new(&Recorded::key("slow"), "c")).await;
    wait_until("the consumer to be busy", WAIT, || async {
        overlap.now() == 1
    })
    .await;

    // The connection goes; the message in hand is still being handled, and
    // the broker hands its copy to the next session.
    let closed = broker::close_connections_named(&format!("{}.recorder@", h.prefix)).await;
    assert_eq!(closed, 1);
    let queue = h.names.queue("recorder");
    wait_until("a new session to take the broker's copy", WAIT, || async {
        readiness.broker() && h.ready(&queue).await == 0
    })
    .await;
    // Time for the new session to start the copy, were it given a slot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        overlap.most(),
        1,
        "the new session waited for the old one's slot (concurrency 1)"
    );
    overlap.open();
    wait_until("the first handling to finish", WAIT, || async {
        h.effects_for("slow").await == 1
    })
    .await;
    assert_eq!(overlap.most(), 1);
    h.finish(vec![consumer]).await;
}

#[tokio::test]
async fn a_relay_draining_a_backlog_stops_on_shutdown_without_finishing_it() {
    let h = Harness::new().await;
    const N: i64 = 2000;
    let mut tx = h.db.pool.begin().await.unwrap();
    for i in 0..N {
        let e = Envelope::new(&Recorded::key(&format!("d{i}")), "c");
        outbox::enqueue(&mut tx, &e).await.unwrap();
    }
    tx.commit().await.unwrap();
    let relay = h.spawn_relay(&amqp_url(), 1);
    wait_until("the relay to be under way", WAIT, || async {
        count(&h.db.pool, PUBLISHED).await > 0
    })
    .await;
    h.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), relay)
        .await
        .expect("the relay stops soon")
        .unwrap();
    let done = count(&h.db.pool, PUBLISHED).await;
    assert!(done < N, "stopped mid-backlog ({done} of {N} published)");
    h.finish(vec![]).await;
}

#[tokio::test]
async fn a_message_no_queue_is_bound_for_is_kept_in_the_unrouted_queue() {
    let h = Harness::new().await;
    let mut lost = Envelope::new(&Recorded::key("lost"), "c");
    lost.kind = "nobody.listens".into();
    let mut tx = h.db.pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &lost).await.unwrap();
    tx.commit().await.unwrap();
    let relay = h.spawn_relay(&amqp_url(), 10);

    let unrouted = h.names.unrouted_queue();
    wait_until("the message in the unrouted queue", WAIT, || async {
        h.ready(&unrouted).await == 1
    })
    .await;
    wait_until("its row to be marked published", WAIT, || async {
        count(&h.db.pool, PUBLISHED).await == 1
    })
    .await;
    // Operators list it like a parked message (the queue is left as it was).
    let listed = parked::list(&h.amqp, &h.names, parked::UNROUTED, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].message_id, Some(lost.id.to_string()));
    assert_eq!(listed[0].kind.as_deref(), Some("nobody.listens"));
    let error = listed[0].error.clone().unwrap_or_default();
    assert!(error.contains("nobody.listens"), "{error}");
    // Replayed while still nothing takes it: it stays.
    let replayed = parked::replay(&h.amqp, &h.names, parked::UNROUTED, None)
        .await
        .unwrap();
    assert_eq!(replayed, 0);
    // Left unacked, it is back once the broker has handled the replay's
    // channel closing, which can come after the replay has returned.
    wait_until("it to be back in the unrouted queue", WAIT, || async {
        h.ready(&unrouted).await == 1
    })
    .await;
    // Once a queue is bound for its type, the replay delivers it there.
    let channel = h.amqp.create_channel().await.unwrap();
    let bound = format!("{}.late", h.prefix);
    channel
        .queue_declare(
            bound.as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            bound.as_str().into(),
            h.names.events_exchange().as_str().into(),
            "nobody.listens".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let replayed = parked::replay(&h.amqp, &h.names, parked::UNROUTED, None)
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    assert_eq!(h.ready(&unrouted).await, 0);
    wait_until("the replayed message in the bound queue", WAIT, || async {
        h.ready(&bound).await == 1
    })
    .await;
    let got = channel
        .basic_get(bound.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message");
    assert_eq!(
        Envelope::from_bytes(&got.delivery.data).unwrap().id,
        lost.id
    );
    for queue in [&unrouted, &bound] {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    h.finish(vec![relay]).await;
}

#[tokio::test]
async fn a_failure_that_cannot_be_republished_reconnects_instead_of_looping_on_the_handler() {
    let h = Harness::new().await;
    // Every prepare (the outside call) fails transiently.
    let handler = Leased {
        prepare_fails: true,
        ..Leased::new(Duration::from_secs(30))
    };
    let (consumer, readiness) =
        h.spawn_handler(handler.clone(), h.consumer_settings(&amqp_url(), 2));
    wait_until("the consumer to connect", WAIT, || async {
        readiness.broker()
    })
    .await;
    let needle = format!("{}.recorder@", h.prefix);
    let first_session = common::connection_pids(&needle).await;
    assert_eq!(first_session.len(), 1, "{first_session:?}");

    // The first retry queue goes away: the confirmed send to it comes back
    // unroutable, so the first failure cannot be moved on.
    let first_retry = h.names.retry_queue("recorder", common::DELAYS[0]);
    let channel = h.amqp.create_channel().await.unwrap();
    channel
        .queue_delete(first_retry.as_str().into(), Default::default())
        .await
        .unwrap();
    let msg = Envelope::new(&Recorded::key("stranded"), "c");
    h.publish(&msg).await;

    // The consumer reconnects, redeclaring the retry queue, and the message
    // walks its retries as usual to the parking queue, with its error.
    let parked_queue = h.names.parking_queue("recorder");
    wait_until("the message to be parked", WAIT, || async {
        h.ready(&parked_queue).await == 1
    })
    .await;
    // Each attempt called out once, plus the first again after the
    // reconnect; not once per immediate redelivery.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        handler.prepares(),
        common::DELAYS.len() as u32 + 2,
        "no hot loop on the outside call"
    );
    let listed = parked::list(&h.amqp, &h.names, "recorder", 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let p = &listed[0];
    assert_eq!(p.message_id.as_deref(), Some(msg.id.to_string().as_str()));
    assert_eq!(p.attempts, Some(common::DELAYS.len() as u32 + 1), "{p:?}");
    assert!(
        p.error
            .as_deref()
            .unwrap_or("")
            .contains("planned prepare failure"),
        "parked with its error: {p:?}"
    );
    let now = common::connection_pids(&needle).await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, first_session, "the consumer reconnected");
    assert_eq!(h.ready(&h.names.queue("recorder")).await, 0);
    h.finish(vec![consumer]).await;
}
