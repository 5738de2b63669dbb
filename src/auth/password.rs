//! argon2id password hashing, off the shard threads and bounded in concurrency.
//!
//! A hash costs tens of milliseconds of CPU by design, so it runs on the blocking
//! pool, and a node-wide semaphore caps how many run at once: a login storm queues
//! instead of starving every shard.

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use confab_protocol::Password;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Hashes and verifies passwords with argon2id on the blocking pool, a bounded number at once.
#[derive(Debug, Clone)]
pub struct PasswordHasher {
    argon2: Argon2<'static>,
    permits: Arc<Semaphore>,
    /// Hash of a random password, verified when a user does not exist so a failed
    /// login takes as long either way.
    decoy_hash: Arc<str>,
}

/// Why hashing or verifying a password failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HashError {
    /// Invalid argon2 parameters.
    #[error("invalid argon2 parameters: {0}")]
    Params(String),
    /// Password hashing failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// Password hashing task failed.
    #[error("password hashing task failed: {0}")]
    Task(String),
    /// The server is busy; retry later.
    #[error("the server is busy; retry later")]
    Busy,
}

/// Longest wait for a hashing slot before a request is refused as busy.
const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl PasswordHasher {
    /// A hasher with these argon2id costs, running at most `max_concurrent` hashes at once.
    pub fn new(memory_kib: u32, iterations: u32, max_concurrent: usize) -> Result<Self, HashError> {
        let params = Params::new(memory_kib, iterations, 1, None).map_err(|err| HashError::Params(err.to_string()))?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let decoy: [u8; 16] = rand::random();
        let decoy_hash = hash_blocking(&argon2, &decoy)?.into();
        Ok(Self {
            argon2,
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            decoy_hash,
        })
    }

    /// PHC string of `password` with a fresh salt.
    pub async fn hash(&self, password: Password) -> Result<String, HashError> {
        let argon2 = self.argon2.clone();
        self.run(move || hash_blocking(&argon2, password.expose())).await?
    }

    /// Checks `password` against a stored PHC string; `None` checks against the decoy
    /// and always fails.
    pub async fn verify(&self, password: Password, stored: Option<String>) -> Result<bool, HashError> {
        let argon2 = self.argon2.clone();
        let (hash, real) = match stored {
            Some(hash) => (hash, true),
            None => (self.decoy_hash.to_string(), false),
        };
        let matches = self
            .run(move || {
                let parsed = PasswordHash::new(&hash).map_err(|err| HashError::Hash(err.to_string()))?;
                Ok::<_, HashError>(argon2.verify_password(password.expose(), &parsed).is_ok())
            })
            .await??;
        Ok(matches && real)
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, HashError> {
        let _permit = tokio::time::timeout(QUEUE_WAIT, self.permits.acquire())
            .await
            .map_err(|_| HashError::Busy)?
            .map_err(|err| HashError::Task(err.to_string()))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|err| HashError::Task(err.to_string()))
    }
}

fn hash_blocking(argon2: &Argon2<'_>, password: &[u8]) -> Result<String, HashError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|err| HashError::Hash(err.to_string()))?;
    argon2
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| HashError::Hash(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password(text: &str) -> Password {
        Password::parse(text.to_owned()).unwrap()
    }

    #[tokio::test]
    async fn hashes_are_argon2id_and_verify() {
        let hasher = PasswordHasher::new(64, 1, 2).unwrap();
        let hash = hasher.hash(password("correct horse")).await.unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("correct horse"));
        assert!(
            hasher
                .verify(password("correct horse"), Some(hash.clone()))
                .await
                .unwrap()
        );
        assert!(!hasher.verify(password("wrong horse!"), Some(hash)).await.unwrap());
        assert!(!hasher.verify(password("correct horse"), None).await.unwrap());
    }
}
