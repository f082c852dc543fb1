//! Checkout helpers: customers with an address, sellers with stock, carts,
//! checkout, paying through localstripe, and waiting for an order's status.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_api::auth::{Jwt, Role};
use souk_testkit::{
    mail::{Mail, mails_to, unique_address},
    stripe::{CARD_OK, LocalStripe, WEBHOOK_SECRET},
};
use uuid::Uuid;

use super::{
    App, auth_config,
    catalog::{call, json_of, product, publish, simple},
    verified_seller,
};

/// Long enough for the pipeline on a loaded machine (localstripe sends a
/// webhook about a second after the charge).
pub const PIPELINE_WAIT: Duration = Duration::from_secs(30);

pub struct Customer {
    pub id: Uuid,
    pub email: String,
    pub token: String,
}

/// A verified customer with a default shipping address. Made in the
/// database with a minted token: fast enough for fifty at once.
pub async fn customer(app: &App) -> Customer {
    let id = Uuid::now_v7();
    let email = unique_address();
    sqlx::query(
        "INSERT INTO users (id, email, name, role, email_verified_at) VALUES ($1, $2, 'Casey', 'customer', now())",
    )
    .bind(id)
    .bind(&email)
    .execute(&app.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO addresses (id, user_id, full_name, line1, city, postal_code, country, is_default)
         VALUES ($1, $2, 'Casey Buyer', '1 Market Street', 'Fes', '30000', 'MA', true)",
    )
    .bind(Uuid::now_v7())
    .bind(id)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let token = Jwt::new(&auth_config()).issue(id, Role::Customer, 0);
    Customer { id, email, token }
}

/// A shop (`slug`) selling one product with one variant; returns the
/// seller's token and the variant's id.
pub struct Listing {
    pub seller: String,
    pub shop: String,
    pub variant: String,
}

pub async fn listing(app: &App, slug: &str, title: &str, price: i64, stock: i32) -> Listing {
    let seller = verified_seller(app, slug).await;
    add_product(app, &seller, slug, title, price, stock).await
}

/// Another product in the seller's shop.
pub async fn add_product(
    app: &App,
    seller: &str,
    slug: &str,
    title: &str,
    price: i64,
    stock: i32,
) -> Listing {
    let created = product(
        app,
        seller,
        simple(title, &title.replace(' ', "-"), price, stock),
    )
    .await;
    publish(app, seller, created["id"].as_str().unwrap()).await;
    Listing {
        seller: seller.to_string(),
        shop: slug.to_string(),
        variant: created["variants"][0]["id"].as_str().unwrap().to_string(),
    }
}

pub async fn add_to_cart(app: &App, token: &str, variant: &str, quantity: i32) {
    let body = json!({"variant_id": variant, "quantity": quantity});
    json_of(
        call(app, token, Method::POST, "/cart/items", body).await,
        StatusCode::OK,
    )
    .await;
}

/// `POST /checkout`, with an Idempotency-Key if given.
pub async fn checkout_request(
    app: &App,
    token: &str,
    key: Option<&str>,
    body: Value,
) -> reqwest::Response {
    let mut req = app
        .http
        .post(format!("{}/api/v1/checkout", app.base))
        .bearer_auth(token)
        .json(&body);
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    req.send().await.unwrap()
}

/// Checks out the cart; returns the order (pending).
pub async fn checkout(app: &App, token: &str) -> Value {
    json_of(
        checkout_request(app, token, None, json!({})).await,
        StatusCode::ACCEPTED,
    )
    .await
}

pub async fn order(app: &App, token: &str, id: &str) -> Value {
    json_of(
        call(app, token, Method::GET, &format!("/orders/{id}"), json!({})).await,
        StatusCode::OK,
    )
    .await
}

