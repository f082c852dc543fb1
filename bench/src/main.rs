//! Souk's benchmark harness: the workloads of `../shared/BENCHMARKS.md`
//! against a running system, each run printed and appended to a results
//! file (JSON lines), and the set as a Markdown table.
//!
//! ```text
//! souk-bench seed --database URL [--products 1000]
//! souk-bench catalog --api URL [--connections 64] [--seconds 30] [--query WORD] [--per-page 20]
//! souk-bench checkout --api URL --stripe URL --database URL [--customers 32] [--seconds 60] [--poll-ms MS]
//! souk-bench backbone [--messages 20000] [--producers 16] [--rate 1000] [--seconds 10]
//! souk-bench all --api URL --stripe URL --database URL [--products 1000] [--seconds 30] [--checkout-seconds 60]
//! souk-bench report [FILE]
//! souk-bench stripe --port P --webhook URL --secret S     (the fast Stripe stand-in)
//! ```
//!
//! Every workload takes `--runs N` (2), `--label TEXT` (what was varied) and
//! `--out FILE` (`bench/results/results.jsonl`). `bench/run.sh` starts a
//! release build of the whole system and runs every figure of
//! `docs/benchmarks.md`.

mod backbone;
mod catalog;
mod checkout;
mod http_load;
mod procs;
mod report;
mod seed;
mod sink;
mod stats;
mod stripe_standin;

use std::{path::PathBuf, time::Duration};

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> anyhow::Result<T> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("{name} needs a value")),
    }
}

fn optional(args: &[String], name: &str) -> anyhow::Result<Option<String>> {
    Ok(Some(flag(args, name, String::new())?).filter(|v| !v.is_empty()))
}

fn text(args: &[String], name: &str) -> anyhow::Result<String> {
    optional(args, name)?.ok_or_else(|| anyhow::anyhow!("{name} is required"))
}

const USAGE: &str = "usage:
  souk-bench seed --database URL [--products 1000]
  souk-bench catalog --api URL [--connections 64] [--seconds 30] [--query WORD] [--per-page 20]
  souk-bench checkout --api URL --stripe URL --database URL [--customers 32] [--seconds 60] [--poll-ms MS]
  souk-bench backbone [--messages 20000] [--producers 16] [--rate 1000] [--seconds 10]
  souk-bench all --api URL --stripe URL --database URL [--products 1000] [--seconds 30] [--checkout-seconds 60]
  souk-bench report [FILE]
  souk-bench stripe --port P --webhook URL --secret S
every workload also takes --runs N (2), --label TEXT and --out FILE (bench/results/results.jsonl)";

/// What every workload is asked for in common.
struct Common {
    runs: u32,
    label: String,
    out: PathBuf,
}

impl Common {
    fn from(args: &[String], label: &str) -> anyhow::Result<Self> {
        Ok(Self {
            runs: flag(args, "--runs", 2)?,
            label: flag(args, "--label", label.to_string())?,
            out: flag(args, "--out", PathBuf::from("bench/results/results.jsonl"))?,
        })
    }
}

fn catalog_options(
    args: &[String],
    c: &Common,
    query: Option<String>,
    run: u32,
) -> anyhow::Result<catalog::Options> {
    Ok(catalog::Options {
        api: text(args, "--api")?,
        connections: flag(args, "--connections", 64)?,
        seconds: flag(args, "--seconds", 30)?,
        query,
        per_page: flag(args, "--per-page", 20)?,
        label: c.label.clone(),
        run,
    })
}

fn checkout_options(
    args: &[String],
    c: &Common,
    seconds: u64,
    run: u32,
) -> anyhow::Result<checkout::Options> {
    Ok(checkout::Options {
        api: text(args, "--api")?,
        stripe: text(args, "--stripe")?,
        stripe_key: flag(args, "--stripe-key", "sk_test_bench".to_string())?,
        database: text(args, "--database")?,
        customers: flag(args, "--customers", 32)?,
        seconds,
        poll: optional(args, "--poll-ms")?
            .map(|ms| ms.parse().map(Duration::from_millis))
            .transpose()?,
        label: c.label.clone(),
        run,
    })
}

fn backbone_options(args: &[String], c: &Common, run: u32) -> anyhow::Result<backbone::Options> {
    Ok(backbone::Options {
        messages: flag(args, "--messages", 20_000)?,
        producers: flag(args, "--producers", 16)?,
        rate: flag(args, "--rate", 1_000)?,
        seconds: flag(args, "--backbone-seconds", flag(args, "--seconds", 10)?)?,
        label: c.label.clone(),
        run,
    })
}

async fn catalog_runs(args: &[String], c: &Common, query: Option<String>) -> anyhow::Result<()> {
    for run in 1..=c.runs {
        let figure = catalog::run(catalog_options(args, c, query.clone(), run)?).await?;
        report::record(&figure, &c.out)?;
    }
    Ok(())
}

async fn checkout_runs(args: &[String], c: &Common, seconds: u64) -> anyhow::Result<()> {
    for run in 1..=c.runs {
        let figure = checkout::run(checkout_options(args, c, seconds, run)?).await?;
        report::record(&figure, &c.out)?;
    }
    Ok(())
}

async fn backbone_runs(args: &[String], c: &Common) -> anyhow::Result<()> {
    for run in 1..=c.runs {
        for figure in backbone::run(backbone_options(args, c, run)?).await? {
            report::record(&figure, &c.out)?;
        }
    }
    Ok(())
}

/// Everything, in the order of the workloads' list: seed, W1, W1s, W2, B.
async fn all(args: &[String]) -> anyhow::Result<()> {
    let products: u32 = flag(args, "--products", 1000)?;
    let database = text(args, "--database")?;
    seed::run(&database, products).await?;
    let c = Common::from(args, &format!("{products} products"))?;
    // A warm-up, so that no measured run is the cold one.
    let mut warm = catalog_options(args, &c, None, 0)?;
    warm.seconds = 3;
    catalog::run(warm).await?;
    catalog_runs(args, &c, None).await?;
    catalog_runs(args, &c, Some(flag(args, "--query", "walnut".to_string())?)).await?;
    checkout::warm_up(checkout_options(args, &c, 10, 0)?).await?;
    checkout_runs(args, &c, flag(args, "--checkout-seconds", 60)?).await?;
    backbone_runs(args, &c).await?;
    println!("\n{}", report::table(&c.out)?);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let common = |label: &str| Common::from(&args, label);
    match args.first().map(String::as_str) {
        Some("seed") => {
            seed::run(
                &text(&args, "--database")?,
                flag(&args, "--products", 1000)?,
            )
            .await
        }
        Some("catalog") => {
            let query = optional(&args, "--query")?;
            catalog_runs(&args, &common("catalog")?, query).await
        }
        Some("checkout") => {
            let c = common("checkout")?;
            checkout_runs(&args, &c, flag(&args, "--seconds", 60)?).await
        }
        Some("backbone") => backbone_runs(&args, &common("backbone")?).await,
        Some("all") => all(&args).await,
        Some("report") => {
            let file = args
                .get(1)
                .map_or("bench/results/results.jsonl", String::as_str);
            println!("{}", report::table(std::path::Path::new(file))?);
            Ok(())
        }
        Some("sink") => sink::run().await,
        Some("stripe") => {
            let opts = stripe_standin::Options {
                port: flag(&args, "--port", 18420)?,
                webhook: text(&args, "--webhook")?,
                secret: text(&args, "--secret")?,
            };
            stripe_standin::run(opts).await
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2)
        }
    }
}
