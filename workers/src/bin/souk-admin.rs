//! Operator commands: apply migrations, create an admin account, list and
//! replay parked messages.
//!
//! ```text
//! souk-admin migrate
//! souk-admin demo-data                       (once; the accounts share demo::PASSWORD)
//! souk-admin create-admin <email> <name>     (password from SOUK_ADMIN_PASSWORD, else stdin)
//! souk-admin parked list <group> [--limit N]
//! souk-admin parked replay <group> (<message-id> | --all) --as <admin-email> --reason <why>
//! ```
//!
//! `<group>` is a consumer group, or `unrouted` for the outbox messages no
//! queue was bound for (replayed to the events exchange by their type).
//!
//! A replay is an admin action like any other: it names the admin who asks
//! and why, and is kept in the audit log before it is done and its outcome
//! after it, as the API's replay is. The first admin's creation is kept
//! there too.

use souk_shared::{
    amqp, audit,
    config::{CommonConfig, Env, exit_on_error},
    db, parked, password,
    topology::{self, Names},
};
use souk_workers::demo;

const USAGE: &str = "usage:
  souk-admin migrate
  souk-admin demo-data
  souk-admin create-admin <email> <name>   (password from SOUK_ADMIN_PASSWORD, else stdin)
  souk-admin parked list <group> [--limit N]
  souk-admin parked replay <group> (<message-id> | --all) --as <admin-email> --reason <why>";

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
        ["demo-data"] => {
            let pool = db::pool(&config.database_url, 2)?;
            // The market's currency, as the API reads it: the demo plan is in it.
            let currency: String = Env::load().or("CURRENCY", "eur".to_string())?;
            if demo::load(&pool, &currency).await? {
                println!("demo data loaded; accounts: {}", demo::ACCOUNTS.join(", "));
                println!("password for each: {}", demo::PASSWORD);
            } else {
                println!("demo data already present");
            }
        }
        ["create-admin", email, name] => {
            let password = match std::env::var("SOUK_ADMIN_PASSWORD") {
                Ok(p) => p,
                Err(_) => {
                    eprintln!("password for {email}:");
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            anyhow::ensure!(
                (10..=128).contains(&password.chars().count()),
                "the password must be 10 to 128 characters"
            );
            let pool = db::pool(&config.database_url, 2)?;
            let hash = password::hash(password).await?;
            let id = uuid::Uuid::now_v7();
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO users (id, email, password_hash, name, role, email_verified_at)
                 VALUES ($1, $2, $3, $4, 'admin', now())",
            )
            .bind(id)
            .bind(email.trim())
            .bind(hash.as_str())
            .bind(name.trim())
            .execute(&mut *tx)
            .await
            .map_err(
                |e| match e.as_database_error().and_then(|d| d.constraint()) {
                    Some("users_email_key") => {
                        anyhow::anyhow!("an account with the email {email} already exists")
                    }
                    _ => e.into(),
                },
            )?;
            let why = "created with souk-admin create-admin";
            audit::record(&mut tx, id, "user.create_admin", ("user", id), why).await?;
            tx.commit().await?;
            println!("admin {email} created ({id})");
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
        ["parked", "replay", group, which, rest @ ..] => {
            let (email, reason) = match rest {
                ["--as", email, "--reason", reason] | ["--reason", reason, "--as", email] => {
                    (*email, reason.trim())
                }
                _ => anyhow::bail!(USAGE),
            };
            anyhow::ensure!(
                (1..=500).contains(&reason.chars().count()),
                "the reason must be 1 to 500 characters"
            );
            let group = topology::GROUPS
                .iter()
                .map(|g| g.name)
                .chain([parked::UNROUTED])
                .find(|g| g == group)
                .ok_or_else(|| anyhow::anyhow!("no consumer group {group}"))?;
            let (id, target) = match *which {
                "--all" => (None, uuid::Uuid::nil()),
                id => (
                    Some(id),
                    uuid::Uuid::parse_str(id)
                        .map_err(|_| anyhow::anyhow!("{id} is not a message id"))?,
                ),
            };
            let pool = db::pool(&config.database_url, 2)?;
            let admin: Option<uuid::Uuid> = sqlx::query_scalar(
                "SELECT id FROM users
                  WHERE lower(email) = lower($1) AND role = 'admin' AND suspended_at IS NULL",
            )
            .bind(email)
            .fetch_optional(&pool)
            .await?;
            let admin = admin.ok_or_else(|| anyhow::anyhow!("no admin account {email}"))?;
            let replay = async {
                let conn = amqp::connect(&config.amqp_url, "souk-admin").await?;
                parked::replay(&conn, &names, group, id).await
            };
            let target = (target != uuid::Uuid::nil()).then_some(target);
            let n = parked::audited_replay(&pool, admin, group, target, reason, replay).await??;
            println!("replayed {n} message(s) to {}", names.queue(group));
        }
        _ => anyhow::bail!(USAGE),
    }
    Ok(())
}
