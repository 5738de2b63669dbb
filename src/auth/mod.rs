//! Accounts: sign-up, log-in, access/refresh tokens, log-out, and the app's own
//! tokens (JWT, [`jwt`]).
//!
//! Passwords are hashed with argon2id and never stored or logged in clear. A failed
//! log-in says only "invalid username or password" and takes as long whether or not
//! the user exists. Access tokens are stateless HMAC tokens bound to a device; a
//! device removed by `LogOut` makes its tokens useless.
//!
//! With `auth.mode` "jwt" or "both", a JWT of the app's sign-in authenticates too:
//! its user (`<namespace>:<sub>`, no password) and device are created on first
//! sight, within `auth.max_devices_per_user`. With "jwt", the password requests
//! (SignUp, LogIn, RefreshToken, ChangePassword) and confab's own tokens are off.

pub mod jwt;
mod password;
mod throttle;
mod token;

pub use jwt::{JwtError, JwtVerifier};
pub use password::{HashError, PasswordHasher};
pub use throttle::{Throttle, Throttled};
pub use token::{Claims, KeyError, TokenError, TokenSigner};

use crate::clock::unix_ms;
use crate::config::{AuthConfig, AuthMode};
use crate::store::{DeviceRecord, NewUser, Rotation, Store, StoreError, UserRecord};
use confab_protocol::ids::{DeviceId, UserId};
use confab_protocol::{ErrorCode, ErrorKind, Identity, Password, Username};
use sha2::{Digest as _, Sha256};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use token::{ACCESS_PREFIX, PresentedRefresh, RefreshSecret};

/// The device of a JWT that names none, when the client names none either.
const DEFAULT_DEVICE: &str = "default";

/// Why an account operation failed. Messages are safe to show to the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Username is already taken.
    #[error("username is already taken")]
    UsernameTaken,
    /// Invalid username or password.
    #[error("invalid username or password")]
    InvalidCredentials,
    /// Access token rejected.
    #[error("access token rejected: {0}")]
    InvalidToken(TokenError),
    /// The app's token (JWT) rejected.
    #[error("access token rejected: {0}")]
    InvalidJwt(JwtError),
    /// A password for a user of the app's sign-in, or none for a password account.
    #[error("a password account needs a password; a user of the app's sign-in (namespace:subject) has none")]
    PasswordMismatch,
    /// Passwords and confab's own tokens are off (`auth.mode = "jwt"`).
    #[error("password accounts are off on this server: sign in with the app's token")]
    PasswordsOff,
    /// Refresh token rejected.
    #[error("refresh token rejected")]
    InvalidRefreshToken,
    /// The device was logged out.
    #[error("the device was logged out")]
    DeviceRevoked,
    /// No such user.
    #[error("no such user")]
    UnknownUser,
    /// No such device.
    #[error("no such device")]
    UnknownDevice,
    /// A replaced refresh token was used: the device was logged out; log in again.
    #[error("a replaced refresh token was used: the device was logged out; log in again")]
    RefreshReused {
        /// The device's user.
        user: UserId,
        /// The device, now logged out.
        device: DeviceId,
    },
    /// Too many devices: log one out first (ListDevices, RevokeDevice).
    #[error("too many devices ({0}): log one out first (ListDevices, RevokeDevice)")]
    TooManyDevices(usize),
    /// A `StoreError`, passed on.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A `HashError`, passed on.
    #[error(transparent)]
    Hash(#[from] HashError),
    /// A `Throttled`, passed on.
    #[error(transparent)]
    Throttled(#[from] Throttled),
}

/// Tokens handed to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user.
    pub user: UserId,
    /// The new (or refreshed) device.
    pub device: DeviceId,
    /// Proves the device on `Authenticate`.
    pub access_token: String,
    /// When the access token expires (Unix ms).
    pub access_expires_at_ms: u64,
    /// Trades for new tokens on `RefreshToken`; single use.
    pub refresh_token: String,
    /// When the refresh token expires (Unix ms).
    pub refresh_expires_at_ms: u64,
}

/// The accounts of a node: sign-up, log-in, tokens, devices; cheap to clone.
#[derive(Debug, Clone)]
pub struct Accounts {
    mode: AuthMode,
    jwt: Option<JwtVerifier>,
    store: Arc<dyn Store>,
    hasher: PasswordHasher,
    throttle: Throttle,
    signer: TokenSigner,
    access_ttl_ms: u64,
    refresh_ttl_ms: u64,
    session_lifetime_ms: u64,
    max_devices: usize,
}

