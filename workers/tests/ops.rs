//! Every worker process serves /health/live, /health/ready and /metrics.

mod common;

use std::time::Duration;

use common::{Harness, spawn};
use souk_testkit::{free_port, wait_until};

const WAIT: Duration = Duration::from_secs(20);

async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    Some((resp.status().as_u16(), resp.text().await.ok()?))
}

#[tokio::test]
async fn a_worker_reports_ready_only_while_it_has_its_broker_and_exports_metrics() {
    let h = Harness::new().await;
    let up = free_port();
    let _relay = spawn(
        env!("CARGO_BIN_EXE_outbox-relay"),
        &h,
        &[("OPS_ADDR", format!("127.0.0.1:{up}"))],
    );
    wait_until("the relay to be ready", WAIT, || async {
        get(up, "/health/ready")
            .await
            .is_some_and(|(status, _)| status == 200)
    })
    .await;
    assert_eq!(get(up, "/health/live").await.unwrap().0, 200);
    let (_, metrics) = get(up, "/metrics").await.unwrap();
    assert!(metrics.contains("souk_broker_connected 1"), "{metrics}");

    // A broker it cannot reach: alive, but not ready.
    let down = free_port();
    let nowhere = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let _cut_off = spawn(
        env!("CARGO_BIN_EXE_mailer"),
        &h,
        &[
            ("OPS_ADDR", format!("127.0.0.1:{down}")),
            ("AMQP_URL", nowhere),
        ],
    );
    wait_until("the cut-off mailer to answer", WAIT, || async {
        get(down, "/health/live").await.is_some()
    })
    .await;
    let (status, body) = get(down, "/health/ready").await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(body.trim(), "database=true broker=false");
    h.finish(vec![]).await;
}
