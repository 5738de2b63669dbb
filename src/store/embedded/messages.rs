//! The embedded store's part of the `MessageStore` contract: conversation
//! history and the send records that make sends idempotent.

use super::keys::{decode_send, message_key, send_key, seq_of_key};
use super::writer::WriteJob;
use super::{EmbeddedStore, corrupt, fjall_error};
use crate::store::encoding::StoredMessage;
use crate::store::{HistoryPage, MessageRecord, MessageStore, StoreError, StoredSend};
use async_trait::async_trait;
use confab_protocol::HistoryRange;
use confab_protocol::ids::{ConversationId, DeviceId, Seq};
use prost::Message as _;
use std::collections::HashMap;

#[async_trait]
impl MessageStore for EmbeddedStore {
    async fn append_messages(&self, messages: Vec<MessageRecord>) -> Result<(), StoreError> {
        match self.append_in_place(messages) {
            Ok(committed) => {
                self.appended_in_place.increment(1);
                committed.await.map_err(|_| StoreError::Closed)?
            }
            Err(messages) => {
                self.appended_by_writer.increment(1);
                self.write(|reply| WriteJob::Append(messages, reply)).await
            }
        }
    }

    fn finds_sends_cheaply(&self) -> bool {
        true
    }

    async fn find_sends(
        &self,
        conversation: ConversationId,
        keys: Vec<(DeviceId, String)>,
        since_ms: u64,
    ) -> Result<HashMap<(DeviceId, String), StoredSend>, StoreError> {
        // Inline, not on the blocking pool: this runs before every append, and the
        // keys looked up are almost always new, which fjall answers from the
        // memtable or the segments' bloom filters without touching the disk. The
        // hop to a blocking thread and back cost more than the lookup itself.
        self.shared.before_sequencing()?;
        let view = self.shared.view()?;
        {
            let mut found = HashMap::new();
            for key in keys {
                let Some(value) = view
                    .get(&view.sends, send_key(conversation, key.0, &key.1))
                    .map_err(fjall_error)?
                else {
                    continue;
                };
                let stored = decode_send(&value)?;
                if stored.server_time_ms >= since_ms {
                    found.insert(key, stored);
                }
            }
            Ok(found)
        }
    }

    async fn sent_ids(
        &self,
        conversation: ConversationId,
        device: DeviceId,
        limit: usize,
    ) -> Result<Option<Vec<String>>, StoreError> {
        // A message and its send record are one batch here, so the records are
        // complete unless a failed batch may yet reappear.
        self.shared.before_sequencing()?;
        self.read(move |view| {
            let prefix = send_key(conversation, device, "");
            let mut ids = Vec::new();
            for guard in view.prefix(&view.sends, &prefix) {
                if ids.len() == limit {
                    return Ok(None);
                }
                let key = guard.key().map_err(fjall_error)?;
                let id = key
                    .get(prefix.len()..)
                    .and_then(|id| std::str::from_utf8(id).ok())
                    .ok_or_else(|| StoreError::corrupt("send record key"))?;
                ids.push(id.to_owned());
            }
            Ok(Some(ids))
        })
        .await
    }

    async fn purge_sends(&self, before_ms: u64) -> Result<usize, StoreError> {
        let expired = self
            .read(move |view| {
                let mut expired = Vec::new();
                for guard in view.iter(&view.sends) {
                    let (key, value) = guard.into_inner().map_err(fjall_error)?;
                    if decode_send(&value)?.server_time_ms < before_ms {
                        expired.push(key);
                    }
                }
                Ok(expired)
            })
            .await?;
        if expired.is_empty() {
            return Ok(0);
        }
        self.write(|reply| WriteJob::Purge(expired, reply)).await
    }

    async fn messages_at(
        &self,
        conversation: ConversationId,
        seqs: Vec<Seq>,
    ) -> Result<HashMap<Seq, MessageRecord>, StoreError> {
        self.read(move |view| {
            let mut found = HashMap::new();
            for seq in seqs {
                if let Some(value) = view
                    .get(&view.messages, message_key(conversation, seq))
                    .map_err(fjall_error)?
                {
                    let stored = StoredMessage::decode(&*value).map_err(corrupt)?;
                    found.insert(seq, stored.into_record(conversation, seq)?);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn last_seq(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
        self.shared.before_sequencing()?;
        self.read(
            move |view| match view.prefix(&view.messages, conversation.to_key()).next_back() {
                None => Ok(0),
                Some(guard) => seq_of_key(&guard.key().map_err(fjall_error)?),
            },
        )
        .await
    }

    async fn history(
        &self,
        conversation: ConversationId,
        range: HistoryRange,
        limit: usize,
    ) -> Result<HistoryPage, StoreError> {
        self.read(move |view| view.history(conversation, range, limit)).await
    }
}
