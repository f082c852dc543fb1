//! Start-up with bad configuration fails with one line naming the variable.

use std::process::Command;

fn run(bin: &str, vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = std::env::temp_dir(); // no .env there
    let out = Command::new(bin)
        .current_dir(dir)
        .env_clear()
        .envs(vars.iter().copied())
        .output()
        .expect("binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const DB: (&str, &str) = (
    "DATABASE_URL",
    "postgres://postgres@127.0.0.1:5432/postgres",
);
const AMQP: (&str, &str) = ("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");

#[test]
fn each_worker_names_the_bad_variable_and_exits_non_zero() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (env!("CARGO_BIN_EXE_mailer"), &[AMQP], "DATABASE_URL"),
        (
            env!("CARGO_BIN_EXE_mailer"),
            &[DB, ("AMQP_URL", "http://localhost")],
            "AMQP_URL",
        ),
        (
            env!("CARGO_BIN_EXE_mailer"),
            &[DB, AMQP, ("SMTP_PORT", "smtp")],
            "SMTP_PORT",
        ),
        (
            env!("CARGO_BIN_EXE_outbox-relay"),
            &[DB, AMQP, ("RELAY_BATCH_SIZE", "lots")],
            "RELAY_BATCH_SIZE",
        ),
        (
            env!("CARGO_BIN_EXE_outbox-relay"),
            &[DB, AMQP, ("LOG_FORMAT", "xml")],
            "LOG_FORMAT",
        ),
        (
            env!("CARGO_BIN_EXE_souk-admin"),
            &[DB, AMQP, ("AMQP_PREFIX", "a.b")],
            "AMQP_PREFIX",
        ),
        (
            env!("CARGO_BIN_EXE_order-splitter"),
            &[DB, AMQP, ("COMMISSION_BPS", "20000")],
            "COMMISSION_BPS",
        ),
        (
            env!("CARGO_BIN_EXE_stock-reserver"),
            &[DB, AMQP, ("RESERVATION_TTL_SECS", "0")],
            "RESERVATION_TTL_SECS",
        ),
        (
            env!("CARGO_BIN_EXE_payments"),
            &[DB, AMQP],
            "STRIPE_SECRET_KEY",
        ),
        (
            env!("CARGO_BIN_EXE_settlement"),
            &[DB, AMQP, ("SETTLEMENT_HOLD_SECS", "a week")],
            "SETTLEMENT_HOLD_SECS",
        ),
        (
            env!("CARGO_BIN_EXE_replenisher"),
            &[DB, AMQP, ("REPLENISH_MAX_ATTEMPTS", "0")],
            "REPLENISH_MAX_ATTEMPTS",
        ),
        (
            env!("CARGO_BIN_EXE_replenisher"),
            &[DB, AMQP, ("REPLENISH_RETRY_MS", "soon")],
            "REPLENISH_RETRY_MS",
        ),
        (
            env!("CARGO_BIN_EXE_payments"),
            &[DB, AMQP, ("STRIPE_SECRET_KEY", "pk_test_public")],
            "STRIPE_SECRET_KEY",
        ),
        (
            env!("CARGO_BIN_EXE_payments"),
            &[
                DB,
                AMQP,
                ("STRIPE_SECRET_KEY", "sk_test_x"),
                ("STRIPE_API_BASE", "ftp://stripe"),
            ],
            "STRIPE_API_BASE",
        ),
    ];
    for (bin, vars, named) in cases {
        let (code, stderr) = run(bin, vars);
        assert_eq!(code, Some(2), "{bin} with bad {named}: {stderr}");
        let line = stderr.trim();
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(
            line.starts_with(&format!("error: invalid configuration: {named}:")),
            "{line}"
        );
    }
}
