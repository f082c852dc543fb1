use souk_shared::config::{ConfigError, Env};

/// Authentication settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// HMAC key for access tokens; at least 32 bytes.
    pub secret: String,
    pub issuer: String,
    pub audience: String,
    pub access_ttl_secs: i64,
    pub refresh_ttl_days: i64,
    pub verify_email_ttl_hours: i64,
    pub reset_password_ttl_minutes: i64,
    /// Where the storefront serves its pages; links in mails point there.
    pub storefront_url: String,
    /// Mark auth cookies `Secure` (HTTPS only). Off only for local HTTP.
    pub cookie_secure: bool,
    /// `Strict`, `Lax` or `None` (which needs `Secure`).
    pub cookie_same_site: String,
}

impl AuthConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let secret: String = env.required("JWT_SECRET")?;
        if secret.len() < 32 {
            return Err(ConfigError {
                var: "JWT_SECRET".into(),
                reason: "must be at least 32 bytes".into(),
            });
        }
        let cookie_secure: bool = env.or("COOKIE_SECURE", true)?;
        let cookie_same_site: String = env.or("COOKIE_SAME_SITE", "Lax".to_string())?;
        match cookie_same_site.as_str() {
            "Strict" | "Lax" => {}
            "None" if cookie_secure => {}
            "None" => {
                return Err(ConfigError {
                    var: "COOKIE_SAME_SITE".into(),
                    reason: "None needs COOKIE_SECURE=true".into(),
                });
            }
            _ => {
                return Err(ConfigError {
                    var: "COOKIE_SAME_SITE".into(),
                    reason: "must be Strict, Lax or None".into(),
                });
            }
        }
        Ok(Self {
            cookie_secure,
            cookie_same_site,
            secret,
            issuer: env.or("JWT_ISSUER", "souk".to_string())?,
            audience: env.or("JWT_AUDIENCE", "souk-api".to_string())?,
            access_ttl_secs: env.or("ACCESS_TOKEN_TTL_SECS", 900)?,
            refresh_ttl_days: env.or("REFRESH_TOKEN_TTL_DAYS", 30)?,
            verify_email_ttl_hours: env.or("VERIFY_EMAIL_TTL_HOURS", 48)?,
            reset_password_ttl_minutes: env.or("RESET_PASSWORD_TTL_MINUTES", 60)?,
            storefront_url: env
                .or("STOREFRONT_URL", "http://localhost:3000".to_string())?
                .trim_end_matches('/')
                .to_string(),
        })
    }
}
