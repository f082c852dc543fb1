//! Operator commands: apply migrations, list and replay parked messages.
//!
//! ```text
//! souk-admin migrate
//! souk-admin parked list <group> [--limit N]
//! souk-admin parked replay <group> [<message-id> | --all]
//! ```

use souk_shared::{
    amqp,
    config::{CommonConfig, Env, exit_on_error},
    db,
    topology::Names,
};
use souk_workers::runtime::parked;

const USAGE: &str = "usage:
  souk-admin migrate
  souk-admin parked list <group> [--limit N]
  souk-admin parked replay <group> (<message-id> | --all)";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let config = exit_on_error(CommonConfig::from_env(&Env::load()));
    if let Err(e) = run(&config, &args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(config: &CommonConfig, args: &[&str]) -> anyhow::Result<()> {
    let names = Names::new(&config.amqp_prefix);
    match args {
        ["migrate"] => {
            let pool = db::pool(&config.database_url, 2)?;
            db::migrate(&pool).await?;
            println!("migrations applied");
        }
        ["parked", "list", group, rest @ ..] => {
            let limit = match rest {
                [] => 100,
                ["--limit", n] => n.parse()?,
                _ => anyhow::bail!(USAGE),
            };
            let conn = amqp::connect(&config.amqp_url, "souk-admin").await?;
            let messages = parked::list(&conn, &names, group, limit).await?;
            println!("{}", serde_json::to_string_pretty(&messages)?);
            eprintln!(
                "{} parked message(s) in {}",
                messages.len(),
                names.parking_queue(group)
            );
        }
        ["parked", "replay", group, which] => {
            let id = match *which {
                "--all" => None,
                id => Some(id),
            };
            let conn = amqp::connect(&config.amqp_url, "souk-admin").await?;
            let n = parked::replay(&conn, &names, group, id).await?;
            println!("replayed {n} message(s) to {}", names.queue(group));
        }
        _ => anyhow::bail!(USAGE),
    }
    Ok(())
}
