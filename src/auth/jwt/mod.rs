//! Tokens of the app's own sign-in (JWT), for `auth.mode` "jwt" and "both".
//!
//! A token is HS256 under `auth.jwt.hs256_secret`, or signed by one of the keys
//! the app's auth server publishes at `auth.jwt.jwks_url` (RS*, PS*, ES256/384,
//! EdDSA), picked by the token's `kid`. The algorithm must fit the key: an HS256
//! token is checked against the shared secret only, never against a public key
//! (the classic "RS/HS confusion"), and `alg: none` is no algorithm at all.
//! `iss` and `aud` must be the configured ones; `exp` (required) and `nbf` are
//! checked against the clock passed in, with `auth.jwt.leeway`.
//!
//! The token's `sub` names the confab user `<auth.jwt.namespace>:<sub>`; the
//! device is the `auth.jwt.device_claim` claim, else what the client names.

mod keys;

pub use keys::{Jwks, KeySet};

use crate::config::JwtConfig;
use confab_protocol::{Username, device_label, display_name};
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use keys::PublicKey;
use std::sync::Arc;

/// Longer tokens are refused before any decoding work.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a JWT was refused. Messages are safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not a JWT.
    #[error("token is malformed")]
    Malformed,
    /// The algorithm is not accepted here (or does not fit the key).
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    /// No key has the token's kid.
    #[error("token signing key is unknown")]
    UnknownKey,
    /// Signature is invalid.
    #[error("token signature is invalid")]
    BadSignature,
    /// Token has expired.
    #[error("token has expired")]
    Expired,
    /// Token is not valid yet.
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// Wrong issuer.
    #[error("token issuer is not accepted")]
    Issuer,
    /// Wrong audience.
    #[error("token audience is not accepted")]
    Audience,
    /// A claim is missing or of the wrong type.
    #[error("token claim `{0}` is missing or invalid")]
    Claim(String),
    /// The app's keys could not be fetched yet.
    #[error("the app's signing keys are not available; retry later")]
    KeysUnavailable,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The confab user: `<namespace>:<sub>`.
    pub username: Username,
    /// The device the token names, if it names one.
    pub device: Option<String>,
    /// The user's display name, if the token has one.
    pub display_name: Option<String>,
    /// When the token expires (Unix ms).
    pub expires_at_ms: u64,
}

