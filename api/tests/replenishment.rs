//! Replenishment schedules: each due time makes exactly one order, through
//! the normal pipeline and paid off session with the saved card, however
//! many replenishers run and whenever one dies; failures tell the customer
//! and follow the schedule's policy; schedules are their customer's alone.

mod common;

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::{
    bin_path,
    stripe::{CARD_DECLINED, CARD_OK},
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use uuid::Uuid;

use common::{
    App,
    catalog::{call, json_of},
    fields,
    orders::{Customer, Listing, Market, PIPELINE_WAIT, listing, mails_about, stock, wait_for},
    problem,
    recurring::{
        customer_with_card, make_due, make_due_on, notifications, replenisher, runs, schedule,
        schedule_id,
    },
};

/// A replenisher process, as operators run it, logging JSON to a pipe the
/// test reads, its database sessions named `name` (`application_name`).
struct Replenisher {
    name: String,
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Replenisher {
    fn start(m: &Market, name: &str) -> Self {
        let mut child = Command::new(bin_path("replenisher"))
            .env(
                "DATABASE_URL",
                format!("{}?application_name={name}", m.app.db.url),
            )
            .env("AMQP_URL", souk_testkit::amqp_url())
            .env("AMQP_PREFIX", &m.pipeline.prefix)
            .env("OPS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn,souk_workers=info")
            .env("LOG_FORMAT", "json")
            .env("REPLENISH_POLL_MS", "50")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the replenisher starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kept = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(line) = serde_json::from_str::<Value>(&line) {
                    kept.lock().unwrap().push(line);
                }
            }
        });
        Self {
            name: name.to_string(),
            child,
            logs,
        }
    }

    /// Log lines whose message is `message`.
    fn logged(&self, message: &str) -> Vec<Value> {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .filter(|l| l["message"] == message)
            .cloned()
            .collect()
    }

    /// Waits until its `/health/ready` (on the port it logged) answers 200.
    async fn ready(&self) {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
        loop {
            let started = self.logged("started; /metrics and /health/* are up");
            if let Some(addr) = started.first().and_then(|l| l["ops_addr"].as_str()) {
                let ready = http.get(format!("http://{addr}/health/ready")).send().await;
                if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never became ready: {:?}",
                self.name,
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The schedules it logged an order placed for.
    fn placed(&self) -> Vec<String> {
        self.logged("replenishment order placed")
            .iter()
            .map(|l| l["schedule"].as_str().unwrap().to_string())
            .collect()
    }

    async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Sessions of this test's database (tests run side by side) waiting on a
/// lock in a statement starting with `statement`, by `application_name`.
async fn waiting_in(m: &Market, statement: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND starts_with(query, $1)
          ORDER BY application_name",
    )
    .bind(statement)
    .fetch_all(&m.app.db.pool)
    .await
    .unwrap()
}

/// A schedule of `items` (variant, quantity), weekly, first due in a day.
fn weekly(address: &str, card: &str, items: &[(&str, i32)], on_failure: &str) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(v, q)| json!({"variant_id": v, "quantity": q}))
        .collect();
    json!({
        "items": items, "interval_days": 7, "starts_at": Utc::now() + chrono::Duration::days(1),
        "address_id": address, "payment_method_id": card, "on_failure": on_failure,
    })
}

/// A verified customer with a saved card and a default address: what a
/// schedule needs. It reads as the customer (`buyer.token`, `buyer.email`).
struct Buyer {
    customer: Customer,
    card: String,
    address: String,
}

impl std::ops::Deref for Buyer {
    type Target = Customer;

    fn deref(&self) -> &Customer {
        &self.customer
    }
}

impl Buyer {
    /// A customer who saved `card` (a test card number).
    async fn new(m: &Market, card: &str) -> Self {
        let (customer, card, address) = customer_with_card(m, card).await;
        Self {
            customer,
            card,
            address,
        }
    }

    /// Their `weekly` schedule of `items`, made through the API; its id.
    async fn weekly(&self, app: &App, items: &[(&str, i32)], on_failure: &str) -> String {
        let body = weekly(&self.address, &self.card, items, on_failure);
        schedule_id(app, &self.token, body).await
    }
}

