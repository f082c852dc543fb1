//! W2, checkout: virtual customers, each with its own account and session,
//! loop for a while: put 3 distinct random products from 2 shops in the
//! cart, check out, pay (the Stripe stand-in confirms and its signed
//! webhook arrives), and wait until the order reads as paid. Counts only
//! orders that read as paid, and checks at the end that the count equals
//! the paid orders in the database.
//!
//! ```text
//! souk-bench checkout --api URL --stripe URL --database URL [--customers 32] [--seconds 60] [--poll-ms 20]
//! ```

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub struct Options {
    pub api: String,
    pub stripe: String,
    pub database: String,
    pub customers: usize,
    pub seconds: u64,
    /// How often a customer's page asks whether the order is paid yet.
    pub poll: Duration,
}

const PASSWORD: &str = "bench-password-123";
/// An order not paid within this is an error.
const GIVE_UP: Duration = Duration::from_secs(30);

/// The benchmark's customers (`bench-customer-NNN@bench.souk`): made once,
/// verified, each with a default shipping address; their carts emptied.
async fn seed_customers(pool: &PgPool, n: usize) -> anyhow::Result<Vec<String>> {
    let hash = souk_shared::password::hash(PASSWORD.to_string()).await?;
    let mut emails = Vec::with_capacity(n);
    for i in 1..=n {
        let email = format!("bench-customer-{i:03}@bench.souk");
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, name, role, email_verified_at)
             SELECT $1, $2, $3, $4, 'customer', now()
              WHERE NOT EXISTS (SELECT 1 FROM users WHERE lower(email) = lower($2))",
        )
        .bind(Uuid::now_v7())
        .bind(&email)
        .bind(hash.as_str())
        .bind(format!("Bench customer {i}"))
        .execute(pool)
        .await?;
        sqlx::query(
            "INSERT INTO addresses (id, user_id, full_name, line1, city, postal_code, country, is_default)
             SELECT $1, u.id, u.name, '1 Bench Street', 'Fes', '30000', 'MA', true FROM users u
              WHERE lower(u.email) = lower($2)
                AND NOT EXISTS (SELECT 1 FROM addresses a WHERE a.user_id = u.id)",
        )
        .bind(Uuid::now_v7())
        .bind(&email)
        .execute(pool)
        .await?;
        emails.push(email);
    }
    sqlx::query(
        "DELETE FROM cart_items WHERE user_id IN (SELECT id FROM users WHERE email LIKE 'bench-customer-%')",
    )
    .execute(pool)
    .await?;
    Ok(emails)
}

/// Variants for sale, by shop.
async fn shelves(pool: &PgPool) -> anyhow::Result<Vec<Vec<Uuid>>> {
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT p.shop_id, v.id FROM variants v JOIN products p ON p.id = v.product_id
          WHERE p.status = 'active' AND p.hidden_at IS NULL AND v.on_hand - v.reserved > 1000",
    )
    .fetch_all(pool)
    .await?;
    let mut by_shop: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (shop, variant) in rows {
        by_shop.entry(shop).or_default().push(variant);
    }
    let shelves: Vec<Vec<Uuid>> = by_shop.into_values().filter(|v| v.len() >= 2).collect();
    anyhow::ensure!(
        shelves.len() >= 2,
        "seed the catalog first (bench/catalog/seed.sql)"
    );
    Ok(shelves)
}

