//! OpenID Connect client: discovery, the authorization-code flow with PKCE,
//! and the id_token checks (signature against the provider's JWKS, issuer,
//! audience, expiry and nonce).
//!
//! Works with Microsoft Entra ID (`OIDC_ISSUER=https://login.microsoftonline.com/<tenant>/v2.0`)
//! and any provider that publishes `/.well-known/openid-configuration`.
//! Discovery is lazy, so the API starts while the provider is unreachable.

use std::time::{Duration, Instant};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{Jwk, JwkSet},
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use souk_shared::config::{ConfigError, Env};
use tokio::sync::RwLock;

/// Algorithms an id_token may be signed with: asymmetric only, so neither
/// `none` nor an HMAC keyed with something public can pass.
const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// A key rotation at the provider shows as an unknown `kid`; the JWKS is
/// fetched again then, but not more often than this.
const JWKS_REFRESH_MIN: Duration = Duration::from_secs(60);

/// Clock skew allowed on `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 60;

#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// The provider's issuer, as configured: with or without the trailing
    /// `/` some providers write (Auth0's `https://tenant.auth0.com/`). The
    /// discovery document says which exactly, and tokens are checked
    /// against that.
    pub issuer: String,
    pub client_id: String,
    /// Confidential clients (e.g. an Entra ID web app) send it to the token
    /// endpoint; public clients rely on PKCE alone.
    pub client_secret: Option<String>,
    /// Where the provider sends the browser back with `code` and `state`: the
    /// storefront's callback page, registered at the provider.
    pub redirect_url: String,
    pub scopes: String,
    /// Treat the `email` claim as verified even without `email_verified`.
    /// Only for providers whose emails are owned by the organisation (an
    /// Entra ID tenant); a wrong `true` lets anyone take over accounts.
    pub trust_emails: bool,
    /// How long a started sign-in may take at the provider.
    pub login_ttl_secs: i64,
}

impl OidcConfig {
    /// `None` when `OIDC_ISSUER` is unset: single sign-on is off.
    pub fn from_env(env: &Env) -> Result<Option<Self>, ConfigError> {
        let Some(issuer) = env.optional::<String>("OIDC_ISSUER")? else {
            return Ok(None);
        };
        Ok(Some(Self {
            // Kept as written: a trailing `/` may be part of the issuer.
            issuer: issuer.trim().to_string(),
            client_id: env.required("OIDC_CLIENT_ID")?,
            client_secret: env.optional("OIDC_CLIENT_SECRET")?,
            redirect_url: env.required("OIDC_REDIRECT_URL")?,
            scopes: env.or("OIDC_SCOPES", "openid email profile".to_string())?,
            trust_emails: env.or("OIDC_TRUST_EMAILS", false)?,
            login_ttl_secs: env.or("OIDC_LOGIN_TTL_SECS", 600)?,
        }))
    }
}

/// Why a sign-in with the provider did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The provider could not be reached or answered nonsense.
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused to exchange the code (used, expired, or not ours).
    #[error("the provider refused the code: {0}")]
    CodeRefused(String),
    /// The id_token failed a check; never trusted.
    #[error("id_token rejected: {0}")]
    BadToken(String),
}

/// What the discovery document says that we use.
#[derive(Debug, Clone, Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    id_token_signing_alg_values_supported: Vec<String>,
}

struct Provider {
    metadata: Metadata,
    jwks: JwkSet,
    jwks_fetched: Instant,
}

/// A started sign-in: send the browser to `url`; keep the rest server-side.
pub struct Authorization {
    pub url: String,
    pub state: String,
    pub nonce: String,
    pub code_verifier: String,
}

/// The identity an id_token vouches for, after every check passed.
#[derive(Debug, Clone)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IdClaims {
    iss: String,
    sub: String,
    #[serde(default)]
    nonce: Option<String>,
    /// A string or an array; its value is checked by `Validation`.
    #[serde(default)]
    aud: serde_json::Value,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    email: Option<String>,
    /// Some providers send `"true"` as a string.
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    #[serde(default)]
    name: Option<String>,
}