/// The schedule as its customer reads it (`GET /me/replenishments/{id}`).
async fn read_schedule(app: &App, token: &str, schedule: &str) -> Value {
    let path = format!("/me/replenishments/{schedule}");
    json_of(
        call(app, token, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await
}

/// The caller's schedules (`GET /me/replenishments`).
async fn list_schedules(app: &App, token: &str) -> Value {
    json_of(
        call(app, token, Method::GET, "/me/replenishments", json!({})).await,
        StatusCode::OK,
    )
    .await
}

/// The listing's seller changes its variant (`/seller/variants/{id}{path}`).
async fn change_variant(app: &App, listing: &Listing, method: Method, path: &str, body: Value) {
    let path = format!("/seller/variants/{}{path}", listing.variant);
    let resp = call(app, &listing.seller, method, &path, body).await;
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
}

/// The seller takes `delta` more of their variant into stock.
async fn restock(app: &App, listing: &Listing, delta: i32) {
    let delivery = json!({"delta": delta, "reason": "delivery"});
    change_variant(app, listing, Method::POST, "/stock-adjustments", delivery).await;
}

/// The seller's variant now costs `price_minor`.
async fn reprice(app: &App, listing: &Listing, price_minor: i64) {
    let price = json!({"price_minor": price_minor});
    change_variant(app, listing, Method::PATCH, "", price).await;
}

/// Orders placed for a schedule, as (id, status), oldest first.
async fn orders_of(m: &Market, schedule: &str) -> Vec<(Uuid, String)> {
    sqlx::query_as(
        "SELECT o.id, o.status FROM orders o JOIN replenishment_runs r ON r.id = o.replenishment_run_id
          WHERE r.schedule_id = $1::uuid ORDER BY o.created_at",
    )
    .bind(schedule)
    .fetch_all(&m.app.db.pool)
    .await
    .unwrap()
}

/// Waits until the schedule's run for `due` reads `status`.
async fn wait_run(
    m: &Market,
    schedule: &str,
    n: usize,
    status: &str,
) -> Vec<(DateTime<Utc>, String, i32, Option<String>)> {
    let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
    loop {
        let got = runs(&m.app, schedule).await;
        if got.len() >= n && got[n - 1].1 == status {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {n} of {schedule} never became {status}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two customers' weekly runs made due and placed, one of 2 boards (its
/// schedule's policy `first`), one of 2 teapots (`second`), while a sale
/// elsewhere holds both variants' rows: the orders exist (their lines' keys
/// only share the rows) and the reserver waits for the sale, which the test
/// then ends as it likes. Retries come an hour later (a test brings one
/// forward).
struct HeldRuns {
    first: (Customer, String),
    second: (Customer, String),
    variants: Vec<Uuid>,
    sale: sqlx::Transaction<'static, sqlx::Postgres>,
}

async fn runs_held_by_a_sale(m: &mut Market, first: &str, second: &str) -> HeldRuns {
    let mut held = Vec::new();
    for (variant, policy) in [(&m.oak.variant, first), (&m.tea.variant, second)] {
        let who = Buyer::new(m, CARD_OK).await;
        let id = who.weekly(&m.app, &[(variant.as_str(), 2)], policy).await;
        held.push((who.customer, id));
    }
    m.pipeline
        .run_replenisher(&m.app, replenisher(Duration::from_secs(3600), 3));
    let variants: Vec<Uuid> = [&m.oak.variant, &m.tea.variant]
        .iter()
        .map(|v| Uuid::parse_str(v).unwrap())
        .collect();
    let mut sale = m.app.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM variants WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(&variants)
        .execute(&mut *sale)
        .await
        .unwrap();
    for (_, id) in &held {
        make_due(&m.app, id).await;
    }
    for (_, id) in &held {
        wait_run(m, id, 1, "placed").await;
    }
    reserver_waits_for_stock(m).await;
    let second = held.pop().unwrap();
    let first = held.pop().unwrap();
    HeldRuns {
        first,
        second,
        variants,
        sale,
    }
}

/// Waits until the stock reserver waits for a variant's row the test holds:
/// either in its batch lock (several orders in one batch) or in a
/// reservation's UPDATE (one order alone).
async fn reserver_waits_for_stock(m: &Market) {
    souk_testkit::wait_until(
        "the reserver to wait for the stock",
        PIPELINE_WAIT,
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND query ~ '(SELECT 1 FROM|UPDATE) variants'",
            )
            .fetch_one(&m.app.db.pool)
            .await
            .unwrap();
            waiting > 0
        },
    )
    .await;
}

async fn next_run_at(m: &Market, schedule: &str) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT next_run_at FROM replenishment_schedules WHERE id = $1::uuid")
        .bind(schedule)
        .fetch_one(&m.app.db.pool)
        .await
        .unwrap()
}

/// Moves the schedule's next run to `at` (as if no replenisher had run).
async fn set_next_run_at(m: &Market, schedule: &str, at: DateTime<Utc>) {
    sqlx::query("UPDATE replenishment_schedules SET next_run_at = $2 WHERE id = $1::uuid")
        .bind(schedule)
        .bind(at)
        .execute(&m.app.db.pool)
        .await
        .unwrap();
}

/// Brings the time of the schedule's waiting retry to now.
async fn retry_now<'e>(db: impl sqlx::PgExecutor<'e>, schedule: &str) {
    sqlx::query(
        "UPDATE replenishment_runs SET retry_at = now() - interval '1 second' WHERE schedule_id = $1::uuid",
    )
    .bind(schedule)
    .execute(db)
    .await
    .unwrap();
}

/// Holds the customer's row (an order's key refers to it) until the
/// transaction ends: a run placing their order waits at the order's
/// insert, its schedule claimed.
async fn hold_customer(m: &Market, who: &Customer) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = m.app.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
        .bind(who.id)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// Every order placed for the schedule, once cancelled, each saying the
/// card was declined.
async fn declined_orders(m: &Market, token: &str, schedule: &str) -> Vec<Value> {
    let mut cancelled = vec![];
    for (id, _) in orders_of(m, schedule).await {
        let order = wait_for(&m.app, token, &id.to_string(), "cancelled").await;
        let why = order["failure_reason"].as_str().unwrap();
        assert!(why.contains("declined"), "{order}");
        cancelled.push(order);
    }
    cancelled
}

#[tokio::test]
async fn two_replenishers_and_a_restart_make_exactly_one_order_per_due_time() {
    const SCHEDULES: usize = 10;
    let m = Market::open().await;
    let app = &m.app;
    let rice = listing(app, "rice", "Basmati rice", 500, 100).await;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let mut ids = vec![];
    for _ in 0..SCHEDULES {
        ids.push(buyer.weekly(app, &[(&rice.variant, 1)], "skip").await);
    }

    // Two replenishers, both up before anything is due.
    let mut a = Replenisher::start(&m, "replenisher-a");
    let mut b = Replenisher::start(&m, "replenisher-b");
    a.ready().await;
    b.ready().await;
    // Every schedule due at once, with the customer's row held (the
    // order's key refers to it): whichever claims a schedule first is held
    // at its order's insert with that schedule locked, so the other must
    // claim another. Neither can take every schedule in one poll.
    let holder = hold_customer(&m, &buyer).await;
    sqlx::query("UPDATE replenishment_schedules SET next_run_at = now() - interval '1 second'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    souk_testkit::wait_until(
        "both replenishers to be mid-run at once",
        PIPELINE_WAIT,
        || async { waiting_in(&m, "WITH placed AS").await == ["replenisher-a", "replenisher-b"] },
    )
    .await;
    holder.rollback().await.unwrap();
    for id in &ids {
        wait_run(&m, id, 1, "placed").await;
    }
    // Let both poll a while more before counting.
    tokio::time::sleep(Duration::from_millis(750)).await;
    for id in &ids {
        let got = runs(app, id).await;
        assert_eq!(got.len(), 1, "one run per due time: {got:?}");
        let orders = orders_of(&m, id).await;
        assert_eq!(orders.len(), 1, "one order per due time: {orders:?}");
        let order = wait_for(app, &buyer.token, &orders[0].0.to_string(), "paid").await;
        assert_eq!(order["replenishment_schedule_id"], id.as_str());
        assert!(next_run_at(&m, id).await > Utc::now() + chrono::Duration::days(6));
    }
    // Both placed orders, and between them each schedule's exactly once.
    let (by_a, by_b) = (a.placed(), b.placed());
    assert!(
        !by_a.is_empty() && !by_b.is_empty(),
        "both placed runs: a {by_a:?}, b {by_b:?}"
    );
    let mut placed = [by_a, by_b].concat();
    placed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        placed, expected,
        "each schedule placed once, by one of them"
    );
    assert_eq!(
        stock(app, &rice.variant).await,
        (100 - SCHEDULES as i32, 0),
        "{SCHEDULES} sold, nothing left held"
    );
    a.kill().await;
    b.kill().await;

    // A replenisher killed mid-run: it is held at its order's insert (the
    // test locks the customer's row, which the order's key refers to).
    let target = &ids[0];
    let holder = hold_customer(&m, &buyer).await;
    make_due(app, target).await;
    let due = next_run_at(&m, target).await;
    let mut victim = Replenisher::start(&m, "replenisher-victim");
    souk_testkit::wait_until("the replenisher to be mid-run", PIPELINE_WAIT, || async {
        waiting_in(&m, "WITH placed AS").await == ["replenisher-victim"]
    })
    .await;
    victim.kill().await;
    holder.rollback().await.unwrap();

    // Nothing of the killed run stayed; a new replenisher makes it once.
    let _fresh = Replenisher::start(&m, "replenisher-fresh");
    let got = wait_run(&m, target, 2, "placed").await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[1].0, due,
        "the run is for the due time the killed one had claimed"
    );
    let orders = orders_of(&m, target).await;
    assert_eq!(orders.len(), 2, "one order per due time: {orders:?}");
    wait_for(app, &buyer.token, &orders[1].0.to_string(), "paid").await;
    // Let it poll a while more: still one run per due time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs(app, target).await.len(), 2);
    m.close().await;
}

#[tokio::test]
async fn a_declined_off_session_payment_notifies_the_customer_and_follows_the_schedules_policy() {
    let mut m = Market::open().await;
    let app = &m.app;
    let retrying = Buyer::new(&m, CARD_DECLINED).await;
    let skipping = Buyer::new(&m, CARD_DECLINED).await;
    let retry = retrying.weekly(app, &[(&m.oak.variant, 1)], "retry").await;
    let skip = skipping.weekly(app, &[(&m.tea.variant, 2)], "skip").await;
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_millis(500), 2));
    make_due(app, &retry).await;
    make_due(app, &skip).await;

    // Retry: declined, tried again, declined again, given up after 2.
    let got = wait_run(&m, &retry, 1, "failed").await;
    assert_eq!(got[0].2, 2, "two attempts");
    assert_eq!(got[0].3.as_deref(), Some("payment_declined"));
    let orders = declined_orders(&m, &retrying.token, &retry).await;
    assert_eq!(orders.len(), 2, "one order per attempt: {orders:?}");
    let delayed = mails_about(&retrying.email, "scheduled order is delayed", 1).await;
    assert!(delayed[0].text.contains("declined"), "{}", delayed[0].text);
    assert!(delayed[0].text.contains("try again"), "{}", delayed[0].text);
    let gave_up = mails_about(&retrying.email, "scheduled order was not placed", 1).await;
    assert!(
        gave_up[0].text.contains("given this delivery up"),
        "{}",
        gave_up[0].text
    );
    // And in the app: each attempt's outcome, newest first.
    let told = notifications(app, &retrying.token, "replenishment_failed", 2).await;
    let seen: Vec<_> = told
        .iter()
        .map(|n| {
            let d = &n["data"];
            (
                d["schedule_id"].as_str(),
                d["reason"].as_str(),
                d["outcome"].as_str(),
                d["attempt"].as_i64(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                Some(retry.as_str()),
                Some("payment_declined"),
                Some("failed"),
                Some(2)
            ),
            (
                Some(retry.as_str()),
                Some("payment_declined"),
                Some("retrying"),
                Some(1)
            ),
        ],
        "{told:?}"
    );
    assert!(told[1]["data"]["retry_at"].is_string(), "{told:?}");
    assert!(told[0]["data"]["retry_at"].is_null(), "{told:?}");

    // Skip: declined once, that delivery skipped, the next one stands.
    let got = wait_run(&m, &skip, 1, "skipped").await;
    assert_eq!(
        (got[0].2, got[0].3.as_deref()),
        (1, Some("payment_declined"))
    );
    let orders = orders_of(&m, &skip).await;
    assert_eq!(orders.len(), 1);
    wait_for(app, &skipping.token, &orders[0].0.to_string(), "cancelled").await;
    let skipped = mails_about(&skipping.email, "scheduled order was not placed", 1).await;
    assert!(skipped[0].text.contains("skipped"), "{}", skipped[0].text);
    assert!(next_run_at(&m, &skip).await > Utc::now() + chrono::Duration::days(6));
    let told = notifications(app, &skipping.token, "replenishment_failed", 1).await;
    assert_eq!(told.len(), 1, "{told:?}");
    let d = &told[0]["data"];
    assert_eq!(
        (
            d["schedule_id"].as_str(),
            d["reason"].as_str(),
            d["outcome"].as_str()
        ),
        (
            Some(skip.as_str()),
            Some("payment_declined"),
            Some("skipped")
        ),
        "{d}"
    );
    assert!(d["next_run_at"].is_string(), "{d}");
    // Nor can it be re-timed to run again at once.
    let again = call(
        app,
        &skipping.token,
        Method::PATCH,
        &format!("/me/replenishments/{skip}"),
        json!({"starts_at": Utc::now()}),
    )
    .await;
    assert_eq!(
        fields(&problem(again, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["starts_at"]
    );

    // The held stock went back; nobody was asked to pay by hand.
    souk_testkit::wait_until("the stock to be released", PIPELINE_WAIT, || async {
        stock(app, &m.oak.variant).await == (5, 0) && stock(app, &m.tea.variant).await == (5, 0)
    })
    .await;
    for who in [&retrying.email, &skipping.email] {
        let asked = souk_testkit::mail::mails_to(who).await;
        assert!(
            !asked
                .iter()
                .any(|m| m.subject.contains("did not go through")),
            "{asked:?}"
        );
    }
    m.close().await;
}

#[tokio::test]
async fn an_out_of_stock_item_or_a_price_beyond_the_limit_notifies_and_follows_the_policy() {
    let mut m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    // 6 boards wanted, 5 in stock; retried until the seller restocks.
    let boards = buyer.weekly(app, &[(&m.oak.variant, 6)], "retry").await;
    // 6 teapots wanted, 5 in stock; skipped.
    let teapots = buyer.weekly(app, &[(&m.tea.variant, 6)], "skip").await;
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_millis(700), 20));
    make_due(app, &boards).await;
    make_due(app, &teapots).await;

    let delayed = mails_about(&buyer.email, "scheduled order is delayed", 1).await;
    assert!(
        delayed[0].text.contains("only 5 left"),
        "{}",
        delayed[0].text
    );
    let got = wait_run(&m, &teapots, 1, "skipped").await;
    assert_eq!(got[0].3.as_deref(), Some("out_of_stock"));
    assert!(orders_of(&m, &teapots).await.is_empty());
    let skipped = mails_about(&buyer.email, "scheduled order was not placed", 1).await;
    assert!(skipped[0].text.contains("skipped"), "{}", skipped[0].text);

    // Restocked: the retry goes through and is paid with the saved card.
    restock(app, &m.oak, 5).await;
    let got = wait_run(&m, &boards, 1, "placed").await;
    assert!(got[0].2 >= 2, "placed on a retry: {got:?}");
    let orders = orders_of(&m, &boards).await;
    assert_eq!(orders.len(), 1);
    let paid = wait_for(app, &buyer.token, &orders[0].0.to_string(), "paid").await;
    assert_eq!(paid["total_minor"], 6 * 4500 + 499);

    // The price rose past the customer's limit (10% over the price when
    // the item was chosen): not placed.
    let one = call(
        app,
        &buyer.token,
        Method::PATCH,
        &format!("/me/replenishments/{teapots}"),
        json!({"items": [{"variant_id": m.tea.variant, "quantity": 1}]}),
    )
    .await;
    assert_eq!(one.status(), StatusCode::OK);
    reprice(app, &m.tea, 3400).await;
    make_due(app, &teapots).await;
    let got = wait_run(&m, &teapots, 2, "skipped").await;
    assert_eq!(got[1].3.as_deref(), Some("price_changed"));
    let told = mails_about(&buyer.email, "scheduled order was not placed", 2).await;
    assert!(
        told.iter().any(|m| m.text.contains("now costs 3400")),
        "{told:?}"
    );
    m.close().await;
}

