//! Request extractors that answer in problem+json.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts},
};
use serde::de::DeserializeOwned;

use crate::{
    error::{ApiError, FieldError},
    middleware::RequestId,
};

/// Checks a parsed body; returns every field at fault.
pub trait Validate {
    fn validate(&self) -> Vec<FieldError>;
}

/// A JSON body, parsed and validated. Type errors name the JSON path of the
/// field (via `serde_path_to_error`), so `{"items":[{"qty":"x"}]}` answers
/// `items[0].qty`, not a byte offset.
pub struct ValidJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Validate> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime == "application/json" || mime.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
                _ => ApiError::MalformedJson(e.body_text()),
            })?;
        let value = parse::<T>(&bytes)?;
        refuse_nul_in_json(&bytes)?;
        let errors = value.validate();
        if errors.is_empty() {
            Ok(Self(value))
        } else {
            Err(ApiError::Validation(errors))
        }
    }
}

/// Query-string parameters, parsed and validated; a bad one is a 422 that
/// names it, like a bad body field.
pub struct ValidQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Validate> FromRequestParts<S> for ValidQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        let value: T = located(serde_path_to_error::deserialize(de))?;
        if let Some((key, _)) =
            form_urlencoded::parse(query.as_bytes()).find(|(_, v)| v.contains('\0'))
        {
            return Err(ApiError::Validation(vec![nul(key.into_owned())]));
        }
        let errors = value.validate();
        if errors.is_empty() {
            Ok(Self(value))
        } else {
            Err(ApiError::Validation(errors))
        }
    }
}

/// PostgreSQL keeps no NUL character in text, so one would fail the write
/// as a 500: it is refused up front, naming the field that carries it.
fn nul(field: String) -> FieldError {
    FieldError::new(field, "must not contain NUL characters")
}

/// A JSON body can only carry a NUL as the escape `\u0000`: only then is
/// it read again to find the field (a rare case, so the common one costs a
/// scan of the bytes).
fn refuse_nul_in_json(bytes: &[u8]) -> Result<(), ApiError> {
    if !bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return Ok(());
    }
    fn find(value: &serde_json::Value, path: String) -> Option<String> {
        match value {
            serde_json::Value::String(s) => s.contains('\0').then_some(path),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| find(v, format!("{path}[{i}]"))),
            serde_json::Value::Object(fields) => fields.iter().find_map(|(k, v)| {
                find(
                    v,
                    if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    },
                )
            }),
            _ => None,
        }
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    match find(&value, String::new()) {
        Some(path) => Err(ApiError::Validation(vec![nul(if path.is_empty() {
            "body".into()
        } else {
            path
        })])),
        None => Ok(()),
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    located(serde_path_to_error::deserialize(de))
}

/// A deserializer's error as a problem naming the field at fault.
fn located<T, E: serde::de::Error + std::fmt::Display + IsData>(
    result: Result<T, serde_path_to_error::Error<E>>,
) -> Result<T, ApiError> {
    result.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() {
            // serde's message without its " at line 1 column 9" suffix
            let message = inner.to_string();
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_string();
            // A missing field is reported at its parent; name the field itself.
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next());
            let field = match (path.as_str(), missing) {
                (".", Some(name)) => name.to_string(),
                (_, Some(name)) => format!("{path}.{name}"),
                (".", None) => "body".to_string(),
                (_, None) => path,
            };
            ApiError::Validation(vec![FieldError::new(field, message)])
        } else {
            ApiError::MalformedJson(inner.to_string())
        }
    })
}

/// Path parameters, like axum's `Path`, but a malformed one (`/orders/abc`)
/// is a 422 problem naming the parameter, like a bad body field, instead of
/// axum's plain-text 400. Routes take this `Path`, never axum's. Every typed
/// path parameter of this API is an id (a UUID), so the one at fault is the
/// first that is not one.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::{RawPathParams, rejection::PathRejection};
        // A slug with a NUL (`/shops/a%00b`) would reach PostgreSQL, which
        // refuses NUL in text: a 500 for what is bad input, as in bodies.
        if let Ok(raw) = RawPathParams::from_request_parts(parts, state).await
            && let Some((name, _)) = raw.iter().find(|(_, value)| value.contains('\0'))
        {
            return Err(ApiError::Validation(vec![FieldError::new(
                name,
                "must not contain a NUL character",
            )]));
        }
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let raw = RawPathParams::from_request_parts(parts, state).await.ok();
                let at_fault = raw.as_ref().and_then(|params| {
                    params
                        .iter()
                        .find(|(_, value)| uuid::Uuid::parse_str(value).is_err())
                        .map(|(name, value)| (name.to_string(), value.to_string()))
                });
                let (field, value) = at_fault.unwrap_or_else(|| ("path".into(), e.body_text()));
                Err(ApiError::Validation(vec![FieldError::new(
                    field,
                    format!("{value:?} is not a valid id"),
                )]))
            }
            Err(e) => Err(ApiError::Internal(anyhow::anyhow!("path parameters: {e}"))),
        }
    }
}

/// The request's correlation id (see [`crate::middleware::request_id`]).
impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(RequestId::generate))
    }
}

/// Whether a deserializer error is about the data (a field) rather than the
/// syntax of the document.
trait IsData {
    fn is_data(&self) -> bool;
}

impl IsData for serde_json::Error {
    fn is_data(&self) -> bool {
        serde_json::Error::is_data(self)
    }
}

impl IsData for serde_urlencoded::de::Error {
    fn is_data(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Line {
        qty: u32,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        items: Vec<Line>,
    }

    #[test]
    fn type_errors_name_the_path() {
        let Err(ApiError::Validation(errors)) =
            parse::<Body>(br#"{"items":[{"qty":1},{"qty":"x"}]}"#)
        else {
            panic!("expected a validation error");
        };
        assert_eq!(errors[0].field, "items[1].qty");
        assert!(!errors[0].message.contains("line"), "{}", errors[0].message);
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        assert!(matches!(
            parse::<Body>(b"{\"items\":"),
            Err(ApiError::MalformedJson(_))
        ));
    }

    #[test]
    fn missing_fields_are_named() {
        let Err(ApiError::Validation(errors)) = parse::<Body>(b"{}") else {
            panic!()
        };
        assert_eq!(errors[0].field, "items");
        let Err(ApiError::Validation(errors)) = parse::<Body>(br#"{"items":[{}]}"#) else {
            panic!()
        };
        assert_eq!(errors[0].field, "items[0].qty");
    }
}