pub struct OidcClient {
    pub config: OidcConfig,
    http: reqwest::Client,
    provider: RwLock<Option<Provider>>,
}

impl OidcClient {
    pub fn new(config: OidcConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            // The token endpoint answers directly; a redirect is not expected.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("static HTTP client settings");
        Self {
            config,
            http,
            provider: RwLock::new(None),
        }
    }

    /// A new sign-in: fresh `state`, `nonce` and PKCE verifier (S256).
    pub async fn authorize(&self) -> Result<Authorization, OidcError> {
        let endpoint = self.metadata().await?.authorization_endpoint;
        let (state, nonce, code_verifier) = (random(), random(), random());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(code_verifier.as_bytes()));
        let mut url = reqwest::Url::parse(&endpoint)
            .map_err(|e| OidcError::Unavailable(format!("authorization_endpoint: {e}")))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", &self.config.redirect_url)
            .append_pair("scope", &self.config.scopes)
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(Authorization {
            url: url.into(),
            state,
            nonce,
            code_verifier,
        })
    }

    /// Exchanges `code` at the token endpoint and checks the id_token it
    /// returns against `nonce`.
    pub async fn finish(
        &self,
        code: &str,
        code_verifier: &str,
        nonce: &str,
    ) -> Result<Identity, OidcError> {
        let endpoint = self.metadata().await?.token_endpoint;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.config.redirect_url),
            ("client_id", &self.config.client_id),
            ("code_verifier", code_verifier),
        ];
        if let Some(secret) = &self.config.client_secret {
            form.push(("client_secret", secret));
        }
        let response = self
            .http
            .post(&endpoint)
            .form(&form)
            .send()
            .await
            .map_err(|e| OidcError::Unavailable(format!("token endpoint: {e}")))?;
        let status = response.status();
        // RFC 6749 answers a used, expired or foreign code (invalid_grant)
        // with 400; a 401 means our client credentials are wrong, which is
        // ours to fix, not the user's.
        if status == reqwest::StatusCode::BAD_REQUEST {
            let body = response.text().await.unwrap_or_default();
            return Err(OidcError::CodeRefused(format!("{status}: {body}")));
        }
        #[derive(Deserialize)]
        struct Tokens {
            id_token: String,
        }
        let tokens: Tokens = response
            .error_for_status()
            .map_err(|e| OidcError::Unavailable(format!("token endpoint: {e}")))?
            .json()
            .await
            .map_err(|e| OidcError::Unavailable(format!("token response: {e}")))?;
        self.verify_id_token(&tokens.id_token, nonce).await
    }

    async fn verify_id_token(&self, token: &str, nonce: &str) -> Result<Identity, OidcError> {
        let bad = |m: String| OidcError::BadToken(m);
        // Fails for `none` and unknown algorithms: they are not in the enum.
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(format!("header: {e}")))?;
        let metadata = self.metadata().await?;
        let advertised = &metadata.id_token_signing_alg_values_supported;
        if !ALLOWED.contains(&header.alg)
            || (!advertised.is_empty() && !advertised.iter().any(|a| *a == alg_name(header.alg)))
        {
            return Err(bad(format!("algorithm {:?} not accepted", header.alg)));
        }
        let jwk = self.key(header.kid.as_deref()).await?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| bad(format!("jwk: {e}")))?;
        let mut validation = Validation::new(header.alg);
        // The issuer exactly as the provider names itself (`iss` is
        // compared byte for byte), not as configured: the two may differ
        // by a trailing `/`.
        validation.set_issuer(&[&metadata.issuer]);
        validation.set_audience(&[&self.config.client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        let claims = jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
            .map_err(|e| bad(e.to_string()))?
            .claims;
        // The nonce ties the token to the sign-in we started: a token
        // replayed from another sign-in fails here.
        if claims.nonce.as_deref() != Some(nonce) {
            return Err(bad("nonce does not match".into()));
        }
        // With several audiences the token must have been issued to us.
        if claims.aud.as_array().is_some_and(|a| a.len() > 1)
            && claims.azp.as_deref() != Some(&self.config.client_id)
        {
            return Err(bad("azp is not this client".into()));
        }
        let email_verified = self.config.trust_emails
            || matches!(claims.email_verified, Some(serde_json::Value::Bool(true)))
            || matches!(&claims.email_verified, Some(serde_json::Value::String(s)) if s == "true");
        Ok(Identity {
            issuer: claims.iss,
            subject: claims.sub,
            email: claims
                .email
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty()),
            email_verified,
            name: claims.name,
        })
    }

    /// The provider's key for `kid`, refetching the JWKS once if it is
    /// unknown (the provider may have rotated its keys).
    async fn key(&self, kid: Option<&str>) -> Result<Jwk, OidcError> {
        let find = |set: &JwkSet| match kid {
            Some(kid) => set.find(kid).cloned(),
            // Without a kid only an unambiguous set will do.
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        self.metadata().await?;
        {
            let guard = self.provider.read().await;
            let provider = guard.as_ref().expect("metadata() loaded it");
            if let Some(jwk) = find(&provider.jwks) {
                return Ok(jwk);
            }
            if provider.jwks_fetched.elapsed() < JWKS_REFRESH_MIN {
                return Err(OidcError::BadToken(format!("unknown key {kid:?}")));
            }
        }
        let mut guard = self.provider.write().await;
        let provider = guard.as_mut().expect("metadata() loaded it");
        provider.jwks = self.fetch(&provider.metadata.jwks_uri).await?;
        provider.jwks_fetched = Instant::now();
        find(&provider.jwks).ok_or_else(|| OidcError::BadToken(format!("unknown key {kid:?}")))
    }

    /// The discovery document, fetched on first use (with the JWKS).
    async fn metadata(&self) -> Result<Metadata, OidcError> {
        if let Some(provider) = self.provider.read().await.as_ref() {
            return Ok(provider.metadata.clone());
        }
        let mut guard = self.provider.write().await;
        if let Some(provider) = guard.as_ref() {
            return Ok(provider.metadata.clone());
        }
        let metadata: Metadata = self.fetch(&discovery_url(&self.config.issuer)).await?;
        // A document naming another issuer is not this provider's.
        if !same_issuer(&metadata.issuer, &self.config.issuer) {
            return Err(OidcError::Unavailable(format!(
                "discovery names issuer {} instead of {}",
                metadata.issuer, self.config.issuer
            )));
        }
        let jwks = self.fetch(&metadata.jwks_uri).await?;
        *guard = Some(Provider {
            metadata: metadata.clone(),
            jwks,
            jwks_fetched: Instant::now(),
        });
        Ok(metadata)
    }

    async fn fetch<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let unavailable = |e: reqwest::Error| OidcError::Unavailable(format!("{url}: {e}"));
        self.http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)
    }
}

/// Where the discovery document of `issuer` is: the trailing `/` of an
/// issuer is not doubled.
fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// Whether the discovery document's issuer is the configured one: the same
/// but for a trailing `/`, which operators write or leave out either way.
fn same_issuer(discovered: &str, configured: &str) -> bool {
    discovered.trim_end_matches('/') == configured.trim_end_matches('/')
}

fn random() -> String {
    super::secret::generate()
}

fn alg_name(alg: Algorithm) -> String {
    format!("{alg:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trailing_slash_is_not_doubled_in_discovery_and_either_form_matches() {
        assert_eq!(
            discovery_url("https://tenant.auth0.com/"),
            "https://tenant.auth0.com/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://login.microsoftonline.com/t/v2.0"),
            "https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration"
        );
        assert!(same_issuer(
            "https://tenant.auth0.com/",
            "https://tenant.auth0.com"
        ));
        assert!(same_issuer(
            "https://tenant.auth0.com",
            "https://tenant.auth0.com/"
        ));
        assert!(!same_issuer(
            "https://evil.auth0.com/",
            "https://tenant.auth0.com/"
        ));
    }
}
