//! Abuse limits, counted in Redis so every API replica shares them.
//!
//! Fixed windows: each hit increments `{prefix}:rl:{scope}:{key}`, which
//! expires with its window; past the limit the answer is 429 with
//! `Retry-After`. Guesses at a password are also counted before they are
//! checked and, past a threshold, each needs a lock of its own that grows
//! (see [`RateLimiter::attempt`]). If Redis is unreachable the limits are
//! skipped (and logged): an outage of the limiter must not take sign-in
//! down with it.

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
    /// Failed sign-ins to one account from one client (or wrong current
    /// passwords given to `POST /me/password` by one account) that lock
    /// it: for 1 s after the last of them, then for a doubling time after
    /// each further one (2 s, 4 s … up to 5 minutes). Per client, so a
    /// stranger who knows an email cannot lock its owner out by guessing.
    pub failures_before_lock: u32,
    /// Failed sign-ins to one account from all clients together before the
    /// same doubling lock applies to everyone: guesses spread over many
    /// addresses stay bounded. Higher than `failures_before_lock`, so only
    /// a distributed attack reaches it; a password reset lifts it.
    pub failures_before_account_lock: u32,
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
            failures_before_account_lock: env.or("SIGN_IN_FAILURES_BEFORE_ACCOUNT_LOCK", 20)?,
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

    /// Counts one guess at a secret against every guard, before the guess
    /// is checked; 429 (with `Retry-After`) while any guard is locked.
    ///
    /// The first `threshold - 1` attempts in a guard's memory pass freely;
    /// from the `threshold`-th on, an attempt passes only by taking the
    /// guard's lock itself, for 1 s, 2 s, 4 s … (up to 5 minutes). All of it
    /// is one Redis script, so concurrent guesses cannot all slip past a
    /// check made before the first of them failed: whatever the
    /// concurrency, at most `threshold` guesses are checked before the
    /// first lock and one per lock after it. Refused attempts are not
    /// counted, so waiting out a lock costs only the next doubling.
    /// A success must [`clear`](Self::clear) the guards, which also lifts
    /// the lock it took.
    pub async fn attempt(&self, guards: &[Guard]) -> Result<(), ApiError> {
        let mut script = redis::cmd("EVAL");
        script.arg(ATTEMPT).arg(guards.len() * 2);
        for guard in guards {
            script
                .arg(self.key("fail", guard.scope, &guard.id))
                .arg(self.key("lock", guard.scope, &guard.id));
        }
        script
            .arg(FAILURE_MEMORY.as_secs())
            .arg(MAX_LOCK.as_millis() as u64);
        for guard in guards {
            script.arg(guard.threshold);
        }
        let mut redis = self.redis.clone();
        let locked: redis::RedisResult<i64> = script.query_async(&mut redis).await;
        match locked {
            Ok(ms) if ms > 0 => Err(ApiError::TooManyRequests {
                retry_after: (ms as u64).div_ceil(1000),
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                let scope = guards.first().map_or("", |g| g.scope);
                tracing::warn!(error = %e, scope, "lockout unavailable; attempt allowed");
                Ok(())
            }
        }
    }

    /// Forgets the failed attempts counted by `guards`, and lifts their
    /// locks: after a success, or once the owner has proved who they are
    /// some other way (a password reset).
    pub async fn clear(&self, guards: &[Guard]) {
        let keys: Vec<String> = guards
            .iter()
            .flat_map(|g| {
                [
                    self.key("fail", g.scope, &g.id),
                    self.key("lock", g.scope, &g.id),
                ]
            })
            .collect();
        let mut redis = self.redis.clone();
        if let Err(e) = redis.del::<_, ()>(keys).await {
            tracing::warn!(error = %e, "could not clear failed attempts");
        }
    }
}

/// One count of failed guesses at a secret: of `id` in `scope` (such as
/// sign-ins to an email from one client), locked from the `threshold`-th
/// attempt on.
#[derive(Debug, Clone)]
pub struct Guard {
    pub scope: &'static str,
    pub id: String,
    pub threshold: u32,
}

/// KEYS: a failure counter and its lock for each guard; ARGV: how long
/// failures are remembered (s), the longest lock (ms), then each guard's
/// threshold. Returns the longest remaining lock in ms (nothing counted),
/// or 0 when the attempt may go ahead (counted, and any lock it needed
/// taken). Checking and taking in one script is what keeps a burst of
/// guesses from all passing an empty lock.
const ATTEMPT: &str = r#"
local wait = 0
for i = 2, #KEYS, 2 do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl > wait then wait = ttl end
end
if wait > 0 then return wait end
for i = 1, #KEYS, 2 do
  local n = redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[1])
  local over = n - tonumber(ARGV[2 + (i + 1) / 2])
  if over >= 0 then
    local ms = math.min(1000 * 2 ^ math.min(over, 16), tonumber(ARGV[2]))
    redis.call('SET', KEYS[i + 1], 1, 'PX', math.floor(ms))
  end
end
return 0
"#;
