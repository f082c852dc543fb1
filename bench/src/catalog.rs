//! W1 and W1s: the storefront's product list, a random page of 20 with
//! each item's price and stock, under `connections` concurrent connections;
//! W1s the same page through full-text search with a one-word query.
//!
//! ```text
//! souk-bench catalog --api URL [--connections 64] [--seconds 30] [--query WORD] [--per-page 20]
//! ```

use std::{sync::Arc, time::Duration};

use anyhow::Context;

use crate::{http_load, procs, stats};

pub struct Options {
    pub api: String,
    pub connections: usize,
    pub seconds: u64,
    /// A one-word search (W1s); none for the plain list (W1).
    pub query: Option<String>,
    pub per_page: u32,
    pub label: String,
    pub run: u32,
}

/// The list's path for `page` (the query escaped for a URL).
fn path(query: Option<&str>, per_page: u32, page: u32) -> String {
    let mut path = format!("/api/v1/products?per_page={per_page}&page={page}");
    if let Some(q) = query {
        path.push_str("&q=");
        path.extend(url_escape(q));
    }
    path
}

fn url_escape(s: &str) -> impl Iterator<Item = String> + '_ {
    s.bytes().map(|b| match b {
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
        _ => format!("%{b:02X}"),
    })
}

/// How many pages the list has (asked once, before the run).
async fn pages(opts: &Options) -> anyhow::Result<u32> {
    let url = format!(
        "{}{}",
        opts.api,
        path(opts.query.as_deref(), opts.per_page, 1)
    );
    let first: serde_json::Value = reqwest::get(&url).await?.error_for_status()?.json().await?;
    let total = first["total"].as_u64().context("the list has a total")?;
    anyhow::ensure!(
        total > 0,
        "the catalog is empty: run `souk-bench seed` first"
    );
    Ok(u32::try_from(total.div_ceil(u64::from(opts.per_page)))?)
}

pub async fn run(opts: Options) -> anyhow::Result<stats::Figure> {
    let pages = pages(&opts).await?;
    let workload = if opts.query.is_some() { "W1s" } else { "W1" };
    eprintln!(
        "{workload}: random page of {} ({pages} pages{}), {} connections, {} s",
        opts.per_page,
        opts.query
            .as_deref()
            .map(|q| format!(", q={q}"))
            .unwrap_or_default(),
        opts.connections,
        opts.seconds
    );
    let (query, per_page) = (opts.query.clone(), opts.per_page);
    let next: Arc<dyn Fn() -> String + Send + Sync> =
        Arc::new(move || path(query.as_deref(), per_page, rand::random_range(1..=pages)));
    let load = http_load::run(
        &opts.api,
        opts.connections,
        Duration::from_secs(opts.seconds),
        next,
    );
    let (outcome, rss_mib) = procs::during(load).await;
    let outcome = outcome?;
    Ok(stats::Figure {
        workload: workload.into(),
        label: opts.label,
        run: opts.run,
        at: stats::now(),
        throughput: outcome.per_sec(),
        unit: "req/s".into(),
        count: outcome.latencies.len() as u64,
        p50_ms: outcome.latencies.ms(50.0),
        p99_ms: outcome.latencies.ms(99.0),
        errors: outcome.errors,
        rss_mib,
        cores: stats::cores(),
        notes: outcome.first_error.into_iter().collect(),
    })
}
