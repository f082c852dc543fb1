//! Demo data for `scripts/dev`: an admin, two sellers with shops, a
//! customer with an address, a small catalog (`catalog.sql`) and a
//! membership plan (made at Stripe by the payments worker once it runs).
//! Loaded once; a second run changes nothing.

use souk_shared::{contracts::MembershipPlanCreated, envelope::Envelope, outbox, password};
use sqlx::PgPool;
use uuid::Uuid;

/// Every demo account signs in with this password.
pub const PASSWORD: &str = "souk-demo-password";

pub const ACCOUNTS: [&str; 4] = [
    "admin@demo.souk",
    "oak@demo.souk",
    "pantry@demo.souk",
    "customer@demo.souk",
];

/// Loads the demo data unless it is there already; `true` if it loaded any.
/// Each part is loaded once (a database from before a part existed gets it).
pub async fn load(pool: &PgPool, currency: &str) -> anyhow::Result<bool> {
    let accounts = load_accounts_and_catalog(pool).await?;
    let plan = load_membership_plan(pool, currency).await?;
    Ok(accounts || plan)
}

async fn load_accounts_and_catalog(pool: &PgPool) -> anyhow::Result<bool> {
    let present: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE email = 'admin@demo.souk')")
            .fetch_one(pool)
            .await?;
    if present {
        return Ok(false);
    }
    let hash = password::hash(PASSWORD.to_string()).await?;
    let mut tx = pool.begin().await?;
    for (email, name, role) in [
        ("admin@demo.souk", "Demo Admin", "admin"),
        ("oak@demo.souk", "Layla (Olive & Oak)", "seller"),
        ("pantry@demo.souk", "Karim (Souk Pantry)", "seller"),
        ("customer@demo.souk", "Sam Customer", "customer"),
    ] {
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, name, role, email_verified_at)
             VALUES ($1, $2, $3, $4, $5, now())",
        )
        .bind(Uuid::now_v7())
        .bind(email)
        .bind(hash.as_str())
        .bind(name)
        .bind(role)
        .execute(&mut *tx)
        .await?;
    }
    for (owner, name, slug) in [
        ("oak@demo.souk", "Olive & Oak", "olive-and-oak"),
        ("pantry@demo.souk", "Souk Pantry", "souk-pantry"),
    ] {
        sqlx::query(
            "INSERT INTO shops (id, owner_id, name, slug, description, contact_email)
             SELECT $1, id, $2, $3, 'A demo shop.', email FROM users WHERE email = $4",
        )
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(slug)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::raw_sql(include_str!("catalog.sql"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// A membership plan, pending until the payments worker makes it at Stripe.
async fn load_membership_plan(pool: &PgPool, currency: &str) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let plan = Uuid::now_v7();
    let made = sqlx::query(
        "INSERT INTO membership_plans (id, name, amount_minor, currency, interval, free_shipping, percent_off, created_by)
         SELECT $1, 'Souk Plus', 999, $2, 'month', true, 5, id FROM users
          WHERE email = 'admin@demo.souk' AND NOT EXISTS (SELECT 1 FROM membership_plans)",
    )
    .bind(plan)
    .bind(currency)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if made == 0 {
        return Ok(false);
    }
    let created = MembershipPlanCreated { plan_id: plan };
    outbox::enqueue(&mut tx, &Envelope::new(&created, "demo-data")).await?;
    tx.commit().await?;
    Ok(true)
}
