//! Access and refresh tokens.
//!
//! An access token is `v1.<payload>.<mac>` (base64url, no padding): the payload names
//! the user, the device and the expiry; the MAC is HMAC-SHA256 under the node's
//! signing key. It is verified without the store; the caller still checks that the
//! device exists, which is how `LogOut` revokes it.
//!
//! A refresh token is `r1.<user, device, 32 random bytes>`. Only the SHA-256 of the
//! random part is stored, so a leaked database does not leak usable refresh tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use confab_protocol::ids::{DeviceId, UserId};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use subtle::ConstantTimeEq as _;

pub(super) const ACCESS_PREFIX: &str = "v1.";
const REFRESH_PREFIX: &str = "r1.";
const PAYLOAD_BYTES: usize = 24;
const SECRET_BYTES: usize = 32;
pub(super) const MIN_KEY_BYTES: usize = 32;
/// Tokens are bounded so garbage is rejected before any decoding work.
const MAX_TOKEN_CHARS: usize = 256;

/// Who an access token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// The user.
    pub user: UserId,
    /// Its device.
    pub device: DeviceId,
    /// When the token expires (Unix ms).
    pub expires_at_ms: u64,
}

/// Why an access token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Token is malformed.
    #[error("token is malformed")]
    Malformed,
    /// Token signature is invalid.
    #[error("token signature is invalid")]
    BadSignature,
    /// Token has expired.
    #[error("token has expired")]
    Expired,
}

/// Why the token signing key could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Auth.token_key is not valid base64.
    #[error("auth.token_key is not valid base64: {0}")]
    Base64(String),
    /// Auth.token_key must be at least … bytes, got ….
    #[error("auth.token_key must be at least {MIN_KEY_BYTES} bytes, got {0}")]
    TooShort(usize),
    /// Token key file ….
    #[error("token key file {path}: {source}")]
    File {
        /// The key file.
        path: String,
        /// Why it could not be read or written.
        source: std::io::Error,
    },
}

/// Signs and verifies access tokens.
#[derive(Clone)]
pub struct TokenSigner {
    /// HMAC state keyed once; cloned per token.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(<key redacted>)")
    }
}

impl TokenSigner {
    /// A signer with `key` (at least 32 bytes).
    pub fn new(key: Vec<u8>) -> Result<Self, KeyError> {
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(key.len()));
        }
        let keyed = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| KeyError::TooShort(key.len()))?;
        Ok(Self { keyed })
    }

    /// The configured base64 key, or else the one persisted in `key_file`, created
    /// (mode 0600) with a random key on first start.
    pub fn from_config_or_file(configured: &str, key_file: &Path) -> Result<Self, KeyError> {
        if !configured.is_empty() {
            let key = base64::engine::general_purpose::STANDARD
                .decode(configured.trim())
                .map_err(|err| KeyError::Base64(err.to_string()))?;
            return Self::new(key);
        }
        let file_error = |source| KeyError::File {
            path: key_file.display().to_string(),
            source,
        };
        match std::fs::read_to_string(key_file) {
            Ok(text) => {
                crate::files::warn_if_readable(key_file, "the token signing key");
                let key = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|err| KeyError::Base64(format!("{}: {err}", key_file.display())))?;
                Self::new(key)
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                let encoded = base64::engine::general_purpose::STANDARD.encode(key);
                crate::files::write_private(key_file, encoded.as_bytes()).map_err(file_error)?;
                tracing::info!(path = %key_file.display(), "generated a new token signing key");
                Self::new(key.to_vec())
            }
            Err(err) => Err(file_error(err)),
        }
    }

    /// An access token for `claims`.
    pub fn sign(&self, claims: Claims) -> String {
        let mut payload = [0u8; PAYLOAD_BYTES];
        payload[..8].copy_from_slice(&claims.user.get().to_be_bytes());
        payload[8..16].copy_from_slice(&claims.device.get().to_be_bytes());
        payload[16..].copy_from_slice(&claims.expires_at_ms.to_be_bytes());
        let mac = self.mac(&payload);
        format!("{ACCESS_PREFIX}{}.{}", B64.encode(payload), B64.encode(mac))
    }

    /// The claims of `token` if its signature holds and it has not expired at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Malformed);
        }
        let rest = token.strip_prefix(ACCESS_PREFIX).ok_or(TokenError::Malformed)?;
        let (payload, mac) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let payload: [u8; PAYLOAD_BYTES] = decode_exact(payload)?;
        let mac: [u8; 32] = decode_exact(mac)?;
        if !bool::from(self.mac(&payload).ct_eq(&mac)) {
            return Err(TokenError::BadSignature);
        }
        let field = |range: std::ops::Range<usize>| {
            payload[range]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| TokenError::Malformed)
        };
        let claims = Claims {
            user: UserId::new(field(0..8)?).ok_or(TokenError::Malformed)?,
            device: DeviceId::new(field(8..16)?).ok_or(TokenError::Malformed)?,
            expires_at_ms: field(16..24)?,
        };
        if claims.expires_at_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// A secret for another use (`label` names it), derived from the signing key,
    /// so one configured key is all a node needs.
    pub fn derive_secret(&self, label: &str) -> [u8; 32] {
        self.mac(format!("confab derived secret: {label}").as_bytes())
    }

    fn mac(&self, payload: &[u8]) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }
}

