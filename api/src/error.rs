//! Errors as RFC 9457 `application/problem+json`.
//!
//! One enum for every handler. Client errors say what was wrong and name the
//! field; server errors are logged with their cause and answered with a
//! generic detail, so internals never leak.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

/// One field at fault. `field` is a JSON path such as `items[2].quantity`.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The problem document (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI reference naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Fields at fault, for validation problems.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON")]
    MalformedJson(String),
    /// A request that is not acceptable as sent, other than its JSON (a
    /// missing or bad signature header, say).
    #[error("bad request")]
    BadRequest(FieldError),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("not found")]
    NotFound,
    /// No valid credentials; the detail never says which part was wrong.
    #[error("unauthorized")]
    Unauthorized,
    /// Too many attempts; try again after `retry_after` seconds.
    #[error("too many requests")]
    TooManyRequests { retry_after: u64 },
    /// Signed in, but not allowed to do this.
    #[error("forbidden")]
    Forbidden,
    /// Not allowed, because of something about the named field (e.g. an
    /// email that is not verified yet).
    #[error("forbidden")]
    ForbiddenBecause(FieldError),
    /// A service we depend on (an identity provider) failed; the detail is
    /// safe to show.
    #[error("bad gateway")]
    BadGateway(&'static str),
    /// The request clashes with existing data, e.g. an email already taken.
    #[error("conflict")]
    Conflict(FieldError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Unique constraints whose violation is the client's doing, and the field
/// each one is about.
const UNIQUE_FIELDS: &[(&str, &str, &str)] = &[
    (
        "users_email_key",
        "email",
        "an account with this email already exists",
    ),
    ("shops_slug_key", "shop.slug", "this shop address is taken"),
    ("categories_slug_key", "slug", "this category slug is taken"),
    (
        "reviews_once",
        "product_id",
        "you have already reviewed this product",
    ),
    ("coupons_code_key", "code", "this coupon code is taken"),
    (
        "memberships_one_live",
        "plan_id",
        "you already have a membership; cancel it before choosing another plan",
    ),
    (
        "variants_sku_key",
        "sku",
        "this SKU is already used in your shop",
    ),
];

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if let Some(db) = e.as_database_error()
            && let Some(constraint) = db.constraint()
            && let Some((_, field, message)) =
                UNIQUE_FIELDS.iter().find(|(c, _, _)| *c == constraint)
        {
            return Self::Conflict(FieldError::new(*field, *message));
        }
        Self::Internal(e.into())
    }
}

/// A status change the order state machines refuse is the client's
/// conflict with the order as it is now.
impl From<souk_shared::orders::MoveError> for ApiError {
    fn from(e: souk_shared::orders::MoveError) -> Self {
        use souk_shared::orders::MoveError;
        match e {
            MoveError::Refused(refused) => {
                Self::Conflict(FieldError::new("status", refused.to_string()))
            }
            MoveError::NotFound => Self::NotFound,
            MoveError::Db(e) => e.into(),
        }
    }
}

impl From<souk_shared::orders::cancel::CancelError> for ApiError {
    fn from(e: souk_shared::orders::cancel::CancelError) -> Self {
        use souk_shared::orders::cancel::CancelError;
        match e {
            CancelError::NotFound => Self::NotFound,
            CancelError::TooLate(why) => Self::Conflict(FieldError::new("status", why)),
            CancelError::Move(e) => e.into(),
            CancelError::Db(e) => e.into(),
            overdrawn @ CancelError::Overdrawn(_) => Self::Internal(overdrawn.into()),
        }
    }
}

impl ApiError {
    fn problem(&self) -> (StatusCode, Problem) {
        let (status, slug, title, detail, errors) = match self {
            Self::MalformedJson(detail) => (
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Malformed JSON",
                Some(detail.clone()),
                vec![],
            ),
            Self::BadRequest(error) => (
                StatusCode::BAD_REQUEST,
                "bad-request",
                "Bad request",
                Some(format!("{}: {}", error.field, error.message)),
                vec![error.clone()],
            ),
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                Some("send the body as application/json".into()),
                vec![],
            ),
            Self::Validation(errors) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Validation failed",
                Some(
                    errors
                        .iter()
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                errors.clone(),
            ),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                Some("the request body is larger than this endpoint accepts".into()),
                vec![],
            ),
            Self::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found", None, vec![]),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                Some("missing, invalid or expired credentials".into()),
                vec![],
            ),
            Self::TooManyRequests { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                "Too many requests",
                Some(format!("try again in {retry_after} seconds")),
                vec![],
            ),
            Self::Forbidden => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                Some("your account may not do this".into()),
                vec![],
            ),
            Self::ForbiddenBecause(error) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                Some(format!("{}: {}", error.field, error.message)),
                vec![error.clone()],
            ),
            Self::BadGateway(detail) => (
                StatusCode::BAD_GATEWAY,
                "bad-gateway",
                "Bad gateway",
                Some((*detail).into()),
                vec![],
            ),
            Self::Conflict(error) => (
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                Some(format!("{}: {}", error.field, error.message)),
                vec![error.clone()],
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
                Some("something went wrong on our side; quote the X-Request-Id header if you contact support".into()),
                vec![],
            ),
        };
        let problem = Problem {
            kind: format!("/problems/{slug}"),
            title: title.into(),
            status: status.as_u16(),
            detail,
            errors,
        };
        (status, problem)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(e) = &self {
            tracing::error!(error = %format!("{e:#}"), "request failed");
        }
        let (status, problem) = self.problem();
        let mut response = problem_response(status, &problem);
        if let Self::TooManyRequests { retry_after } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Serializes a problem with the right content type.
pub fn problem_response(status: StatusCode, problem: &Problem) -> Response {
    let body = serde_json::to_vec(problem).expect("problems serialize");
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}
