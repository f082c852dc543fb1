//! Support requests from the storefront's contact form.
//!
//! The request row and the confirmation mail's outbox message are written in
//! one transaction: either both exist or neither does, and the mail goes out
//! even if RabbitMQ is down when the customer writes in.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::{contracts::EmailRequested, envelope::Envelope, outbox};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    client_ip::ClientIp,
    error::{ApiError, FieldError},
    extract::{ValidJson, Validate},
    middleware::RequestId,
    state::AppState,
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSupportRequest {
    /// Where the answer goes.
    #[schema(example = "ann@example.com")]
    pub email: String,
    #[schema(example = "Ann")]
    pub name: String,
    #[schema(example = "My parcel is late")]
    pub subject: String,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SupportRequest {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub subject: String,
    pub message: String,
    pub created_at: DateTime<Utc>,
}

/// A pragmatic address check: one `@`, something on each side, a dot in the
/// domain, no spaces. Deliverability is the mail server's call.
pub fn valid_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
                && s.len() <= 254
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

fn length(errors: &mut Vec<FieldError>, field: &str, value: &str, max: usize) {
    let n = value.trim().chars().count();
    if n == 0 {
        errors.push(FieldError::new(field, "must not be empty"));
    } else if n > max {
        errors.push(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
}

impl Validate for NewSupportRequest {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !valid_email(self.email.trim()) {
            errors.push(FieldError::new("email", "must be an email address"));
        }
        length(&mut errors, "name", &self.name, 100);
        length(&mut errors, "subject", &self.subject, 200);
        length(&mut errors, "message", &self.message, 5000);
        errors
    }
}

/// Open a support request; a confirmation mail is sent to `email`.
#[utoipa::path(
    post,
    path = "/support-requests",
    tag = "support",
    request_body = NewSupportRequest,
    responses(
        (status = 201, description = "created", body = SupportRequest),
        (status = 400, description = "malformed JSON", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many requests from this client or to this address; see Retry-After", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    request_id: RequestId,
    ip: ClientIp,
    ValidJson(body): ValidJson<NewSupportRequest>,
) -> Result<(StatusCode, Json<SupportRequest>), ApiError> {
    let id = Uuid::now_v7();
    let email = body.email.trim().to_string();
    // Anyone may write in, and the confirmation goes to the address given:
    // without budgets the form would mail anyone, as often as asked.
    let limits = &state.limiter.limits;
    state
        .limiter
        .hit("support-ip", &ip.0, limits.support_per_ip)
        .await?;
    state
        .limiter
        .hit(
            "support-email",
            &email.to_lowercase(),
            limits.support_per_email,
        )
        .await?;
    let mut tx = state.pool.begin().await?;
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO support_requests (id, email, name, subject, message, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
    )
    .bind(id)
    .bind(&email)
    .bind(body.name.trim())
    .bind(body.subject.trim())
    .bind(&body.message)
    .bind(&request_id.0)
    .fetch_one(&mut *tx)
    .await?;
    let mail = EmailRequested {
        to: email.clone(),
        template: "support_request_received".into(),
        data: serde_json::json!({
            "name": body.name.trim(),
            "subject": body.subject.trim(),
            "message": body.message,
            "request_id": id,
        }),
    };
    outbox::enqueue(&mut tx, &Envelope::new(&mail, request_id.0)).await?;
    state.commit_with_messages(tx).await?;

    Ok((
        StatusCode::CREATED,
        Json(SupportRequest {
            id,
            email,
            name: body.name.trim().to_string(),
            subject: body.subject.trim().to_string(),
            message: body.message,
            created_at,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::valid_email;

    #[test]
    fn emails() {
        for ok in ["a@b.co", "first.last+tag@shop.example.com"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@b", "@b.co", "a@.co", "a@b.", "a b@c.co", "a@b@c.co",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