/// Checks the app's tokens; cheap to clone.
#[derive(Clone)]
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    jwks: Option<Jwks>,
    validation: Arc<Validation>,
    leeway_ms: u64,
    namespace: String,
    device_claim: String,
    display_name_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("hs256", &self.hs256.is_some())
            .field("jwks", &self.jwks)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `config`, with the keys of `jwks` (when a JWKS URL is set).
    pub fn new(config: &JwtConfig, jwks: Option<Jwks>) -> Self {
        let mut validation = Validation::default();
        // exp and nbf are checked against the clock passed in (see `claims`).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        Self {
            hs256: (!config.hs256_secret.is_empty()).then(|| DecodingKey::from_secret(config.hs256_secret.as_bytes())),
            jwks,
            validation: Arc::new(validation),
            leeway_ms: u64::try_from(config.leeway.as_millis()).unwrap_or(u64::MAX),
            namespace: config.namespace.clone(),
            device_claim: config.device_claim.clone(),
            display_name_claim: config.display_name_claim.clone(),
        }
    }

    /// Checks `token` at `now_ms`, fetching the app's keys again once if it names
    /// a key not known (a rotation).
    pub async fn verify(&self, token: &str, now_ms: u64) -> Result<Verified, JwtError> {
        let header = self.header(token)?;
        if header.alg == Algorithm::HS256 {
            let key = self.hs256.as_ref().ok_or(JwtError::Algorithm("HS256".into()))?;
            return self.claims(token, &header, key, now_ms);
        }
        let jwks = self
            .jwks
            .as_ref()
            .ok_or_else(|| JwtError::Algorithm(format!("{:?}", header.alg)))?;
        let keys = jwks.current();
        match self.with_key(&keys, token, &header, now_ms) {
            Err(JwtError::UnknownKey | JwtError::KeysUnavailable) => {
                let keys = jwks.refetched(&keys).await;
                self.with_key(&keys, token, &header, now_ms)
            }
            checked => checked,
        }
    }

    /// Checks `token` at `now_ms` with the keys at hand, without waiting: a
    /// token naming a key not known yet passes (its `Authenticate` decides), so a
    /// WebSocket upgrade never waits for a fetch.
    pub fn check(&self, token: &str, now_ms: u64) -> Result<(), JwtError> {
        let header = self.header(token)?;
        let checked = match (&self.jwks, header.alg) {
            (_, Algorithm::HS256) => {
                let key = self.hs256.as_ref().ok_or(JwtError::Algorithm("HS256".into()))?;
                self.claims(token, &header, key, now_ms)
            }
            (Some(jwks), _) => self.with_key(&jwks.current(), token, &header, now_ms),
            (None, alg) => Err(JwtError::Algorithm(format!("{alg:?}"))),
        };
        match checked {
            Ok(_) | Err(JwtError::UnknownKey | JwtError::KeysUnavailable) => Ok(()),
            Err(err) => Err(err),
        }
    }

    fn header(&self, token: &str) -> Result<Header, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed);
        }
        jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)
    }

    fn with_key(&self, keys: &KeySet, token: &str, header: &Header, now_ms: u64) -> Result<Verified, JwtError> {
        let Some(PublicKey { key, algorithms }) = keys.find(header.kid.as_deref()) else {
            return Err(if keys.fetched() {
                JwtError::UnknownKey
            } else {
                JwtError::KeysUnavailable
            });
        };
        if !algorithms.contains(&header.alg) {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        self.claims(token, header, key, now_ms)
    }

    /// Verifies the signature with `key` and reads the claims.
    fn claims(&self, token: &str, header: &Header, key: &DecodingKey, now_ms: u64) -> Result<Verified, JwtError> {
        let mut validation = Validation::clone(&self.validation);
        validation.algorithms = vec![header.alg];
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &validation)
            .map_err(|err| match err.into_kind() {
                JwtErrorKind::InvalidSignature => JwtError::BadSignature,
                JwtErrorKind::InvalidIssuer => JwtError::Issuer,
                JwtErrorKind::InvalidAudience => JwtError::Audience,
                JwtErrorKind::MissingRequiredClaim(claim) => JwtError::Claim(claim),
                JwtErrorKind::InvalidAlgorithm => JwtError::Algorithm(format!("{:?}", header.alg)),
                _ => JwtError::Malformed,
            })?;
        let claims = data.claims;
        let time_ms = |name: &str| -> Result<Option<u64>, JwtError> {
            match claims.get(name) {
                None => Ok(None),
                Some(value) => value
                    .as_f64()
                    .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
                    // Saturates: a date past u64 ms is "never".
                    .map(|seconds| Some((seconds * 1000.0) as u64))
                    .ok_or_else(|| JwtError::Claim(name.into())),
            }
        };
        let expires_at_ms = time_ms("exp")?.ok_or_else(|| JwtError::Claim("exp".into()))?;
        if expires_at_ms.saturating_add(self.leeway_ms) <= now_ms {
            return Err(JwtError::Expired);
        }
        if time_ms("nbf")?.is_some_and(|not_before| not_before > now_ms.saturating_add(self.leeway_ms)) {
            return Err(JwtError::NotYetValid);
        }
        let subject = claims
            .get("sub")
            .and_then(|sub| sub.as_str())
            .ok_or_else(|| JwtError::Claim("sub".into()))?;
        let username = Username::external(&self.namespace, subject).map_err(|_| JwtError::Claim("sub".into()))?;
        let device = match self.device_claim.as_str() {
            "" => None,
            name => match claims.get(name) {
                None => None,
                Some(value) => value
                    .as_str()
                    .map(device_label)
                    .and_then(Result::ok)
                    .ok_or_else(|| JwtError::Claim(name.into()))?,
            },
        };
        let display_name = match self.display_name_claim.as_str() {
            "" => None,
            name => match claims.get(name) {
                None => None,
                Some(value) => Some(
                    value
                        .as_str()
                        .map(display_name)
                        .ok_or_else(|| JwtError::Claim(name.into()))?,
                ),
            },
        };
        Ok(Verified {
            username,
            device,
            display_name,
            expires_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{EncodingKey, encode};
    use serde_json::json;

    const SECRET: &str = "a shared secret of at least 32 bytes";
    const NOW_MS: u64 = 1_800_000_000_000;
    const NOW: u64 = NOW_MS / 1000;

    fn config() -> JwtConfig {
        let mut config = crate::config::Config::defaults().unwrap().auth.jwt;
        config.hs256_secret = SECRET.into();
        config.issuer = "https://auth.example".into();
        config.audience = "chat".into();
        config.device_claim = "did".into();
        config
    }

    fn claims() -> serde_json::Value {
        json!({ "sub": "User-1", "iss": "https://auth.example", "aud": "chat", "exp": NOW + 60 })
    }

    fn hs(alg: Algorithm, claims: &serde_json::Value) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    fn verify(token: &str) -> Result<Verified, JwtError> {
        verify_with(&JwtVerifier::new(&config(), None), token)
    }

    fn verify_with(verifier: &JwtVerifier, token: &str) -> Result<Verified, JwtError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(verifier.verify(token, NOW_MS))
    }

    fn with(changes: serde_json::Value) -> String {
        let mut claims = claims();
        for (key, value) in changes.as_object().unwrap() {
            match value {
                serde_json::Value::Null => claims.as_object_mut().unwrap().remove(key),
                value => claims.as_object_mut().unwrap().insert(key.clone(), value.clone()),
            };
        }
        hs(Algorithm::HS256, &claims)
    }

    #[test]
    fn a_valid_token_names_a_namespaced_user_and_its_device() {
        let verified = verify(&with(json!({ "did": "phone", "name": " Ada Lovelace " }))).unwrap();
        assert_eq!(verified.username.as_str(), "app:User-1");
        assert_eq!(verified.display_name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(verified.device.as_deref(), Some("phone"));
        assert_eq!(verified.expires_at_ms, (NOW + 60) * 1000);
        assert_eq!(verify(&hs(Algorithm::HS256, &claims())).unwrap().device, None);
        // An audience list with ours in it.
        assert!(verify(&with(json!({ "aud": ["other", "chat"] }))).is_ok());
    }

    #[test]
    fn time_claims_are_checked_against_the_clock_passed_in_with_leeway() {
        // Leeway 30 s by default.
        assert!(verify(&with(json!({ "exp": NOW - 10 }))).is_ok());
        assert_eq!(verify(&with(json!({ "exp": NOW - 31 }))), Err(JwtError::Expired));
        assert_eq!(verify(&with(json!({ "nbf": NOW + 31 }))), Err(JwtError::NotYetValid));
        assert!(verify(&with(json!({ "nbf": NOW + 10 }))).is_ok());
        assert_eq!(
            verify(&with(json!({ "exp": null }))),
            Err(JwtError::Claim("exp".into()))
        );
        assert!(verify(&with(json!({ "exp": "soon" }))).is_err());
    }

    #[test]
    fn wrong_issuer_audience_or_subject_is_refused() {
        assert_eq!(verify(&with(json!({ "iss": "https://evil" }))), Err(JwtError::Issuer));
        assert_eq!(verify(&with(json!({ "aud": "other" }))), Err(JwtError::Audience));
        assert_eq!(
            verify(&with(json!({ "aud": null }))),
            Err(JwtError::Claim("aud".into()))
        );
        assert_eq!(
            verify(&with(json!({ "iss": null }))),
            Err(JwtError::Claim("iss".into()))
        );
        assert_eq!(
            verify(&with(json!({ "sub": null }))),
            Err(JwtError::Claim("sub".into()))
        );
        assert_eq!(
            verify(&with(json!({ "sub": "has space" }))),
            Err(JwtError::Claim("sub".into()))
        );
        assert_eq!(verify(&with(json!({ "sub": 42 }))), Err(JwtError::Claim("sub".into())));
        assert_eq!(verify(&with(json!({ "did": 7 }))), Err(JwtError::Claim("did".into())));
        assert_eq!(
            verify(&with(json!({ "did": "x".repeat(65) }))),
            Err(JwtError::Claim("did".into()))
        );
    }

    #[test]
    fn forged_tokens_are_refused() {
        let token = hs(Algorithm::HS256, &claims());
        // Another payload under the original signature.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = B64.encode(
            with(json!({ "sub": "admin" }))
                .split('.')
                .nth(1)
                .map(|p| B64.decode(p).unwrap())
                .unwrap(),
        );
        assert_eq!(verify(&parts.join(".")), Err(JwtError::BadSignature));
        // Signed with another secret.
        let other = encode(
            &Header::default(),
            &claims(),
            &EncodingKey::from_secret(b"another secret of 32 bytes......"),
        )
        .unwrap();
        assert_eq!(verify(&other), Err(JwtError::BadSignature));
        // alg: none, unsigned.
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            B64.encode(claims().to_string())
        );
        assert_eq!(verify(&none), Err(JwtError::Malformed));
        // HS384/HS512 are not accepted, nor HS256 without a secret.
        assert_eq!(
            verify(&hs(Algorithm::HS512, &claims())),
            Err(JwtError::Algorithm("HS512".into()))
        );
        let mut no_secret = config();
        no_secret.hs256_secret.clear();
        let verifier = JwtVerifier::new(&no_secret, None);
        assert_eq!(verify_with(&verifier, &token), Err(JwtError::Algorithm("HS256".into())));
        for garbage in ["", "a.b.c", "not a token", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
            assert_eq!(verify(garbage), Err(JwtError::Malformed), "{garbage}");
        }
    }

    #[test]
    fn check_refuses_what_verify_refuses_without_waiting() {
        let verifier = JwtVerifier::new(&config(), None);
        assert!(verifier.check(&hs(Algorithm::HS256, &claims()), NOW_MS).is_ok());
        assert_eq!(
            verifier.check(&with(json!({ "exp": NOW - 60 })), NOW_MS),
            Err(JwtError::Expired)
        );
        assert_eq!(verifier.check("garbage", NOW_MS), Err(JwtError::Malformed));
    }
}
