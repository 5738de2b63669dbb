//! The embedded store's part of the `PushStore` contract: devices' push tokens
//! and users' open notification windows.

use super::keys::{conversation_of_key, decode_push_token, decode_user_id, device_of_key};
use super::writer::WriteJob;
use super::{EmbeddedStore, fjall_error};
use crate::store::encoding::{decode_pending_push, encode_pending_push};
use crate::store::{PendingPush, PushStore, StoreError};
use async_trait::async_trait;
use confab_protocol::PushToken;
use confab_protocol::ids::{ConversationId, DeviceId, UserId};

#[async_trait]
impl PushStore for EmbeddedStore {
    async fn set_push_token(&self, user: UserId, device: DeviceId, token: Option<PushToken>) -> Result<(), StoreError> {
        self.write(|reply| WriteJob::PushToken(user, device, token, reply))
            .await
    }

    async fn push_tokens(&self, user: UserId) -> Result<Vec<(DeviceId, PushToken)>, StoreError> {
        self.read(move |view| {
            let mut tokens = Vec::new();
            for guard in view.prefix(&view.push_tokens, user.get().to_be_bytes()) {
                let (key, value) = guard.into_inner().map_err(fjall_error)?;
                let (_, device) = device_of_key(&key)?;
                tokens.push((device, decode_push_token(&value)?));
            }
            Ok(tokens)
        })
        .await
    }

    async fn set_muted(&self, user: UserId, conversation: ConversationId, muted: bool) -> Result<(), StoreError> {
        self.write(|reply| WriteJob::Mute(user, conversation, muted, reply))
            .await
    }

    async fn muted(&self, user: UserId) -> Result<Vec<ConversationId>, StoreError> {
        self.read(move |view| {
            let mut muted = Vec::new();
            for guard in view.prefix(&view.mutes, user.get().to_be_bytes()) {
                let (key, _) = guard.into_inner().map_err(fjall_error)?;
                muted.push(conversation_of_key(key.get(8..).unwrap_or_default())?);
            }
            Ok(muted)
        })
        .await
    }

    async fn put_pending_push(&self, user: UserId, pending: PendingPush) -> Result<(), StoreError> {
        let pending = encode_pending_push(&pending);
        self.write(|reply| WriteJob::PendingPush(user, Some(pending), reply))
            .await
    }

    async fn delete_pending_push(&self, user: UserId) -> Result<(), StoreError> {
        self.write(|reply| WriteJob::PendingPush(user, None, reply)).await
    }

    async fn pending_pushes(&self) -> Result<Vec<(UserId, PendingPush)>, StoreError> {
        self.read(move |view| {
            let mut pending = Vec::new();
            for guard in view.prefix(&view.push_pending, []) {
                let (key, value) = guard.into_inner().map_err(fjall_error)?;
                pending.push((decode_user_id(&key)?, decode_pending_push(&value)?));
            }
            Ok(pending)
        })
        .await
    }
}
