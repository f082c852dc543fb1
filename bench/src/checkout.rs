//! W2, checkout: virtual customers, each with its own account and session,
//! loop for a while: put 3 distinct random products from 2 shops in the
//! cart, check out, pay (the Stripe stand-in confirms and its signed
//! webhook arrives), and wait until the order reads as paid. Counts only
//! orders that read as paid, and checks at the end that the count equals
//! the paid orders in the database.
//!
//! ```text
//! souk-bench checkout --api URL --stripe URL --database URL [--customers 32] [--seconds 60] [--poll-ms MS]
//! ```
//!
//! The customer's page waits for the order as a storefront should: each read
//! is held by the API until the order moves (`wait_for`); with `--poll-ms`
//! it asks again at that interval instead.
//!
//! The card is paid as Stripe.js pays it: a payment method made once per
//! customer, attached to the order's intent, then the intent confirmed; so
//! the same run works against localstripe (slowly) or the harness's fast
//! stand-in (`souk-bench stripe`).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    procs,
    stats::{self, Latencies},
};

pub struct Options {
    pub api: String,
    pub stripe: String,
    /// The secret key the Stripe stand-in expects (localstripe checks one).
    pub stripe_key: String,
    pub database: String,
    pub customers: usize,
    pub seconds: u64,
    /// How a customer's page waits for the order to move: `None` holds the
    /// request until it does (`wait_for`, as a storefront should); `Some`
    /// asks again at that interval (how a naive storefront polls).
    pub poll: Option<Duration>,
    pub label: String,
    pub run: u32,
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
    stripe_key: String,
    token: String,
    /// The customer's card at Stripe.
    card: String,
    poll: Option<Duration>,
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

    /// Reads the order until it is `status`: held by the API until it gets
    /// there (`wait_for`), or asked again every `poll`.
    async fn until(&self, order: &str, started: Instant, status: &str) -> anyhow::Result<Value> {
        let path = match self.poll {
            None => format!("/orders/{order}?wait_for={status}&wait_ms=10000"),
            Some(_) => format!("/orders/{order}"),
        };
        loop {
            let o = self.call(reqwest::Method::GET, &path, None).await?;
            if o["status"] == status {
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
                "order {order} not {status} in {GIVE_UP:?}"
            );
            if let Some(poll) = self.poll {
                tokio::time::sleep(poll).await;
            }
        }
    }

    /// A form POST to the Stripe stand-in, as the customer's browser makes it.
    async fn stripe(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}/v1/{path}", self.stripe))
            .basic_auth(&self.stripe_key, None::<&str>)
            .form(form)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "stripe {path}: {status} {body}");
        Ok(body)
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
        let awaiting = self.until(&id, started, "awaiting_payment").await?;
        let intent = awaiting["payment"]["payment_intent_id"]
            .as_str()
            .context("intent")?;
        // Stripe.js: the customer's card on the intent, then confirmed.
        let attach = [("payment_method", self.card.as_str())];
        self.stripe(&format!("payment_intents/{intent}"), &attach)
            .await?;
        self.stripe(&format!("payment_intents/{intent}/confirm"), &[])
            .await?;
        self.until(&id, started, "paid").await?;
        Ok(())
    }
}

fn two_distinct(n: usize) -> (usize, usize) {
    let a = rand::random_range(0..n);
    let b = (a + rand::random_range(1..n)) % n;
    (a, b)
}

/// A short unmeasured run, then fresh planner statistics: a database in
/// service has both (fresh tables would leave plans that scan).
pub async fn warm_up(opts: Options) -> anyhow::Result<()> {
    let database = opts.database.clone();
    run(opts).await?;
    let pool = souk_shared::db::pool(&database, 1)?;
    sqlx::query("ANALYZE").execute(&pool).await?;
    Ok(())
}

pub async fn run(opts: Options) -> anyhow::Result<stats::Figure> {
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
        let mut client = Client {
            http: http.clone(),
            api: opts.api.clone(),
            stripe: opts.stripe.clone(),
            stripe_key: opts.stripe_key.clone(),
            token: token.to_string(),
            card: String::new(),
            poll: opts.poll,
        };
        let card = [
            ("type", "card"),
            ("card[number]", "4242424242424242"),
            ("card[exp_month]", "12"),
            ("card[exp_year]", "2034"),
            ("card[cvc]", "123"),
        ];
        let made = client.stripe("payment_methods", &card).await?;
        client.card = made["id"]
            .as_str()
            .context("a payment method id")?
            .to_string();
        clients.push(client);
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
    let ((times, errors), rss_mib) = procs::during(async {
        let (mut times, mut errors) = (Vec::new(), Vec::new());
        for task in tasks {
            let (t, e) = task.await.unwrap_or_default();
            times.extend(t);
            errors.extend(e);
        }
        (times, errors)
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let times = Latencies::new(times);
    // Orders still being paid when the time ran out are not counted: wait
    // for them to settle before comparing with the database.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let paid_in_db = paid_count(&pool).await? - paid_before;
    let mut notes: Vec<String> = errors.iter().take(3).cloned().collect();
    let counted = times.len() as i64;
    notes.push(format!(
        "paid in the database: {paid_in_db} ({})",
        if paid_in_db == counted {
            "equals the orders counted"
        } else {
            "MISMATCH"
        }
    ));
    let figure = stats::Figure {
        workload: "W2".into(),
        label: opts.label,
        run: opts.run,
        at: stats::now(),
        throughput: times.len() as f64 / elapsed,
        unit: "paid orders/s".into(),
        count: times.len() as u64,
        p50_ms: times.ms(50.0),
        p99_ms: times.ms(99.0),
        errors: errors.len() as u64,
        rss_mib,
        cores: stats::cores(),
        notes,
    };
    anyhow::ensure!(
        paid_in_db == counted,
        "counted {counted} paid orders, the database has {paid_in_db}"
    );
    Ok(figure)
}

async fn paid_count(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM orders o JOIN users u ON u.id = o.customer_id
          WHERE o.status = 'paid' AND u.email LIKE 'bench-customer-%'",
    )
    .fetch_one(pool)
    .await?)
}
