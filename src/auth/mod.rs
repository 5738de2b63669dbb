//! Accounts: sign-up, log-in, access/refresh tokens, log-out.
//!
//! Passwords are hashed with argon2id and never stored or logged in clear. A failed
//! log-in says only "invalid username or password" and takes as long whether or not
//! the user exists. Access tokens are stateless HMAC tokens bound to a device; a
//! device removed by `LogOut` makes its tokens useless.

mod credentials;
mod password;
mod throttle;
mod token;

pub use credentials::{InvalidPassword, InvalidUsername, Password, Username, device_name};
pub use password::{HashError, PasswordHasher};
pub use throttle::{Throttle, Throttled};
pub use token::{Claims, KeyError, TokenError, TokenSigner};

use crate::clock::unix_ms;
use crate::config::AuthConfig;
use crate::ids::{DeviceId, UserId};
use crate::protocol::{ErrorCode, ErrorKind};
use crate::store::{DeviceRecord, NewUser, Store, StoreError};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use token::{PresentedRefresh, RefreshSecret};

/// Why an account operation failed. Messages are safe to show to the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("username is already taken")]
    UsernameTaken,
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("access token rejected: {0}")]
    InvalidToken(TokenError),
    #[error("refresh token rejected")]
    InvalidRefreshToken,
    #[error("the device was logged out")]
    DeviceRevoked,
    #[error("no such user")]
    UnknownUser,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error(transparent)]
    Throttled(#[from] Throttled),
}

/// Tokens handed to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user: UserId,
    pub device: DeviceId,
    pub access_token: String,
    pub access_expires_at_ms: u64,
    pub refresh_token: String,
    pub refresh_expires_at_ms: u64,
}

/// An authenticated (user, device) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub device: DeviceId,
    pub username: String,
    /// When the access token that proved it expires (Unix ms).
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Accounts {
    store: Arc<dyn Store>,
    hasher: PasswordHasher,
    throttle: Throttle,
    signer: TokenSigner,
    access_ttl_ms: u64,
    refresh_ttl_ms: u64,
}