#[tokio::test]
async fn an_item_sold_out_after_its_order_was_placed_notifies_the_customer_and_follows_the_policy()
{
    let mut m = Market::open().await;
    let HeldRuns {
        first: (retrying, retry),
        second: (skipping, skip),
        variants,
        mut sale,
    } = runs_held_by_a_sale(&mut m, "retry", "skip").await;
    let app = &m.app;
    assert_eq!(orders_of(&m, &retry).await.len(), 1);
    assert_eq!(orders_of(&m, &skip).await.len(), 1);
    // That sale takes the stock: 1 board left of the 2 wanted, no teapot.
    sqlx::query(
        "UPDATE variants SET on_hand = CASE WHEN id = $1 THEN 1 ELSE 0 END WHERE id = ANY($2)",
    )
    .bind(variants[0])
    .bind(&variants)
    .execute(&mut *sale)
    .await
    .unwrap();
    sale.commit().await.unwrap();

    // Retry: the order is out of stock, the run waits for its retry.
    let got = wait_run(&m, &retry, 1, "retrying").await;
    assert_eq!((got[0].2, got[0].3.as_deref()), (1, Some("out_of_stock")));
    let (first, status) = orders_of(&m, &retry).await.remove(0);
    assert_eq!(status, "out_of_stock");
    let order = wait_for(app, &retrying.token, &first.to_string(), "out_of_stock").await;
    assert!(
        order["failure_reason"]
            .as_str()
            .unwrap()
            .contains("only 1 of Walnut board"),
        "{order}"
    );
    let retry_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT retry_at FROM replenishment_runs WHERE schedule_id = $1::uuid")
            .bind(&retry)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(
        retry_at > Utc::now() + chrono::Duration::minutes(50)
            && retry_at < Utc::now() + chrono::Duration::minutes(61),
        "retried after the hour asked: {retry_at}"
    );
    assert!(next_run_at(&m, &retry).await > Utc::now() + chrono::Duration::days(6));
    let delayed = mails_about(&retrying.email, "scheduled order is delayed", 1).await;
    assert!(
        delayed[0].text.contains("only 1 of Walnut board"),
        "{}",
        delayed[0].text
    );
    assert!(delayed[0].text.contains("try again"), "{}", delayed[0].text);
    let told = notifications(app, &retrying.token, "replenishment_failed", 1).await;
    let d = &told[0]["data"];
    assert_eq!(
        (
            d["schedule_id"].as_str(),
            d["reason"].as_str(),
            d["outcome"].as_str(),
            d["attempt"].as_i64()
        ),
        (
            Some(retry.as_str()),
            Some("out_of_stock"),
            Some("retrying"),
            Some(1)
        ),
        "{d}"
    );
    let told_at: DateTime<Utc> = d["retry_at"].as_str().unwrap().parse().unwrap();
    assert!(
        (told_at - retry_at).abs() < chrono::Duration::milliseconds(1),
        "told the retry's time: {d}"
    );

    // Skip: the run is skipped, the next due time stands.
    let got = wait_run(&m, &skip, 1, "skipped").await;
    assert_eq!((got[0].2, got[0].3.as_deref()), (1, Some("out_of_stock")));
    let orders = orders_of(&m, &skip).await;
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].1, "out_of_stock");
    assert!(next_run_at(&m, &skip).await > Utc::now() + chrono::Duration::days(6));
    let skipped = mails_about(&skipping.email, "scheduled order was not placed", 1).await;
    assert!(skipped[0].text.contains("Teapot"), "{}", skipped[0].text);
    assert!(skipped[0].text.contains("skipped"), "{}", skipped[0].text);
    let told = notifications(app, &skipping.token, "replenishment_failed", 1).await;
    let d = &told[0]["data"];
    assert_eq!(
        (
            d["schedule_id"].as_str(),
            d["reason"].as_str(),
            d["outcome"].as_str()
        ),
        (Some(skip.as_str()), Some("out_of_stock"), Some("skipped")),
        "{d}"
    );
    // Nothing was held for either.
    assert_eq!(stock(app, &m.oak.variant).await, (1, 0));
    assert_eq!(stock(app, &m.tea.variant).await, (0, 0));

    // Restocked and the retry's time come: a second order, paid.
    restock(app, &m.oak, 5).await;
    retry_now(&app.db.pool, &retry).await;
    let got = wait_run(&m, &retry, 1, "placed").await;
    assert_eq!(
        (got.len(), got[0].2),
        (1, 2),
        "placed on its retry: {got:?}"
    );
    let orders = orders_of(&m, &retry).await;
    assert_eq!(orders.len(), 2, "{orders:?}");
    assert_eq!(orders[0], (first, "out_of_stock".to_string()));
    let paid = wait_for(app, &retrying.token, &orders[1].0.to_string(), "paid").await;
    assert_eq!(paid["total_minor"], 2 * 4500 + 499);
    // The skipped one stays skipped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs(app, &skip).await.len(), 1);
    assert_eq!(orders_of(&m, &skip).await.len(), 1);
    m.close().await;
}

