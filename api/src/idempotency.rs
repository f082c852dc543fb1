//! `Idempotency-Key` on the POSTs that move money or set up charges:
//! checkout, memberships, replenishment schedules, withdrawals and admin
//! refunds. The row the first request made keeps the key and a digest of
//! what was asked; a retry with the key answers that row, and the key sent
//! with a different request is refused, naming the header.
//!
//! Each table has a unique index on (owner, key), so two retries racing
//! each other cannot both make a row: the loser's insert fails and its
//! transaction rolls back. Handlers look the key up after taking the lock
//! that serializes their owner's requests, so a retry waits for the first.

use axum::http::HeaderMap;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::{ApiError, FieldError};

pub const HEADER: &str = "idempotency-key";

/// A request's key with the digest of what it asks for.
#[derive(Debug, Clone)]
pub struct Key {
    pub key: String,
    pub hash: Vec<u8>,
}

impl Key {
    /// The `Idempotency-Key` header, if sent (1 to 255 visible ASCII
    /// characters), with the digest of `request`.
    pub fn from_request(
        headers: &HeaderMap,
        request: &impl Serialize,
    ) -> Result<Option<Self>, ApiError> {
        let Some(raw) = headers.get(HEADER) else {
            return Ok(None);
        };
        let key = raw
            .to_str()
            .ok()
            .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| refusal("must be 1 to 255 visible ASCII characters"))?;
        let body = serde_json::to_vec(request).expect("requests serialize");
        Ok(Some(Self {
            key: key.to_string(),
            hash: Sha256::digest(body).to_vec(),
        }))
    }
}

/// Where keyed rows live: the table and the column naming whose they are.
#[derive(Debug, Clone, Copy)]
pub enum Keyed {
    Orders,
    Memberships,
    Schedules,
    Withdrawals,
    Refunds,
}

impl Keyed {
    fn table(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Orders => ("orders", "customer_id", "checkout"),
            Self::Memberships => ("memberships", "user_id", "subscription"),
            Self::Schedules => ("replenishment_schedules", "customer_id", "schedule"),
            Self::Withdrawals => ("withdrawals", "shop_id", "withdrawal"),
            Self::Refunds => ("refunds", "seller_order_id", "refund"),
        }
    }
}

/// The row an earlier request with this key made, if it asked the same; the
/// key sent with a different request is refused.
pub async fn earlier(
    conn: &mut PgConnection,
    keyed: Keyed,
    owner: Uuid,
    key: &Key,
) -> Result<Option<Uuid>, ApiError> {
    let (table, owner_column, what) = keyed.table();
    let found: Option<(Uuid, Option<Vec<u8>>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, request_hash FROM {table} WHERE {owner_column} = $1 AND idempotency_key = $2"
    )))
    .bind(owner)
    .bind(&key.key)
    .fetch_optional(conn)
    .await?;
    match found {
        None => Ok(None),
        Some((id, stored)) if stored.as_deref() == Some(key.hash.as_slice()) => Ok(Some(id)),
        Some(_) => Err(refusal(&format!(
            "this key was used for a different {what} request"
        ))),
    }
}

fn refusal(message: &str) -> ApiError {
    ApiError::Validation(vec![FieldError::new("Idempotency-Key", message)])
}
