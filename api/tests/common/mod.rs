//! The API on a free port against a fresh database, and the pipeline behind
//! it (relay and mailer) for tests that follow a request to the mail it sends.
#![allow(dead_code)]

pub mod catalog;
pub mod orders;
pub mod recurring;
pub mod stripe_proxy;

use std::{net::SocketAddr, time::Duration};

use reqwest::{Client, StatusCode};
use serde_json::Value;
use souk_api::{
    auth::{
        AuthConfig,
        oidc::{OidcClient, OidcConfig},
    },
    broker::BrokerProbe,
    market_config::MarketConfig,
    ratelimit::{Limit, Limits, RateLimiter},
    router,
    state::AppState,
    storage::StorageConfig,
};
use souk_shared::{telemetry, topology::Names};
use souk_testkit::{
    TestDb, amqp_url, broker,
    mail::smtp_port,
    stripe::{LocalStripe, SECRET_KEY, WEBHOOK_SECRET},
    unique_prefix,
};
use souk_workers::{
    mailer::{Mailer, MailerConfig},
    ops::Readiness,
    payments::{Payments, PaymentsConfig, events::StripeEvents, stripe_api::StripeConfig},
    relay::{self, RelaySettings},
    replenisher::{self, ReplenisherConfig},
    reserver::{self, ReserverConfig, StockReserver},
    runtime::{self, ConsumerSettings, Handler},
    settlement::{self, Settlement, SettlementConfig},
    splitter::{OrderSplitter, SplitterConfig},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);
/// Avatar size limit in tests: small, so the oversize case is cheap.
pub const IMAGE_MAX: usize = 256 * 1024;

pub struct App {
    pub base: String,
    pub db: TestDb,
    pub http: Client,
    /// The broker prefix of this app and its pipeline.
    pub prefix: String,
}

pub fn auth_config() -> AuthConfig {
    AuthConfig {
        secret: "test-secret-test-secret-test-secret!".into(),
        issuer: "souk".into(),
        audience: "souk-api".into(),
        access_ttl_secs: 900,
        refresh_ttl_days: 30,
        verify_email_ttl_hours: 48,
        reset_password_ttl_minutes: 60,
        storefront_url: "http://shop.test".into(),
        cookie_secure: true,
        cookie_same_site: "Lax".into(),
    }
}

/// The marketplace's settings in tests: new sellers wait for approval
/// (`verified_seller` approves them, as an admin would).
pub fn market_config() -> MarketConfig {
    MarketConfig {
        currency: "eur".into(),
        stripe_webhook_secret: WEBHOOK_SECRET.into(),
        payout_details_key: [7; 32],
        withdrawal_min_minor: WITHDRAWAL_MIN_MINOR,
        seller_approval_manual: true,
    }
}

pub const WITHDRAWAL_MIN_MINOR: i64 = 1000;

