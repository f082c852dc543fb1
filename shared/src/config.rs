//! Configuration from the environment (and `.env`), validated at start.
//!
//! Every binary reads its settings through [`Env`], which collects the first
//! bad variable into one error line that names it, so a misconfigured
//! process exits at once with a message an operator can act on.

use std::{fmt::Display, str::FromStr, time::Duration};

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {var}: {reason}")]
pub struct ConfigError {
    pub var: String,
    pub reason: String,
}

/// Reads variables from the process environment, after loading `.env` if present.
pub struct Env {
    _private: (),
}

impl Env {
    /// Loads `.env` (if any) into the environment; real variables win over the file.
    pub fn load() -> Self {
        let _ = dotenvy::dotenv();
        Self { _private: () }
    }

    fn raw(&self, var: &str) -> Option<String> {
        std::env::var(var).ok().filter(|v| !v.trim().is_empty())
    }

    /// A variable that must be set and parse as `T`.
    pub fn required<T: FromStr>(&self, var: &str) -> Result<T, ConfigError>
    where
        T::Err: Display,
    {
        let raw = self.raw(var).ok_or_else(|| ConfigError {
            var: var.into(),
            reason: "is required but not set".into(),
        })?;
        parse(var, &raw)
    }

    /// A variable with a default used when it is unset or empty.
    pub fn or<T: FromStr>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: Display,
    {
        match self.raw(var) {
            Some(raw) => parse(var, &raw),
            None => Ok(default),
        }
    }

    /// A variable that may be unset; when set it must parse as `T`.
    pub fn optional<T: FromStr>(&self, var: &str) -> Result<Option<T>, ConfigError>
    where
        T::Err: Display,
    {
        self.raw(var).map(|raw| parse(var, &raw)).transpose()
    }

    /// A duration given in milliseconds.
    pub fn millis(&self, var: &str, default_ms: u64) -> Result<Duration, ConfigError> {
        self.or(var, default_ms).map(Duration::from_millis)
    }

    /// A comma-separated list, e.g. `RETRY_DELAYS_MS=1000,5000,30000`.
    pub fn list<T: FromStr + Clone>(&self, var: &str, default: &[T]) -> Result<Vec<T>, ConfigError>
    where
        T::Err: Display,
    {
        match self.raw(var) {
            None => Ok(default.to_vec()),
            Some(raw) => raw.split(',').map(|part| parse(var, part.trim())).collect(),
        }
    }
}

fn parse<T: FromStr>(var: &str, raw: &str) -> Result<T, ConfigError>
where
    T::Err: Display,
{
    raw.parse().map_err(|e: T::Err| ConfigError {
        var: var.into(),
        reason: format!("{raw:?} is not valid ({e})"),
    })
}

/// How logs are written: human-readable lines or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pretty" | "text" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            _ => Err("expected `pretty` or `json`".into()),
        }
    }
}

/// A URL with the scheme checked, so `DATABASE_URL=localhost` fails at start.
#[derive(Debug, Clone)]
pub struct Url(pub String);

impl Url {
    fn with_schemes(raw: &str, schemes: &[&str]) -> Result<Self, String> {
        match raw.split_once("://") {
            Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => {
                Ok(Self(raw.to_string()))
            }
            _ => Err(format!(
                "expected a URL starting with {}://",
                schemes.join(":// or ")
            )),
        }
    }
}

/// A PostgreSQL connection URL.
#[derive(Debug, Clone)]
pub struct PgUrl(pub Url);
impl FromStr for PgUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Url::with_schemes(s, &["postgres", "postgresql"]).map(Self)
    }
}

/// An AMQP 0-9-1 connection URL.
#[derive(Debug, Clone)]
pub struct AmqpUrl(pub Url);
impl FromStr for AmqpUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Url::with_schemes(s, &["amqp", "amqps"]).map(Self)
    }
}

/// Names used in the broker: every exchange and queue starts with the
/// prefix, so tests (and several environments on one broker) never collide.
#[derive(Debug, Clone)]
pub struct Prefix(pub String);
impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            Ok(Self(s.to_string()))
        } else {
            Err("use 1 to 64 letters, digits, '-' or '_'".into())
        }
    }
}

/// Settings every binary needs.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub database_url: String,
    pub database_max_connections: u32,
    pub amqp_url: String,
    pub amqp_prefix: String,
    pub log_format: LogFormat,
}

impl CommonConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            database_url: env.required::<PgUrl>("DATABASE_URL")?.0.0,
            database_max_connections: env.or("DATABASE_MAX_CONNECTIONS", 10)?,
            amqp_url: env.required::<AmqpUrl>("AMQP_URL")?.0.0,
            amqp_prefix: env.or("AMQP_PREFIX", Prefix("souk".into()))?.0,
            log_format: env.or("LOG_FORMAT", LogFormat::Pretty)?,
        })
    }
}

impl CommonConfig {
    /// The process's database pool (connecting lazily, so a process can start
    /// and report not-ready while PostgreSQL comes up).
    pub fn pool(&self) -> Result<sqlx::PgPool, ConfigError> {
        crate::db::pool(&self.database_url, self.database_max_connections).map_err(|e| {
            ConfigError {
                var: "DATABASE_URL".into(),
                reason: e.to_string(),
            }
        })
    }
}

/// Prints a configuration error as one line and exits non-zero.
///
/// Used by every `main` so the failure looks the same everywhere.
pub fn exit_on_error<T>(result: Result<T, ConfigError>) -> T {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_by_scheme() {
        assert!("postgres://localhost/souk".parse::<PgUrl>().is_ok());
        assert!("localhost/souk".parse::<PgUrl>().is_err());
        assert!(
            "amqp://guest:guest@127.0.0.1:5672/%2f"
                .parse::<AmqpUrl>()
                .is_ok()
        );
        assert!("http://x".parse::<AmqpUrl>().is_err());
    }

    #[test]
    fn prefix_rejects_dots_and_spaces() {
        assert!("souk_test-1".parse::<Prefix>().is_ok());
        assert!("a.b".parse::<Prefix>().is_err());
        assert!("".parse::<Prefix>().is_err());
    }

    #[test]
    fn the_error_names_the_variable() {
        let err = parse::<u16>("HTTP_PORT", "eighty").unwrap_err();
        let line = err.to_string();
        assert!(
            line.starts_with("invalid configuration: HTTP_PORT:"),
            "{line}"
        );
        assert!(line.contains("\"eighty\""), "{line}");
    }
}
