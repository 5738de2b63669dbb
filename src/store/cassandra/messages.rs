//! The Cassandra store's part of the `MessageStore` contract: conversation
//! history and the send records that make sends idempotent.

use super::CassandraStore;
use super::rows::to_cql;
use crate::store::{HistoryPage, MessageRecord, MessageStore, StoreError, StoredSend};
use async_trait::async_trait;
use confab_protocol::HistoryRange;
use confab_protocol::ids::{ConversationId, DeviceId, Seq};
use futures::future::try_join_all;
use std::collections::HashMap;

#[async_trait]
impl MessageStore for CassandraStore {
    async fn append_messages(&self, messages: Vec<MessageRecord>) -> Result<(), StoreError> {
        self.writer.append(messages).await
    }

    async fn find_sends(
        &self,
        conversation: ConversationId,
        keys: Vec<(DeviceId, String)>,
        since_ms: u64,
    ) -> Result<HashMap<(DeviceId, String), StoredSend>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let records = inner.read_sends(conversation, &keys).await?;
            // A send record counts only with its message: a failed flush may have
            // stored the record and not the message (then its seq may even hold
            // another message by now).
            let messages = try_join_all(records.iter().map(|(_, send)| inner.message(conversation, send.seq))).await?;
            let mut sends: HashMap<(DeviceId, String), StoredSend> = records
                .into_iter()
                .zip(messages)
                .filter(|(((device, client_msg_id), _), message)| {
                    message.as_ref().is_some_and(|message| {
                        message.sender_device == device.get() && message.client_msg_id == *client_msg_id
                    })
                })
                .map(|(record, _)| record)
                .collect();
            if let Some(from) = inner.suspect_from(conversation)
                && keys.iter().any(|key| !sends.contains_key(key))
            {
                sends.extend(inner.scan_sends(conversation, from).await?);
            }
            // In cluster mode a record above the readable end is a fenced
            // owner's late write: its seq is someone else's to give.
            let readable = inner.read_bound(conversation).await?;
            sends.retain(|_, send| send.server_time_ms >= since_ms && send.seq <= readable);
            Ok(keys
                .into_iter()
                .filter_map(|key| sends.remove(&key).map(|send| (key, send)))
                .collect())
        })
        .await
    }

    async fn sent_ids(
        &self,
        conversation: ConversationId,
        device: DeviceId,
        limit: usize,
    ) -> Result<Option<Vec<String>>, StoreError> {
        // After a failed flush (or a takeover that adopted a dead owner's
        // last rows) a message row may have landed without its record. In
        // cluster mode the list is complete only once this node holds the
        // conversation: every later send goes through it. (A fenced owner's
        // late records may be listed too: harmless, `find_sends` refuses them.)
        let held_here = self
            .inner
            .cluster
            .get()
            .is_none_or(|node| node.epoch(conversation).is_some());
        if self.inner.suspect_from(conversation).is_some() || !held_here {
            return Ok(None);
        }
        self.read_on_driver(move |inner| async move {
            let read_limit = i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX);
            let ids: Vec<(String,)> = inner
                .rows(
                    &inner.statements.device_sends,
                    (conversation.to_string(), to_cql(device.get()), read_limit),
                )
                .await?;
            Ok((ids.len() <= limit).then(|| ids.into_iter().map(|(id,)| id).collect()))
        })
        .await
    }

    /// Send records expire by themselves (TTL = the dedup window).
    async fn purge_sends(&self, _before_ms: u64) -> Result<usize, StoreError> {
        Ok(0)
    }

    async fn messages_at(
        &self,
        conversation: ConversationId,
        seqs: Vec<Seq>,
    ) -> Result<HashMap<Seq, MessageRecord>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let readable = inner.read_bound(conversation).await?;
            let seqs: Vec<Seq> = seqs.into_iter().filter(|seq| *seq <= readable).collect();
            let found = try_join_all(seqs.iter().map(|seq| inner.message(conversation, *seq))).await?;
            seqs.into_iter()
                .zip(found)
                .filter_map(|(seq, stored)| {
                    stored.map(|stored| stored.into_record(conversation, seq).map(|m| (seq, m)))
                })
                .collect()
        })
        .await
    }

    async fn take_conversation(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
        match self.inner.cluster.get() {
            None => self.last_seq(conversation).await,
            Some(node) => self.take(node, conversation).await,
        }
    }

    async fn last_seq(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
        self.read_on_driver(move |inner| async move { inner.readable_seq(conversation).await })
            .await
    }

    async fn history(
        &self,
        conversation: ConversationId,
        range: HistoryRange,
        limit: usize,
    ) -> Result<HistoryPage, StoreError> {
        self.read_on_driver(move |inner| async move { inner.history(conversation, range, limit).await })
            .await
    }
}
