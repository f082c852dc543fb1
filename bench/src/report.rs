//! Results: each run appended as a JSON line to the results file, and the
//! set printed as a Markdown table (medians across runs, as
//! `../shared/BENCHMARKS.md` asks) for `docs/benchmarks.md`.

use std::{collections::BTreeMap, io::Write, path::Path};

use crate::stats::Figure;

/// Prints one run and appends it to `out`.
pub fn record(figure: &Figure, out: &Path) -> anyhow::Result<()> {
    println!(
        "{} [{}] run {}: {:.1} {}, p50 {:.1} ms, p99 {:.1} ms, {} errors",
        figure.workload,
        figure.label,
        figure.run,
        figure.throughput,
        figure.unit,
        figure.p50_ms,
        figure.p99_ms,
        figure.errors
    );
    for note in &figure.notes {
        println!("  {note}");
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)?;
    writeln!(file, "{}", serde_json::to_string(figure)?)?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The results file as a Markdown table: one row per workload and label,
/// each run's figures and their median; then peak memory by process.
pub fn table(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let figures: Vec<Figure> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut groups: BTreeMap<(String, String), Vec<&Figure>> = BTreeMap::new();
    let mut order = vec![];
    for f in &figures {
        let key = (f.workload.clone(), f.label.clone());
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(f);
    }
    let mut out = String::new();
    let cores = figures.first().map_or(0, |f| f.cores);
    let at = figures.last().map_or(String::new(), |f| f.at.clone());
    out.push_str(&format!("Measured {at}, {cores} cores.\n\n"));
    out.push_str("| workload | setting | runs | median | p50 / p99 (median) | errors |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for key in &order {
        let runs = &groups[key];
        let each: Vec<String> = runs
            .iter()
            .map(|f| format!("{:.1}", f.throughput))
            .collect();
        let unit = &runs[0].unit;
        out.push_str(&format!(
            "| {} | {} | {} | **{:.1} {unit}** | {:.1} / {:.1} ms | {} |\n",
            key.0,
            key.1,
            each.join(", "),
            median(runs.iter().map(|f| f.throughput).collect()),
            median(runs.iter().map(|f| f.p50_ms).collect()),
            median(runs.iter().map(|f| f.p99_ms).collect()),
            runs.iter().map(|f| f.errors).sum::<u64>(),
        ));
    }
    out.push_str("\nPeak resident memory during the runs (MiB):\n\n");
    out.push_str("| workload | setting | by process |\n|---|---|---|\n");
    for key in &order {
        let mut peak: BTreeMap<&str, f64> = BTreeMap::new();
        for f in &groups[key] {
            for (name, mib) in &f.rss_mib {
                let p = peak.entry(name).or_default();
                *p = p.max(*mib);
            }
        }
        let list: Vec<String> = peak.iter().map(|(n, m)| format!("{n} {m:.0}")).collect();
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            key.0,
            key.1,
            list.join(", ")
        ));
    }
    Ok(out)
}
