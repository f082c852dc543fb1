//! Request-scoped middleware: correlation ids and HTTP metrics.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::HeaderValue,
    middleware::Next,
    response::Response,
};
use tracing::Instrument;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The correlation id of a request, carried into every message it causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// Accepts a caller's id only if it is short and plain, so it is safe to
    /// log and to put into messages; otherwise a new one is made.
    fn accept(raw: Option<&HeaderValue>) -> Self {
        raw.and_then(|v| v.to_str().ok())
            .filter(|s| {
                (1..=128).contains(&s.len())
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
            })
            .map(|s| Self(s.to_string()))
            .unwrap_or_else(Self::generate)
    }
}

/// Takes `X-Request-Id` from the request (or makes one), puts it in the
/// request's extensions and tracing span, and echoes it on the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = RequestId::accept(req.headers().get(REQUEST_ID_HEADER));
    req.extensions_mut().insert(id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %id.0,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let mut response = next.run(req).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Counts requests and records their duration by route template and status.
pub async fn http_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("souk_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("souk_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    if response.status().is_server_error() {
        tracing::warn!(status = %response.status(), "request answered with a server error");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_are_kept_and_odd_ones_replaced() {
        let kept = RequestId::accept(Some(&HeaderValue::from_static("abc-123_x.y:z")));
        assert_eq!(kept.0, "abc-123_x.y:z");
        let replaced = RequestId::accept(Some(&HeaderValue::from_static("bad id with spaces")));
        assert_ne!(replaced.0, "bad id with spaces");
        assert!(uuid::Uuid::parse_str(&replaced.0).is_ok());
        let long = "a".repeat(129);
        assert_ne!(
            RequestId::accept(Some(&HeaderValue::from_str(&long).unwrap())).0,
            long
        );
    }
}
