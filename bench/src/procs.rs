//! Resident memory of Souk's processes, read from /proc while a workload
//! runs: the peak each one reached during the run (its high-water mark would
//! include whatever it did before, such as the sign-ins ahead of W2).

use std::{collections::BTreeMap, time::Duration};

use tokio_util::sync::CancellationToken;

/// The binaries whose memory is reported (as `comm` shows them).
const NAMES: &[&str] = &[
    "souk-api",
    "outbox-relay",
    "order-splitter",
    "stock-reserver",
    "payments",
    "mailer",
    "settlement",
    "replenisher",
];

/// (name, pid, resident KiB) of every running Souk process.
fn sample() -> Vec<(String, u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let mut found = vec![];
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        let Some(name) = field("Name:").filter(|n| NAMES.contains(&n.as_str())) else {
            continue;
        };
        let kib = field("VmRSS:")
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0);
        found.push((name, pid, kib));
    }
    found
}

/// Samples every 250 ms until `stop`; the peak of each process, in MiB,
/// named `payments` or, with several processes of one binary, `payments#2`.
pub async fn peaks(stop: CancellationToken) -> Vec<(String, f64)> {
    let mut peak: BTreeMap<(String, u32), u64> = BTreeMap::new();
    loop {
        for (name, pid, kib) in sample() {
            let seen = peak.entry((name, pid)).or_default();
            *seen = (*seen).max(kib);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    let mut named = vec![];
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for ((name, _), kib) in peak {
        let n = seen.entry(name.clone()).or_default();
        *n += 1;
        let label = if *n == 1 { name } else { format!("{name}#{n}") };
        named.push((label, kib as f64 / 1024.0));
    }
    named
}

/// Runs `work` while sampling memory; its result and the peaks.
pub async fn during<T>(work: impl Future<Output = T>) -> (T, Vec<(String, f64)>) {
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(peaks(stop.clone()));
    let out = work.await;
    stop.cancel();
    (out, sampler.await.unwrap_or_default())
}