impl Accounts {
    /// Accounts over `store`, hashing with `hasher`, throttled by `throttle`,
    /// signing with `signer`, taking the app's tokens through `jwt` (when
    /// `auth.mode` accepts them).
    pub fn new(
        config: &AuthConfig,
        store: Arc<dyn Store>,
        hasher: PasswordHasher,
        throttle: Throttle,
        signer: TokenSigner,
        jwt: Option<JwtVerifier>,
    ) -> Self {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            mode: config.mode,
            jwt: jwt.filter(|_| config.mode.jwt()),
            store,
            hasher,
            throttle,
            signer,
            access_ttl_ms: ms(config.access_token_ttl),
            refresh_ttl_ms: ms(config.refresh_token_ttl),
            session_lifetime_ms: ms(config.session_lifetime),
            max_devices: config.max_devices_per_user,
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
        self.passwords_on()?;
        let _slot = self.throttle.before_sign_up(from, Instant::now())?;
        // Cheap check first so a taken name does not cost a hash.
        if self.store.user_by_name(username.as_str()).await?.is_some() {
            return Err(AuthError::UsernameTaken);
        }
        let password_hash = self.hasher.hash(password).await?;
        let user = self
            .insert_user(NewUser {
                username: username.as_str().to_owned(),
                password_hash,
                created_at_ms: unix_ms(),
                display_name: String::new(),
            })
            .await?;
        tracing::info!(user = %user.id, username = %user.username, "user signed up");
        Ok(user.id)
    }

    /// Logs a new device in with a password, for a client at `from`; failures
    /// count against the account and the address (see [`Throttle`]). Devices
    /// whose refresh tokens expired are cleaned up first; at
    /// `auth.max_devices_per_user` live devices it is refused.
    pub async fn log_in(
        &self,
        username: Username,
        password: Password,
        device_name: String,
        from: Option<IpAddr>,
    ) -> Result<Grant, AuthError> {
        self.passwords_on()?;
        let user = self.verify_password(username.as_str(), password, from).await?;
        self.new_device(user.id, device_name).await
    }

    /// Logs a new device of `user` in without a password, for the app's
    /// backend (the server API). Passwords (confab's tokens) must be on.
    pub async fn issue_device(&self, user: UserId, device_name: String) -> Result<Grant, AuthError> {
        self.passwords_on()?;
        if self.store.user_by_id(user).await?.is_none() {
            return Err(AuthError::UnknownUser);
        }
        self.new_device(user, device_name).await
    }

    /// A new device of `user` with fresh tokens, within the device limit.
    async fn new_device(&self, user: UserId, device_name: String) -> Result<Grant, AuthError> {
        let now = unix_ms();
        self.make_room_for_a_device(user, now).await?;
        let device = DeviceId::random();
        let refresh = RefreshSecret::generate(user, device);
        let refresh_expires_at_ms = now.saturating_add(self.refresh_ttl_ms.min(self.session_lifetime_ms));
        self.store
            .put_device(DeviceRecord {
                user,
                id: device,
                name: device_name,
                refresh_hash: refresh.hash,
                previous_refresh_hash: [0; 32],
                refresh_expires_at_ms,
                created_at_ms: now,
                refreshed_at_ms: now,
            })
            .await?;
        tracing::info!(user = %user, device = %device, "device logged in");
        Ok(self.grant(user, device, refresh, refresh_expires_at_ms, now))
    }

    /// Stores a new user; a taken name is [`AuthError::UsernameTaken`].
    async fn insert_user(&self, user: NewUser) -> Result<UserRecord, AuthError> {
        self.store.create_user(user).await.map_err(|err| match err {
            StoreError::UsernameTaken => AuthError::UsernameTaken,
            other => AuthError::Store(other),
        })
    }

    /// Removes the user's devices whose refresh token (or last JWT) expired, and
    /// refuses a new device at `auth.max_devices_per_user` live ones.
    async fn make_room_for_a_device(&self, user: UserId, now: u64) -> Result<(), AuthError> {
        let mut live = 0;
        for device in self.store.devices(user).await? {
            if device.refresh_expires_at_ms <= now {
                self.store.delete_device(user, device.id).await?;
            } else {
                live += 1;
            }
        }
        if live >= self.max_devices {
            return Err(AuthError::TooManyDevices(self.max_devices));
        }
        Ok(())
    }

    /// Refuses when passwords and confab's own tokens are off.
    fn passwords_on(&self) -> Result<(), AuthError> {
        match self.mode.local() {
            true => Ok(()),
            false => Err(AuthError::PasswordsOff),
        }
    }

