//! The embedded store's part of the `AccountStore` contract: users and their
//! devices.

use super::keys::{StoredDevice, decode_user_id, device_of_key};
use super::writer::{UserUpdate, WriteJob};
use super::{EmbeddedStore, corrupt, fjall_error};
use crate::store::{AccountStore, DeviceRecord, NewUser, Rotation, StoreError, UserRecord};
use async_trait::async_trait;
use confab_protocol::ids::{DeviceId, UserId};
use prost::Message as _;

#[async_trait]
impl AccountStore for EmbeddedStore {
    async fn create_user(&self, user: NewUser) -> Result<UserRecord, StoreError> {
        self.write(|reply| WriteJob::CreateUser(user, reply)).await
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let username = username.to_owned();
        self.read(move |view| {
            let Some(id) = view.get(&view.usernames, username.as_bytes()).map_err(fjall_error)? else {
                return Ok(None);
            };
            view.user(decode_user_id(&id)?)
        })
        .await
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.read(move |view| view.user(id)).await
    }

    async fn missing_users(&self, ids: Vec<UserId>) -> Result<Vec<UserId>, StoreError> {
        self.read(move |view| {
            let mut missing = Vec::new();
            for id in ids {
                if !view
                    .contains_key(&view.users, id.get().to_be_bytes())
                    .map_err(fjall_error)?
                {
                    missing.push(id);
                }
            }
            Ok(missing)
        })
        .await
    }

    async fn put_device(&self, device: DeviceRecord) -> Result<(), StoreError> {
        self.write(|reply| WriteJob::PutDevice(device, reply)).await
    }

    async fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.read(move |view| view.device(user, device)).await
    }

    async fn device_and_user(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<(DeviceRecord, UserRecord)>, StoreError> {
        self.read(move |view| {
            let Some(device) = view.device(user, device)? else {
                return Ok(None);
            };
            Ok(view.user(user)?.map(|user| (device, user)))
        })
        .await
    }

    async fn delete_device(&self, user: UserId, device: DeviceId) -> Result<bool, StoreError> {
        self.write(|reply| WriteJob::DeleteDevice(user, device, reply)).await
    }

    async fn devices(&self, user: UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read(move |view| {
            let mut devices = Vec::new();
            for guard in view.prefix(&view.devices, user.get().to_be_bytes()) {
                let (key, value) = guard.into_inner().map_err(fjall_error)?;
                let (user, device) = device_of_key(&key)?;
                devices.push(
                    StoredDevice::decode(&*value)
                        .map_err(corrupt)?
                        .into_record(user, device)?,
                );
            }
            Ok(devices)
        })
        .await
    }

    async fn rotate_refresh(&self, rotation: Rotation) -> Result<bool, StoreError> {
        self.write(|reply| WriteJob::RotateRefresh(rotation, reply)).await
    }

    async fn set_password(&self, user: UserId, password_hash: String) -> Result<(), StoreError> {
        let update = UserUpdate::Password(password_hash);
        self.write(|reply| WriteJob::UpdateUser(user, update, reply)).await
    }

    async fn set_display_name(&self, user: UserId, display_name: String) -> Result<(), StoreError> {
        let update = UserUpdate::DisplayName(display_name);
        self.write(|reply| WriteJob::UpdateUser(user, update, reply)).await
    }

    async fn delete_user(&self, user: UserId) -> Result<bool, StoreError> {
        self.write(|reply| WriteJob::DeleteUser(user, reply)).await
    }
}
