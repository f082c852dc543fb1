//! Password hashing with Argon2id at OWASP's minimum cost (19 MiB, t=2,
//! p=1: the crate's defaults), run on the blocking pool so a sign-in never
//! stalls the async workers.

use argon2::{
    Argon2,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};

/// A PHC-format Argon2id hash. Only [`hash`] makes one, so a plain password
/// can never be stored where a hash belongs.
#[derive(Debug, Clone)]
pub struct Hashed(String);

impl Hashed {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub async fn hash(password: String) -> anyhow::Result<Hashed> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| Hashed(h.to_string()))
            .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
    })
    .await?
}

/// True if `password` matches `stored`. With no stored hash, a dummy hash is
/// checked anyway so unknown accounts take as long as wrong passwords.
pub async fn verify(password: String, stored: Option<String>) -> anyhow::Result<bool> {
    tokio::task::spawn_blocking(move || {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| DUMMY.clone());
        let parsed =
            PasswordHash::new(&stored).map_err(|e| anyhow::anyhow!("bad stored hash: {e}"))?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
            && known)
    })
    .await?
}

/// The hash of a random secret nobody knows, made once.
static DUMMY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    Argon2::default()
        .hash_password(uuid::Uuid::new_v4().as_bytes())
        .expect("hashing works")
        .to_string()
});

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn hashes_verify_and_use_argon2id_at_owasp_cost() {
        let h = super::hash("correct horse battery".into())
            .await
            .unwrap()
            .as_str()
            .to_string();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(
            super::verify("correct horse battery".into(), Some(h.clone()))
                .await
                .unwrap()
        );
        assert!(!super::verify("wrong".into(), Some(h)).await.unwrap());
        assert!(!super::verify("anything".into(), None).await.unwrap());
    }
}
