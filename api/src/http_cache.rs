//! Public reads: conditional GETs and a short-lived cache of answers.
//!
//! Every public answer carries a strong `ETag` (a digest of its body) and
//! `Cache-Control: public, max-age=30`; a request naming the ETag in
//! `If-None-Match` gets `304 Not Modified`. Hashing the body (rather than
//! tracking versions) stays right whatever changes the answer: a price, a
//! sale starting, stock selling out.
//!
//! [`PublicCache`] keeps each answer (body and ETag) for `PUBLIC_CACHE_MS`
//! in the API process, so a burst of storefront traffic costs PostgreSQL one
//! query per distinct page per period instead of one per request. An answer
//! past its time is served while one request makes the new one
//! (stale-while-revalidate), so a popular page never sends a crowd to the
//! database at once. What a shopper sees is at most that old; checkout reads
//! prices and stock afresh.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Shared caches may reuse a public answer this long without asking again.
const CACHE_CONTROL: &str = "public, max-age=30";

/// A public answer, serialized once: its body and ETag.
#[derive(Debug)]
struct Answer {
    body: Bytes,
    tag: HeaderValue,
}

impl Answer {
    fn of<T: Serialize>(value: &T) -> Self {
        let body = serde_json::to_vec(value).expect("responses serialize");
        let digest = Sha256::digest(&body);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            body: Bytes::from(body),
            tag: HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex"),
        }
    }

    /// `304` when the request already holds this answer, else `200`.
    fn respond(&self, request: &HeaderMap) -> Response {
        let tag = self.tag.to_str().expect("ascii");
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
            (
                [(header::CONTENT_TYPE, "application/json")],
                self.body.clone(),
            )
                .into_response()
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, self.tag.clone());
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        );
        response
    }
}

/// A public answer with its ETag, `304` when the client has it already.
pub fn cached_json<T: Serialize>(request: &HeaderMap, value: &T) -> Response {
    Answer::of(value).respond(request)
}

struct Entry {
    answer: Answer,
    made: Instant,
    /// One request is making the next answer; the others serve this one.
    refreshing: AtomicBool,
}

/// The process's cache of public answers, by request (path and query).
#[derive(Clone)]
pub struct PublicCache {
    ttl: Duration,
    store: Arc<RwLock<Store>>,
    /// Counts (a list's total) by filters, kept as long as answers are.
    counts: Arc<RwLock<HashMap<String, (i64, Instant)>>>,
}

/// Most counts kept; past that they are all forgotten (each is one query to
/// make again).
const MAX_COUNTS: usize = 10_000;

#[derive(Default)]
struct Store {
    entries: HashMap<String, Arc<Entry>>,
    /// Sum of the kept bodies' lengths.
    bytes: usize,
}

/// Bytes of answers kept (bodies); past that, the older half is dropped.
/// Bounds the API's memory whatever the number of distinct pages asked for.
const MAX_BYTES: usize = 16 << 20;
/// An answer older than this many periods is never served, even stale.
const STALE_PERIODS: u32 = 10;

