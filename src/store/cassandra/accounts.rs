//! The Cassandra store's part of the `AccountStore` contract: users and their
//! devices.

use super::CassandraStore;
use super::rows::{DeviceRow, device_record, to_cql, user_id};
use crate::store::{AccountStore, DeviceRecord, NewUser, Rotation, StoreError, UserRecord};
use async_trait::async_trait;
use confab_protocol::ids::{DeviceId, UserId};
use futures::future::try_join_all;

#[async_trait]
impl AccountStore for CassandraStore {
    async fn create_user(&self, user: NewUser) -> Result<UserRecord, StoreError> {
        self.on_driver(move |inner| async move {
            let id = UserId::random();
            let applied = inner
                .applied(
                    &inner.statements.claim_username,
                    (user.username.clone(), to_cql(id.get())),
                )
                .await?;
            if !applied {
                return Err(StoreError::UsernameTaken);
            }
            inner
                .execute(
                    &inner.statements.insert_user,
                    (
                        to_cql(id.get()),
                        user.username.clone(),
                        user.password_hash.clone(),
                        to_cql(user.created_at_ms),
                        user.display_name.clone(),
                    ),
                )
                .await?;
            Ok(UserRecord {
                id,
                username: user.username,
                password_hash: user.password_hash,
                created_at_ms: user.created_at_ms,
                display_name: user.display_name,
            })
        })
        .await
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let username = username.to_owned();
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(i64,)> = inner.rows(&inner.statements.id_by_username, (username,)).await?;
            match rows.first() {
                Some((id,)) => inner.user(user_id(*id)?).await,
                None => Ok(None),
            }
        })
        .await
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.read_on_driver(move |inner| async move { inner.user(id).await })
            .await
    }

    async fn missing_users(&self, ids: Vec<UserId>) -> Result<Vec<UserId>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let found = try_join_all(ids.iter().map(|id| inner.user(*id))).await?;
            Ok(ids
                .into_iter()
                .zip(found)
                .filter_map(|(id, user)| user.is_none().then_some(id))
                .collect())
        })
        .await
    }

    async fn put_device(&self, device: DeviceRecord) -> Result<(), StoreError> {
        self.on_driver(move |inner| async move {
            inner
                .execute(
                    &inner.statements.insert_device,
                    (
                        to_cql(device.user.get()),
                        to_cql(device.id.get()),
                        device.name,
                        device.refresh_hash.to_vec(),
                        device.previous_refresh_hash.to_vec(),
                        to_cql(device.refresh_expires_at_ms),
                        to_cql(device.created_at_ms),
                        to_cql(device.refreshed_at_ms),
                    ),
                )
                .await
        })
        .await
    }

    async fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.read_on_driver(move |inner| async move { inner.device(user, device).await })
            .await
    }

    async fn device_and_user(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<(DeviceRecord, UserRecord)>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let (device, user) = futures::try_join!(inner.device(user, device), inner.user(user))?;
            Ok(device.zip(user))
        })
        .await
    }

    async fn delete_device(&self, user: UserId, device: DeviceId) -> Result<bool, StoreError> {
        self.on_driver(move |inner| async move {
            let key = (to_cql(user.get()), to_cql(device.get()));
            let existed = inner.applied(&inner.statements.delete_device, key).await?;
            inner.execute(&inner.statements.delete_push_token, key).await?;
            Ok(existed)
        })
        .await
    }

    async fn devices(&self, user: UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<DeviceRow> = inner.rows(&inner.statements.devices, (to_cql(user.get()),)).await?;
            rows.into_iter().map(|row| device_record(user, row)).collect()
        })
        .await
    }

    async fn rotate_refresh(&self, rotation: Rotation) -> Result<bool, StoreError> {
        self.on_driver(move |inner| async move {
            let values = (
                rotation.refresh_hash.to_vec(),
                rotation.expected.to_vec(),
                to_cql(rotation.refresh_expires_at_ms),
                to_cql(rotation.refreshed_at_ms),
                to_cql(rotation.user.get()),
                to_cql(rotation.device.get()),
                rotation.expected.to_vec(),
            );
            inner.applied(&inner.statements.rotate_refresh, values).await
        })
        .await
    }

    async fn set_password(&self, user: UserId, password_hash: String) -> Result<(), StoreError> {
        self.on_driver(move |inner| async move {
            inner
                .execute(&inner.statements.set_password, (password_hash, to_cql(user.get())))
                .await
        })
        .await
    }

    async fn set_display_name(&self, user: UserId, display_name: String) -> Result<(), StoreError> {
        self.on_driver(move |inner| async move {
            inner
                .execute(&inner.statements.set_display_name, (display_name, to_cql(user.get())))
                .await
        })
        .await
    }

    async fn delete_user(&self, user: UserId) -> Result<bool, StoreError> {
        self.on_driver(move |inner| async move {
            let Some(record) = inner.user(user).await? else {
                return Ok(false);
            };
            // The name first (only while it still names this user): a failure
            // between the two leaves a user no name finds, never a name of no user.
            inner
                .applied(
                    &inner.statements.release_username,
                    (record.username, to_cql(user.get())),
                )
                .await?;
            inner
                .execute(&inner.statements.delete_user, (to_cql(user.get()),))
                .await?;
            Ok(true)
        })
        .await
    }
}
