//! `souk-admin`: the first admin, the demo data, and parked messages
//! replayed from the command line with the admin and the reason kept in the
//! audit log.

use lapin::BasicProperties;
use souk_shared::{amqp, parked, topology};
use souk_testkit::TestDb;

/// `souk-admin` against `db` and the broker under `prefix`, with nothing
/// else from the environment.
fn command(db: &TestDb, prefix: &str, password: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_souk-admin"));
    command
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", souk_testkit::amqp_url())
        .env("AMQP_PREFIX", prefix)
        .env("SOUK_ADMIN_PASSWORD", password);
    command
}

fn souk_admin(db: &TestDb, prefix: &str, args: &[&str]) -> std::process::Output {
    let mut command = command(db, prefix, "correct horse battery");
    command.args(args).output().unwrap()
}

fn create_admin(db: &TestDb, email: &str, password: &str) -> std::process::Output {
    let mut command = command(db, "souk", password);
    command
        .args(["create-admin", email, "Root"])
        .output()
        .unwrap()
}

#[tokio::test]
async fn create_admin_makes_a_verified_admin_once() {
    let db = TestDb::new().await;
    let out = create_admin(&db, "root@example.com", "correct horse battery");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (role, verified, hash): (String, bool, String) = sqlx::query_as(
        "SELECT role, email_verified_at IS NOT NULL, password_hash FROM users WHERE email = 'root@example.com'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((role.as_str(), verified), ("admin", true));
    assert!(hash.starts_with("$argon2id$"));

    let again = create_admin(&db, "ROOT@example.com", "correct horse battery");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let short = create_admin(&db, "other@example.com", "short");
    assert_eq!(short.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&short.stderr).contains("10 to 128"));
}

fn demo_data(db: &TestDb) -> std::process::Output {
    souk_admin(db, "souk", &["demo-data"])
}

#[tokio::test]
async fn demo_data_loads_a_shoppable_catalog_once() {
    let db = TestDb::new().await;
    let out = demo_data(&db);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts = || async {
        sqlx::query_as::<_, (i64, i64, i64, i64)>(
            "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM products WHERE status = 'active'),
                    (SELECT count(*) FROM variants_now WHERE price_now_minor < price_minor),
                    (SELECT count(*) FROM addresses WHERE is_default)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(
        counts().await,
        (4, 7, 1, 1),
        "users, products, variants on sale, default addresses"
    );
    let again = demo_data(&db);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already present"));
    assert_eq!(counts().await.0, 4);
}

#[tokio::test]
async fn a_replay_from_the_command_line_is_kept_in_the_audit_log_with_its_admin_and_reason() {
    let db = TestDb::new().await;
    let prefix = souk_testkit::unique_prefix();
    let names = topology::Names::new(&prefix);
    let conn = amqp::connect(&souk_testkit::amqp_url(), "admin-cli-test")
        .await
        .unwrap();
    let channel = amqp::confirm_channel(&conn).await.unwrap();
    topology::declare_exchange(&channel, &names).await.unwrap();
    let mailer = topology::Group {
        name: topology::MAILER.name,
        bindings: topology::MAILER.bindings,
        retry_delays_ms: vec![1000],
    };
    topology::declare_group(&channel, &names, &mailer)
        .await
        .unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    let props = BasicProperties::default().with_message_id(id.as_str().into());
    amqp::send_to_queue(&channel, &names.parking_queue("mailer"), b"{}", props)
        .await
        .unwrap();
    let parked_now = || async {
        parked::list(&conn, &names, "mailer", 10)
            .await
            .unwrap()
            .len()
    };
    let entries = |action: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, uuid::Uuid, String)>(
                "SELECT u.email, a.target_type, a.target_id, a.reason
                   FROM audit_log a JOIN users u ON u.id = a.actor_id WHERE a.action = $1",
            )
            .bind(action)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let made = souk_admin(&db, &prefix, &["create-admin", "root@example.com", "Root"]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let created = entries("user.create_admin").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].0, "root@example.com");

    // Without a reason, or by someone who is not an admin: refused, nothing
    // replayed, nothing kept.
    let replay = |rest: &[&str]| {
        let mut args = vec!["parked", "replay", "mailer", id.as_str()];
        args.extend_from_slice(rest);
        souk_admin(&db, &prefix, &args)
    };
    let no_reason = replay(&["--as", "root@example.com"]);
    assert_eq!(no_reason.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_reason.stderr).contains("--reason"));
    let stranger = replay(&["--as", "nobody@example.com", "--reason", "why not"]);
    assert_eq!(stranger.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stranger.stderr).contains("no admin account"));
    assert!(entries("parked.replay.mailer").await.is_empty());
    assert_eq!(parked_now().await, 1);

    let done = replay(&[
        "--reason",
        "the SMTP relay is back",
        "--as",
        "ROOT@example.com",
    ]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(String::from_utf8_lossy(&done.stdout).contains("replayed 1"));
    assert_eq!(parked_now().await, 0);
    let kept = entries("parked.replay.mailer").await;
    assert_eq!(
        kept,
        [(
            "root@example.com".to_string(),
            "message".to_string(),
            id.parse().unwrap(),
            "the SMTP relay is back".to_string()
        )]
    );
    // And what it did, after it.
    let outcome = entries("parked.replay.mailer.done").await;
    assert_eq!(outcome.len(), 1, "{outcome:?}");
    assert_eq!(outcome[0].3, "1 message(s) replayed");
}
