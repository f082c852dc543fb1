//! The SMTP sink (maildev): read what the mailer sent through its REST API.

use serde::Deserialize;

/// maildev's REST API (`/api/email` in maildev 3); `MAILDEV_URL` overrides the default.
pub fn maildev_url() -> String {
    std::env::var("MAILDEV_URL").unwrap_or_else(|_| "http://127.0.0.1:1080".into())
}

/// maildev's SMTP port; `MAILDEV_SMTP_PORT` overrides the default.
pub fn smtp_port() -> u16 {
    std::env::var("MAILDEV_SMTP_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1025)
}

#[derive(Debug, Clone, Deserialize)]
pub struct Address {
    pub address: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Mail {
    pub subject: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub html: String,
    pub to: Vec<Address>,
    #[serde(default)]
    pub headers: serde_json::Map<String, serde_json::Value>,
}

impl Mail {
    pub fn message_id(&self) -> Option<&str> {
        self.headers.get("message-id").and_then(|v| v.as_str())
    }
}

/// Every mail in the sink addressed to `recipient` (tests use unique addresses).
pub async fn mails_to(recipient: &str) -> Vec<Mail> {
    let all: Vec<Mail> = reqwest::get(format!("{}/api/email", maildev_url()))
        .await
        .expect("maildev answers; is it running?")
        .json()
        .await
        .expect("maildev's /email is a JSON list");
    all.into_iter()
        .filter(|m| {
            m.to.iter()
                .any(|a| a.address.eq_ignore_ascii_case(recipient))
        })
        .collect()
}

/// A recipient address no other test uses.
pub fn unique_address() -> String {
    format!(
        "t{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}
