//! An HTTP man-in-the-middle in front of localstripe, for the payments
//! worker's `STRIPE_API_BASE`: it forwards every request (method, path,
//! query, headers with Authorization and Idempotency-Key, body) and returns
//! localstripe's answer, unless told to
//!
//! - [`StripeProxy::refuse`] a route: answer it with a Stripe-style 400
//!   (`invalid_request_error`) without asking localstripe, or
//! - [`StripeProxy::hold`] a route: forward it (so Stripe has made the
//!   object) and then never answer, as if the connection hung just after
//!   Stripe committed; [`StripeProxy::wait_held`] says when that happened.
//!
//! Every request seen is logged ([`StripeProxy::seen`]) with its
//! idempotency key, so a test can tell a retry from a new request.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, to_bytes},
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::Response,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// The path without the query.
    pub path: String,
    pub idempotency_key: Option<String>,
    /// What the proxy did with it.
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    Refused,
    /// Forwarded, and localstripe's answer kept from the client.
    Held,
}

#[derive(Default)]
struct Rules {
    /// (method, path) answered with a 400 carrying this message.
    refuse: Vec<(Method, String, String)>,
    /// (method, path) forwarded and never answered.
    hold: Vec<(Method, String)>,
    seen: Vec<Seen>,
    /// The answers localstripe gave to held requests (JSON bodies).
    held_answers: Vec<serde_json::Value>,
}

struct Shared {
    target: String,
    http: reqwest::Client,
    rules: Mutex<Rules>,
    /// How many requests are held so far.
    held: watch::Sender<usize>,
}

pub struct StripeProxy {
    pub addr: SocketAddr,
    /// `STRIPE_API_BASE` pointing here (with the trailing slash).
    pub url: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl StripeProxy {
    /// Forwards to `target`, a localstripe base URL (`http://host:port/`).
    pub async fn start(target: &str) -> Self {
        let shared = Arc::new(Shared {
            target: target.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            rules: Mutex::new(Rules::default()),
            held: watch::channel(0).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let st = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { st.cancelled().await })
                .await
                .unwrap()
        });
        Self {
            addr,
            url: format!("http://{addr}/"),
            shared,
            stop,
        }
    }

    /// Answers `method path` (e.g. `POST /v1/refunds`) with Stripe's 400
    /// `invalid_request_error` carrying `message`, localstripe not asked.
    pub fn refuse(&self, method: Method, path: &str, message: &str) {
        let mut rules = self.shared.rules.lock().unwrap();
        rules
            .refuse
            .push((method, path.to_string(), message.to_string()));
    }

    /// Forwards `method path` to localstripe and never answers.
    pub fn hold(&self, method: Method, path: &str) {
        let mut rules = self.shared.rules.lock().unwrap();
        rules.hold.push((method, path.to_string()));
    }

    /// Forwards everything again (held requests stay unanswered).
    pub fn pass_through(&self) {
        let mut rules = self.shared.rules.lock().unwrap();
        rules.refuse.clear();
        rules.hold.clear();
    }

    /// Waits until `n` requests have been forwarded and held; returns
    /// localstripe's answers to them.
    pub async fn wait_held(&self, n: usize, within: Duration) -> Vec<serde_json::Value> {
        let mut rx = self.shared.held.subscribe();
        tokio::time::timeout(within, rx.wait_for(|held| *held >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} request(s) held within {within:?}"))
            .unwrap();
        self.shared.rules.lock().unwrap().held_answers.clone()
    }

    /// Every request seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.rules.lock().unwrap().seen.clone()
    }

    /// The requests seen to `method path`.
    pub fn seen_to(&self, method: Method, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == method && s.path == path)
            .collect()
    }
}

impl Drop for StripeProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Stripe's shape for a request it refuses.
fn refusal(message: &str) -> Response {
    let body = serde_json::json!({
        "error": {"type": "invalid_request_error", "message": message}
    });
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header(header::CONTENT_TYPE, "application/json")
        .header("request-id", "req_proxy_refused")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let idempotency_key = parts
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (refused, held) = {
        let rules = shared.rules.lock().unwrap();
        let refused = rules
            .refuse
            .iter()
            .find(|(m, p, _)| *m == method && *p == path)
            .map(|(_, _, message)| message.clone());
        let held = rules.hold.iter().any(|(m, p)| *m == method && *p == path);
        (refused, held)
    };
    let outcome = match (&refused, held) {
        (Some(_), _) => Outcome::Refused,
        (None, true) => Outcome::Held,
        (None, false) => Outcome::Forwarded,
    };
    shared.rules.lock().unwrap().seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        idempotency_key,
        outcome,
    });
    if let Some(message) = refused {
        return refusal(&message);
    }

    let body = to_bytes(body, 16 * 1024 * 1024).await.unwrap();
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if name != header::HOST && name != header::CONTENT_LENGTH && name != header::CONNECTION {
            headers.append(name.clone(), value.clone());
        }
    }
    let answer = shared
        .http
        .request(method, format!("{}{path_and_query}", shared.target))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(format!("localstripe: {e}")))
                .unwrap();
        }
    };
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap_or_default();

    if held {
        // Stripe has made it; the client never hears.
        let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        shared.rules.lock().unwrap().held_answers.push(value);
        shared.held.send_modify(|n| *n += 1);
        std::future::pending::<()>().await;
    }

    let mut response = Response::builder().status(status);
    for (name, value) in &answer_headers {
        if name != header::CONTENT_LENGTH
            && name != header::TRANSFER_ENCODING
            && name != header::CONNECTION
        {
            response = response.header(name, value);
        }
    }
    response.body(Body::from(bytes)).unwrap()
}

/// A payments consumer in the test, calling Stripe at `stripe_base` (a
/// proxy) instead of the pipeline's localstripe.
pub struct PaymentsTask {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl PaymentsTask {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(20), self.task).await;
    }
}

pub fn payments_through(
    app: &super::App,
    pipeline: &super::Pipeline,
    stripe_base: &str,
) -> PaymentsTask {
    let config = souk_workers::payments::PaymentsConfig {
        stripe: souk_workers::payments::stripe_api::StripeConfig {
            secret_key: souk_testkit::stripe::SECRET_KEY.into(),
            api_base: stripe_base.into(),
            timeout: std::time::Duration::from_secs(10),
        },
        lease: std::time::Duration::from_secs(30),
    };
    let handler = souk_workers::payments::Payments::new(&config, app.db.pool.clone()).unwrap();
    let settings = souk_workers::runtime::ConsumerSettings {
        amqp_url: souk_testkit::amqp_url(),
        names: pipeline.names.clone(),
        prefetch: 8,
        concurrency: 4,
        batch: 8,
        // The pipeline's retry delays: its relay declared these queues.
        retry_delays_ms: vec![200, 1000],
        connection_name: format!("{}.payments-via-proxy@test", pipeline.prefix),
        processed_retention: std::time::Duration::from_secs(3600),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(souk_workers::runtime::run(
        handler,
        app.db.pool.clone(),
        settings,
        souk_workers::ops::Readiness::default(),
        shutdown.clone(),
    ));
    PaymentsTask { shutdown, task }
}
