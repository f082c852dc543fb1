//! A small OpenID Connect provider on localhost, for testing single sign-on
//! against a real HTTP exchange: discovery document, JWKS, an authorization
//! endpoint that signs in whoever the test says, and a token endpoint that
//! enforces PKCE (S256) and returns an RS256 id_token signed with its own
//! key. A test can make it misbehave (`Forgery`) to prove the client refuses.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Form, Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const KEY_ID: &str = "provider-key-1";
const PROVIDER_KEY: &str = include_str!("../keys/oidc-provider.pem");
/// Another RSA key: what a forger would sign with.
const FORGER_KEY: &str = include_str!("../keys/oidc-forger.pem");

/// Who signs in at the provider next.
#[derive(Debug, Clone)]
pub struct User {
    pub sub: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub name: Option<String>,
}

impl User {
    pub fn verified(sub: &str, email: &str, name: &str) -> Self {
        Self {
            sub: sub.into(),
            email: Some(email.into()),
            email_verified: true,
            name: Some(name.into()),
        }
    }
}

/// How the next id_token is spoiled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Forgery {
    #[default]
    Honest,
    /// Signed with a key not in the JWKS, under the provider's key id.
    WrongKey,
    /// Signed with a key id the JWKS does not have.
    UnknownKeyId,
    /// `alg: none`, no signature.
    AlgNone,
    /// HS256 keyed with the provider's public modulus (a classic confusion).
    Hs256,
    WrongAudience,
    WrongIssuer,
    WrongNonce,
    Expired,
}

struct Grant {
    user: User,
    nonce: String,
    challenge: String,
    redirect_uri: String,
}

#[derive(Default)]
struct Inner {
    next: Option<User>,
    forgery: Forgery,
    codes: HashMap<String, Grant>,
    token_requests: usize,
}

#[derive(Clone)]
struct Shared {
    issuer: String,
    client_id: String,
    client_secret: Option<String>,
    inner: Arc<Mutex<Inner>>,
}

pub struct OidcProvider {
    pub issuer: String,
    pub client_id: String,
    shared: Shared,
}

/// Where the provider sent the browser back.
#[derive(Debug)]
pub struct Redirect {
    pub code: String,
    pub state: String,
    pub redirect_uri: String,
}

impl OidcProvider {
    /// Serves on a free localhost port until the test ends.
    pub async fn start(client_id: &str, client_secret: Option<&str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let issuer = format!("http://{addr}/tenant");
        let shared = Shared {
            issuer: issuer.clone(),
            client_id: client_id.into(),
            client_secret: client_secret.map(str::to_string),
            inner: Arc::default(),
        };
        let app = Router::new()
            .route("/tenant/.well-known/openid-configuration", get(discovery))
            .route("/tenant/keys", get(jwks))
            .route("/tenant/authorize", get(authorize))
            .route("/tenant/token", post(token))
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self {
            issuer,
            client_id: client_id.into(),
            shared,
        }
    }

    /// The next visitor of the authorization endpoint signs in as `user`.
    pub fn sign_in_as(&self, user: User) {
        self.shared.inner.lock().unwrap().next = Some(user);
    }

    /// Spoil the id_tokens issued from now on.
    pub fn forge(&self, forgery: Forgery) {
        self.shared.inner.lock().unwrap().forgery = forgery;
    }

    /// How many code exchanges the token endpoint has answered.
    pub fn token_requests(&self) -> usize {
        self.shared.inner.lock().unwrap().token_requests
    }

    /// Plays the browser: opens `authorization_url` and reads where the
    /// provider redirects to.
    pub async fn visit(&self, authorization_url: &str) -> Redirect {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let response = client.get(authorization_url).send().await.unwrap();
        assert_eq!(response.status(), 303, "{}", response.text().await.unwrap());
        let location = response.headers()[header::LOCATION].to_str().unwrap();
        let url = reqwest::Url::parse(location).unwrap();
        let param = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        Redirect {
            code: param("code"),
            state: param("state"),
            redirect_uri: format!("{}://{}{}", url.scheme(), url.authority(), url.path()),
        }
    }
}

async fn discovery(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "issuer": s.issuer,
        "authorization_endpoint": format!("{}/authorize", s.issuer),
        "token_endpoint": format!("{}/token", s.issuer),
        "jwks_uri": format!("{}/keys", s.issuer),
        "response_types_supported": ["code"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
    }))
}

