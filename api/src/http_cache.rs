//! Conditional GETs for public reads: a strong `ETag` from the response
//! body and `304 Not Modified` when the client already has it. Hashing the
//! body (rather than tracking versions) stays right whatever changes the
//! answer: a price, a sale starting, stock selling out.

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// How long shared caches may reuse a public answer without asking again.
const MAX_AGE_SECS: u32 = 30;

pub fn cached_json<T: Serialize>(request: &HeaderMap, value: &T) -> Response {
    let body = serde_json::to_vec(value).expect("responses serialize");
    let digest = Sha256::digest(&body);
    let tag = format!(
        "\"{}\"",
        digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == tag || t == "*");
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, HeaderValue::from_str(&tag).expect("hex"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={MAX_AGE_SECS}")).expect("ascii"),
    );
    response
}
