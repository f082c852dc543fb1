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
    "order_receipt",
    "order_failed",
    "payment_failed",
    "order_update",
    "order_cancelled",
    "refund_issued",
    "refund_failed",
    "seller_refund_issued",
    "seller_refund_failed",
    "seller_new_order",
    "seller_order_cancelled",
    "withdrawal_requested",
    "admin_withdrawal_requested",
    "withdrawal_paid",
    "withdrawal_rejected",
    "payout_details_changed",
    "refund_request_opened",
    "refund_request_received",
    "refund_request_decided",
    "shop_approved",
    "shop_suspended",
    "shop_reinstated",
    "membership_update",
    "replenishment_failed",
];

/// Currencies without minor units (Stripe's list): 1234 is 1234 JPY.
const ZERO_DECIMAL: &[&str] = &[
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];

/// `{{ amount|money(currency) }}`: minor units as `12.34 EUR`, in integer
/// arithmetic.
fn money(minor: i64, currency: &str) -> String {
    let code = currency.to_ascii_uppercase();
    if ZERO_DECIMAL.contains(&currency.to_ascii_lowercase().as_str()) {
        return format!("{minor} {code}");
    }
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02} {code}", abs / 100, abs % 100)
}

/// `{{ at|when }}`: an RFC 3339 time as people read it, in UTC
/// (`Thu 26 Nov 2026, 09:00 UTC`); anything else as it is.
fn when(at: String) -> String {
    chrono::DateTime::parse_from_rfc3339(&at)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%a %-d %b %Y, %H:%M UTC")
                .to_string()
        })
        .unwrap_or(at)
}

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
        env.add_filter("money", |minor: i64, currency: String| {
            money(minor, &currency)
        });
        env.add_filter("when", when);
        embed!(
            env,
            "layout.html",
            "_lines.html",
            "_lines.txt",
            "_address.txt",
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
            "order_receipt.subject.txt",
            "order_receipt.txt",
            "order_receipt.html",
            "order_failed.subject.txt",
            "order_failed.txt",
            "order_failed.html",
            "payment_failed.subject.txt",
            "payment_failed.txt",
            "payment_failed.html",
            "order_update.subject.txt",
            "order_update.txt",
            "order_update.html",
            "order_cancelled.subject.txt",
            "order_cancelled.txt",
            "order_cancelled.html",
            "refund_issued.subject.txt",
            "refund_issued.txt",
            "refund_issued.html",
            "refund_failed.subject.txt",
            "refund_failed.txt",
            "refund_failed.html",
            "seller_refund_issued.subject.txt",
            "seller_refund_issued.txt",
            "seller_refund_issued.html",
            "seller_refund_failed.subject.txt",
            "seller_refund_failed.txt",
            "seller_refund_failed.html",
            "seller_new_order.subject.txt",
            "seller_new_order.txt",
            "seller_new_order.html",
            "seller_order_cancelled.subject.txt",
            "seller_order_cancelled.txt",
            "seller_order_cancelled.html",
            "withdrawal_requested.subject.txt",
            "withdrawal_requested.txt",
            "withdrawal_requested.html",
            "admin_withdrawal_requested.subject.txt",
            "admin_withdrawal_requested.txt",
            "admin_withdrawal_requested.html",
            "withdrawal_paid.subject.txt",
            "withdrawal_paid.txt",
            "withdrawal_paid.html",
            "withdrawal_rejected.subject.txt",
            "withdrawal_rejected.txt",
            "withdrawal_rejected.html",
            "refund_request_opened.subject.txt",
            "refund_request_opened.txt",
            "refund_request_opened.html",
            "refund_request_received.subject.txt",
            "refund_request_received.txt",
            "refund_request_received.html",
            "refund_request_decided.subject.txt",
            "refund_request_decided.txt",
            "refund_request_decided.html",
            "shop_approved.subject.txt",
            "shop_approved.txt",
            "shop_approved.html",
            "shop_suspended.subject.txt",
            "shop_suspended.txt",
            "shop_suspended.html",
            "shop_reinstated.subject.txt",
            "shop_reinstated.txt",
            "shop_reinstated.html",
            "payout_details_changed.subject.txt",
            "payout_details_changed.txt",
            "payout_details_changed.html",
            "membership_update.subject.txt",
            "membership_update.txt",
            "membership_update.html",
            "replenishment_failed.subject.txt",
            "replenishment_failed.txt",
            "replenishment_failed.html",
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
    fn times_read_as_people_say_them() {
        assert_eq!(
            when("2026-11-26T09:00:00.123Z".into()),
            "Thu 26 Nov 2026, 09:00 UTC"
        );
        assert_eq!(
            when("2026-11-26T10:00:00+01:00".into()),
            "Thu 26 Nov 2026, 09:00 UTC"
        );
        assert_eq!(when("soon".into()), "soon");
    }

    #[test]
    fn money_is_formatted_from_integers() {
        assert_eq!(money(123_456, "eur"), "1234.56 EUR");
        assert_eq!(money(5, "usd"), "0.05 USD");
        assert_eq!(money(-250, "eur"), "-2.50 EUR");
        assert_eq!(money(1234, "jpy"), "1234 JPY");
    }

    /// Every order mail renders with the data its producers send.
    #[test]
    fn order_mails_render() {
        let t = Templates::default();
        let order = serde_json::json!({
            "id": "0190-order", "currency": "eur",
            "lines": [{"title": "Board", "variant_title": "Large", "sku": "B-1", "quantity": 2,
                       "unit_price_minor": 1500, "line_total_minor": 3000}],
            "subtotal_minor": 3000, "discount_minor": 300, "shipping_minor": 499, "total_minor": 3199,
            "refunded_minor": 0,
            "address": {"full_name": "Ann", "line1": "1 Road", "line2": "", "city": "Town",
                        "region": "", "postal_code": "123", "country": "DE", "phone": ""},
        });
        let seller_order = serde_json::json!({"id": "0190-part", "status": "paid", "total_minor": 3199,
                                              "commission_minor": 270, "payout_minor": 2929});
        let cases = [
            ("order_receipt", serde_json::json!({})),
            (
                "order_failed",
                serde_json::json!({"status": "out_of_stock", "reason": "Board is out of stock"}),
            ),
            (
                "payment_failed",
                serde_json::json!({"reason": "declined", "pay_until": null}),
            ),
            (
                "order_update",
                serde_json::json!({"shop": "Oak", "status": "shipped", "note": null, "note_from": "Oak",
                                                "carrier": "DHL", "tracking_number": "123", "refund_minor": null}),
            ),
            (
                "order_cancelled",
                serde_json::json!({"reason": "changed my mind", "refund_minor": 3199}),
            ),
            (
                "refund_issued",
                serde_json::json!({"amount_minor": 3199, "reason": "cancelled"}),
            ),
            (
                "refund_failed",
                serde_json::json!({"amount_minor": 3199, "reason": "cancelled"}),
            ),
            (
                "seller_refund_issued",
                serde_json::json!({"shop": "Oak", "seller_order": seller_order,
                                   "amount_minor": 999, "reason": "cracked"}),
            ),
            (
                "seller_refund_failed",
                serde_json::json!({"shop": "Oak", "seller_order": seller_order,
                                   "amount_minor": 999, "reason": "cracked"}),
            ),
            (
                "seller_new_order",
                serde_json::json!({"shop": "Oak", "seller_order": seller_order}),
            ),
            (
                "seller_order_cancelled",
                serde_json::json!({"shop": "Oak", "seller_order": seller_order,
                                                          "reason": "changed my mind"}),
            ),
        ];
        for (name, extra) in cases {
            let mut data = serde_json::json!({"name": "Ann", "order": order});
            data.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let r = t
                .render(name, &data)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!r.subject.is_empty(), "{name}");
        }
        let r = t
            .render(
                "order_receipt",
                &serde_json::json!({"name": "Ann", "order": order}),
            )
            .unwrap();
        assert!(r.text.contains("31.99 EUR"), "{}", r.text);
        assert!(r.html.contains("2 × Board"), "{}", r.html);
    }

    /// The recurring-commerce mails render with what their producers send
    /// (`souk_shared::membership` and the replenisher).
    #[test]
    fn recurring_mails_render() {
        let t = Templates::default();
        for status in ["active", "past_due", "canceled", "failed", "incomplete"] {
            let data = serde_json::json!({
                "name": "Ann", "plan": "Plus", "status": status, "membership_id": "m-1",
                "cancel_at_period_end": true, "current_period_end": "2026-12-26T00:00:00Z",
            });
            let r = t
                .render("membership_update", &data)
                .unwrap_or_else(|e| panic!("{status}: {e}"));
            assert!(r.subject.contains("Plus"), "{status}: {}", r.subject);
        }
        let refused = serde_json::json!({
            "name": "Ann", "plan": "Plus", "status": "active", "membership_id": "m-1",
            "cancel_at_period_end": false, "current_period_end": null,
            "cancel_failed": "No such subscription",
        });
        let r = t.render("membership_update", &refused).unwrap();
        assert!(r.subject.contains("not cancelled"), "{}", r.subject);
        assert!(r.text.contains("No such subscription"), "{}", r.text);
        for (outcome, retry_at) in [
            ("retrying", serde_json::json!("2026-11-27T09:00:00Z")),
            ("skipped", serde_json::Value::Null),
            ("failed", serde_json::Value::Null),
        ] {
            let data = serde_json::json!({
                "name": "Ann", "schedule_id": "s-1", "run_id": "r-1", "due_at": "2026-11-26T09:00:00Z",
                "reason": "out_of_stock", "detail": "Tea (Green): only 0 left", "outcome": outcome,
                "attempt": 1, "retry_at": retry_at, "next_run_at": "2026-12-03T09:00:00Z",
            });
            let r = t
                .render("replenishment_failed", &data)
                .unwrap_or_else(|e| panic!("{outcome}: {e}"));
            assert!(r.text.contains("only 0 left"), "{}", r.text);
            assert!(r.text.contains("Thu 3 Dec 2026, 09:00 UTC"), "{}", r.text);
        }
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