/// Limits loose enough for any test but the ones about limits.
pub fn loose_limits() -> Limits {
    let limit = Limit {
        max: 1000,
        window: Duration::from_secs(60),
    };
    Limits {
        register_per_ip: limit,
        sign_in_per_ip: limit,
        forgot_per_ip: limit,
        forgot_per_email: limit,
        resend_per_account: limit,
        support_per_ip: limit,
        support_per_email: limit,
        failures_before_lock: 1000,
        failures_before_account_lock: 1000,
        trusted_proxies: Default::default(),
    }
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub async fn spawn_app(amqp: &str) -> App {
    spawn_app_with(amqp, &redis_url(), loose_limits()).await
}

/// The API with `limits`, counted in Redis at `redis` under a prefix of its own.
pub async fn spawn_app_with(amqp: &str, redis: &str, limits: Limits) -> App {
    spawn(amqp, redis, limits, None, Duration::ZERO).await
}

/// The API with single sign-on at the provider `oidc` describes.
pub async fn spawn_app_with_sso(amqp: &str, oidc: OidcConfig) -> App {
    spawn(
        amqp,
        &redis_url(),
        loose_limits(),
        Some(oidc),
        Duration::ZERO,
    )
    .await
}

/// The API keeping public catalog answers for `ttl` (off in the others).
pub async fn spawn_app_with_public_cache(amqp: &str, ttl: Duration) -> App {
    spawn(amqp, &redis_url(), loose_limits(), None, ttl).await
}

async fn spawn(
    amqp: &str,
    redis: &str,
    limits: Limits,
    oidc: Option<OidcConfig>,
    public_cache: Duration,
) -> App {
    let db = TestDb::new().await;
    let prefix = unique_prefix();
    // Each app stores uploads in a directory of its own.
    let storage = StorageConfig {
        url: std::env::temp_dir()
            .join(format!("souk-uploads-{}", db.name))
            .display()
            .to_string(),
        image_max_bytes: IMAGE_MAX,
    };
    let state = AppState::new(
        db.pool.clone(),
        BrokerProbe::new(amqp, "souk-api-test", &prefix),
        telemetry::metrics_handle(),
        auth_config(),
        RateLimiter::new(redis, &unique_prefix(), limits).unwrap(),
        (storage.open().unwrap(), storage.clone()),
        market_config(),
    )
    .with_oidc(oidc.map(OidcClient::new))
    .with_public_cache(public_cache);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    // With peer addresses, as in main, so per-IP limits see the client.
    let app =
        router(state, 64 * 1024, IMAGE_MAX).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    App {
        base: format!("http://{addr}"),
        db,
        http: Client::new(),
        prefix,
    }
}

impl App {
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }
    pub async fn get_with_token(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }
}

pub const PASSWORD: &str = "correct horse battery";

/// Registers a new account (a seller with a shop at `shop`, if given), signs
/// it in and returns the access token.
pub async fn signed_in(app: &App, shop: Option<&str>) -> String {
    let email = souk_testkit::mail::unique_address();
    let mut body = serde_json::json!({"email": email, "password": PASSWORD, "name": "Ann"});
    if let Some(slug) = shop {
        body["kind"] = serde_json::json!("seller");
        body["shop"] =
            serde_json::json!({"name": "Shop", "slug": slug, "contact_email": "shop@example.com"});
    }
    assert_eq!(
        app.post("/api/v1/auth/register", &body).await.status(),
        StatusCode::CREATED
    );
    let session: Value = app
        .post(
            "/api/v1/auth/sign-in",
            &serde_json::json!({"email": email, "password": PASSWORD}),
        )
        .await
        .json()
        .await
        .unwrap();
    session["access_token"]
        .as_str()
        .expect("signed in")
        .to_string()
}