struct Client {
    http: reqwest::Client,
    api: String,
    stripe: String,
    token: String,
    poll: Duration,
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.api))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        if path == "/checkout" {
            // As a storefront does, so a retried click cannot order twice.
            req = req.header("idempotency-key", Uuid::new_v4().to_string());
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "{path}: {status} {body}");
        Ok(body)
    }

    /// Polls the order until `pred` holds.
    async fn until(
        &self,
        order: &str,
        started: Instant,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        loop {
            let o = self
                .call(reqwest::Method::GET, &format!("/orders/{order}"), None)
                .await?;
            if pred(&o) {
                return Ok(o);
            }
            if matches!(
                o["status"].as_str(),
                Some("out_of_stock" | "expired" | "cancelled")
            ) {
                anyhow::bail!("order {order} ended {}", o["status"]);
            }
            anyhow::ensure!(
                started.elapsed() < GIVE_UP,
                "order {order} not paid in {GIVE_UP:?}"
            );
            tokio::time::sleep(self.poll).await;
        }
    }

    /// One whole checkout: cart, checkout, pay, paid.
    async fn buy(&self, shelves: &[Vec<Uuid>]) -> anyhow::Result<()> {
        let started = Instant::now();
        // 3 distinct products from 2 shops: two from one, one from another.
        let (a, b) = two_distinct(shelves.len());
        let (x, y) = two_distinct(shelves[a].len());
        let picks = [
            shelves[a][x],
            shelves[a][y],
            shelves[b][rand::random_range(0..shelves[b].len())],
        ];
        for variant in picks {
            let body = json!({"variant_id": variant, "quantity": 1});
            self.call(reqwest::Method::POST, "/cart/items", Some(body))
                .await?;
        }
        let order = self
            .call(reqwest::Method::POST, "/checkout", Some(json!({})))
            .await?;
        let id = order["id"].as_str().context("order id")?.to_string();
        let awaiting = self
            .until(&id, started, |o| o["status"] == "awaiting_payment")
            .await?;
        let intent = awaiting["payment"]["payment_intent_id"]
            .as_str()
            .context("intent")?;
        // Stripe.js confirming with the customer's card.
        let confirmed = self
            .http
            .post(format!(
                "{}/v1/payment_intents/{intent}/confirm",
                self.stripe
            ))
            .send()
            .await?;
        anyhow::ensure!(
            confirmed.status().is_success(),
            "confirm: {}",
            confirmed.status()
        );
        self.until(&id, started, |o| o["status"] == "paid").await?;
        Ok(())
    }
}

fn two_distinct(n: usize) -> (usize, usize) {
    let a = rand::random_range(0..n);
    let b = (a + rand::random_range(1..n)) % n;
    (a, b)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let pool = souk_shared::db::pool(&opts.database, 4)?;
    let emails = seed_customers(&pool, opts.customers).await?;
    let shelves = Arc::new(shelves(&pool).await?);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let mut clients = Vec::with_capacity(emails.len());
    for email in &emails {
        let session: Value = http
            .post(format!("{}/api/v1/auth/sign-in", opts.api))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await?
            .json()
            .await?;
        let token = session["access_token"]
            .as_str()
            .with_context(|| format!("sign-in: {session}"))?;
        clients.push(Client {
            http: http.clone(),
            api: opts.api.clone(),
            stripe: opts.stripe.clone(),
            token: token.to_string(),
            poll: opts.poll,
        });
    }
    let paid_before: i64 = paid_count(&pool).await?;
    eprintln!(
        "W2: {} customers, {} s, 3 items from 2 shops per order, against {}",
        clients.len(),
        opts.seconds,
        opts.api
    );
    let deadline = Instant::now() + Duration::from_secs(opts.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let shelves = shelves.clone();
            tokio::spawn(async move {
                let (mut times, mut errors) = (Vec::new(), Vec::new());
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match client.buy(&shelves).await {
                        Ok(()) => times.push(t.elapsed()),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (times, errors)
            })
        })
        .collect();
    let (mut times, mut errors) = (Vec::new(), Vec::new());
    for task in tasks {
        let (t, e) = task.await?;
        times.extend(t);
        errors.extend(e);
    }
    let elapsed = started.elapsed().as_secs_f64();
    times.sort();
    let paid_in_db = paid_count(&pool).await? - paid_before;
    println!("paid orders        {}", times.len());
    println!("orders/s           {:.1}", times.len() as f64 / elapsed);
    println!(
        "checkout p50       {:.0} ms",
        percentile(&times, 50.0).as_secs_f64() * 1000.0
    );
    println!(
        "checkout p99       {:.0} ms",
        percentile(&times, 99.0).as_secs_f64() * 1000.0
    );
    println!("errors             {}", errors.len());
    for e in errors.iter().take(5) {
        println!("  {e}");
    }
    println!(
        "paid in database   {paid_in_db} ({})",
        if paid_in_db == times.len() as i64 {
            "matches"
        } else {
            "MISMATCH"
        }
    );
    anyhow::ensure!(
        paid_in_db == times.len() as i64,
        "counted and paid orders differ"
    );
    Ok(())
}

async fn paid_count(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM orders o JOIN users u ON u.id = o.customer_id
          WHERE o.status = 'paid' AND u.email LIKE 'bench-customer-%'",
    )
    .fetch_one(pool)
    .await?)
}
