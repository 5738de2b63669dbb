//! The Cassandra store's part of the `PushStore` contract: devices' push tokens
//! and users' open notification windows.

use super::CassandraStore;
use super::rows::{from_cql, to_cql, user_id};
use crate::store::encoding::{decode_pending_push, encode_pending_push};
use crate::store::{PendingPush, PushStore, StoreError};
use async_trait::async_trait;
use confab_proto::v1::PushPlatform;
use confab_protocol::PushToken;
use confab_protocol::ids::{ConversationId, DeviceId, UserId};

#[async_trait]
impl PushStore for CassandraStore {
    async fn set_push_token(&self, user: UserId, device: DeviceId, token: Option<PushToken>) -> Result<(), StoreError> {
        self.on_driver(move |inner| async move {
            let key = (to_cql(user.get()), to_cql(device.get()));
            match token {
                Some(token) => {
                    let row = (key.0, key.1, token.platform as i32, token.token);
                    inner.execute(&inner.statements.upsert_push_token, row).await
                }
                None => inner.execute(&inner.statements.delete_push_token, key).await,
            }
        })
        .await
    }

    async fn push_tokens(&self, user: UserId) -> Result<Vec<(DeviceId, PushToken)>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(i64, i32, String)> =
                inner.rows(&inner.statements.push_tokens, (to_cql(user.get()),)).await?;
            rows.into_iter()
                .map(|(device, platform, token)| {
                    let device = DeviceId::new(from_cql(device)).ok_or_else(|| StoreError::corrupt("device id 0"))?;
                    let platform =
                        PushPlatform::try_from(platform).map_err(|_| StoreError::corrupt("push platform"))?;
                    Ok((device, PushToken { platform, token }))
                })
                .collect()
        })
        .await
    }

    async fn set_muted(&self, user: UserId, conversation: ConversationId, muted: bool) -> Result<(), StoreError> {
        let row = (to_cql(user.get()), conversation.to_string());
        self.on_driver(move |inner| async move {
            let statement = if muted {
                &inner.statements.mute
            } else {
                &inner.statements.unmute
            };
            inner.execute(statement, row).await
        })
        .await
    }

    async fn muted(&self, user: UserId) -> Result<Vec<ConversationId>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(String,)> = inner.rows(&inner.statements.mutes, (to_cql(user.get()),)).await?;
            rows.into_iter()
                .map(|(conversation,)| {
                    ConversationId::parse(&conversation).map_err(|_| StoreError::corrupt("a muted conversation"))
                })
                .collect()
        })
        .await
    }

    async fn put_pending_push(&self, user: UserId, pending: PendingPush) -> Result<(), StoreError> {
        let row = (to_cql(user.get()), encode_pending_push(&pending));
        self.on_driver(move |inner| async move { inner.execute(&inner.statements.put_pending_push, row).await })
            .await
    }

    async fn delete_pending_push(&self, user: UserId) -> Result<(), StoreError> {
        let key = (to_cql(user.get()),);
        self.on_driver(move |inner| async move { inner.execute(&inner.statements.delete_pending_push, key).await })
            .await
    }

    async fn pending_pushes(&self) -> Result<Vec<(UserId, PendingPush)>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(i64, Vec<u8>)> = inner.rows(&inner.statements.pending_pushes, ()).await?;
            rows.into_iter()
                .map(|(user, pending)| Ok((user_id(user)?, decode_pending_push(&pending)?)))
                .collect()
        })
        .await
    }
}
