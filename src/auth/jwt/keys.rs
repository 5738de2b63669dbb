//! The app's public keys: a JWKS document parsed into verifying keys, and the
//! thread that keeps it fresh.
//!
//! The document is fetched on a thread and runtime of its own (never a shard's):
//! at start, every `auth.jwt.jwks_refresh_interval`, and when a token names a key
//! not in the set (a key rotation), but then not more often than
//! `auth.jwt.jwks_min_refetch_interval`, so tokens with made-up key ids cannot
//! turn into a flood of fetches. Shards read the current set through a `watch`
//! channel; one that needs a newer set asks for it and waits at most
//! `auth.jwt.jwks_timeout`.

use crate::config::JwtConfig;
use crate::http::{HttpUrl, client_tls};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The shortest wait before fetching again after a failed fetch.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// A key that verifies tokens, and the algorithms it may verify.
#[derive(Clone)]
pub(super) struct PublicKey {
    pub(super) key: DecodingKey,
    pub(super) algorithms: Vec<Algorithm>,
}

/// The keys of one fetch of the JWKS document.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<(Option<String>, PublicKey)>,
    /// Whether any fetch succeeded yet (these keys are the last good ones).
    fetched: bool,
    /// When the last fetch was tried, if one was.
    attempted_at: Option<Instant>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.iter().map(|(kid, _)| kid).collect::<Vec<_>>())
            .field("fetched", &self.fetched)
            .finish_non_exhaustive()
    }
}

impl KeySet {
    /// The signing keys of a JWKS document. Keys confab cannot use (encryption
    /// keys, symmetric keys, unknown types or curves) are skipped with a warning:
    /// one odd key must not take the others down.
    pub fn parse(document: &[u8]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document =
            serde_json::from_slice(document).map_err(|err| format!("not a JWKS document: {err}"))?;
        let mut keys = Vec::new();
        for value in document.keys {
            let kid = value.get("kid").and_then(|kid| kid.as_str()).map(str::to_owned);
            match serde_json::from_value::<Jwk>(value)
                .map_err(|err| err.to_string())
                .and_then(|jwk| public_key(&jwk))
            {
                Ok(key) => keys.push((kid, key)),
                Err(reason) => tracing::warn!(kid = ?kid, %reason, "JWKS key skipped"),
            }
        }
        Ok(Self {
            keys,
            fetched: true,
            attempted_at: None,
        })
    }

    /// The key named `kid`; without a kid, the only key of the set.
    pub(super) fn find(&self, kid: Option<&str>) -> Option<&PublicKey> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|(id, _)| id.as_deref() == Some(kid))
                .map(|(_, key)| key),
            None => match self.keys.as_slice() {
                [(_, key)] => Some(key),
                _ => None,
            },
        }
    }

    /// Whether any fetch of the document succeeded.
    pub(super) fn fetched(&self) -> bool {
        self.fetched
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no usable key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A verifying key from a JWK, with the algorithms its type allows (narrowed to
/// its `alg` when it names one).
fn public_key(jwk: &Jwk) -> Result<PublicKey, String> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("an encryption key (use: enc)".into());
    }
    let family: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            ref other => return Err(format!("unsupported curve {other:?}")),
        },
        AlgorithmParameters::OctetKeyPair(params) => match params.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            ref other => return Err(format!("unsupported curve {other:?}")),
        },
        // A shared secret published at a URL is no secret.
        AlgorithmParameters::OctetKey(_) => return Err("a symmetric key (kty: oct)".into()),
    };
    let algorithms: Vec<Algorithm> = match jwk.common.key_algorithm {
        None => family.to_vec(),
        Some(named) => {
            let named = named
                .to_string()
                .parse::<Algorithm>()
                .map_err(|_| format!("algorithm {named} is not for signatures"))?;
            if !family.contains(&named) {
                return Err(format!("algorithm {named:?} does not fit the key type"));
            }
            vec![named]
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|err| err.to_string())?;
    Ok(PublicKey { key, algorithms })
}

/// The current keys, kept fresh by a thread of their own; cheap to clone.
#[derive(Debug, Clone)]
pub struct Jwks {
    current: watch::Receiver<Arc<KeySet>>,
    refetch: mpsc::Sender<()>,
    timeout: Duration,
    min_refetch_interval: Duration,
}

