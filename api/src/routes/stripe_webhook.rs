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
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use souk_shared::{contracts::StripeEventReceived, envelope::Envelope, outbox};
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

/// How far a signature's timestamp may be from now (Stripe's default).
const TOLERANCE_SECS: i64 = 300;

/// Checks the `Stripe-Signature` header (`t=<unix time>,v1=<hex>[,v1=…]`)
/// over `payload` as Stripe signs it: HMAC-SHA256 of `t.payload` with the
/// endpoint's secret, any `v1` matching (Stripe sends several while a
/// secret is rolled), compared in constant time, `t` within the tolerance.
/// Nothing of the event is read until this passes. (async-stripe's
/// verifier would also parse the event into its typed model, which fails,
/// and logs an error, for every event of another API version.)
fn verify(payload: &str, header: &str, secret: &str, now: i64) -> Result<(), ApiError> {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let (Some(t), false) = (t, signatures.is_empty()) else {
        return Err(refused("expected t=<timestamp>,v1=<signature>"));
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("webhook secret: {e}")))?;
    mac.update(format!("{t}.").as_bytes());
    mac.update(payload.as_bytes());
    if !signatures
        .iter()
        .any(|s| mac.clone().verify_slice(s).is_ok())
    {
        return Err(refused("the signature does not match the body"));
    }
    if (now - t).abs() > TOLERANCE_SECS {
        return Err(refused(
            "the signature's timestamp is outside the 300 s tolerance",
        ));
    }
    Ok(())
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
    let now = chrono::Utc::now().timestamp();
    verify(payload, signature, &state.market.stripe_webhook_secret, now)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret_long_enough";
    const BODY: &str = r#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;

    /// Signed by async-stripe's own test signer, as Stripe signs.
    fn signed(t: i64) -> String {
        souk_testkit::stripe::signature(BODY, SECRET, t)
    }

    #[test]
    fn stripes_signature_verifies_within_the_tolerance_only() {
        let now = 1_800_000_000;
        assert!(verify(BODY, &signed(now), SECRET, now).is_ok());
        assert!(verify(BODY, &signed(now - 300), SECRET, now).is_ok());
        assert!(verify(BODY, &signed(now - 301), SECRET, now).is_err());
        assert!(verify(BODY, &signed(now + 301), SECRET, now).is_err());
        assert!(verify(BODY, &signed(now), "whsec_another_secret_entirely", now).is_err());
        assert!(verify(&BODY.replace("evt_1", "evt_2"), &signed(now), SECRET, now).is_err());
    }

    #[test]
    fn any_v1_may_match_and_a_malformed_header_is_refused() {
        let now = 1_800_000_000;
        let good = signed(now);
        let v1 = good.split_once("v1=").unwrap().1;
        let rolled = format!("t={now},v1={},v1={v1}", "ab".repeat(32));
        assert!(verify(BODY, &rolled, SECRET, now).is_ok());
        for header in [
            "",
            "t=abc,v1=00",
            &format!("t={now}"),
            &format!("v1={v1}"),
            "garbage",
        ] {
            assert!(verify(BODY, header, SECRET, now).is_err(), "{header:?}");
        }
    }
}
