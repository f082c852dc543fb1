//! The cookie form of authentication, for browsers.
//!
//! Sign-in with `use_cookies` sets three cookies instead of returning tokens:
//! the access token (HttpOnly), the refresh token (HttpOnly, sent only to
//! `/api/v1/auth`) and a CSRF token the page can read. A request
//! authenticated by cookie that changes anything must echo the CSRF cookie
//! in `X-CSRF-Token` (double submit): another site can make the browser send
//! the cookies, but cannot read them to fill in the header.

use axum::http::{HeaderMap, HeaderValue, Method, header};

use super::{AuthConfig, secret};
use crate::error::ApiError;

pub const ACCESS: &str = "souk_access";
pub const REFRESH: &str = "souk_refresh";
pub const CSRF: &str = "souk_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A cookie's value from the request's `Cookie` headers.
pub fn read(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn cookie(
    config: &AuthConfig,
    name: &str,
    value: &str,
    path: &str,
    max_age: i64,
    http_only: bool,
) -> HeaderValue {
    let mut c = format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; SameSite={}",
        config.cookie_same_site
    );
    if http_only {
        c.push_str("; HttpOnly");
    }
    if config.cookie_secure {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).expect("cookie values are URL-safe")
}

/// `Set-Cookie` headers for a new session.
pub fn set(config: &AuthConfig, access: &str, refresh: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let refresh_age = config.refresh_ttl_days * 86_400;
    headers.append(
        header::SET_COOKIE,
        cookie(config, ACCESS, access, "/", config.access_ttl_secs, true),
    );
    headers.append(
        header::SET_COOKIE,
        cookie(config, REFRESH, refresh, "/api/v1/auth", refresh_age, true),
    );
    headers.append(
        header::SET_COOKIE,
        cookie(config, CSRF, &secret::generate(), "/", refresh_age, false),
    );
    headers
}

/// `Set-Cookie` headers that remove the session's cookies.
pub fn clear(config: &AuthConfig) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.append(header::SET_COOKIE, cookie(config, ACCESS, "", "/", 0, true));
    headers.append(
        header::SET_COOKIE,
        cookie(config, REFRESH, "", "/api/v1/auth", 0, true),
    );
    headers.append(header::SET_COOKIE, cookie(config, CSRF, "", "/", 0, false));
    headers
}

/// For a cookie-authenticated request: safe methods pass; others must carry
/// the CSRF cookie's value in `X-CSRF-Token`.
pub fn check_csrf(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let cookie = read(headers, CSRF);
    let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    match (cookie, sent) {
        (Some(cookie), Some(sent))
            if !cookie.is_empty() && constant_time_eq(cookie.as_bytes(), sent.as_bytes()) =>
        {
            Ok(())
        }
        _ => Err(ApiError::Forbidden),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