impl Jwks {
    /// Starts the thread that fetches `url` until `stop` is cancelled.
    pub fn start(
        url: HttpUrl,
        config: &JwtConfig,
        stop: CancellationToken,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let tls = client_tls().map_err(std::io::Error::other)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (publish, current) = watch::channel(Arc::new(KeySet::default()));
        let (refetch, requests) = mpsc::channel(1);
        let fetcher = Fetcher {
            url,
            tls,
            timeout: config.jwks_timeout,
            refresh_interval: config.jwks_refresh_interval,
            min_refetch_interval: config.jwks_min_refetch_interval,
        };
        let thread = std::thread::Builder::new()
            .name("confab-jwks".into())
            .spawn(move || runtime.block_on(fetcher.run(publish, requests, stop)))?;
        let jwks = Self {
            current,
            refetch,
            timeout: config.jwks_timeout,
            min_refetch_interval: config.jwks_min_refetch_interval,
        };
        Ok((jwks, thread))
    }

    /// The keys as last fetched.
    pub fn current(&self) -> Arc<KeySet> {
        self.current.borrow().clone()
    }

    /// The keys after one more fetch, for a token whose key `seen` lacks; `seen`
    /// again at once when the last fetch was too recent to try another.
    pub async fn refetched(&self, seen: &Arc<KeySet>) -> Arc<KeySet> {
        let recent = seen
            .attempted_at
            .is_some_and(|at| at.elapsed() < self.min_refetch_interval);
        if recent {
            return seen.clone();
        }
        let mut current = self.current.clone();
        if !Arc::ptr_eq(&current.borrow_and_update(), seen) {
            return current.borrow().clone();
        }
        // Full: a fetch is asked for already; wait for it like the others.
        let _ = self.refetch.try_send(());
        let _ = tokio::time::timeout(self.timeout, current.changed()).await;
        current.borrow().clone()
    }
}

struct Fetcher {
    url: HttpUrl,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    refresh_interval: Duration,
    min_refetch_interval: Duration,
}

impl Fetcher {
    async fn run(self, publish: watch::Sender<Arc<KeySet>>, mut requests: mpsc::Receiver<()>, stop: CancellationToken) {
        let mut retry = FIRST_RETRY;
        loop {
            let attempted_at = Instant::now();
            let fetched = match self.url.fetch(&self.tls, self.timeout).await {
                Ok(document) => KeySet::parse(&document),
                Err(err) => Err(err.to_string()),
            };
            let wait = match fetched {
                Ok(mut keys) => {
                    tracing::info!(url = %self.url, keys = keys.len(), "JWKS fetched");
                    keys.attempted_at = Some(attempted_at);
                    publish.send_replace(Arc::new(keys));
                    retry = FIRST_RETRY;
                    self.refresh_interval
                }
                Err(reason) => {
                    tracing::warn!(url = %self.url, %reason, "JWKS fetch failed; the last keys stay");
                    // The last good keys, marked as tried now.
                    let mut keys = KeySet::clone(&publish.borrow());
                    keys.attempted_at = Some(attempted_at);
                    publish.send_replace(Arc::new(keys));
                    let wait = retry;
                    retry = (retry * 2).min(self.refresh_interval);
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                Some(()) = requests.recv() => {
                    let earliest = attempted_at + self.min_refetch_interval;
                    tokio::select! {
                        () = tokio::time::sleep_until(earliest.into()) => {}
                        () = stop.cancelled() => return,
                    }
                }
                () = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_keys_are_skipped_and_the_rest_kept() {
        let document = serde_json::json!({ "keys": [
            { "kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" },
            { "kty": "oct", "kid": "secret", "k": "c2VjcmV0" },
            { "kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" },
            { "kty": "OKP", "crv": "Ed25519", "kid": "wrong-alg", "alg": "RS256", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" },
            { "kty": "XYZ", "kid": "unknown" },
        ]});
        let keys = KeySet::parse(document.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        let key = keys.find(Some("ed")).unwrap();
        assert_eq!(key.algorithms, vec![Algorithm::EdDSA]);
        // Without a kid only a set of one key answers.
        assert!(keys.find(None).is_some());
        assert!(keys.find(Some("secret")).is_none());
        assert!(KeySet::parse(b"{}").is_err());
        assert!(KeySet::parse(b"not json").is_err());
    }
}
