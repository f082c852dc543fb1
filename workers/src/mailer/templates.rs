//! Email templates: a subject, a plain-text and an HTML body per template,
//! embedded in the binary and rendered with minijinja. HTML is auto-escaped
//! (by the `.html` extension), so user input cannot inject markup.

use minijinja::{Environment, UndefinedBehavior};

/// Templates known to the mailer, by name.
const NAMES: &[&str] = &[
    "support_request_received",
    "verify_email",
    "reset_password",
    "low_stock",
];

macro_rules! embed {
    ($env:ident, $($file:literal),* $(,)?) => {
        $( $env.add_template($file, include_str!(concat!("../../templates/email/", $file)))
            .expect(concat!("template ", $file, " parses")); )*
    };
}

pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("unknown email template {0:?}")]
    Unknown(String),
    #[error("template {template:?} failed to render: {source}")]
    Failed {
        template: String,
        source: minijinja::Error,
    },
}

pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        let mut env = Environment::new();
        // A missing variable is a bug in the producer: fail, don't send blanks.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        embed!(
            env,
            "layout.html",
            "support_request_received.subject.txt",
            "support_request_received.txt",
            "support_request_received.html",
            "verify_email.subject.txt",
            "verify_email.txt",
            "verify_email.html",
            "reset_password.subject.txt",
            "reset_password.txt",
            "reset_password.html",
            "low_stock.subject.txt",
            "low_stock.txt",
            "low_stock.html",
        );
        Self { env }
    }
}

impl Templates {
    pub fn render(&self, name: &str, data: &serde_json::Value) -> Result<Rendered, RenderError> {
        if !NAMES.contains(&name) {
            return Err(RenderError::Unknown(name.to_string()));
        }
        let render = |suffix: &str| {
            self.env
                .get_template(&format!("{name}.{suffix}"))
                .and_then(|t| t.render(data))
                .map_err(|source| RenderError::Failed {
                    template: name.to_string(),
                    source,
                })
        };
        Ok(Rendered {
            subject: render("subject.txt")?.trim().to_string(),
            text: render("txt")?,
            html: render("html")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_renders_and_html_is_escaped() {
        let t = Templates::default();
        let data = serde_json::json!({
            "name": "<b>Ann</b>", "subject": "Late parcel", "message": "Where is it?",
            "request_id": "r-1",
        });
        let r = t.render("support_request_received", &data).unwrap();
        assert_eq!(r.subject, "We received your request: Late parcel");
        assert!(r.html.contains("Hello &lt;b&gt;Ann"), "{}", r.html);
        assert!(!r.html.contains("<b>Ann"));
        assert!(r.text.contains("Hello <b>Ann</b>"));
    }

    #[test]
    fn unknown_templates_and_missing_fields_fail() {
        let t = Templates::default();
        assert!(matches!(
            t.render("nope", &serde_json::json!({})),
            Err(RenderError::Unknown(_))
        ));
        assert!(matches!(
            t.render(
                "support_request_received",
                &serde_json::json!({"name": "x"})
            ),
            Err(RenderError::Failed { .. })
        ));
    }
}
