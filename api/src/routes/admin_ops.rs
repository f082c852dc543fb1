//! Running the platform without a database console: the event log (every
//! message the outbox carried), Stripe's webhook events, the parking queues
//! (list and replay), and the audit log itself.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::{
    parked::{self, ParkedMessage},
    topology,
};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Admin,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    routes::{
        admin::{audit, reason_error},
        catalog::{Page, Paging},
    },
    state::AppState,
};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// The message type, e.g. `order.placed`, or a Stripe event type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Only the messages one request caused (its `X-Request-Id`).
    pub correlation_id: Option<String>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for EventQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// What an admin reading the event log or a parking queue must not see:
/// the one-time links of sign-up and password-reset mails (a live token
/// would let its reader take the account) and PaymentIntents' client
/// secrets (only the order's owner sees those). Replaced wherever they sit.
fn redact(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                let secret = key == "client_secret"
                    || key == "token"
                    || key.ends_with("_token")
                    || (key == "link" && field.as_str().is_some_and(|l| l.contains("token=")));
                if secret && !field.is_null() {
                    *field = Value::String("[redacted]".into());
                } else {
                    redact(field);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// A message the outbox carried.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Event {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: String,
    pub correlation_id: String,
    /// The whole envelope, payload included.
    pub envelope: serde_json::Value,
    pub created_at: DateTime<Utc>,
    /// When the broker confirmed it; absent while waiting to be relayed.
    pub published_at: Option<DateTime<Utc>>,
}

/// The event log, newest first (published events are kept for
/// `OUTBOX_RETENTION_HOURS`).
#[utoipa::path(
    get, path = "/admin/events", tag = "admin", security(("bearer" = [])), params(EventQuery),
    responses(
        (status = 200, description = "a page of events", body = Page<Event>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<EventQuery>,
) -> Result<Json<Page<Event>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let filter =
        "($1::text IS NULL OR routing_key = $1) AND ($2::text IS NULL OR correlation_id = $2)";
    let items: Vec<Event> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, routing_key AS kind, correlation_id, envelope, created_at, published_at
           FROM outbox WHERE {filter} ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4"
    )))
    .bind(&query.kind)
    .bind(&query.correlation_id)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let mut items = items;
    items.iter_mut().for_each(|e| redact(&mut e.envelope));
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM outbox WHERE {filter}"
    )))
    .bind(&query.kind)
    .bind(&query.correlation_id)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(paging.page(items, total)))
}

/// An event Stripe sent, as stored.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct StripeEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub payload: serde_json::Value,
    pub received_at: DateTime<Utc>,
}

/// Stripe's webhook events, newest first (`correlation_id` does not apply).
#[utoipa::path(
    get, path = "/admin/stripe-events", tag = "admin", security(("bearer" = [])), params(EventQuery),
    responses(
        (status = 200, description = "a page of Stripe events", body = Page<StripeEvent>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stripe_events(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<EventQuery>,
) -> Result<Json<Page<StripeEvent>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let mut items: Vec<StripeEvent> = sqlx::query_as(
        "SELECT id, type AS kind, payload, received_at FROM stripe_events
          WHERE $1::text IS NULL OR type = $1 ORDER BY received_at DESC, id DESC LIMIT $2 OFFSET $3",
    )
    .bind(&query.kind)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    items.iter_mut().for_each(|e| redact(&mut e.payload));
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM stripe_events WHERE $1::text IS NULL OR type = $1",
    )
    .bind(&query.kind)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(paging.page(items, total)))
}

/// A consumer group Souk runs, or 404.
/// A consumer group's name, or `unrouted` for the relay's unrouted queue.
fn group(name: &str) -> Result<&'static str, ApiError> {
    topology::GROUPS
        .iter()
        .map(|g| g.name)
        .chain([parked::UNROUTED])
        .find(|g| *g == name)
        .ok_or(ApiError::NotFound)
}