/// An admin, created as `souk-admin create-admin` does (straight in the
/// database); returns the email.
pub async fn admin(app: &App) -> String {
    let email = souk_testkit::mail::unique_address();
    let hash = souk_shared::password::hash(PASSWORD.into()).await.unwrap();
    sqlx::query(
        "INSERT INTO users (id, email, password_hash, name, role, email_verified_at)
         VALUES ($1, $2, $3, 'Root', 'admin', now())",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(&email)
    .bind(hash.as_str())
    .execute(&app.db.pool)
    .await
    .unwrap();
    email
}

/// An access token for `email` (password [`PASSWORD`]).
pub async fn token_for(app: &App, email: &str) -> String {
    let resp = app
        .post(
            "/api/v1/auth/sign-in",
            &serde_json::json!({"email": email, "password": PASSWORD}),
        )
        .await;
    let session: Value = resp.json().await.unwrap();
    session["access_token"]
        .as_str()
        .expect("signed in")
        .to_string()
}

/// A seller of a new shop at `slug`, email verified and the shop approved
/// (as the seller and an admin would); returns its token.
pub async fn verified_seller(app: &App, slug: &str) -> String {
    let token = signed_in(app, Some(slug)).await;
    sqlx::query(
        "UPDATE users SET email_verified_at = now()
          WHERE id = (SELECT owner_id FROM shops WHERE slug = $1)",
    )
    .bind(slug)
    .execute(&app.db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE shops SET approved_at = now() WHERE slug = $1")
        .bind(slug)
        .execute(&app.db.pool)
        .await
        .unwrap();
    token
}

/// Asserts a problem+json answer with `status` and returns its body.
pub async fn problem(resp: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    body
}

/// The fields named by a validation or conflict problem.
pub fn fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["field"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Which workers a [`Pipeline`] runs beside its relay and mailer.
#[derive(Debug, Clone, Copy)]
pub struct Workers {
    pub splitter: bool,
    pub reserver: bool,
    /// The Stripe calls (PaymentIntents, cancels, refunds).
    pub payments: bool,
    /// The webhook events.
    pub stripe_events: bool,
    /// The ledger (payments, earnings, refunds, releases).
    pub settlement: bool,
}

impl Workers {
    pub const ALL: Self = Self {
        splitter: true,
        reserver: true,
        payments: true,
        stripe_events: true,
        settlement: true,
    };
    pub const MAIL_ONLY: Self = Self {
        splitter: false,
        reserver: false,
        payments: false,
        stripe_events: false,
        settlement: false,
    };
}

/// The checkout pipeline's settings in tests: the platform's terms and a
/// reservation that lasts (tests expire one by moving its time back).
pub const SHIPPING_FLAT_MINOR: i64 = 499;
/// Long: tests that want earnings released move `available_at` back.
pub const SETTLEMENT_HOLD: Duration = Duration::from_secs(3600);
pub const COMMISSION_BPS: i32 = 1000;

/// The outbox relay, the mailer and any of the checkout workers on the
/// app's database, under their own broker prefix.
pub struct Pipeline {
    /// The broker prefix; a worker binary joins the pipeline with it.
    pub prefix: String,
    pub names: Names,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

const DELAYS: &[u64] = &[200, 1000];

fn consumer(names: &Names, prefix: &str, group: &str) -> ConsumerSettings {
    ConsumerSettings {
        amqp_url: amqp_url(),
        names: names.clone(),
        prefetch: 8,
        concurrency: 4,
        batch: 8,
        retry_delays_ms: DELAYS.to_vec(),
        connection_name: format!("{prefix}.{group}@test"),
        processed_retention: Duration::from_secs(3600),
    }
}

impl Pipeline {
    /// The relay and the mailer; `broker_url` is where the relay publishes
    /// (a proxy, to cut it off).
    pub fn start(app: &App, broker_url: &str) -> Self {
        Self::with(app, broker_url, None, Workers::MAIL_ONLY)
    }

    /// Everything from checkout to the mails, with Stripe played by `stripe`.
    pub fn checkout(app: &App, stripe: &LocalStripe) -> Self {
        Self::with(app, &amqp_url(), Some(stripe), Workers::ALL)
    }

    pub fn with(
        app: &App,
        broker_url: &str,
        stripe: Option<&LocalStripe>,
        workers: Workers,
    ) -> Self {
        let prefix = app.prefix.clone();
        let mut pipeline = Self {
            prefix: prefix.clone(),
            names: Names::new(&prefix),
            shutdown: CancellationToken::new(),
            tasks: vec![],
        };
        let pool = app.db.pool.clone();
        pipeline.tasks.push(tokio::spawn(relay::run(
            pool.clone(),
            RelaySettings {
                amqp_url: broker_url.into(),
                names: pipeline.names.clone(),
                batch_size: 100,
                poll_interval: Duration::from_secs(2),
                coalesce: Duration::ZERO,
                retention_hours: 24,
                connection_name: format!("{prefix}.relay@test"),
            },
            Readiness::default(),
            pipeline.shutdown.clone(),
        )));
        pipeline.run(
            &prefix,
            pool.clone(),
            Mailer::new(&MailerConfig {
                smtp_host: "127.0.0.1".into(),
                smtp_port: smtp_port(),
                smtp_username: None,
                smtp_password: None,
                from: "Souk <no-reply@souk.test>".parse().unwrap(),
                timeout: Duration::from_secs(5),
                lease: Duration::from_secs(30),
            }),
        );
        if workers.splitter {
            let config = SplitterConfig {
                shipping_flat_minor: SHIPPING_FLAT_MINOR,
                commission_bps: COMMISSION_BPS,
            };
            pipeline.run(&prefix, pool.clone(), OrderSplitter { config });
        }
        if workers.reserver {
            let config = ReserverConfig {
                reservation_ttl: Duration::from_secs(900),
                expiry_poll: Duration::from_millis(200),
            };
            let sweep = reserver::sweep_expired(
                pool.clone(),
                config.expiry_poll,
                pipeline.shutdown.clone(),
            );
            pipeline.tasks.push(tokio::spawn(sweep));
            pipeline.run(&prefix, pool.clone(), StockReserver { config });
        }
        if workers.payments {
            pipeline.run_payments(app, stripe.expect("payments need a Stripe"));
        }
        if workers.stripe_events {
            pipeline.run(&prefix, pool.clone(), StripeEvents);
        }
        if workers.settlement {
            pipeline.run_settlement(app);
        }
        pipeline
    }

    /// Starts a settlement process (consumer and release sweep); call again
    /// for a second one working beside it.
    pub fn run_settlement(&mut self, app: &App) {
        let config = SettlementConfig {
            hold: SETTLEMENT_HOLD,
            release_poll: Duration::from_millis(200),
        };
        let pool = app.db.pool.clone();
        let sweep =
            settlement::sweep_releases(pool.clone(), config.release_poll, self.shutdown.clone());
        self.tasks.push(tokio::spawn(sweep));
        let prefix = self.prefix.clone();
        self.run(&prefix, pool, Settlement { config });
    }

    /// Starts a replenisher beside the pipeline (call again for another).
    pub fn run_replenisher(&mut self, app: &App, config: ReplenisherConfig) {
        let run = replenisher::run(app.db.pool.clone(), config, self.shutdown.clone());
        self.tasks.push(tokio::spawn(run));
    }

    /// Starts the payments consumer (the Stripe calls), e.g. later than the rest.
    pub fn run_payments(&mut self, app: &App, stripe: &LocalStripe) {
        let config = PaymentsConfig {
            stripe: StripeConfig {
                secret_key: SECRET_KEY.into(),
                api_base: stripe.url.clone(),
                timeout: Duration::from_secs(10),
            },
            lease: Duration::from_secs(30),
        };
        let pool = app.db.pool.clone();
        let handler = Payments::new(&config, pool.clone()).unwrap();
        let prefix = self.prefix.clone();
        self.run(&prefix, pool, handler);
    }

    fn run<H: Handler>(&mut self, prefix: &str, pool: sqlx::PgPool, handler: H) {
        self.tasks.push(tokio::spawn(runtime::run(
            handler,
            pool,
            consumer(&self.names, prefix, H::GROUP),
            Readiness::default(),
            self.shutdown.clone(),
        )));
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
        let conn = souk_shared::amqp::connect(&amqp_url(), "cleanup")
            .await
            .unwrap();
        // The relay declared every group's queues, run here or not.
        for group in souk_shared::topology::GROUPS {
            broker::delete_group(&conn, &self.names, group.name, DELAYS).await;
        }
    }
}

impl Pipeline {
    /// Starts a settlement process that holds earnings for `hold` (instead
    /// of [`SETTLEMENT_HOLD`]), for tests that wait a hold out for real.
    pub fn run_settlement_holding(&mut self, app: &App, hold: Duration) {
        let config = SettlementConfig {
            hold,
            release_poll: Duration::from_millis(200),
        };
        let pool = app.db.pool.clone();
        let sweep =
            settlement::sweep_releases(pool.clone(), config.release_poll, self.shutdown.clone());
        self.tasks.push(tokio::spawn(sweep));
        let prefix = self.prefix.clone();
        self.run(&prefix, pool, Settlement { config });
    }
}

impl orders::Market {
    /// [`orders::Market::open`], but its only settlement process holds
    /// earnings for `hold`.
    pub async fn open_with_hold(hold: Duration) -> Self {
        let app = spawn_app(&amqp_url()).await;
        let stripe = orders::stripe_for(&app).await;
        let workers = Workers {
            settlement: false,
            ..Workers::ALL
        };
        let mut pipeline = Pipeline::with(&app, &amqp_url(), Some(&stripe), workers);
        pipeline.run_settlement_holding(&app, hold);
        let oak = orders::listing(&app, "oak", "Walnut board", 4500, 5).await;
        let tea = orders::listing(&app, "tea", "Teapot", 3000, 5).await;
        Self {
            app,
            stripe,
            pipeline,
            oak,
            tea,
        }
    }
}
