//! The benchmark's consumer process: the real consumer runtime with a handler
//! that records when each message's effect was applied.

use serde::{Deserialize, Serialize};
use souk_shared::envelope::{Contract, Envelope};
use souk_workers::{
    process::Process,
    runtime::{Failure, Handler},
};
use sqlx::PgConnection;

pub const GROUP: &str = "bench-sink";

#[derive(Debug, Serialize, Deserialize)]
pub struct Tick {
    pub seq: u64,
}

impl Contract for Tick {
    const TYPE: &'static str = "bench.tick";
    const VERSION: u16 = 1;
}

pub struct Sink;

impl Handler for Sink {
    type Prepared = ();
    const GROUP: &'static str = GROUP;
    const BINDINGS: &'static [&'static str] = &["bench.*"];

    async fn prepare(&self, _: &Envelope) -> Result<(), Failure> {
        Ok(())
    }

    async fn apply(&self, tx: &mut PgConnection, msg: &Envelope, _: ()) -> Result<(), Failure> {
        sqlx::query(
            "INSERT INTO bench_effects (message_id, applied_at) VALUES ($1, clock_timestamp())",
        )
        .bind(msg.id)
        .execute(tx)
        .await?;
        Ok(())
    }
}

pub async fn run() -> anyhow::Result<()> {
    Process::start("bench-sink").await.consume(Sink).await;
    Ok(())
}