    /// The user named `account`, if `password` is its password; throttled like a
    /// log-in (see [`Throttle`]).
    async fn verify_password(
        &self,
        account: &str,
        password: Password,
        from: Option<IpAddr>,
    ) -> Result<UserRecord, AuthError> {
        let slot = self.throttle.before_log_in(account, from, Instant::now())?;
        let user = self.store.user_by_name(account).await?;
        // A user of the app's sign-in has no password: checked against the decoy.
        let stored_hash = user
            .as_ref()
            .map(|user| user.password_hash.clone())
            .filter(|hash| !hash.is_empty());
        let verified = self.hasher.verify(password, stored_hash).await?;
        drop(slot);
        match user {
            Some(user) if verified => {
                self.throttle.succeeded(account);
                Ok(user)
            }
            _ => {
                self.throttle.failed(account, from, Instant::now());
                Err(AuthError::InvalidCredentials)
            }
        }
    }

    /// Checks an access token's signature and expiry only (no store access, no
    /// wait), for rejecting a bad token early, e.g. at a WebSocket upgrade.
    pub fn check_token(&self, access_token: &str) -> Result<(), AuthError> {
        match self.jwt_of(access_token)? {
            Some(jwt) => jwt.check(access_token, unix_ms()).map_err(AuthError::InvalidJwt),
            None => self
                .signer
                .verify(access_token, unix_ms())
                .map(drop)
                .map_err(AuthError::InvalidToken),
        }
    }

    /// The verifier of `access_token` when it is the app's token (JWT); an error
    /// when it is confab's own and those are off.
    fn jwt_of(&self, access_token: &str) -> Result<Option<&JwtVerifier>, AuthError> {
        match &self.jwt {
            Some(jwt) if !access_token.starts_with(ACCESS_PREFIX) => Ok(Some(jwt)),
            _ => self.passwords_on().map(|()| None),
        }
    }

