//! Worker processes killed with SIGKILL in the middle of their work lose
//! nothing and apply nothing twice. These run the real binaries.

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Harness, Recorded, spawn};
use souk_shared::{
    contracts::EmailRequested,
    envelope::Envelope,
    outbox,
    topology::{self, Group},
};
use souk_testkit::{
    count,
    mail::{mails_to, smtp_port, unique_address},
    proxy::Tarpit,
    wait_until,
};
use tokio::process::Child;

const WAIT: Duration = Duration::from_secs(30);
const DELAYS: &[u64] = &[300, 600, 1200, 2400, 4800];

async fn kill9(child: &mut Child) {
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reaped");
}

#[tokio::test]
async fn a_mailer_killed_while_sending_loses_nothing_and_the_mail_goes_out_once() {
    let h = Harness::new().await;
    let tarpit = Tarpit::start().await;
    let delays = DELAYS
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let to = unique_address();
    let mail = EmailRequested {
        to: to.clone(),
        template: "support_request_received".into(),
        data: serde_json::json!({"name": "Ann", "subject": "Killed", "message": "m", "request_id": "r"}),
    };
    let envelope = Envelope::new(&mail, "corr-kill");
    let group = Group {
        name: "mailer",
        bindings: &["notify.email"],
        retry_delays_ms: DELAYS.to_vec(),
    };
    let channel = h.amqp.create_channel().await.unwrap();
    topology::declare_group(&channel, &h.names, &group)
        .await
        .unwrap();
    h.publish(&envelope).await;

    // The first mailer takes the message and hangs talking to a dead SMTP server.
    let settings = |smtp: u16| {
        vec![
            ("SMTP_PORT", smtp.to_string()),
            ("SMTP_TIMEOUT_MS", "2000".to_string()),
            ("MAILER_LEASE_MS", "4000".to_string()),
            ("RETRY_DELAYS_MS", delays.clone()),
        ]
    };
    let mut first = spawn(
        env!("CARGO_BIN_EXE_mailer"),
        &h,
        &settings(tarpit.addr.port()),
    );
    wait_until("the first mailer to claim the message", WAIT, || async {
        count(&h.db.pool, "SELECT count(*) FROM message_claims").await == 1
    })
    .await;
    kill9(&mut first).await;

    // A replacement with a working SMTP server gets the redelivery.
    let mut second = spawn(env!("CARGO_BIN_EXE_mailer"), &h, &settings(smtp_port()));
    wait_until("the mail", WAIT, || async {
        !mails_to(&to).await.is_empty()
    })
    .await;
    wait_until("the processed record", WAIT, || async {
        count(
            &h.db.pool,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'mailer'",
        )
        .await
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mails_to(&to).await.len(), 1, "sent once");
    assert_eq!(count(&h.db.pool, "SELECT count(*) FROM email_log").await, 1);
    assert_eq!(
        count(&h.db.pool, "SELECT count(*) FROM message_claims").await,
        0
    );
    assert_eq!(
        souk_testkit::broker::ready_count(&h.amqp, &h.names.parking_queue("mailer")).await,
        0
    );
    kill9(&mut second).await;
    souk_testkit::broker::delete_group(&h.amqp, &h.names, "mailer", DELAYS).await;
    h.finish(vec![]).await;
}

#[tokio::test]
async fn a_relay_killed_mid_backlog_loses_nothing() {
    let h = Harness::new().await;
    let mut tap = h.tap().await;
    const N: usize = 3000;
    let mut ids = HashSet::new();
    let mut tx = h.db.pool.begin().await.unwrap();
    for i in 0..N {
        let e = Envelope::new(&Recorded::key(&format!("r{i}")), "c");
        ids.insert(e.id.to_string());
        outbox::enqueue(&mut tx, &e).await.unwrap();
    }
    tx.commit().await.unwrap();

    let relay = |h: &Harness| {
        spawn(
            env!("CARGO_BIN_EXE_outbox-relay"),
            h,
            &[("RELAY_BATCH_SIZE", "10".into())],
        )
    };
    let published = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL";
    let mut first = relay(&h);
    wait_until("the first relay to be under way", WAIT, || async {
        count(&h.db.pool, published).await > 0
    })
    .await;
    kill9(&mut first).await;
    let after_kill = count(&h.db.pool, published).await;
    assert!(
        after_kill < N as i64,
        "killed mid-backlog ({after_kill} of {N} published)"
    );

    let mut second = relay(&h);
    wait_until("every row published", WAIT, || async {
        count(&h.db.pool, published).await == N as i64
    })
    .await;

    let got: HashSet<String> = common::tapped(&mut tap, N).await.into_keys().collect();
    assert_eq!(got, ids, "every row reached the broker");
    kill9(&mut second).await;
    h.finish(vec![]).await;
}
