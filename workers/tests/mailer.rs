//! The mailer against the real SMTP sink (maildev).

mod common;

use std::time::Duration;

use common::Harness;
use souk_shared::{contracts::EmailRequested, envelope::Envelope, parked, topology::Group};
use souk_testkit::{
    amqp_url, broker,
    mail::{mails_to, smtp_port, unique_address},
    proxy::Proxy,
    wait_until,
};
use souk_workers::{
    mailer::{Mailer, MailerConfig},
    runtime::Handler,
};

const WAIT: Duration = Duration::from_secs(20);

fn config(port: u16) -> MailerConfig {
    MailerConfig {
        smtp_host: "127.0.0.1".into(),
        smtp_port: port,
        smtp_username: None,
        smtp_password: None,
        from: "Souk <no-reply@souk.test>".parse().unwrap(),
        timeout: Duration::from_secs(5),
        lease: Duration::from_secs(30),
    }
}

fn support_mail(to: &str) -> EmailRequested {
    EmailRequested {
        to: to.into(),
        template: "support_request_received".into(),
        data: serde_json::json!({
            "name": "Ann", "subject": "Late parcel", "message": "Where is my order?", "request_id": "r-42",
        }),
    }
}

async fn declare_mailer_group(h: &Harness, delays: &[u64]) {
    let channel = h.amqp.create_channel().await.unwrap();
    let group = Group {
        name: Mailer::GROUP,
        bindings: Mailer::BINDINGS,
        retry_delays_ms: delays.to_vec(),
    };
    souk_shared::topology::declare_group(&channel, &h.names, &group)
        .await
        .unwrap();
}

fn settings(h: &Harness, delays: &[u64]) -> souk_workers::runtime::ConsumerSettings {
    let mut s = h.consumer_settings(&amqp_url(), 4);
    s.retry_delays_ms = delays.to_vec();
    s.connection_name = format!("{}.mailer@test", h.prefix);
    s
}

async fn finish(h: Harness, tasks: Vec<tokio::task::JoinHandle<()>>, delays: &[u64]) {
    broker::delete_group(&h.amqp, &h.names, Mailer::GROUP, delays).await;
    h.finish(tasks).await;
}

#[tokio::test]
async fn an_email_message_delivered_twice_sends_exactly_one_rendered_mail() {
    let h = Harness::new().await;
    let delays = [200];
    declare_mailer_group(&h, &delays).await;
    let to = unique_address();
    let msg = Envelope::new(&support_mail(&to), "corr-1");
    h.publish(&msg).await;
    h.publish(&msg).await;
    let (task, _) = h.spawn_handler(Mailer::new(&config(smtp_port())), settings(&h, &delays));

    wait_until("the mail in the sink", WAIT, || async {
        !mails_to(&to).await.is_empty()
    })
    .await;
    wait_until("both deliveries handled", WAIT, || async {
        h.ready(&h.names.queue("mailer")).await == 0
    })
    .await;
    wait_until("the send to be logged", WAIT, || async {
        souk_testkit::count(&h.db.pool, "SELECT count(*) FROM email_log").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mails = mails_to(&to).await;
    assert_eq!(mails.len(), 1, "one mail, not two");
    let mail = &mails[0];
    assert_eq!(mail.subject, "We received your request: Late parcel");
    assert!(mail.text.contains("Hello Ann"), "{}", mail.text);
    assert!(mail.text.contains("r-42"));
    assert!(
        mail.html.contains("<strong>Late parcel</strong>"),
        "{}",
        mail.html
    );
    assert_eq!(
        mail.message_id(),
        Some(format!("<{}@souk>", msg.id).as_str())
    );
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM email_log WHERE message_id = $1 AND recipient = $2",
    )
    .bind(msg.id)
    .bind(&to)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(logged, 1);
    finish(h, vec![task], &delays).await;
}

#[tokio::test]
async fn an_unreachable_smtp_server_is_retried_until_it_answers() {
    let h = Harness::new().await;
    let delays = [200, 400, 800, 1600, 3200];
    declare_mailer_group(&h, &delays).await;
    let smtp = Proxy::start(format!("127.0.0.1:{}", smtp_port()).parse().unwrap(), false).await;
    let (task, _) = h.spawn_handler(
        Mailer::new(&config(smtp.addr.port())),
        settings(&h, &delays),
    );

    let to = unique_address();
    let msg = Envelope::new(&support_mail(&to), "corr-2");
    h.publish(&msg).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(mails_to(&to).await.is_empty());
    smtp.set_up(true);

    wait_until("the mail after the SMTP server came back", WAIT, || async {
        !mails_to(&to).await.is_empty()
    })
    .await;
    // The mail is sent before the processed record commits.
    wait_until("the processed record", WAIT, || async {
        souk_testkit::count(&h.db.pool, "SELECT count(*) FROM processed_messages").await == 1
    })
    .await;
    let attempt: i32 =
        sqlx::query_scalar("SELECT attempt FROM processed_messages WHERE message_id = $1")
            .bind(msg.id)
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert!(
        attempt >= 1,
        "sent on a retry, not the first attempt (attempt {attempt})"
    );
    assert_eq!(mails_to(&to).await.len(), 1);
    assert_eq!(h.ready(&h.names.parking_queue("mailer")).await, 0);
    finish(h, vec![task], &delays).await;
}

#[tokio::test]
async fn a_mail_that_can_never_be_sent_is_parked_at_once_with_the_reason() {
    let h = Harness::new().await;
    let delays = [200];
    declare_mailer_group(&h, &delays).await;
    let (task, _) = h.spawn_handler(Mailer::new(&config(smtp_port())), settings(&h, &delays));
    let to = unique_address();
    let mut bad = support_mail(&to);
    bad.template = "no_such_template".into();
    let msg = Envelope::new(&bad, "corr-3");
    h.publish(&msg).await;

    let parked_queue = h.names.parking_queue("mailer");
    wait_until("the message to be parked", WAIT, || async {
        h.ready(&parked_queue).await == 1
    })
    .await;
    let listed = parked::list(&h.amqp, &h.names, "mailer", 10).await.unwrap();
    assert_eq!(
        listed[0].attempts,
        Some(1),
        "permanent failures are not retried"
    );
    assert!(
        listed[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no_such_template"),
        "{:?}",
        listed[0]
    );
    assert!(mails_to(&to).await.is_empty());
    finish(h, vec![task], &delays).await;
}

#[test]
fn a_mailer_whose_lease_would_run_out_mid_send_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailer"))
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .env("AMQP_URL", amqp_url())
        .env("OPS_ADDR", "127.0.0.1:0")
        .env("SMTP_TIMEOUT_MS", "10000")
        .env("MAILER_LEASE_MS", "15000")
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("MAILER_LEASE_MS") && stderr.contains("SMTP_TIMEOUT_MS"),
        "{stderr}"
    );
}
