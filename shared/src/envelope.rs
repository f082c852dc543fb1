//! The versioned envelope every message travels in.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

/// A message contract: a payload type with its routing key and version.
///
/// The type doubles as the topic routing key, so consumer groups bind to
/// patterns such as `notify.*`. Bump `VERSION` on an incompatible change and
/// keep reading the old one until no producer sends it.
pub trait Contract: Serialize + DeserializeOwned {
    const TYPE: &'static str;
    const VERSION: u16;
}

/// What goes on the wire. `id` is the message id consumers de-duplicate on;
/// `attempt` counts failed deliveries (0 on the first delivery).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u16,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    #[serde(default)]
    pub attempt: u32,
    pub payload: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("message is of type {found} v{found_version}, expected {expected} v{expected_version}")]
    WrongType {
        found: String,
        found_version: u16,
        expected: &'static str,
        expected_version: u16,
    },
    #[error("payload does not match {contract}: {source}")]
    Invalid {
        contract: &'static str,
        source: serde_json::Error,
    },
}

impl Envelope {
    /// Wraps a payload in a new envelope with a fresh time-ordered id.
    pub fn new<C: Contract>(payload: &C, correlation_id: impl Into<String>) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind: C::TYPE.to_string(),
            version: C::VERSION,
            occurred_at: Utc::now(),
            correlation_id: correlation_id.into(),
            attempt: 0,
            payload: serde_json::to_value(payload).expect("contracts serialize to JSON"),
        }
    }

    /// Reads the payload as contract `C`, checking type and version first.
    pub fn payload<C: Contract>(&self) -> Result<C, PayloadError> {
        if self.kind != C::TYPE || self.version != C::VERSION {
            return Err(PayloadError::WrongType {
                found: self.kind.clone(),
                found_version: self.version,
                expected: C::TYPE,
                expected_version: C::VERSION,
            });
        }
        serde_json::from_value(self.payload.clone()).map_err(|source| PayloadError::Invalid {
            contract: C::TYPE,
            source,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelopes serialize to JSON")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::EmailRequested;

    #[test]
    fn round_trips_and_checks_type() {
        let mail = EmailRequested {
            to: "a@example.com".into(),
            template: "support_request_received".into(),
            data: serde_json::json!({"name": "A"}),
        };
        let env = Envelope::new(&mail, "req-1");
        let back = Envelope::from_bytes(&env.to_bytes()).unwrap();
        assert_eq!(back, env);
        assert_eq!(
            back.payload::<EmailRequested>().unwrap().to,
            "a@example.com"
        );

        let mut wrong = back.clone();
        wrong.version = 99;
        assert!(matches!(
            wrong.payload::<EmailRequested>(),
            Err(PayloadError::WrongType { .. })
        ));
    }
}