fn provider_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(PROVIDER_KEY.as_bytes()).expect("provider key")
}

async fn jwks() -> Json<Value> {
    let mut jwk = Jwk::from_encoding_key(&provider_key(), Algorithm::RS256).expect("jwk");
    jwk.common.key_id = Some(KEY_ID.into());
    Json(json!({ "keys": [jwk] }))
}

fn refuse(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

async fn authorize(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let param = |k: &str| q.get(k).cloned().unwrap_or_default();
    if param("response_type") != "code"
        || param("client_id") != s.client_id
        || param("code_challenge_method") != "S256"
        || param("code_challenge").is_empty()
        || param("state").is_empty()
        || param("nonce").is_empty()
        || !param("scope").split(' ').any(|x| x == "openid")
    {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let mut inner = s.inner.lock().unwrap();
    let Some(user) = inner.next.clone() else {
        return refuse(StatusCode::BAD_REQUEST, "access_denied");
    };
    let code = uuid::Uuid::new_v4().simple().to_string();
    inner.codes.insert(
        code.clone(),
        Grant {
            user,
            nonce: param("nonce"),
            challenge: param("code_challenge"),
            redirect_uri: param("redirect_uri"),
        },
    );
    let mut back = reqwest::Url::parse(&param("redirect_uri")).expect("redirect_uri");
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &param("state"));
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, back.to_string())],
    )
        .into_response()
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: String,
    code: String,
    redirect_uri: String,
    client_id: String,
    code_verifier: Option<String>,
    client_secret: Option<String>,
}

async fn token(State(s): State<Shared>, Form(req): Form<TokenRequest>) -> Response {
    let mut inner = s.inner.lock().unwrap();
    inner.token_requests += 1;
    if req.grant_type != "authorization_code" {
        return refuse(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if req.client_id != s.client_id || req.client_secret != s.client_secret {
        return refuse(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    // Codes are single use, whatever happens next.
    let Some(grant) = inner.codes.remove(&req.code) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let verifier = req.code_verifier.unwrap_or_default();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if challenge != grant.challenge || req.redirect_uri != grant.redirect_uri {
        return refuse(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    let id_token = id_token(&s, &grant, inner.forgery);
    Json(json!({
        "access_token": "opaque-access-token",
        "token_type": "Bearer",
        "expires_in": 3600,
        "id_token": id_token,
    }))
    .into_response()
}

fn id_token(s: &Shared, grant: &Grant, forgery: Forgery) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut claims = json!({
        "iss": s.issuer,
        "sub": grant.user.sub,
        "aud": s.client_id,
        "iat": now,
        "exp": now + 300,
        "nonce": grant.nonce,
        "email_verified": grant.user.email_verified,
    });
    if let Some(email) = &grant.user.email {
        claims["email"] = json!(email);
    }
    if let Some(name) = &grant.user.name {
        claims["name"] = json!(name);
    }
    match forgery {
        Forgery::WrongAudience => claims["aud"] = json!("someone-else"),
        Forgery::WrongIssuer => claims["iss"] = json!("http://evil.example/tenant"),
        Forgery::WrongNonce => claims["nonce"] = json!("replayed-nonce"),
        Forgery::Expired => {
            claims["iat"] = json!(now - 3600);
            claims["exp"] = json!(now - 1800);
        }
        _ => {}
    }
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KEY_ID.into());
    let forger = || EncodingKey::from_rsa_pem(FORGER_KEY.as_bytes()).expect("forger key");
    let key = match forgery {
        Forgery::WrongKey => forger(),
        Forgery::UnknownKeyId => {
            header.kid = Some("someone-elses-key".into());
            forger()
        }
        Forgery::AlgNone => {
            let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
            let body = URL_SAFE_NO_PAD.encode(claims.to_string());
            return format!("{head}.{body}.");
        }
        Forgery::Hs256 => {
            let jwk = Jwk::from_encoding_key(&provider_key(), Algorithm::RS256).unwrap();
            let modulus = match jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(rsa) => rsa.n,
                _ => unreachable!("an RSA key"),
            };
            header = Header::new(Algorithm::HS256);
            header.kid = Some(KEY_ID.into());
            EncodingKey::from_secret(modulus.as_bytes())
        }
        _ => provider_key(),
    };
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}
