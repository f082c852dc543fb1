//! Abuse limits, counted in Redis so every API replica shares them.
//!
//! Fixed windows: each hit increments `{prefix}:rl:{scope}:{key}`, which
//! expires with its window; past the limit the answer is 429 with
//! `Retry-After`. Failed sign-ins also arm a growing lock per account. If
//! Redis is unreachable the limits are skipped (and logged): an outage of
//! the limiter must not take sign-in down with it.

use std::time::Duration;

use redis::{AsyncCommands, aio::ConnectionManager, aio::ConnectionManagerConfig};
use souk_shared::config::{ConfigError, Env};

use crate::{client_ip::TrustedProxies, error::ApiError};

/// At most `max` hits per `window`.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub max: u32,
    pub window: Duration,
}

/// The limits the auth endpoints apply.
#[derive(Debug, Clone)]
pub struct Limits {
    pub register_per_ip: Limit,
    pub sign_in_per_ip: Limit,
    pub forgot_per_ip: Limit,
    pub forgot_per_email: Limit,
    pub resend_per_account: Limit,
    /// The public contact form mails a confirmation to the address it is
    /// given: budgets per client and per address keep it from being a way
    /// to send mail from our domain to anyone.
    pub support_per_ip: Limit,
    pub support_per_email: Limit,
    /// Failed sign-ins of one account (or wrong current passwords given to
    /// `POST /me/password` by one account) before each further one locks it
    /// for a doubling time (1 s, 2 s, 4 s … up to 5 minutes).
    pub failures_before_lock: u32,
    /// Proxies (load balancers) whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
}

impl Limits {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let per = |var: &str, default: u32, window: u64| -> Result<Limit, ConfigError> {
            Ok(Limit {
                max: env.or(var, default)?,
                window: Duration::from_secs(window),
            })
        };
        Ok(Self {
            register_per_ip: per("LIMIT_REGISTER_PER_IP_HOUR", 20, 3600)?,
            sign_in_per_ip: per("LIMIT_SIGN_IN_PER_IP_MINUTE", 30, 60)?,
            forgot_per_ip: per("LIMIT_FORGOT_PER_IP_HOUR", 20, 3600)?,
            forgot_per_email: per("LIMIT_FORGOT_PER_EMAIL_HOUR", 3, 3600)?,
            resend_per_account: per("LIMIT_RESEND_PER_ACCOUNT_HOUR", 3, 3600)?,
            support_per_ip: per("LIMIT_SUPPORT_PER_IP_HOUR", 10, 3600)?,
            support_per_email: per("LIMIT_SUPPORT_PER_EMAIL_HOUR", 3, 3600)?,
            failures_before_lock: env.or("SIGN_IN_FAILURES_BEFORE_LOCK", 3)?,
            trusted_proxies: TrustedProxies(env.list("TRUSTED_PROXIES", &[])?),
        })
    }
}

const MAX_LOCK: Duration = Duration::from_secs(300);
/// How long failed attempts are remembered.
const FAILURE_MEMORY: Duration = Duration::from_secs(900);

#[derive(Clone)]
pub struct RateLimiter {
    redis: ConnectionManager,
    prefix: String,
    pub limits: Limits,
}

impl RateLimiter {
    /// Connects lazily, so the API starts even while Redis is down.
    pub fn new(url: &str, prefix: &str, limits: Limits) -> Result<Self, ConfigError> {
        let bad = |e: redis::RedisError| ConfigError {
            var: "REDIS_URL".into(),
            reason: e.to_string(),
        };
        let client = redis::Client::open(url).map_err(bad)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1);
        Ok(Self {
            redis: ConnectionManager::new_lazy_with_config(client, config).map_err(bad)?,
            prefix: prefix.to_string(),
            limits,
        })
    }

    fn key(&self, kind: &str, scope: &str, id: &str) -> String {
        format!("{}:{kind}:{scope}:{}", self.prefix, id.to_lowercase())
    }

    /// Counts one hit; 429 once `limit` is passed within the window.
    pub async fn hit(&self, scope: &str, id: &str, limit: Limit) -> Result<(), ApiError> {
        let key = self.key("rl", scope, id);
        let mut redis = self.redis.clone();
        let counted: redis::RedisResult<(u32, bool, i64)> = redis::pipe()
            .atomic()
            .incr(&key, 1)
            .expire(&key, limit.window.as_secs() as i64)
            .arg("NX")
            .ttl(&key)
            .query_async(&mut redis)
            .await;
        match counted {
            Ok((count, _, ttl)) if count > limit.max => Err(ApiError::TooManyRequests {
                retry_after: ttl.max(1) as u64,
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, scope, "rate limiter unavailable; request allowed");
                Ok(())
            }
        }
    }

    /// 429 while `id` is locked after failed attempts in `scope` (`sign-in`
    /// by email, `password` by account).
    pub async fn check_lock(&self, scope: &str, id: &str) -> Result<(), ApiError> {
        let mut redis = self.redis.clone();
        let ttl: redis::RedisResult<i64> = redis.pttl(self.key("lock", scope, id)).await;
        match ttl {
            Ok(ms) if ms > 0 => Err(ApiError::TooManyRequests {
                retry_after: (ms as u64).div_ceil(1000),
            }),
            _ => Ok(()),
        }
    }

    /// Remembers a failed attempt; past the threshold, locks `id` in `scope`
    /// for a time that doubles with each further failure.
    pub async fn record_failure(&self, scope: &str, id: &str) {
        let (fails, lock) = (self.key("fail", scope, id), self.key("lock", scope, id));
        let mut redis = self.redis.clone();
        let count: redis::RedisResult<(u32, bool)> = redis::pipe()
            .atomic()
            .incr(&fails, 1)
            .expire(&fails, FAILURE_MEMORY.as_secs() as i64)
            .query_async(&mut redis)
            .await;
        let Ok((count, _)) = count else { return };
        if count >= self.limits.failures_before_lock {
            let doubling = count - self.limits.failures_before_lock;
            let wait = Duration::from_secs(1u64 << doubling.min(16)).min(MAX_LOCK);
            let _: redis::RedisResult<()> = redis.pset_ex(&lock, 1, wait.as_millis() as u64).await;
        }
    }

    /// Forgets failed attempts after a successful one.
    pub async fn clear_failures(&self, scope: &str, id: &str) {
        let mut redis = self.redis.clone();
        let _: redis::RedisResult<()> = redis
            .del(&[self.key("fail", scope, id), self.key("lock", scope, id)])
            .await;
    }
}
