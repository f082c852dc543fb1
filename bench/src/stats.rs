//! What every workload reports: how many, how fast, and the latency
//! percentiles, plus the memory of the processes that served it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latencies of one run, sorted once for the percentiles.
#[derive(Debug, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(mut all: Vec<Duration>) -> Self {
        all.sort_unstable();
        Self(all)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p`th percentile (nearest rank), in milliseconds.
    pub fn ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1].as_secs_f64() * 1000.0
    }
}

/// One measured run of one workload: a line of the results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    /// `W1`, `W1s`, `W2` or `B` (`B-latency` for the paced run).
    pub workload: String,
    /// What was varied: data size, process counts, query.
    pub label: String,
    pub run: u32,
    /// When the run ended (RFC 3339).
    pub at: String,
    /// Requests, paid orders or messages per second.
    pub throughput: f64,
    pub unit: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// Peak resident memory seen during the run, MiB, by process.
    pub rss_mib: Vec<(String, f64)>,
    pub cores: usize,
    /// Anything else worth keeping (the first errors, a mismatch).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