impl Accounts {
    pub fn new(
        config: &AuthConfig,
        store: Arc<dyn Store>,
        hasher: PasswordHasher,
        throttle: Throttle,
        signer: TokenSigner,
    ) -> Self {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            store,
            hasher,
            throttle,
            signer,
            access_ttl_ms: ms(config.access_token_ttl),
            refresh_ttl_ms: ms(config.refresh_token_ttl),
        }
    }

    /// Creates an account, for a client at `from` (its address counts against
    /// the sign-up limits).
    pub async fn sign_up(
        &self,
        username: Username,
        password: Password,
        from: Option<IpAddr>,
    ) -> Result<UserId, AuthError> {
        let _slot = self.throttle.before_sign_up(from, Instant::now())?;
        // Cheap check first so a taken name does not cost a hash.
        if self.store.user_by_name(username.as_str()).await?.is_some() {
            return Err(AuthError::UsernameTaken);
        }
        let password_hash = self.hasher.hash(password).await?;
        let user = self
            .store
            .create_user(NewUser {
                username: username.as_str().to_owned(),
                password_hash,
                created_at_ms: unix_ms(),
            })
            .await
            .map_err(|err| match err {
                StoreError::UsernameTaken => AuthError::UsernameTaken,
                other => AuthError::Store(other),
            })?;
        tracing::info!(user = %user.id, username = %user.username, "user signed up");
        Ok(user.id)
    }

    /// Logs a new device in with a password, for a client at `from`; failures
    /// count against the account and the address (see [`Throttle`]).
    pub async fn log_in(
        &self,
        username: Username,
        password: Password,
        device_name: String,
        from: Option<IpAddr>,
    ) -> Result<Grant, AuthError> {
        let account = username.as_str();
        let slot = self.throttle.before_log_in(account, from, Instant::now())?;
        let user = self.store.user_by_name(account).await?;
        let stored_hash = user.as_ref().map(|user| user.password_hash.clone());
        let verified = self.hasher.verify(password, stored_hash).await?;
        drop(slot);
        let user = match user {
            Some(user) if verified => user,
            _ => {
                self.throttle.failed(account, from, Instant::now());
                return Err(AuthError::InvalidCredentials);
            }
        };
        self.throttle.succeeded(account);
        let device = DeviceId::random();
        let now = unix_ms();
        let refresh = RefreshSecret::generate(user.id, device);
        let refresh_expires_at_ms = now.saturating_add(self.refresh_ttl_ms);
        self.store
            .put_device(DeviceRecord {
                user: user.id,
                id: device,
                name: device_name,
                refresh_hash: refresh.hash,
                refresh_expires_at_ms,
                created_at_ms: now,
            })
            .await?;
        tracing::info!(user = %user.id, device = %device, "device logged in");
        Ok(self.grant(user.id, device, refresh, refresh_expires_at_ms, now))
    }

    /// Checks an access token's signature and expiry only (no store access), for
    /// rejecting a bad token early, e.g. at a WebSocket upgrade.
    pub fn check_token(&self, access_token: &str) -> Result<(), AuthError> {
        self.signer
            .verify(access_token, unix_ms())
            .map(drop)
            .map_err(AuthError::InvalidToken)
    }

    /// Checks an access token and that its device still exists.
    pub async fn authenticate(&self, access_token: &str) -> Result<Identity, AuthError> {
        let claims = self
            .signer
            .verify(access_token, unix_ms())
            .map_err(AuthError::InvalidToken)?;
        let (_, user) = self
            .store
            .device_and_user(claims.user, claims.device)
            .await?
            .ok_or(AuthError::DeviceRevoked)?;
        Ok(Identity {
            user: claims.user,
            device: claims.device,
            username: user.username,
            expires_at_ms: claims.expires_at_ms,
        })
    }

    /// Trades a refresh token for new tokens and rotates the refresh secret.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Grant, AuthError> {
        let presented = PresentedRefresh::parse(refresh_token).map_err(|_| AuthError::InvalidRefreshToken)?;
        let now = unix_ms();
        let mut device = self
            .store
            .device(presented.user, presented.device)
            .await?
            .ok_or(AuthError::InvalidRefreshToken)?;
        if !presented.matches(&device.refresh_hash) || device.refresh_expires_at_ms <= now {
            return Err(AuthError::InvalidRefreshToken);
        }
        let refresh = RefreshSecret::generate(device.user, device.id);
        device.refresh_hash = refresh.hash;
        device.refresh_expires_at_ms = now.saturating_add(self.refresh_ttl_ms);
        let (user, id, expires) = (device.user, device.id, device.refresh_expires_at_ms);
        self.store.put_device(device).await?;
        Ok(self.grant(user, id, refresh, expires, now))
    }

    /// Revokes every token of the device.
    pub async fn log_out(&self, user: UserId, device: DeviceId) -> Result<(), AuthError> {
        self.store.delete_device(user, device).await?;
        tracing::info!(user = %user, device = %device, "device logged out");
        Ok(())
    }

    pub async fn user_by_name(&self, username: &Username) -> Result<(UserId, String), AuthError> {
        let user = self
            .store
            .user_by_name(username.as_str())
            .await?
            .ok_or(AuthError::UnknownUser)?;
        Ok((user.id, user.username))
    }

    fn grant(
        &self,
        user: UserId,
        device: DeviceId,
        refresh: RefreshSecret,
        refresh_expires_at_ms: u64,
        now: u64,
    ) -> Grant {
        let access_expires_at_ms = now.saturating_add(self.access_ttl_ms);
        Grant {
            user,
            device,
            access_token: self.signer.sign(Claims {
                user,
                device,
                expires_at_ms: access_expires_at_ms,
            }),
            access_expires_at_ms,
            refresh_token: refresh.token,
            refresh_expires_at_ms,
        }
    }
}

impl ErrorKind for AuthError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::UsernameTaken => ErrorCode::AlreadyExists,
            Self::InvalidCredentials | Self::InvalidToken(_) | Self::InvalidRefreshToken | Self::DeviceRevoked => {
                ErrorCode::Unauthenticated
            }
            Self::UnknownUser => ErrorCode::NotFound,
            Self::Hash(HashError::Busy) => ErrorCode::Unavailable,
            Self::Throttled(_) => ErrorCode::RateLimited,
            Self::Store(err) => err.code(),
            Self::Hash(_) => ErrorCode::Internal,
        }
    }
}