fn broker_down(e: lapin::Error) -> ApiError {
    tracing::warn!(error = %e, "the broker did not answer an admin's request");
    ApiError::BadGateway("the message broker is not reachable; try again shortly")
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ParkedQuery {
    /// At most this many (1 to 100; 100 if absent).
    pub limit: Option<usize>,
}

impl Validate for ParkedQuery {
    fn validate(&self) -> Vec<FieldError> {
        match self.limit {
            Some(n) if !(1..=100).contains(&n) => {
                vec![FieldError::new("limit", "must be 1 to 100")]
            }
            _ => vec![],
        }
    }
}

/// The messages parked in a consumer group's parking queue, oldest first,
/// with the error that parked each (`unrouted`: the outbox messages no
/// queue was bound for). The queue is left as it was.
#[utoipa::path(
    get, path = "/admin/parked/{group}", tag = "admin", security(("bearer" = [])),
    params(("group" = String, Path, description = "e.g. `mailer`, `payments`, or `unrouted`"), ParkedQuery),
    responses(
        (status = 200, description = "the parked messages", body = Vec<ParkedMessage>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such consumer group", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "the broker is not reachable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn parked_list(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
    ValidQuery(query): ValidQuery<ParkedQuery>,
) -> Result<Json<Vec<ParkedMessage>>, ApiError> {
    let group = group(&name)?;
    let conn = state.broker.connect().await.map_err(broker_down)?;
    let messages = parked::list(
        &conn,
        state.broker.names(),
        group,
        query.limit.unwrap_or(100),
    )
    .await
    .map_err(broker_down)?;
    let _ = conn.close(200, "listed".into()).await;
    let mut messages = messages;
    for message in &mut messages {
        if let Ok(mut body) = serde_json::from_str::<serde_json::Value>(&message.body) {
            redact(&mut body);
            message.body = body.to_string();
        }
    }
    Ok(Json(messages))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    /// One message by its id (a UUID: a malformed one is refused, never
    /// read as "all"); every parked message of the group if absent.
    #[serde(default)]
    pub message_id: Option<Uuid>,
    /// Why (the fix that makes it go through now); kept in the audit log.
    pub reason: String,
}

impl Validate for Replay {
    fn validate(&self) -> Vec<FieldError> {
        reason_error(&self.reason).into_iter().collect()
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Replayed {
    /// How many went back.
    pub replayed: usize,
    /// How many of those waiting when the replay began are still parked:
    /// those not asked for, and unrouted ones that still have nowhere to go.
    /// Not counted: messages parked since, and any a concurrent listing held
    /// at that moment (the broker counts only the ones on the shelf), so
    /// list again before taking 0 for an empty queue.
    pub remaining: u32,
}

/// Send parked messages back to their group's queue, attempts reset
/// (`unrouted` ones to the events exchange by their type; one that still
/// has no queue stays). A message being listed at that moment (held
/// briefly by `GET /admin/parked/{group}`) is not replayed: it stays
/// parked, so "all" may leave some behind (not counted in `remaining`), and one
/// asked for by id answers `replayed: 0`. List again and replay what is
/// still there.
#[utoipa::path(
    post, path = "/admin/parked/{group}/replay", tag = "admin", security(("bearer" = [])),
    params(("group" = String, Path)), request_body = Replay,
    responses(
        (status = 200, description = "how many went back, and how many are still parked", body = Replayed),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such consumer group", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no reason, or a message id that is not one", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "the broker is not reachable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn parked_replay(
    State(state): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    ValidJson(body): ValidJson<Replay>,
) -> Result<Json<Replayed>, ApiError> {
    let group = group(&name)?;
    // The request is kept before anything is replayed, as every admin
    // action is: with the actor checked again in the same transaction, so
    // an admin demoted or suspended since the extractor's check is refused
    // and nothing is replayed. Committed before the replay, so no replay
    // happens without its entry.
    let (action, target) = parked::replay_entry(group, body.message_id);
    let mut tx = state.pool.begin().await?;
    audit(&mut tx, &admin, &action, target, body.reason.trim()).await?;
    tx.commit().await?;
    // Messages are named by their id (the nil id for "all of them").
    let replay = async {
        let conn = state.broker.connect().await?;
        let counted = parked::replay_counted(
            &conn,
            state.broker.names(),
            group,
            body.message_id.map(|id| id.to_string()).as_deref(),
        )
        .await?;
        let _ = conn.close(200, "replayed".into()).await;
        Ok::<_, lapin::Error>(counted)
    };
    let outcome = replay.await;
    let mut conn = state.pool.acquire().await?;
    parked::record_replay_outcome(
        &mut conn,
        admin.0.id,
        group,
        body.message_id,
        outcome.as_ref().map(|(n, _)| *n),
    )
    .await?;
    let (replayed, remaining) = outcome.map_err(broker_down)?;
    tracing::info!(group, replayed, remaining, admin = %admin.0.id, "parked messages replayed");
    Ok(Json(Replayed {
        replayed,
        remaining,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: Uuid,
    pub actor_id: Uuid,
    pub actor_email: String,
    pub action: String,
    pub target_type: String,
    pub target_id: Uuid,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// e.g. `user`, `shop`, `order`, `withdrawal`.
    pub target_type: Option<String>,
    pub target_id: Option<Uuid>,
    pub actor_id: Option<Uuid>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for AuditQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// Who did what, to what, when and why: every admin action, newest first.
#[utoipa::path(
    get, path = "/admin/audit-log", tag = "admin", security(("bearer" = [])), params(AuditQuery),
    responses(
        (status = 200, description = "a page of entries", body = Page<AuditEntry>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn audit_log(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<AuditQuery>,
) -> Result<Json<Page<AuditEntry>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let filter =
        "($1::text IS NULL OR a.target_type = $1) AND ($2::uuid IS NULL OR a.target_id = $2)
                  AND ($3::uuid IS NULL OR a.actor_id = $3)";
    let items: Vec<AuditEntry> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT a.id, a.actor_id, u.email AS actor_email, a.action, a.target_type, a.target_id, a.reason, a.at
           FROM audit_log a JOIN users u ON u.id = a.actor_id
          WHERE {filter} ORDER BY a.at DESC, a.id DESC LIMIT $4 OFFSET $5"
    )))
    .bind(&query.target_type)
    .bind(query.target_id)
    .bind(query.actor_id)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM audit_log a WHERE {filter}"
    )))
    .bind(&query.target_type)
    .bind(query.target_id)
    .bind(query.actor_id)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(paging.page(items, total)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn one_time_links_and_client_secrets_are_redacted_wherever_they_sit() {
        let mut envelope = json!({
            "type": "notify.email",
            "payload": {"to": "ann@example.com", "template": "reset_password",
                        "data": {"name": "Ann", "link": "https://shop/reset?token=abc", "expires": "1 hour"}},
            "items": [{"client_secret": "pi_1_secret_x", "refresh_token": "r", "amount": 5}],
        });
        super::redact(&mut envelope);
        assert_eq!(envelope["payload"]["data"]["link"], "[redacted]");
        assert_eq!(envelope["payload"]["data"]["name"], "Ann");
        assert_eq!(envelope["payload"]["to"], "ann@example.com");
        assert_eq!(envelope["items"][0]["client_secret"], "[redacted]");
        assert_eq!(envelope["items"][0]["refresh_token"], "[redacted]");
        assert_eq!(envelope["items"][0]["amount"], 5);
        // A link without a token (an order's page) is no secret.
        let mut mail = json!({"link": "https://shop/orders/1"});
        super::redact(&mut mail);
        assert_eq!(mail["link"], "https://shop/orders/1");
    }
}
