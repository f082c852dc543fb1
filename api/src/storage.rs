//! Where uploaded files live: the local filesystem by default, any
//! S3-compatible store by configuration, both through `object_store`.

use std::sync::Arc;

use object_store::{ObjectStore, aws::AmazonS3Builder, local::LocalFileSystem};
use souk_shared::config::{ConfigError, Env};

#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `file:///abs/dir`, a plain directory path, or `s3://bucket` (credentials,
    /// region and endpoint from the usual `AWS_*` variables).
    pub url: String,
    /// Largest image upload (avatars, product images), in bytes.
    pub image_max_bytes: usize,
}

impl StorageConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            url: env.or("STORAGE_URL", "var/uploads".to_string())?,
            image_max_bytes: env.or("IMAGE_MAX_BYTES", 5 * 1024 * 1024)?,
        })
    }

    pub fn open(&self) -> Result<Arc<dyn ObjectStore>, ConfigError> {
        let bad = |reason: String| ConfigError {
            var: "STORAGE_URL".into(),
            reason,
        };
        if self.url.starts_with("s3://") {
            let s3 = AmazonS3Builder::from_env()
                .with_url(&self.url)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            return Ok(Arc::new(s3));
        }
        let dir = self.url.strip_prefix("file://").unwrap_or(&self.url);
        std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create {dir}: {e}")))?;
        let local = LocalFileSystem::new_with_prefix(dir).map_err(|e| bad(e.to_string()))?;
        Ok(Arc::new(local))
    }
}