/// A freshly minted refresh token and what the store keeps of it.
#[derive(Debug)]
pub(super) struct RefreshSecret {
    pub token: String,
    pub hash: [u8; 32],
}

impl RefreshSecret {
    pub(super) fn generate(user: UserId, device: DeviceId) -> Self {
        let secret: [u8; SECRET_BYTES] = rand::random();
        let mut raw = Vec::with_capacity(16 + SECRET_BYTES);
        raw.extend_from_slice(&user.get().to_be_bytes());
        raw.extend_from_slice(&device.get().to_be_bytes());
        raw.extend_from_slice(&secret);
        Self {
            token: format!("{REFRESH_PREFIX}{}", B64.encode(raw)),
            hash: Sha256::digest(secret).into(),
        }
    }
}

/// A refresh token presented by a client, not yet checked against the store.
#[derive(Debug)]
pub(super) struct PresentedRefresh {
    pub user: UserId,
    pub device: DeviceId,
    secret_hash: [u8; 32],
}

impl PresentedRefresh {
    pub(super) fn parse(token: &str) -> Result<Self, TokenError> {
        if token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Malformed);
        }
        let raw: [u8; 16 + SECRET_BYTES] =
            decode_exact(token.strip_prefix(REFRESH_PREFIX).ok_or(TokenError::Malformed)?)?;
        let id = |range: std::ops::Range<usize>| raw[range].try_into().ok().map(u64::from_be_bytes);
        Ok(Self {
            user: id(0..8).and_then(UserId::new).ok_or(TokenError::Malformed)?,
            device: id(8..16).and_then(DeviceId::new).ok_or(TokenError::Malformed)?,
            secret_hash: Sha256::digest(&raw[16..]).into(),
        })
    }

    /// Constant-time comparison with the stored hash.
    pub(super) fn matches(&self, stored_hash: &[u8; 32]) -> bool {
        self.secret_hash.ct_eq(stored_hash).into()
    }
}

fn decode_exact<const N: usize>(text: &str) -> Result<[u8; N], TokenError> {
    B64.decode(text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> TokenSigner {
        TokenSigner::new(vec![7; 32]).unwrap()
    }

    fn claims(expires_at_ms: u64) -> Claims {
        Claims {
            user: UserId::new(11).unwrap(),
            device: DeviceId::new(22).unwrap(),
            expires_at_ms,
        }
    }

    #[test]
    fn signed_tokens_verify_until_expiry() {
        let token = signer().sign(claims(1_000));
        assert_eq!(signer().verify(&token, 999), Ok(claims(1_000)));
        assert_eq!(signer().verify(&token, 1_000), Err(TokenError::Expired));
    }

    #[test]
    fn tampered_or_foreign_tokens_fail() {
        let token = signer().sign(claims(1_000));
        let other = TokenSigner::new(vec![8; 32]).unwrap();
        assert_eq!(other.verify(&token, 0), Err(TokenError::BadSignature));
        // A longer expiry with the MAC of the original payload.
        let longer = signer().sign(claims(u64::MAX));
        let forged = format!(
            "v1.{}.{}",
            longer.split('.').nth(1).unwrap(),
            token.split('.').nth(2).unwrap()
        );
        assert_eq!(signer().verify(&forged, 0), Err(TokenError::BadSignature));
        let mut swapped = token.clone();
        swapped.replace_range(3..5, "AB");
        assert!(signer().verify(&swapped, 0).is_err());
        for garbage in ["", "v1.", "v1.a.b", "nonsense", &"v1.".repeat(200)] {
            assert!(signer().verify(garbage, 0).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(matches!(TokenSigner::new(vec![1; 16]), Err(KeyError::TooShort(16))));
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let first = TokenSigner::from_config_or_file("", &path).unwrap();
        let second = TokenSigner::from_config_or_file("", &path).unwrap();
        let token = first.sign(claims(10));
        assert_eq!(second.verify(&token, 0), Ok(claims(10)));
    }

    #[test]
    fn refresh_tokens_match_only_their_hash() {
        let user = UserId::new(1).unwrap();
        let device = DeviceId::new(2).unwrap();
        let secret = RefreshSecret::generate(user, device);
        let presented = PresentedRefresh::parse(&secret.token).unwrap();
        assert_eq!((presented.user, presented.device), (user, device));
        assert!(presented.matches(&secret.hash));
        assert!(!presented.matches(&RefreshSecret::generate(user, device).hash));
        assert!(PresentedRefresh::parse("r1.short").is_err());
    }
}
