//! Stripe's webhook: the signature is checked over the raw body (HMAC-SHA256
//! with the endpoint's secret, 300 s tolerance) before anything is read;
//! the event is stored once by its id together with its outbox message, and
//! Stripe gets its 2xx at once. The payments worker applies it. A repeat of
//! a stored event answers 2xx and changes nothing.

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use serde::{Deserialize, Serialize};
use souk_shared::{contracts::StripeEventReceived, envelope::Envelope, outbox};
use stripe_webhook::{Webhook, WebhookError};
use utoipa::ToSchema;

use crate::{
    error::{ApiError, FieldError, Problem},
    middleware::RequestId,
    state::AppState,
};

const SIGNATURE: &str = "stripe-signature";

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Received {
    /// False when the event had been received before (nothing changed).
    pub stored: bool,
}

fn refused(message: &str) -> ApiError {
    ApiError::BadRequest(FieldError::new("Stripe-Signature", message))
}

/// Checks the `Stripe-Signature` header over `payload`.
///
/// async-stripe-webhook verifies the signature and the timestamp first and
/// only then parses the event into its typed model; that last step fails
/// for events of other API versions (stand-ins such as localstripe send
/// older ones), so a parse error here means "signed and on time".
fn verify(payload: &str, signature: &str, secret: &str) -> Result<(), ApiError> {
    match Webhook::construct_event(payload, signature, secret) {
        Ok(_) | Err(WebhookError::BadParse(_)) => Ok(()),
        Err(WebhookError::BadTimestamp(_)) => Err(refused(
            "the signature's timestamp is outside the 300 s tolerance",
        )),
        Err(WebhookError::BadSignature | WebhookError::BadHeader(_) | WebhookError::BadKey) => {
            Err(refused("the signature does not match the body"))
        }
    }
}

/// Receive a Stripe event (called by Stripe, signed).
#[utoipa::path(
    post, path = "/stripe/webhook", tag = "payments",
    params(("Stripe-Signature" = String, Header, description = "t=<timestamp>,v1=<HMAC-SHA256 of `t.body`>")),
    request_body(content = String, content_type = "application/json", description = "the event, exactly as Stripe sent it"),
    responses(
        (status = 200, description = "stored (or stored before)", body = Received),
        (status = 400, description = "missing or bad signature, an old timestamp, or not an event", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn receive(
    State(state): State<AppState>,
    request_id: RequestId,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Received>), ApiError> {
    let signature = headers
        .get(SIGNATURE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| refused("missing"))?;
    let payload = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest(FieldError::new("body", "not UTF-8")))?;
    verify(payload, signature, &state.market.stripe_webhook_secret)?;
    let event: serde_json::Value = serde_json::from_str(payload)
        .map_err(|e| ApiError::BadRequest(FieldError::new("body", format!("not JSON: {e}"))))?;
    // The parts this endpoint reads; the worker reads the rest.
    let (Some(id), Some(kind)) = (event["id"].as_str(), event["type"].as_str()) else {
        return Err(ApiError::BadRequest(FieldError::new(
            "body",
            "not a Stripe event (no id or type)",
        )));
    };

    let mut tx = state.pool.begin().await?;
    let stored = sqlx::query(
        "INSERT INTO stripe_events (id, type, payload) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(kind)
    .bind(&event)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if stored {
        let message = StripeEventReceived {
            event_id: id.to_string(),
            kind: kind.to_string(),
        };
        outbox::enqueue(&mut tx, &Envelope::new(&message, request_id.0)).await?;
        state.commit_with_messages(tx).await?;
    }
    Ok((StatusCode::OK, Json(Received { stored })))
}
