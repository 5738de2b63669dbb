//! The embedded store's part of the `ConversationStore` contract: each user's
//! conversations and receipt watermarks.

use super::keys::{conversation_of_key, decode_user_conversation};
use super::writer::WriteJob;
use super::{EmbeddedStore, fjall_error};
use crate::store::{ConversationHead, ConversationStore, StoreError};
use async_trait::async_trait;
use confab_protocol::Marks;
use confab_protocol::ids::{ConversationId, DeviceId, UserId};

#[async_trait]
impl ConversationStore for EmbeddedStore {
    async fn conversations(&self, user: UserId) -> Result<Vec<ConversationHead>, StoreError> {
        self.read(move |view| {
            let mut heads = Vec::new();
            for guard in view.prefix(&view.user_convs, user.get().to_be_bytes()) {
                let (key, value) = guard.into_inner().map_err(fjall_error)?;
                let conversation = conversation_of_key(key.get(8..).unwrap_or_default())?;
                let Some((last_seq, last_time_ms)) = view.head(conversation)? else {
                    continue;
                };
                let (left_seq, left_time_ms) = decode_user_conversation(&value)?;
                let read_seq = view.user_marks(conversation, user)?.read_seq;
                let title = match conversation {
                    ConversationId::Group(group) => view
                        .get(&view.groups, group.get().to_be_bytes())
                        .map_err(fjall_error)?
                        .map(|title| String::from_utf8_lossy(&title).into_owned()),
                    ConversationId::Direct { .. } => None,
                };
                heads.push(ConversationHead {
                    conversation,
                    last_seq: left_seq.map_or(last_seq, |left| left.min(last_seq)),
                    last_time_ms: left_time_ms.unwrap_or(last_time_ms),
                    left_seq,
                    read_seq,
                    title,
                });
            }
            Ok(heads)
        })
        .await
    }

    async fn mark(
        &self,
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        marks: Marks,
    ) -> Result<(Marks, bool), StoreError> {
        self.write(|reply| WriteJob::Mark(conversation, user, device, marks, reply))
            .await
    }
}
