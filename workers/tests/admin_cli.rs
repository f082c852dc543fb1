//! `souk-admin create-admin` makes the first admin.

use souk_testkit::TestDb;

fn create_admin(db: &TestDb, email: &str, password: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_souk-admin"))
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", souk_testkit::amqp_url())
        .env("SOUK_ADMIN_PASSWORD", password)
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
    std::process::Command::new(env!("CARGO_BIN_EXE_souk-admin"))
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", souk_testkit::amqp_url())
        .arg("demo-data")
        .output()
        .unwrap()
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
