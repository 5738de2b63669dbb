//! The embedded store's part of the `PushStore` contract: devices' push tokens.

use super::keys::{decode_push_token, device_of_key};
use super::writer::WriteJob;
use super::{EmbeddedStore, fjall_error};
use crate::store::{PushStore, StoreError};
use async_trait::async_trait;
use confab_protocol::PushToken;
use confab_protocol::ids::{DeviceId, UserId};

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
}