/// Waits until the order reads as `status`; returns it.
pub async fn wait_for(app: &App, token: &str, id: &str, status: &str) -> Value {
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
    while tokio::time::Instant::now() < deadline {
        last = order(app, token, id).await;
        if last["status"] == status {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("order {id} never became {status}; last seen: {last}");
}

/// Pays an order awaiting payment as the storefront would (Stripe.js with
/// a card), whether the card is taken or declined; returns the intent's id.
pub async fn pay(app: &App, stripe: &LocalStripe, token: &str, id: &str, card: &str) -> String {
    let awaiting = wait_for(app, token, id, "awaiting_payment").await;
    let intent = awaiting["payment"]["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        awaiting["payment"]["client_secret"]
            .as_str()
            .unwrap()
            .starts_with(&intent)
    );
    let answer = stripe.pay(&intent, card).await;
    assert_eq!(answer.is_ok(), card == CARD_OK, "{answer:?}");
    intent
}

/// Checks out the cart and pays it with a good card; returns the paid order.
pub async fn checkout_and_pay(app: &App, stripe: &LocalStripe, token: &str) -> Value {
    let placed = checkout(app, token).await;
    let id = placed["id"].as_str().unwrap();
    pay(app, stripe, token, id, CARD_OK).await;
    wait_for(app, token, id, "paid").await
}

/// Sends localstripe's webhooks to the app, signed with the test secret.
pub async fn stripe_for(app: &App) -> LocalStripe {
    let stripe = LocalStripe::start().await;
    stripe
        .send_webhooks_to(
            &format!("{}/api/v1/stripe/webhook", app.base),
            WEBHOOK_SECRET,
        )
        .await;
    stripe
}

/// Mails to `to` whose subject contains `needle`, once there are `n`.
pub async fn mails_about(to: &str, needle: &str, n: usize) -> Vec<Mail> {
    let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
    loop {
        let found: Vec<Mail> = mails_to(to)
            .await
            .into_iter()
            .filter(|m| m.subject.contains(needle))
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {n} mail(s) to {to} about {needle:?}; got {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (on_hand, reserved) of a variant.
pub async fn stock(app: &App, variant: &str) -> (i32, i32) {
    sqlx::query_as("SELECT on_hand, reserved FROM variants WHERE id = $1")
        .bind(Uuid::parse_str(variant).unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// The email of the seller running `slug`.
pub async fn seller_email(app: &App, slug: &str) -> String {
    sqlx::query_scalar(
        "SELECT u.email FROM shops s JOIN users u ON u.id = s.owner_id WHERE s.slug = $1",
    )
    .bind(slug)
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

/// Posts `event` to the webhook signed at `t` with `secret`.
pub async fn post_event(app: &App, event: &Value, secret: &str, t: i64) -> reqwest::Response {
    let body = serde_json::to_string(event).unwrap();
    app.http
        .post(format!("{}/api/v1/stripe/webhook", app.base))
        .header("content-type", "application/json")
        .header(
            "Stripe-Signature",
            souk_testkit::stripe::signature(&body, secret, t),
        )
        .body(body)
        .send()
        .await
        .unwrap()
}

/// One test's marketplace: the API, localstripe posting its webhooks to it,
/// the whole pipeline, and two shops each selling one product (5 in stock):
/// `oak` a walnut board at 45.00, `tea` a teapot at 30.00.
pub struct Market {
    pub app: App,
    pub stripe: LocalStripe,
    pub pipeline: super::Pipeline,
    pub oak: Listing,
    pub tea: Listing,
}

impl Market {
    pub async fn open() -> Self {
        Self::with(super::Workers::ALL).await
    }

    /// Every worker but the payments worker: the test runs its own, behind
    /// a proxy or stopped at a moment of its choosing
    /// (`stripe_proxy::payments_through`).
    pub async fn without_payments() -> Self {
        Self::with(super::Workers {
            payments: false,
            ..super::Workers::ALL
        })
        .await
    }

    async fn with(workers: super::Workers) -> Self {
        let app = super::spawn_app(&souk_testkit::amqp_url()).await;
        let stripe = stripe_for(&app).await;
        let pipeline =
            super::Pipeline::with(&app, &souk_testkit::amqp_url(), Some(&stripe), workers);
        let oak = listing(&app, "oak", "Walnut board", 4500, 5).await;
        let tea = listing(&app, "tea", "Teapot", 3000, 5).await;
        Self {
            app,
            stripe,
            pipeline,
            oak,
            tea,
        }
    }

    /// A customer who has put these (variant, quantity) in the cart.
    pub async fn shopper(&self, items: &[(&Listing, i32)]) -> Customer {
        let buyer = customer(&self.app).await;
        for (listing, quantity) in items {
            add_to_cart(&self.app, &buyer.token, &listing.variant, *quantity).await;
        }
        buyer
    }

    /// A new admin's access token.
    pub async fn admin_token(&self) -> String {
        super::token_for(&self.app, &super::admin(&self.app).await).await
    }

    /// A customer who bought these (variant, quantity) and paid: the order
    /// as it reads once paid.
    pub async fn paid(&self, items: &[(&Listing, i32)]) -> (Customer, Value) {
        let buyer = self.shopper(items).await;
        let paid = checkout_and_pay(&self.app, &self.stripe, &buyer.token).await;
        (buyer, paid)
    }

    pub async fn close(self) {
        self.pipeline.stop().await;
    }
}

/// The customer of `paid` asks for `quantity` of its line titled `title`
/// back, with `reason`; the request as answered (201).
pub async fn ask_refund(
    app: &App,
    token: &str,
    paid: &Value,
    title: &str,
    quantity: i32,
    reason: &str,
) -> Value {
    let line = paid["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["title"] == title)
        .unwrap_or_else(|| panic!("no line {title} in {paid}"));
    let path = format!("/orders/{}/refund-requests", paid["id"].as_str().unwrap());
    let body = json!({"line_id": line["id"], "quantity": quantity, "reason": reason});
    json_of(
        call(app, token, Method::POST, &path, body).await,
        StatusCode::CREATED,
    )
    .await
}

/// Waits (the pipeline's time) until `sql`, a count, reads `n`.
pub async fn counted(app: &App, what: &str, sql: &'static str, n: i64) {
    souk_testkit::wait_until(what, PIPELINE_WAIT, || async {
        souk_testkit::count(&app.db.pool, sql).await == n
    })
    .await;
}

/// Waits (the pipeline's time) until `intent` has `n` refunds at Stripe.
pub async fn refunds_at_stripe(stripe: &LocalStripe, intent: &str, n: usize, what: &str) {
    souk_testkit::wait_until(what, PIPELINE_WAIT, || async {
        stripe.refunds_of(intent).await.len() == n
    })
    .await;
}

/// The seller order of `slug` within `order` (as read by its customer).
pub fn part_of(order: &Value, slug: &str) -> String {
    order["seller_orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["shop"]["slug"] == slug)
        .and_then(|p| p["id"].as_str())
        .unwrap_or_else(|| panic!("no part of {slug} in {order}"))
        .to_string()
}

/// The seller ships and delivers its part.
pub async fn deliver(app: &App, seller: &str, part: &str) {
    let path = format!("/seller/orders/{part}/status");
    let shipped = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM1"});
    json_of(
        call(app, seller, Method::POST, &path, shipped).await,
        StatusCode::OK,
    )
    .await;
    json_of(
        call(
            app,
            seller,
            Method::POST,
            &path,
            json!({"status": "delivered"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
}

/// Every ledger transaction's entries sum to zero, and so do all entries.
pub async fn assert_ledger_balances(app: &App) {
    let unbalanced: Vec<(String, i64)> = sqlx::query_as(
        "SELECT t.reference, sum(e.amount_minor)::bigint FROM ledger_transactions t
           JOIN ledger_entries e ON e.transaction_id = t.id
          GROUP BY t.reference HAVING sum(e.amount_minor) <> 0",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert!(unbalanced.is_empty(), "unbalanced: {unbalanced:?}");
    let total: Option<i64> =
        sqlx::query_scalar("SELECT sum(amount_minor)::bigint FROM ledger_entries")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(total.unwrap_or(0), 0);
}

/// The balance of a ledger account (`kind`, and the shop for a seller's).
pub async fn ledger_balance(app: &App, kind: &str, shop: Option<&str>) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(e.amount_minor), 0)::bigint FROM ledger_accounts a
           LEFT JOIN ledger_entries e ON e.account_id = a.id
           LEFT JOIN shops s ON s.id = a.shop_id
          WHERE a.kind = $1 AND ($2::text IS NULL OR s.slug = $2)",
    )
    .bind(kind)
    .bind(shop)
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

/// Waits until `reference` is posted in the ledger.
pub async fn posted(app: &App, reference_like: &str, n: i64) {
    let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
    loop {
        let got: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ledger_transactions WHERE reference LIKE $1")
                .bind(reference_like)
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        if got >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} posting(s) like {reference_like}: {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ends every hold: the settlement sweep releases the earnings.
pub async fn end_holds(app: &App) {
    sqlx::query("UPDATE seller_earnings SET available_at = now() - interval '1 second' WHERE released_at IS NULL")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM seller_earnings WHERE released_at IS NULL")
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        if left == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "earnings not released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long the pipeline must stay unchanged before [`settle`] returns:
/// longer than a retry's first delay, so a duplicate would show.
pub const QUIET: Duration = Duration::from_millis(1500);

/// Waits until the pipeline has gone quiet: every outbox row published,
/// every mail asked for (`notify.email`) sent and logged, no refund still
/// waiting for Stripe, and nothing new written or consumed for [`QUIET`],
/// so a duplicate effect has had its chance to show and counts can be
/// asserted exactly.
pub async fn settle(app: &App) {
    let snapshot = || async {
        let row: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox),
                    (SELECT count(*) FROM outbox WHERE published_at IS NULL),
                    (SELECT count(*) FROM outbox o WHERE o.routing_key = 'notify.email'
                        AND NOT EXISTS (SELECT 1 FROM email_log l WHERE l.message_id = o.id)),
                    (SELECT count(*) FROM email_log),
                    (SELECT count(*) FROM processed_messages),
                    (SELECT count(*) FROM refunds WHERE status = 'requested')",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        row
    };
    let deadline = tokio::time::Instant::now() + PIPELINE_WAIT;
    let mut last = snapshot().await;
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = snapshot().await;
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if now.1 == 0 && now.2 == 0 && now.5 == 0 && since.elapsed() >= QUIET {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pipeline never went quiet: (outbox, unpublished, mails unsent, mails, processed, refunds asked) = {now:?}"
        );
    }
}

/// A count about one order (`$1`).
pub async fn of_order(app: &App, sql: &'static str, order: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(Uuid::parse_str(order).unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// The mails `to` was sent from `template` (the mailer logs each send once).
pub async fn mails_logged(app: &App, to: &str, template: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM email_log WHERE recipient = $1 AND template = $2")
        .bind(to)
        .bind(template)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// The mails the pipeline sent, counted by (recipient, template) from
/// `email_log`, once it has [`settle`]d.
///
/// Also checks the SMTP sink against the log: each recipient got exactly
/// the mails logged for it, subject by subject (a second SMTP send of one
/// logged message would show there, not in the log).
pub async fn settled_mails(app: &App) -> std::collections::BTreeMap<(String, String), i64> {
    settle(app).await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT recipient, template, subject FROM email_log")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    // The sink, read once: per recipient, the subjects it received.
    let sink: Vec<Mail> = reqwest::get(format!("{}/api/email", souk_testkit::mail::maildev_url()))
        .await
        .expect("maildev answers")
        .json()
        .await
        .expect("maildev's /email is a JSON list");
    let mut by_recipient: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (to, _, subject) in &rows {
        by_recipient
            .entry(to.to_lowercase())
            .or_default()
            .push(subject.clone());
    }
    for (to, mut logged) in by_recipient {
        let mut received: Vec<String> = sink
            .iter()
            .filter(|m| m.to.iter().any(|a| a.address.eq_ignore_ascii_case(&to)))
            .map(|m| m.subject.clone())
            .collect();
        logged.sort();
        received.sort();
        assert_eq!(received, logged, "mails received by {to} vs logged");
    }
    let mut counts = std::collections::BTreeMap::new();
    for (to, template, _) in rows {
        *counts.entry((to, template)).or_insert(0) += 1;
    }
    counts
}

/// How many of `mails` (from [`settled_mails`]) went to `to` from `template`.
pub fn sent(
    mails: &std::collections::BTreeMap<(String, String), i64>,
    to: &str,
    template: &str,
) -> i64 {
    mails
        .get(&(to.to_string(), template.to_string()))
        .copied()
        .unwrap_or(0)
}

/// How many of `mails` (from [`settled_mails`]) came from `template`, to anyone.
pub fn sent_of(mails: &std::collections::BTreeMap<(String, String), i64>, template: &str) -> i64 {
    mails
        .iter()
        .filter(|((_, t), _)| t == template)
        .map(|(_, n)| n)
        .sum()
}
