//! Souk's benchmark harness.
//!
//! ```text
//! souk-bench backbone [--messages N] [--producers P] [--rate R] [--seconds S]
//! souk-bench checkout --api URL --stripe URL --database URL [--customers N] [--seconds S] [--poll-ms MS]
//! souk-bench stripe --port P --webhook URL --secret S
//! ```
//!
//! `backbone` measures the messaging backbone: messages per second from an
//! outbox insert (committed by P concurrent producers, one message per
//! transaction, like API requests) to the committed effect of a consumer, and
//! the commit-to-effect latency at a fixed rate. The relay is the real
//! `outbox-relay` binary and the consumer a separate process (`souk-bench
//! sink`) on the real consumer runtime, so the figures include every hop.

mod backbone;
mod checkout;
mod sink;
mod stripe_standin;

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> anyhow::Result<T> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("{name} needs a value")),
    }
}

fn text(args: &[String], name: &str) -> anyhow::Result<String> {
    flag(args, name, String::new())
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow::anyhow!("{name} is required"))
}

const USAGE: &str = "usage:
  souk-bench backbone [--messages N] [--producers P] [--rate R] [--seconds S]
  souk-bench checkout --api URL --stripe URL --database URL [--customers N] [--seconds S] [--poll-ms MS]
  souk-bench stripe --port P --webhook URL --secret S";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("backbone") => {
            let opts = backbone::Options {
                messages: flag(&args, "--messages", 20_000)?,
                producers: flag(&args, "--producers", 16)?,
                rate: flag(&args, "--rate", 1_000)?,
                seconds: flag(&args, "--seconds", 10)?,
            };
            backbone::run(opts).await
        }
        Some("sink") => sink::run().await,
        Some("checkout") => {
            let opts = checkout::Options {
                api: text(&args, "--api")?,
                stripe: text(&args, "--stripe")?,
                database: text(&args, "--database")?,
                customers: flag(&args, "--customers", 32)?,
                seconds: flag(&args, "--seconds", 60)?,
                poll: std::time::Duration::from_millis(flag(&args, "--poll-ms", 20)?),
            };
            checkout::run(opts).await
        }
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
