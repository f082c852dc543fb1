//! The mailer: renders `notify.email` messages and sends them over SMTP.
//!
//! The send happens in `prepare`, outside any database transaction, under a
//! lease so two copies of one message handled at once send one mail; the
//! `email_log` row is written in the transaction that records the message
//! as processed, so each message id is logged once. SMTP itself is
//! at-least-once: if the process dies after the server accepted the mail but
//! before the commit, the redelivery sends it again, with the same
//! `Message-ID` header (derived from the message id) so mail systems can
//! drop the copy.

mod templates;

use std::time::Duration;

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, MultiPart},
    transport::smtp::authentication::Credentials,
};
use souk_shared::{
    config::{ConfigError, Env},
    contracts::EmailRequested,
    envelope::Envelope,
    topology,
};
use sqlx::PgConnection;

pub use templates::{RenderError, Templates};

use crate::runtime::{Failure, Handler};

#[derive(Debug, Clone)]
pub struct MailerConfig {
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_username: Option<String>,
    pub smtp_password: Option<String>,
    pub from: Mailbox,
    pub timeout: Duration,
    /// How long one mailer holds a message before another may take it over:
    /// longer than an SMTP exchange (each step bounded by `timeout`), shorter
    /// than the retry schedule, so the copy of a mailer that died mid-send is
    /// taken over by a later attempt rather than parked.
    pub lease: Duration,
}

impl MailerConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let config = Self {
            smtp_host: env.or("SMTP_HOST", "127.0.0.1".to_string())?,
            smtp_port: env.or("SMTP_PORT", 1025)?,
            smtp_username: env.or("SMTP_USERNAME", String::new()).map(non_empty)?,
            smtp_password: env.or("SMTP_PASSWORD", String::new()).map(non_empty)?,
            from: env.or(
                "MAIL_FROM",
                "Souk <no-reply@souk.local>".parse().expect("valid"),
            )?,
            timeout: env.millis("SMTP_TIMEOUT_MS", 10_000)?,
            lease: env.millis("MAILER_LEASE_MS", 30_000)?,
        };
        config.check_lease()?;
        Ok(config)
    }

    /// The lease must outlast a send: if it ran out while this mailer still
    /// waits on a slow SMTP server, a copy of the message would take it over
    /// and send the mail again. A send is several steps (connect, greeting,
    /// EHLO, MAIL, RCPT, DATA), each allowed `timeout`: a lease of at least
    /// twice the timeout covers one step stalling to its limit plus the rest.
    pub fn check_lease(&self) -> Result<(), ConfigError> {
        if self.lease < self.timeout * 2 {
            return Err(ConfigError {
                var: "MAILER_LEASE_MS".into(),
                reason: format!(
                    "must be at least twice SMTP_TIMEOUT_MS ({} ms), so another mailer \
                     cannot take over a message whose mail is still being sent; it is {} ms",
                    self.timeout.as_millis(),
                    self.lease.as_millis()
                ),
            });
        }
        Ok(())
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    templates: Templates,
    lease: Duration,
}

/// What `prepare` hands to `apply`: the mail that was sent.
#[derive(Debug, Clone)]
pub struct Sent {
    to: String,
    template: String,
    subject: String,
}

impl Mailer {
    pub fn new(config: &MailerConfig) -> Self {
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.smtp_host)
                .port(config.smtp_port)
                .timeout(Some(config.timeout));
        if let (Some(user), Some(pass)) = (&config.smtp_username, &config.smtp_password) {
            builder = builder.credentials(Credentials::new(user.clone(), pass.clone()));
        }
        Self {
            transport: builder.build(),
            from: config.from.clone(),
            templates: Templates::default(),
            lease: config.lease,
        }
    }

    fn compose(&self, msg: &Envelope, req: &EmailRequested) -> Result<(Message, String), Failure> {
        let to: Mailbox = req
            .to
            .parse()
            .map_err(|e| Failure::permanent(anyhow::anyhow!("bad recipient {:?}: {e}", req.to)))?;
        let rendered = self
            .templates
            .render(&req.template, &req.data)
            .map_err(Failure::permanent)?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&rendered.subject)
            .message_id(Some(format!("<{}@souk>", msg.id)))
            .multipart(MultiPart::alternative_plain_html(
                rendered.text,
                rendered.html,
            ))
            .map_err(Failure::permanent)?;
        Ok((message, rendered.subject))
    }
}

impl Handler for Mailer {
    type Prepared = Sent;
    const GROUP: &'static str = topology::MAILER.name;
    const BINDINGS: &'static [&'static str] = topology::MAILER.bindings;

    fn prepare_lease(&self) -> Option<Duration> {
        Some(self.lease)
    }

    fn copy_prepared(&self, sent: &Sent) -> Option<Sent> {
        Some(sent.clone())
    }

    async fn prepare(&self, msg: &Envelope) -> Result<Sent, Failure> {
        let req: EmailRequested = msg.payload().map_err(Failure::permanent)?;
        let (message, subject) = self.compose(msg, &req)?;
        match self.transport.send(message).await {
            Ok(_) => {
                tracing::info!(template = %req.template, "email sent");
                metrics::counter!("souk_emails_sent_total", "template" => req.template.clone())
                    .increment(1);
                Ok(Sent {
                    to: req.to,
                    template: req.template,
                    subject,
                })
            }
            // 5xx: the server refused for good (bad mailbox, policy).
            Err(e) if e.is_permanent() => Err(Failure::permanent(e)),
            // Refused connection, timeout, 4xx: try again later.
            Err(e) => Err(Failure::transient(e)),
        }
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        msg: &Envelope,
        sent: Sent,
    ) -> Result<(), Failure> {
        sqlx::query(
            "INSERT INTO email_log (message_id, recipient, template, subject) VALUES ($1, $2, $3, $4)",
        )
        .bind(msg.id)
        .bind(&sent.to)
        .bind(&sent.template)
        .bind(&sent.subject)
        .execute(tx)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(timeout_ms: u64, lease_ms: u64) -> MailerConfig {
        MailerConfig {
            smtp_host: "127.0.0.1".into(),
            smtp_port: 1025,
            smtp_username: None,
            smtp_password: None,
            from: "Souk <no-reply@souk.test>".parse().unwrap(),
            timeout: Duration::from_millis(timeout_ms),
            lease: Duration::from_millis(lease_ms),
        }
    }

    #[test]
    fn the_lease_must_outlast_a_send() {
        assert!(config(10_000, 30_000).check_lease().is_ok(), "the defaults");
        assert!(config(10_000, 20_000).check_lease().is_ok());
        let e = config(10_000, 15_000).check_lease().unwrap_err();
        assert_eq!(e.var, "MAILER_LEASE_MS");
        assert!(e.reason.contains("10000 ms"), "{}", e.reason);
        assert!(config(60_000, 1_500).check_lease().is_err());
    }
}