#[tokio::test]
async fn paused_and_skipped_runs_and_a_due_time_that_has_its_run_make_no_order() {
    let mut m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let paused = buyer.weekly(app, &[(&m.oak.variant, 1)], "retry").await;
    let skipped = buyer.weekly(app, &[(&m.tea.variant, 1)], "retry").await;
    let token = buyer.token.as_str();
    let action = |id: &str, what: &str| {
        let path = format!("/me/replenishments/{id}/{what}");
        async move { call(app, token, Method::POST, &path, json!({})).await }
    };
    assert_eq!(action(&paused, "pause").await.status(), StatusCode::OK);
    assert_eq!(action(&skipped, "skip-next").await.status(), StatusCode::OK);
    // The skipped due time keeps its run; bring that due time (and the
    // schedule with it) into the past, as if a replenisher had stopped
    // between making the run and moving the schedule on.
    let (skipped_due, _, _, reason) = runs(app, &skipped).await.remove(0);
    assert_eq!(reason.as_deref(), Some("skipped_by_customer"));
    // (In PostgreSQL's microseconds, to compare it when read back.)
    let due = DateTime::from_timestamp_micros(Utc::now().timestamp_micros() - 1_000_000).unwrap();
    sqlx::query(
        "UPDATE replenishment_runs SET due_at = $2 WHERE schedule_id = $1::uuid AND due_at = $3",
    )
    .bind(&skipped)
    .bind(due)
    .bind(skipped_due)
    .execute(&app.db.pool)
    .await
    .unwrap();
    set_next_run_at(&m, &skipped, due).await;
    make_due(app, &paused).await;
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_millis(200), 3));

    // The replenisher moves the skipped schedule on past its due time ...
    souk_testkit::wait_until("the skipped schedule to move on", PIPELINE_WAIT, || async {
        next_run_at(&m, &skipped).await > Utc::now()
    })
    .await;
    // ... without a second run or any order for it; the paused one is left.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = runs(app, &skipped).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0, got[0].1.as_str()), (due, "skipped"));
    assert!(orders_of(&m, &skipped).await.is_empty());
    assert!(runs(app, &paused).await.is_empty());
    assert!(orders_of(&m, &paused).await.is_empty());
    assert!(next_run_at(&m, &paused).await < Utc::now());

    // Resumed, the paused one runs at its next due time, not the missed one.
    assert_eq!(action(&paused, "resume").await.status(), StatusCode::OK);
    assert!(next_run_at(&m, &paused).await > Utc::now());
    make_due(app, &paused).await;
    wait_run(&m, &paused, 1, "placed").await;
    let orders = orders_of(&m, &paused).await;
    assert_eq!(orders.len(), 1);
    wait_for(app, &buyer.token, &orders[0].0.to_string(), "paid").await;
    m.close().await;
}