    /// Checks an access token and that its device still exists; for the app's
    /// token (JWT), creates its user and device on first sight (`device` names
    /// the device when the token does not).
    pub async fn authenticate(&self, access_token: &str, device: Option<&str>) -> Result<Identity, AuthError> {
        if let Some(jwt) = self.jwt_of(access_token)? {
            return self.authenticate_jwt(jwt, access_token, device).await;
        }
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
            display_name: user.display_name,
            expires_at_ms: claims.expires_at_ms,
        })
    }

    async fn authenticate_jwt(
        &self,
        jwt: &JwtVerifier,
        token: &str,
        device: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let now = unix_ms();
        let verified = jwt.verify(token, now).await.map_err(AuthError::InvalidJwt)?;
        let user = self
            .external_user(&verified.username, verified.display_name, now)
            .await?;
        let label = verified.device.as_deref().or(device).unwrap_or(DEFAULT_DEVICE);
        let device = self
            .external_device(user.id, label, verified.expires_at_ms, now)
            .await?;
        Ok(Identity {
            user: user.id,
            device,
            username: user.username,
            display_name: user.display_name,
            expires_at_ms: verified.expires_at_ms,
        })
    }

    /// The user of the app's sign-in named `username`, created on first sight
    /// (without a password; two first sights at once make one user); a token
    /// with a display name that differs from the stored one replaces it.
    async fn external_user(
        &self,
        username: &Username,
        display_name: Option<String>,
        now: u64,
    ) -> Result<UserRecord, AuthError> {
        if let Some(mut user) = self.store.user_by_name(username.as_str()).await? {
            if let Some(display_name) = display_name.filter(|name| *name != user.display_name) {
                self.store.set_display_name(user.id, display_name.clone()).await?;
                user.display_name = display_name;
            }
            return Ok(user);
        }
        let created = self
            .store
            .create_user(NewUser {
                username: username.as_str().to_owned(),
                password_hash: String::new(),
                created_at_ms: now,
                display_name: display_name.unwrap_or_default(),
            })
            .await;
        match created {
            Ok(user) => {
                tracing::info!(user = %user.id, username = %user.username, "user of the app's sign-in created");
                Ok(user)
            }
            Err(StoreError::UsernameTaken) => self
                .store
                .user_by_name(username.as_str())
                .await?
                .ok_or(AuthError::UnknownUser),
            Err(err) => Err(err.into()),
        }
    }

    /// The user's device named `label` by the app's sign-in, created on first
    /// sight (within the device limit). Its expiry follows the latest token, so
    /// a device whose tokens all expired makes room for a new one; the record is
    /// written only when a token with a later expiry comes, not per connect.
    async fn external_device(
        &self,
        user: UserId,
        label: &str,
        expires_at_ms: u64,
        now: u64,
    ) -> Result<DeviceId, AuthError> {
        let id = external_device_id(user, label);
        match self.store.device(user, id).await? {
            Some(device) if device.refresh_expires_at_ms >= expires_at_ms => return Ok(id),
            Some(device) => {
                self.store
                    .put_device(DeviceRecord {
                        refresh_expires_at_ms: expires_at_ms,
                        refreshed_at_ms: now,
                        ..device
                    })
                    .await?;
                return Ok(id);
            }
            None => {}
        }
        self.make_room_for_a_device(user, now).await?;
        self.store
            .put_device(DeviceRecord {
                user,
                id,
                name: label.to_owned(),
                // No refresh token matches: the app's sign-in refreshes its own.
                refresh_hash: [0; 32],
                previous_refresh_hash: [0; 32],
                refresh_expires_at_ms: expires_at_ms,
                created_at_ms: now,
                refreshed_at_ms: now,
            })
            .await?;
        tracing::info!(user = %user, device = %id, "device of the app's sign-in created");
        Ok(id)
    }

    /// Trades a refresh token for new tokens and rotates the refresh secret, as
    /// a compare-and-set: of two refreshes with one token one wins, and a device
    /// logged out meanwhile stays out. Presenting the token the last rotation
    /// replaced means it was copied (the thief or the owner is now using an old
    /// one): the device is logged out ([`AuthError::RefreshReused`]). A device
    /// cannot refresh past `auth.session_lifetime` after it logged in.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Grant, AuthError> {
        self.passwords_on()?;
        let presented = PresentedRefresh::parse(refresh_token).map_err(|_| AuthError::InvalidRefreshToken)?;
        let now = unix_ms();
        let device = self
            .store
            .device(presented.user, presented.device)
            .await?
            .ok_or(AuthError::InvalidRefreshToken)?;
        if device.previous_refresh_hash != [0; 32] && presented.matches(&device.previous_refresh_hash) {
            self.store.delete_device(device.user, device.id).await?;
            tracing::warn!(user = %device.user, device = %device.id, "a replaced refresh token was presented: device logged out");
            return Err(AuthError::RefreshReused {
                user: device.user,
                device: device.id,
            });
        }
        let session_ends = device.created_at_ms.saturating_add(self.session_lifetime_ms);
        if !presented.matches(&device.refresh_hash) || device.refresh_expires_at_ms <= now || session_ends <= now {
            return Err(AuthError::InvalidRefreshToken);
        }
        let refresh = RefreshSecret::generate(device.user, device.id);
        let refresh_expires_at_ms = now.saturating_add(self.refresh_ttl_ms).min(session_ends);
        let rotated = self
            .store
            .rotate_refresh(Rotation {
                user: device.user,
                device: device.id,
                expected: device.refresh_hash,
                refresh_hash: refresh.hash,
                refresh_expires_at_ms,
                refreshed_at_ms: now,
            })
            .await?;
        if !rotated {
            return Err(AuthError::InvalidRefreshToken);
        }
        Ok(self.grant(device.user, device.id, refresh, refresh_expires_at_ms, now))
    }

    /// Creates a user for the app's backend (the server API): a password
    /// account (`password` given, passwords on) or, for a `namespace:subject`
    /// name, a user of the app's sign-in without one. Not throttled: the API
    /// is trusted.
    pub async fn create_user(
        &self,
        username: &Username,
        password: Option<Password>,
        display_name: String,
    ) -> Result<UserId, AuthError> {
        let password_hash = match password {
            Some(password) if !username.is_external() => {
                self.passwords_on()?;
                self.hasher.hash(password).await?
            }
            None if username.is_external() => String::new(),
            _ => return Err(AuthError::PasswordMismatch),
        };
        let user = self
            .insert_user(NewUser {
                username: username.as_str().to_owned(),
                password_hash,
                created_at_ms: unix_ms(),
                display_name,
            })
            .await?;
        tracing::info!(user = %user.id, username = %user.username, "user created through the API");
        Ok(user.id)
    }

    /// Changes a user for the app's backend (the server API): its display name,
    /// and a password account's password, which logs every device out (they
    /// are returned).
    pub async fn update_user(
        &self,
        user: UserId,
        display_name: Option<String>,
        password: Option<Password>,
    ) -> Result<Vec<DeviceId>, AuthError> {
        let record = self.store.user_by_id(user).await?.ok_or(AuthError::UnknownUser)?;
        if let Some(display_name) = display_name {
            self.store.set_display_name(user, display_name).await?;
        }
        let Some(password) = password else {
            return Ok(Vec::new());
        };
        self.passwords_on()?;
        if record.password_hash.is_empty() {
            return Err(AuthError::PasswordMismatch);
        }
        let password_hash = self.hasher.hash(password).await?;
        self.store.set_password(user, password_hash).await?;
        self.revoke_all_devices(user).await
    }

    /// Deletes a user for the app's backend (the server API): logs every
    /// device out (they are returned), removes the user and frees its name.
    pub async fn delete_user(&self, user: UserId) -> Result<Vec<DeviceId>, AuthError> {
        let revoked = self.revoke_all_devices(user).await?;
        if !self.store.delete_user(user).await? {
            return Err(AuthError::UnknownUser);
        }
        tracing::info!(user = %user, "user deleted through the API");
        Ok(revoked)
    }

    /// Logs every device of `user` out; returns them.
    pub async fn revoke_all_devices(&self, user: UserId) -> Result<Vec<DeviceId>, AuthError> {
        let mut revoked = Vec::new();
        for device in self.store.devices(user).await? {
            if self.store.delete_device(user, device.id).await? {
                revoked.push(device.id);
            }
        }
        tracing::info!(user = %user, devices = revoked.len(), "devices logged out through the API");
        Ok(revoked)
    }

    /// The user's devices.
    pub async fn devices(&self, user: UserId) -> Result<Vec<DeviceRecord>, AuthError> {
        Ok(self.store.devices(user).await?)
    }

    /// Logs one of the user's devices out.
    pub async fn revoke_device(&self, user: UserId, device: DeviceId) -> Result<(), AuthError> {
        if !self.store.delete_device(user, device).await? {
            return Err(AuthError::UnknownDevice);
        }
        tracing::info!(user = %user, device = %device, "device logged out by another");
        Ok(())
    }

    /// Sets a new password, given the current one, and logs every device but
    /// `keep` out; returns the devices logged out.
    pub async fn change_password(
        &self,
        identity: &Identity,
        current: Password,
        new: Password,
        from: Option<IpAddr>,
    ) -> Result<Vec<DeviceId>, AuthError> {
        self.passwords_on()?;
        let user = self.verify_password(&identity.username, current, from).await?;
        if user.id != identity.user {
            return Err(AuthError::InvalidCredentials);
        }
        let password_hash = self.hasher.hash(new).await?;
        self.store.set_password(user.id, password_hash).await?;
        let mut revoked = Vec::new();
        for device in self.store.devices(user.id).await? {
            if device.id != identity.device && self.store.delete_device(user.id, device.id).await? {
                revoked.push(device.id);
            }
        }
        tracing::info!(user = %user.id, devices_logged_out = revoked.len(), "password changed");
        Ok(revoked)
    }

    /// Revokes every token of the device.
    pub async fn log_out(&self, user: UserId, device: DeviceId) -> Result<(), AuthError> {
        self.store.delete_device(user, device).await?;
        tracing::info!(user = %user, device = %device, "device logged out");
        Ok(())
    }

    /// A user, by name.
    pub async fn user_by_name(&self, username: &Username) -> Result<UserRecord, AuthError> {
        self.store
            .user_by_name(username.as_str())
            .await?
            .ok_or(AuthError::UnknownUser)
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

/// The id of the user's device `label` of the app's sign-in (or of the server
/// API, "api"): the same label is the same device on every connect and every node.
pub fn external_device_id(user: UserId, label: &str) -> DeviceId {
    let digest = Sha256::new()
        .chain_update(b"confab device of the app's sign-in\0")
        .chain_update(user.get().to_be_bytes())
        .chain_update(label.as_bytes())
        .finalize();
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&digest[..8]);
    DeviceId::new(u64::from_be_bytes(raw)).unwrap_or_else(DeviceId::random)
}

impl ErrorKind for AuthError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::UsernameTaken => ErrorCode::AlreadyExists,
            Self::InvalidJwt(JwtError::KeysUnavailable) => ErrorCode::Unavailable,
            Self::PasswordsOff => ErrorCode::Forbidden,
            Self::InvalidCredentials
            | Self::InvalidJwt(_)
            | Self::InvalidToken(_)
            | Self::InvalidRefreshToken
            | Self::DeviceRevoked
            | Self::RefreshReused { .. } => ErrorCode::Unauthenticated,
            Self::UnknownUser | Self::UnknownDevice => ErrorCode::NotFound,
            Self::PasswordMismatch => ErrorCode::BadRequest,
            Self::TooManyDevices(_) => ErrorCode::TooLarge,
            Self::Hash(HashError::Busy) => ErrorCode::Unavailable,
            Self::Throttled(_) => ErrorCode::RateLimited,
            Self::Store(err) => err.code(),
            Self::Hash(_) => ErrorCode::Internal,
        }
    }
}