impl PublicCache {
    /// `ttl` zero: nothing is cached, every answer is made afresh.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            store: Arc::default(),
            counts: Arc::default(),
        }
    }

    /// The answer to `key` (the request's path and query): kept, or made
    /// with `make` and kept.
    pub async fn answer<T, F, Fut>(
        &self,
        request: &HeaderMap,
        key: String,
        make: F,
    ) -> Result<Response, ApiError>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        if self.ttl.is_zero() {
            return Ok(cached_json(request, &make().await?));
        }
        let kept = self
            .store
            .read()
            .expect("not poisoned")
            .entries
            .get(&key)
            .cloned();
        if let Some(entry) = &kept {
            let age = entry.made.elapsed();
            let fresh = age < self.ttl;
            let usable = age < self.ttl * STALE_PERIODS;
            // Past its time: the first request makes the next answer, the
            // rest serve this one meanwhile.
            if fresh || (usable && entry.refreshing.swap(true, Ordering::AcqRel)) {
                return Ok(entry.answer.respond(request));
            }
        }
        // However this request ends (an error, or dropped because its
        // client went away mid-query), the kept entry is open for the next
        // request to remake: otherwise every reader got the stale answer
        // for all its usable periods.
        let _refresh = RefreshGuard(kept);
        let made = Answer::of(&make().await?);
        let response = made.respond(request);
        self.keep(key, made);
        Ok(response)
    }

    /// The count kept under `key`, while it is fresh.
    pub fn kept_count(&self, key: &str) -> Option<i64> {
        if self.ttl.is_zero() {
            return None;
        }
        let counts = self.counts.read().expect("not poisoned");
        let (n, made) = counts.get(key)?;
        (made.elapsed() < self.ttl).then_some(*n)
    }

    /// Keeps `n` as the count under `key` (not when nothing is cached).
    pub fn keep_count(&self, key: String, n: i64) {
        if self.ttl.is_zero() {
            return;
        }
        let mut counts = self.counts.write().expect("not poisoned");
        if counts.len() >= MAX_COUNTS {
            counts.clear();
        }
        counts.insert(key, (n, Instant::now()));
    }

    fn keep(&self, key: String, answer: Answer) {
        let mut store = self.store.write().expect("not poisoned");
        if store.bytes + answer.body.len() > MAX_BYTES {
            let mut ages: Vec<Instant> = store.entries.values().map(|e| e.made).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            store.entries.retain(|_, e| e.made > cut);
            store.bytes = store.entries.values().map(|e| e.answer.body.len()).sum();
        }
        store.bytes += answer.body.len();
        let entry = Entry {
            answer,
            made: Instant::now(),
            refreshing: AtomicBool::new(false),
        };
        if let Some(old) = store.entries.insert(key, Arc::new(entry)) {
            store.bytes -= old.answer.body.len();
        }
    }
}

/// Clears the kept entry's "being remade" mark when dropped.
struct RefreshGuard(Option<Arc<Entry>>);

impl Drop for RefreshGuard {
    fn drop(&mut self) {
        if let Some(entry) = &self.0 {
            entry.refreshing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn an_answer_is_made_once_per_period_and_served_stale_while_remade() {
        let cache = PublicCache::new(Duration::from_millis(100));
        let made = Arc::new(AtomicUsize::new(0));
        let ask =
            |cache: PublicCache| {
                let made = made.clone();
                async move {
                    cache
                    .answer(&HeaderMap::new(), "/products?page=1".into(), || async move {
                        Ok::<_, ApiError>(made.fetch_add(1, Ordering::SeqCst))
                    })
                    .await
                    .unwrap()
                }
            };
        for _ in 0..5 {
            ask(cache.clone()).await;
        }
        assert_eq!(
            made.load(Ordering::SeqCst),
            1,
            "made once within the period"
        );
        tokio::time::sleep(Duration::from_millis(120)).await;
        ask(cache.clone()).await;
        assert_eq!(made.load(Ordering::SeqCst), 2, "made again after it");
        let off = PublicCache::new(Duration::ZERO);
        ask(off.clone()).await;
        ask(off).await;
        assert_eq!(made.load(Ordering::SeqCst), 4, "off: made every time");
    }

    #[tokio::test]
    async fn a_remake_abandoned_midway_lets_the_next_request_remake() {
        let cache = PublicCache::new(Duration::from_millis(50));
        let key = || "/products?page=2".to_string();
        let headers = HeaderMap::new();
        let answer = |n: u32| cache.answer(&headers, key(), move || async move { Ok(n) });
        answer(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Stale: this request remakes it, and its client goes away meanwhile.
        let abandoned = cache.answer(&headers, key(), || {
            std::future::pending::<Result<u32, ApiError>>()
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), abandoned)
                .await
                .is_err()
        );
        let body = |r: Response| async move {
            let bytes = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        assert_eq!(
            body(answer(2).await.unwrap()).await,
            "2",
            "remade, not the stale answer"
        );
    }
}