/// "Mondays at 09:00" in the customer's zone stays 09:00 there when the
/// clocks change; a new zone re-times the schedule; a bad one is a 422.
#[tokio::test]
async fn a_schedule_keeps_its_wall_time_in_the_customers_zone() {
    use souk_shared::replenishment::Tz;
    let mut m = Market::open().await;
    let app = &m.app;
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_millis(300), 1));
    let buyer = Buyer::new(&m, CARD_OK).await;
    let mut body = weekly(&buyer.address, &buyer.card, &[(&m.oak.variant, 1)], "skip");
    body["interval_days"] = Value::Null;
    body["starts_at"] = Value::Null;
    body["cron"] = json!("0 9 * * MON");
    body["time_zone"] = json!("Mars/Olympus");
    let p = problem(
        call(
            app,
            &buyer.token,
            Method::POST,
            "/me/replenishments",
            body.clone(),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["time_zone"]);
    body["time_zone"] = json!("Europe/Berlin");
    let made = schedule(app, &buyer.token, body).await;
    assert_eq!(made["time_zone"], "Europe/Berlin");
    let walls = |schedule: &Value, zone: Tz| -> Vec<String> {
        let next: Vec<DateTime<Utc>> =
            serde_json::from_value(schedule["next_runs"].clone()).unwrap();
        next.iter()
            .map(|t| t.with_timezone(&zone).format("%a %H:%M").to_string())
            .collect()
    };
    assert_eq!(walls(&made, Tz::Europe__Berlin), ["Mon 09:00"; 5]);
    // The replenisher moves it on in the same zone.
    let id = made["id"].as_str().unwrap().to_string();
    let path = format!("/me/replenishments/{id}");
    let moved = json_of(
        call(
            app,
            &buyer.token,
            Method::PATCH,
            &path,
            json!({"time_zone": "America/New_York"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(moved["time_zone"], "America/New_York");
    assert_eq!(walls(&moved, Tz::America__New_York), ["Mon 09:00"; 5]);
    let p = problem(
        call(
            app,
            &buyer.token,
            Method::PATCH,
            &path,
            json!({"time_zone": "nowhere"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["time_zone"]);
    // Run once, the next due time is the following Monday 09:00 New York.
    make_due(app, &id).await;
    wait_run(&m, &id, 1, "placed").await;
    let after = read_schedule(app, &buyer.token, &id).await;
    assert_eq!(walls(&after, Tz::America__New_York), ["Mon 09:00"; 5]);
    m.close().await;
}

#[tokio::test]
async fn customers_manage_their_schedules_and_cannot_see_or_change_anothers() {
    let m = Market::open().await;
    let app = &m.app;
    let (ann, anns_card, anns_address) = customer_with_card(&m, CARD_OK).await;
    let (bob, bobs_card, bobs_address) = customer_with_card(&m, CARD_OK).await;
    let created = schedule(
        app,
        &ann.token,
        json!({"items": [{"variant_id": m.oak.variant, "quantity": 1}, {"variant_id": m.tea.variant, "quantity": 2}],
               "cron": "0  9 * * MON", "address_id": anns_address, "payment_method_id": anns_card,
               "on_failure": "retry", "price_increase_limit_percent": 15}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["cron"], "0 9 * * MON");
    assert_eq!(created["items"][0]["reference_price_minor"], 4500);
    let next: Vec<DateTime<Utc>> = serde_json::from_value(created["next_runs"].clone()).unwrap();
    assert_eq!(next.len(), 5);
    for t in &next {
        assert_eq!(t.format("%a %H:%M").to_string(), "Mon 09:00");
    }
    assert_eq!(next[1] - next[0], chrono::Duration::weeks(1));

    // Bob sees none of it and can change none of it.
    let path = format!("/me/replenishments/{id}");
    for (method, suffix, body) in [
        (Method::GET, "", json!({})),
        (Method::PATCH, "", json!({"interval_days": 1})),
        (Method::POST, "/pause", json!({})),
        (Method::POST, "/resume", json!({})),
        (Method::POST, "/skip-next", json!({})),
        (Method::POST, "/cancel", json!({})),
    ] {
        let resp = call(
            app,
            &bob.token,
            method.clone(),
            &format!("{path}{suffix}"),
            body,
        )
        .await;
        problem(resp, StatusCode::NOT_FOUND).await;
    }
    let listed = list_schedules(app, &bob.token).await;
    assert_eq!(listed["items"], json!([]));
    assert_eq!(listed["total"], 0);
    // Nor use Ann's card or address for his own.
    let mut theirs = weekly(&anns_address, &bobs_card, &[(&m.oak.variant, 1)], "skip");
    let p = problem(
        call(
            app,
            &bob.token,
            Method::POST,
            "/me/replenishments",
            theirs.clone(),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["address_id"]);
    theirs["address_id"] = json!(bobs_address);
    theirs["payment_method_id"] = json!(anns_card);
    let p = problem(
        call(app, &bob.token, Method::POST, "/me/replenishments", theirs).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["payment_method_id"]);
    let unchanged = read_schedule(app, &ann.token, &id).await;
    assert_eq!(unchanged["status"], "active");
    assert_eq!(unchanged["next_runs"], created["next_runs"]);

    // Ann pauses, resumes, skips the next run, changes the cadence, cancels.
    let act = |suffix: &'static str| {
        let path = path.clone();
        let token = ann.token.clone();
        async move {
            json_of(
                call(
                    app,
                    &token,
                    Method::POST,
                    &format!("{path}{suffix}"),
                    json!({}),
                )
                .await,
                StatusCode::OK,
            )
            .await
        }
    };
    let paused = act("/pause").await;
    assert_eq!(
        (
            paused["status"].as_str(),
            paused["next_runs"].as_array().unwrap().len()
        ),
        (Some("paused"), 0)
    );
    let p = problem(
        call(
            app,
            &ann.token,
            Method::POST,
            &format!("{path}/skip-next"),
            json!({}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&p), ["status"]);
    let resumed = act("/resume").await;
    assert_eq!(resumed["next_runs"], created["next_runs"]);
    // Resuming what runs already changes nothing.
    assert_eq!(act("/resume").await["next_runs"], created["next_runs"]);
    let skipped = act("/skip-next").await;
    assert_eq!(skipped["next_runs"][0], created["next_runs"][1]);
    assert_eq!(skipped["runs"][0]["status"], "skipped");
    assert_eq!(skipped["runs"][0]["reason"], "skipped_by_customer");
    assert_eq!(skipped["runs"][0]["due_at"], created["next_runs"][0]);
    let changed = json_of(
        call(
            app,
            &ann.token,
            Method::PATCH,
            &path,
            json!({"interval_days": 14, "items": [{"variant_id": m.tea.variant, "quantity": 3}]}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let next: Vec<DateTime<Utc>> = serde_json::from_value(changed["next_runs"].clone()).unwrap();
    assert_eq!(next[1] - next[0], chrono::Duration::days(14));
    assert!(changed["cron"].is_null());
    assert_eq!(
        changed["items"],
        json!([{"variant_id": m.tea.variant, "quantity": 3, "reference_price_minor": 3000}])
    );
    let cancelled = act("/cancel").await;
    assert_eq!(cancelled["status"], "cancelled");
    let p = problem(
        call(
            app,
            &ann.token,
            Method::PATCH,
            &path,
            json!({"interval_days": 3}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&p), ["status"]);
    let listed = list_schedules(app, &ann.token).await;
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    // Bad input names its field, and nothing is written.
    let base = weekly(&anns_address, &anns_card, &[(&m.oak.variant, 1)], "skip");
    let cases: Vec<(Value, &str)> = vec![
        (json!({"cron": "0 9 * *", "interval_days": null}), "cron"),
        (json!({"cron": "0 9 * * 1", "interval_days": null}), "cron"),
        (
            json!({"cron": "0 9 1 * MON", "interval_days": null}),
            "cron",
        ),
        (
            json!({"cron": "*/10 * * * *", "interval_days": null}),
            "cron",
        ),
        (json!({"cron": "0 9 * * MON"}), "cron"),
        (json!({"interval_days": null}), "interval_days"),
        (json!({"interval_days": 0}), "interval_days"),
        (
            json!({"items": [{"variant_id": m.oak.variant, "quantity": 0}]}),
            "items[0].quantity",
        ),
        (
            json!({"items": [{"variant_id": m.oak.variant, "quantity": 1}, {"variant_id": m.oak.variant, "quantity": 2}]}),
            "items[1].variant_id",
        ),
        (
            json!({"items": [{"variant_id": Uuid::now_v7(), "quantity": 1}]}),
            "items[0].variant_id",
        ),
        (json!({"items": []}), "items"),
        (
            json!({"price_increase_limit_percent": 5000}),
            "price_increase_limit_percent",
        ),
        (
            json!({"starts_at": Utc::now() - chrono::Duration::days(2)}),
            "starts_at",
        ),
        (json!({"on_failure": "sometimes"}), "on_failure"),
    ];
    for (change, field) in cases {
        let mut body = base.clone();
        body.as_object_mut()
            .unwrap()
            .extend(change.as_object().unwrap().clone());
        let p = problem(
            call(
                app,
                &ann.token,
                Method::POST,
                "/me/replenishments",
                body.clone(),
            )
            .await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(fields(&p), [field], "{body}");
    }
    let p = problem(
        call(app, &m.oak.seller, Method::POST, "/me/replenishments", base).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(fields(&p), ["role"]);
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM replenishment_schedules")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(kept, 1);

    // A create retried with its Idempotency-Key answers the same schedule,
    // the key with another request is refused, and keys are each customer's
    // own.
    let keyed = |token: String, body: Value| async move {
        app.http
            .post(format!("{}/api/v1/me/replenishments", app.base))
            .bearer_auth(token)
            .header("Idempotency-Key", "weekly-1")
            .json(&body)
            .send()
            .await
            .unwrap()
    };
    let bobs = weekly(&bobs_address, &bobs_card, &[(&m.oak.variant, 1)], "skip");
    let first = json_of(
        keyed(bob.token.clone(), bobs.clone()).await,
        StatusCode::CREATED,
    )
    .await;
    let again = json_of(
        keyed(bob.token.clone(), bobs.clone()).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(again["id"], first["id"]);
    let mut other = bobs.clone();
    other["on_failure"] = json!("retry");
    let p = problem(
        keyed(bob.token.clone(), other).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["Idempotency-Key"]);
    let anns = weekly(&anns_address, &anns_card, &[(&m.oak.variant, 1)], "skip");
    let hers = json_of(keyed(ann.token.clone(), anns).await, StatusCode::CREATED).await;
    assert_ne!(hers["id"], first["id"]);
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM replenishment_schedules")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(kept, 3);
    m.close().await;
}

#[tokio::test]
async fn an_order_that_expired_unpaid_is_never_followed_by_another_and_suspended_accounts_wait() {
    let mut m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let id = buyer.weekly(app, &[(&m.oak.variant, 1)], "retry").await;
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_millis(300), 5));

    // A suspended account's schedule waits.
    sqlx::query("UPDATE users SET suspended_at = now() WHERE id = $1")
        .bind(buyer.id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    make_due(app, &id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(runs(app, &id).await.is_empty(), "no run while suspended");

    // Reinstated, with the payments worker unable to get to Stripe in time
    // (held before its first read, the Stripe customers' table being
    // locked): the order is reserved but never charged, and its reservation
    // runs out.
    let mut slow = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE stripe_customers IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *slow)
        .await
        .unwrap();
    sqlx::query("UPDATE users SET suspended_at = NULL WHERE id = $1")
        .bind(buyer.id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    wait_run(&m, &id, 1, "placed").await;
    let orders = orders_of(&m, &id).await;
    let order = orders[0].0.to_string();
    wait_for(app, &buyer.token, &order, "reserved").await;
    sqlx::query(
        "UPDATE orders SET reserved_until = now() - interval '1 second' WHERE id = $1::uuid",
    )
    .bind(&order)
    .execute(&app.db.pool)
    .await
    .unwrap();
    wait_for(app, &buyer.token, &order, "expired").await;
    // Stripe reached at last: the order is over, nothing is charged.
    slow.rollback().await.unwrap();

    // Retry policy or not, no second order: a late payment may still come.
    let got = wait_run(&m, &id, 1, "failed").await;
    assert_eq!(got[0].3.as_deref(), Some("unpaid"));
    let told = mails_about(&buyer.email, "scheduled order was not placed", 1).await;
    assert!(
        told[0].text.contains("not paid in time"),
        "{}",
        told[0].text
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(orders_of(&m, &id).await.len(), 1);
    m.close().await;
}

#[tokio::test]
async fn a_schedule_re_timed_onto_a_skipped_due_time_places_that_delivery_after_all() {
    let mut m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let id = buyer.weekly(app, &[(&m.tea.variant, 1)], "skip").await;
    let token = buyer.token.as_str();
    let path = format!("/me/replenishments/{id}");
    let ok = |method: Method, path: String, body: Value| async move {
        json_of(call(app, token, method, &path, body).await, StatusCode::OK).await
    };
    let change = |body: Value| ok(Method::PATCH, path.clone(), body);
    let skipped = ok(Method::POST, format!("{path}/skip-next"), json!({})).await;
    let due = skipped["runs"][0]["due_at"].clone();
    assert_eq!(skipped["runs"][0]["reason"], "skipped_by_customer");
    // A change that leaves the timing alone keeps the skip.
    let kept = change(json!({"price_increase_limit_percent": 20})).await;
    assert_eq!(kept["runs"][0]["due_at"], due);
    assert_eq!(kept["next_runs"], skipped["next_runs"]);

    // Re-timed onto the skipped due time: the customer wants it after all,
    // so it is shown as coming and the skip is gone.
    let back = change(json!({"starts_at": due})).await;
    assert_eq!(back["next_runs"][0], due);
    assert_eq!(back["runs"], json!([]), "{back}");

    // That due time comes (every time of the schedule moved back alike):
    // its order is placed and paid.
    let mut tx = app.db.pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE replenishment_runs r SET due_at = r.due_at - (s.next_run_at - now() + interval '1 second')
           FROM replenishment_schedules s WHERE s.id = r.schedule_id AND s.id = $1::uuid",
    )
    .bind(&id)
    .execute(&mut *tx)
    .await
    .unwrap();
    make_due_on(&mut *tx, &id).await;
    tx.commit().await.unwrap();
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_secs(3600), 3));
    let got = wait_run(&m, &id, 1, "placed").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let orders = orders_of(&m, &id).await;
    assert_eq!(orders.len(), 1, "{orders:?}");
    wait_for(app, token, &orders[0].0.to_string(), "paid").await;

    // Only the time re-timed onto is asked for again. Daily, two days
    // skipped: re-timed onto the first, the second stays skipped and is not
    // shown as coming; re-timed to two days before them, both stay skipped.
    let mut daily = weekly(&buyer.address, &buyer.card, &[(&m.oak.variant, 1)], "skip");
    daily["interval_days"] = json!(1);
    daily["starts_at"] = json!(Utc::now() + chrono::Duration::days(3));
    let daily = schedule_id(app, token, daily).await;
    let daily_path = format!("/me/replenishments/{daily}");
    ok(Method::POST, format!("{daily_path}/skip-next"), json!({})).await;
    let skipped = ok(Method::POST, format!("{daily_path}/skip-next"), json!({})).await;
    let times = |v: &Value| -> Vec<DateTime<Utc>> { serde_json::from_value(v.clone()).unwrap() };
    let at = |v: &Value| -> DateTime<Utc> { serde_json::from_value(v.clone()).unwrap() };
    let day = chrono::Duration::days(1);
    // (Runs newest first.)
    let first = at(&skipped["runs"][1]["due_at"]);
    assert_eq!(at(&skipped["runs"][0]["due_at"]), first + day);
    let onto_first = ok(
        Method::PATCH,
        daily_path.clone(),
        json!({"starts_at": first}),
    )
    .await;
    let next = times(&onto_first["next_runs"]);
    assert_eq!(
        next[..3],
        [first, first + day * 2, first + day * 3],
        "{onto_first}"
    );
    let runs_left = onto_first["runs"].as_array().unwrap();
    assert_eq!(runs_left.len(), 1, "{onto_first}");
    assert_eq!(at(&runs_left[0]["due_at"]), first + day);
    assert_eq!(runs_left[0]["reason"], "skipped_by_customer");
    // Skip the first again (the next run is then past both skips), then
    // re-time to two days before them.
    let again = ok(Method::POST, format!("{daily_path}/skip-next"), json!({})).await;
    assert_eq!(times(&again["next_runs"])[0], first + day * 2, "{again}");
    let earlier = ok(
        Method::PATCH,
        daily_path,
        json!({"starts_at": first - day * 2}),
    )
    .await;
    let next = times(&earlier["next_runs"]);
    assert_eq!(
        next,
        [
            first - day * 2,
            first - day,
            first + day * 2,
            first + day * 3,
            first + day * 4
        ],
        "{earlier}"
    );
    assert_eq!(earlier["runs"].as_array().unwrap().len(), 2, "{earlier}");
    m.close().await;
}

#[tokio::test]
async fn a_run_failing_after_its_schedule_was_paused_or_cancelled_is_skipped_and_says_so() {
    let mut m = Market::open().await;
    // Both orders placed, their reservations held up by a sale elsewhere.
    let HeldRuns {
        first: (ann, paused),
        second: (bob, cancelled),
        variants,
        mut sale,
    } = runs_held_by_a_sale(&mut m, "retry", "retry").await;
    let app = &m.app;
    // Meanwhile the customers pause and cancel, then the sale takes it all.
    for (who, id, what) in [(&ann, &paused, "pause"), (&bob, &cancelled, "cancel")] {
        let path = format!("/me/replenishments/{id}/{what}");
        let resp = call(app, &who.token, Method::POST, &path, json!({})).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    sqlx::query("UPDATE variants SET on_hand = 0 WHERE id = ANY($1)")
        .bind(&variants)
        .execute(&mut *sale)
        .await
        .unwrap();
    sale.commit().await.unwrap();

    // Retry policy or not, no retry is promised: the run is skipped at
    // once, and the mail says why.
    for (who, id, status) in [(&ann, &paused, "paused"), (&bob, &cancelled, "cancelled")] {
        let got = wait_run(&m, id, 1, "skipped").await;
        assert_eq!((got[0].2, got[0].3.as_deref()), (1, Some("out_of_stock")));
        let shown = read_schedule(app, &who.token, id).await;
        assert!(shown["runs"][0]["retry_at"].is_null(), "{shown}");
        let told = mails_about(&who.email, "scheduled order was not placed", 1).await;
        assert!(
            told[0]
                .text
                .contains(&format!("skipped, since the schedule is {status}")),
            "{}",
            told[0].text
        );
        assert!(!told[0].text.contains("try again"), "{}", told[0].text);
        let told = notifications(app, &who.token, "replenishment_failed", 1).await;
        let d = &told[0]["data"];
        assert_eq!(
            (d["outcome"].as_str(), d["schedule_status"].as_str()),
            (Some("skipped"), Some(status)),
            "{d}"
        );
        assert!(d["retry_at"].is_null() && d["next_run_at"].is_null(), "{d}");
        let mails = souk_testkit::mail::mails_to(&who.email).await;
        assert!(
            !mails.iter().any(|m| m.subject.contains("delayed")),
            "{mails:?}"
        );
    }
    // And no retry comes later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in [&paused, &cancelled] {
        assert_eq!(runs(app, id).await.len(), 1);
        assert_eq!(orders_of(&m, id).await.len(), 1);
    }
    m.close().await;
}

#[tokio::test]
async fn changing_a_schedules_items_keeps_the_reference_prices_of_those_it_had() {
    let mut m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    // One teapot at 30.00, within 10% of that.
    let id = buyer.weekly(app, &[(&m.tea.variant, 1)], "skip").await;
    reprice(app, &m.tea, 3400).await;

    // Two teapots and a new board: the teapot's reference stays 30.00, the
    // board takes its price now.
    let changed = json_of(
        call(
            app,
            &buyer.token,
            Method::PATCH,
            &format!("/me/replenishments/{id}"),
            json!({"items": [{"variant_id": m.tea.variant, "quantity": 2},
                             {"variant_id": m.oak.variant, "quantity": 1}]}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        changed["items"],
        json!([
            {"variant_id": m.tea.variant, "quantity": 2, "reference_price_minor": 3000},
            {"variant_id": m.oak.variant, "quantity": 1, "reference_price_minor": 4500},
        ])
    );

    // So the limit still holds against 30.00: 34.00 is beyond it.
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_secs(3600), 3));
    make_due(app, &id).await;
    let got = wait_run(&m, &id, 1, "skipped").await;
    assert_eq!(got[0].3.as_deref(), Some("price_changed"));
    assert!(orders_of(&m, &id).await.is_empty());
    let told = mails_about(&buyer.email, "scheduled order was not placed", 1).await;
    assert!(
        told[0]
            .text
            .contains("now costs 3400 (minor units), up from 3000"),
        "{}",
        told[0].text
    );
    m.close().await;
}

/// The Stripe PaymentIntent an order has, if any.
async fn intent_of(m: &Market, order: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT payment_intent_id FROM orders WHERE id = $1")
        .bind(order)
        .fetch_one(&m.app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_card_still_to_be_charged_for_an_order_cannot_be_removed_and_a_removed_one_is_never_charged()
 {
    let mut m = Market::open().await;
    // Both orders placed on their schedules' cards, not reserved yet.
    let HeldRuns {
        first: (ann, id),
        second: _,
        variants: _,
        sale,
    } = runs_held_by_a_sale(&mut m, "skip", "skip").await;
    let app = &m.app;
    let card_a: Uuid = sqlx::query_scalar(
        "SELECT payment_method_id FROM replenishment_schedules WHERE id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    // Ann moves the schedule to another card and removes the first: refused
    // while the order placed on it is still to be charged.
    let card_b = common::recurring::saved_card(&m, &ann.token, CARD_OK).await;
    let moved = call(
        app,
        &ann.token,
        Method::PATCH,
        &format!("/me/replenishments/{id}"),
        json!({"payment_method_id": card_b}),
    )
    .await;
    assert_eq!(moved.status(), StatusCode::OK);
    let refused = problem(
        call(
            app,
            &ann.token,
            Method::DELETE,
            &format!("/me/payment-methods/{card_a}"),
            json!({}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&refused), ["id"]);
    let (order, _) = orders_of(&m, &id).await.remove(0);
    assert!(
        refused.to_string().contains(&order.to_string()),
        "names the order: {refused}"
    );
    let status: String = sqlx::query_scalar("SELECT status FROM payment_methods WHERE id = $1")
        .bind(card_a)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "active", "nothing written");

    // A card no longer active when the order comes to be charged (removed
    // by a request that raced the order) is not charged: the order is
    // declined, and the run follows its policy.
    sqlx::query("UPDATE payment_methods SET status = 'removed' WHERE id = $1")
        .bind(card_a)
        .execute(&app.db.pool)
        .await
        .unwrap();
    sale.commit().await.unwrap();
    let got = wait_run(&m, &id, 1, "skipped").await;
    assert_eq!(got[0].3.as_deref(), Some("payment_declined"));
    wait_for(app, &ann.token, &order.to_string(), "cancelled").await;
    let told = notifications(app, &ann.token, "replenishment_failed", 1).await;
    let detail = told[0]["data"]["detail"].as_str().unwrap();
    assert!(detail.contains("removed"), "says why: {detail}");
    assert_eq!(intent_of(&m, order).await, None, "nothing asked of Stripe");
    let told = mails_about(&ann.email, "scheduled order was not placed", 1).await;
    assert!(told[0].text.contains("skipped"), "{}", told[0].text);
    m.close().await;
}

#[tokio::test]
async fn a_card_gone_at_stripe_is_a_decline_the_customer_hears_of_and_the_policy_follows() {
    let mut m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let id = buyer.weekly(app, &[(&m.oak.variant, 1)], "retry").await;
    // Detached at Stripe behind Souk's back: Stripe has no such card.
    sqlx::query(
        "UPDATE payment_methods SET stripe_payment_method_id = 'pm_gone' WHERE id = $1::uuid",
    )
    .bind(&buyer.card)
    .execute(&app.db.pool)
    .await
    .unwrap();
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_millis(300), 2));
    make_due(app, &id).await;

    // Nothing was charged, so it is a decline like any other: each order
    // cancelled, the run retried, then given up.
    let got = wait_run(&m, &id, 1, "failed").await;
    assert_eq!(
        (got[0].2, got[0].3.as_deref()),
        (2, Some("payment_declined"))
    );
    let orders = declined_orders(&m, &buyer.token, &id).await;
    assert_eq!(orders.len(), 2, "one order per attempt: {orders:?}");
    let delayed = mails_about(&buyer.email, "scheduled order is delayed", 1).await;
    assert!(delayed[0].text.contains("declined"), "{}", delayed[0].text);
    let told = notifications(app, &buyer.token, "replenishment_failed", 2).await;
    let outcomes: Vec<_> = told
        .iter()
        .map(|n| (n["data"]["reason"].as_str(), n["data"]["outcome"].as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Some("payment_declined"), Some("failed")),
            (Some("payment_declined"), Some("retrying"))
        ]
    );
    souk_testkit::wait_until("the stock to be released", PIPELINE_WAIT, || async {
        stock(app, &m.oak.variant).await == (5, 0)
    })
    .await;
    m.close().await;
}

#[tokio::test]
async fn a_retry_is_promised_only_before_the_next_due_time_and_never_makes_a_second_order() {
    let mut m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    // 6 wanted of 5 in stock, retried 25 hours later: past a daily
    // schedule's next run, before a weekly one's.
    let mut daily = weekly(&buyer.address, &buyer.card, &[(&m.oak.variant, 6)], "retry");
    daily["interval_days"] = json!(1);
    let daily = schedule_id(app, &buyer.token, daily).await;
    let weekly_id = buyer.weekly(app, &[(&m.tea.variant, 6)], "retry").await;
    m.pipeline
        .run_replenisher(app, replenisher(Duration::from_secs(25 * 3600), 3));
    make_due(app, &daily).await;
    make_due(app, &weekly_id).await;

    // Daily: no retry after tomorrow's run, which is that delivery anyway:
    // given up now, and the customer told so.
    let got = wait_run(&m, &daily, 1, "failed").await;
    assert_eq!((got[0].2, got[0].3.as_deref()), (1, Some("out_of_stock")));
    let gave_up = mails_about(&buyer.email, "scheduled order was not placed", 1).await;
    assert!(
        gave_up[0].text.contains("given this delivery up"),
        "{}",
        gave_up[0].text
    );
    let told = notifications(app, &buyer.token, "replenishment_failed", 2).await;
    let of_daily = told
        .iter()
        .find(|n| n["data"]["schedule_id"] == daily.as_str())
        .unwrap();
    assert_eq!(of_daily["data"]["outcome"], "failed", "{of_daily}");
    assert!(of_daily["data"]["retry_at"].is_null(), "{of_daily}");

    // Weekly: retrying. Should the retry still be waiting when the next due
    // time comes (no replenisher ran meanwhile), that run is the delivery
    // and the retry is given up: one order, not two.
    wait_run(&m, &weekly_id, 1, "retrying").await;
    restock(app, &m.tea, 5).await;
    let mut tx = app.db.pool.begin().await.unwrap();
    retry_now(&mut *tx, &weekly_id).await;
    make_due_on(&mut *tx, &weekly_id).await;
    tx.commit().await.unwrap();
    wait_run(&m, &weekly_id, 2, "placed").await;
    let got = wait_run(&m, &weekly_id, 1, "failed").await;
    assert_eq!(got.len(), 2, "{got:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let orders = orders_of(&m, &weekly_id).await;
    assert_eq!(orders.len(), 1, "one order for the two: {orders:?}");
    wait_for(app, &buyer.token, &orders[0].0.to_string(), "paid").await;
    m.close().await;
}

#[tokio::test]
async fn an_overdue_schedule_lists_its_due_run_then_the_times_after_now() {
    let m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let id = buyer.weekly(app, &[(&m.tea.variant, 1)], "skip").await;
    // No replenisher has run for eight days: the due run comes at the next
    // poll, and the replenisher then moves on to the first time after now.
    let due = DateTime::from_timestamp_micros(
        (Utc::now() - chrono::Duration::days(8)).timestamp_micros(),
    )
    .unwrap();
    set_next_run_at(&m, &id, due).await;
    let shown = read_schedule(app, &buyer.token, &id).await;
    let next: Vec<DateTime<Utc>> = serde_json::from_value(shown["next_runs"].clone()).unwrap();
    let week = chrono::Duration::weeks(1);
    assert_eq!(
        next,
        [
            due,
            due + week * 2,
            due + week * 3,
            due + week * 4,
            due + week * 5
        ],
        "{shown}"
    );
    m.close().await;
}

/// `POST /me/replenishments` with `body` as `token`, sending `key` as its
/// `Idempotency-Key`.
async fn create_keyed(app: &App, token: &str, key: &str, body: &Value) -> reqwest::Response {
    app.http
        .post(format!("{}/api/v1/me/replenishments", app.base))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The digest the API keeps of a create `body` sent with `key`: the one
/// its handler computes, through its own request type.
fn request_digest(key: &str, body: &Value) -> Vec<u8> {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(souk_api::idempotency::HEADER, key.parse().unwrap());
    let request: souk_api::routes::replenishments::NewSchedule =
        serde_json::from_value(body.clone()).unwrap();
    souk_api::idempotency::Key::from_request(&headers, &request)
        .ok()
        .flatten()
        .expect("a valid key")
        .hash
}

#[tokio::test]
async fn a_create_retried_after_its_starts_at_passed_answers_the_schedule_it_made() {
    let m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let token = buyer.token.as_str();
    const KEY: &str = "weekly-late";
    // The request a client sent a day ago, when its first run was a few
    // minutes ahead, and retries now: its starts_at is a day past, far
    // beyond the grace for clocks. The schedule that request made is
    // written as the API writes it (made now, the stored digest then that
    // of the request sent a day ago): the digest is all the lookup reads.
    let mut late = weekly(&buyer.address, &buyer.card, &[(&m.tea.variant, 1)], "skip");
    late["starts_at"] = json!(Utc::now() - chrono::Duration::days(1));
    let mut ahead = late.clone();
    ahead["starts_at"] = json!(Utc::now() + chrono::Duration::days(1));
    let first = json_of(
        create_keyed(app, token, KEY, &ahead).await,
        StatusCode::CREATED,
    )
    .await;
    let id = first["id"].as_str().unwrap();
    let moved = sqlx::query(
        "UPDATE replenishment_schedules SET request_hash = $2 WHERE id = $1::uuid AND idempotency_key = $3",
    )
    .bind(id)
    .bind(request_digest(KEY, &late))
    .bind(KEY)
    .execute(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 1);

    // The retry answers what the first request made, as it answered then.
    let again = json_of(
        create_keyed(app, token, KEY, &late).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(again, first);

    // The key with another request is still refused, naming the header;
    // the late request without its key (or with another) is a new one, and
    // its starts_at is refused.
    let mut other = late.clone();
    other["on_failure"] = json!("retry");
    let p = problem(
        create_keyed(app, token, KEY, &other).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["Idempotency-Key"]);
    let p = problem(
        create_keyed(app, token, "weekly-new", &late).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["starts_at"]);
    let p = problem(
        call(app, token, Method::POST, "/me/replenishments", late.clone()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["starts_at"]);
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM replenishment_schedules")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(kept, 1);
    m.close().await;
}

/// The due times of the schedule's runs the customer skipped, oldest first.
async fn skips(app: &App, schedule: &str) -> Vec<DateTime<Utc>> {
    runs(app, schedule)
        .await
        .into_iter()
        .filter(|(_, status, _, reason)| {
            status == "skipped" && reason.as_deref() == Some("skipped_by_customer")
        })
        .map(|(due, ..)| due)
        .collect()
}

fn time_of(v: &Value) -> DateTime<Utc> {
    serde_json::from_value(v.clone()).unwrap()
}

#[tokio::test]
async fn a_change_that_leaves_the_next_run_keeps_its_skip_and_a_re_timing_or_resume_drops_it() {
    use chrono::{DurationRound, Timelike};

    let m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let token = buyer.token.as_str();
    let week = chrono::Duration::weeks(1);
    // Weekly, first due in a day, on the minute (so a cron can name it).
    let due = (Utc::now() + chrono::Duration::days(1))
        .duration_trunc(chrono::Duration::minutes(1))
        .unwrap();
    let mut body = weekly(&buyer.address, &buyer.card, &[(&m.tea.variant, 1)], "skip");
    body["starts_at"] = json!(due);
    let id = schedule_id(app, token, body).await;
    let path = format!("/me/replenishments/{id}");
    let ok = |method: Method, path: String, body: Value| async move {
        json_of(call(app, token, method, &path, body).await, StatusCode::OK).await
    };
    let change = |body: Value| ok(Method::PATCH, path.clone(), body);
    let post = |what: &str| ok(Method::POST, format!("{path}/{what}"), json!({}));
    // The customer skips `due`, and the schedule's next run then sits on
    // that skip: as the replenisher leaves it when, having placed the runs
    // of a schedule re-timed to before its skips, it moves on to a skipped
    // due time. The schedule shows the time after it as its next run.
    let skip_and_sit_on_it = || async {
        post("skip-next").await;
        set_next_run_at(&m, &id, due).await;
        let shown = read_schedule(app, token, &id).await;
        assert_eq!(time_of(&shown["next_runs"][0]), due + week, "{shown}");
        assert_eq!(skips(app, &id).await, [due]);
    };

    // A change of the items, the price limit or the policy, or resuming the
    // schedule that is not paused, leaves the next run where it was: the
    // skip stands, and the delivery after it is still the next one shown.
    skip_and_sit_on_it().await;
    let (market, sid) = (&m, id.as_str());
    let still_skipped = |kept: Value| async move {
        assert_eq!(skips(app, sid).await, [due], "{kept}");
        assert_eq!(time_of(&kept["next_runs"][0]), due + week, "{kept}");
        assert_eq!(next_run_at(market, sid).await, due);
    };
    for body in [
        json!({"items": [{"variant_id": m.tea.variant, "quantity": 2}]}),
        json!({"price_increase_limit_percent": 25}),
        json!({"on_failure": "retry"}),
    ] {
        still_skipped(change(body).await).await;
    }
    still_skipped(post("resume").await).await;

    // Re-timing it onto the skipped time (starts_at; a new cadence; a new
    // zone), or resuming it paused, asks for that delivery after all.
    let wall = format!(
        "{} {} * * {}",
        due.minute(),
        due.hour(),
        due.format("%a").to_string().to_uppercase()
    );
    let dropped = change(json!({"starts_at": due})).await;
    assert_eq!(time_of(&dropped["next_runs"][0]), due, "{dropped}");
    assert!(skips(app, &id).await.is_empty());
    skip_and_sit_on_it().await;
    let dropped = change(json!({"cron": wall})).await;
    assert_eq!(dropped["cron"], json!(wall));
    assert_eq!(time_of(&dropped["next_runs"][0]), due, "{dropped}");
    assert!(skips(app, &id).await.is_empty());
    skip_and_sit_on_it().await;
    let dropped = change(json!({"time_zone": "UTC"})).await;
    assert_eq!(time_of(&dropped["next_runs"][0]), due, "{dropped}");
    assert!(skips(app, &id).await.is_empty());
    skip_and_sit_on_it().await;
    let paused = post("pause").await;
    assert_eq!(paused["status"], "paused");
    assert_eq!(skips(app, &id).await, [due]);
    let resumed = post("resume").await;
    assert_eq!(resumed["status"], "active");
    assert_eq!(time_of(&resumed["next_runs"][0]), due, "{resumed}");
    assert!(skips(app, &id).await.is_empty());
    m.close().await;
}

/// A new address in the customer's book (not the default); its id.
async fn new_address(app: &App, token: &str, city: &str) -> String {
    let address = json!({"full_name": "Ann Example", "line1": "1 Main St", "city": city,
                         "postal_code": "10115", "country": "DE"});
    let made = json_of(
        call(app, token, Method::POST, "/me/addresses", address).await,
        StatusCode::CREATED,
    )
    .await;
    made["id"].as_str().unwrap().to_string()
}

/// The status and body of an answer.
async fn answer(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Schedules naming an address that no longer exists (none, by the
/// foreign key: a write that would make one fails instead).
async fn dangling(app: &App) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM replenishment_schedules s
          WHERE s.address_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM addresses a WHERE a.id = s.address_id)",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn deleting_an_address_while_a_schedule_is_written_with_it_never_fails_the_write() {
    let m = Market::open().await;
    let app = &m.app;
    let buyer = Buyer::new(&m, CARD_OK).await;
    let token = buyer.token.as_str();
    let kept = buyer.weekly(app, &[(&m.tea.variant, 1)], "skip").await;
    let kept_path = format!("/me/replenishments/{kept}");

    // Step by step: a change of the schedule to a new address has checked
    // the address (and waits on its card, whose row the test holds) when
    // the address is deleted. The delete waits for the change; the change
    // is written; the delete then clears the address from the schedule, as
    // from any schedule naming it.
    let address = new_address(app, token, "Leipzig").await;
    let mut card = app.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM payment_methods WHERE id = $1::uuid FOR UPDATE")
        .bind(&buyer.card)
        .execute(&mut *card)
        .await
        .unwrap();
    let change = tokio::spawn({
        let (http, url) = (app.http.clone(), format!("{}/api/v1{kept_path}", app.base));
        let body = json!({"address_id": address, "payment_method_id": buyer.card});
        let token = token.to_string();
        async move {
            answer(
                http.patch(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    });
    souk_testkit::wait_until("the change to wait for the card", PIPELINE_WAIT, || async {
        !waiting_in(&m, "SELECT status FROM payment_methods")
            .await
            .is_empty()
    })
    .await;
    let delete = tokio::spawn({
        let url = format!("{}/api/v1/me/addresses/{address}", app.base);
        let (http, token) = (app.http.clone(), token.to_string());
        async move {
            http.delete(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    souk_testkit::wait_until("the delete to wait or end", PIPELINE_WAIT, || async {
        delete.is_finished() || !waiting_in(&m, "DELETE FROM addresses").await.is_empty()
    })
    .await;
    card.commit().await.unwrap();
    let (status, changed) = change.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["address_id"], json!(address));
    assert_eq!(delete.await.unwrap(), StatusCode::NO_CONTENT);
    let shown = read_schedule(app, token, &kept).await;
    assert!(shown["address_id"].is_null(), "{shown}");
    assert_eq!(dangling(app).await, 0);

    // Raced, many times over: a new schedule with the address and a change
    // of another to it, while the address is deleted. No 5xx; each write
    // either came first (and the delete then cleared the address from it)
    // or came after and names the address as the field it refuses.
    let before = read_schedule(app, token, &kept).await;
    let mut kept_address = before["address_id"].clone();
    let (mut created, mut changed) = (0, 0);
    for i in 0..25 {
        let address = new_address(app, token, &format!("Town {i}")).await;
        let new = weekly(&address, &buyer.card, &[(&m.oak.variant, 1)], "skip");
        let gone = format!("/me/addresses/{address}");
        let (create, change, delete) = tokio::join!(
            async { answer(call(app, token, Method::POST, "/me/replenishments", new).await).await },
            async {
                let body = json!({"address_id": address});
                answer(call(app, token, Method::PATCH, &kept_path, body).await).await
            },
            call(app, token, Method::DELETE, &gone, json!({})),
        );
        assert_eq!(delete.status(), StatusCode::NO_CONTENT, "round {i}");
        let refused_for_the_address = |(status, body): &(StatusCode, Value)| {
            *status == StatusCode::UNPROCESSABLE_ENTITY && fields(body) == ["address_id"]
        };
        match &create {
            (StatusCode::CREATED, made) => {
                created += 1;
                let id = made["id"].as_str().unwrap();
                let shown = read_schedule(app, token, id).await;
                assert!(shown["address_id"].is_null(), "round {i}: {shown}");
                let cancel = format!("/me/replenishments/{id}/cancel");
                ok_status(call(app, token, Method::POST, &cancel, json!({})).await).await;
            }
            refused if refused_for_the_address(refused) => {}
            other => panic!("round {i}: the create answered {other:?}"),
        }
        let shown = read_schedule(app, token, &kept).await;
        match &change {
            (StatusCode::OK, _) => {
                changed += 1;
                assert!(shown["address_id"].is_null(), "round {i}: {shown}");
            }
            refused if refused_for_the_address(refused) => {
                assert_eq!(shown["address_id"], kept_address, "round {i}: {shown}");
            }
            other => panic!("round {i}: the change answered {other:?}"),
        }
        kept_address = shown["address_id"].clone();
        assert_eq!(dangling(app).await, 0, "round {i}");
    }
    eprintln!("of 25 rounds, {created} created and {changed} changed before the delete");
    m.close().await;
}

async fn ok_status(resp: reqwest::Response) {
    let (status, body) = answer(resp).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
