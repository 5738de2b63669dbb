//! A consistent view of the database for reads: its handles and a snapshot,
//! and the reads several calls share (a user, a device, a head, marks, a page
//! of history).

use super::keys::*;
use super::{Inner, corrupt, fjall_error};
use crate::store::encoding::{StoredMessage, StoredTime};
use crate::store::{DeviceRecord, HistoryPage, StoreError, UserRecord};
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};
use confab_protocol::{HistoryRange, Marks};
use fjall::{Keyspace, Readable as _};
use prost::Message as _;
use std::sync::Arc;

/// The database's handles and a snapshot to read them at.
#[derive(Clone)]
pub(super) struct View {
    inner: Arc<Inner>,
    snapshot: fjall::Snapshot,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("seqno", &self.snapshot.seqno())
            .finish_non_exhaustive()
    }
}

impl View {
    /// The database as last committed: for the first view, and the writer's own
    /// reads (it commits one batch at a time, so that is also what is durable).
    pub(super) fn latest(inner: Arc<Inner>) -> Self {
        let snapshot = inner.db.snapshot();
        Self { inner, snapshot }
    }

    pub(super) fn get(&self, keyspace: &Keyspace, key: impl AsRef<[u8]>) -> fjall::Result<Option<fjall::Slice>> {
        self.snapshot.get(keyspace, key)
    }

    pub(super) fn contains_key(&self, keyspace: &Keyspace, key: impl AsRef<[u8]>) -> fjall::Result<bool> {
        self.snapshot.contains_key(keyspace, key)
    }

    pub(super) fn prefix(&self, keyspace: &Keyspace, prefix: impl AsRef<[u8]>) -> fjall::Iter {
        self.snapshot.prefix(keyspace, prefix)
    }

    pub(super) fn range<K: AsRef<[u8]>>(
        &self,
        keyspace: &Keyspace,
        range: impl std::ops::RangeBounds<K>,
    ) -> fjall::Iter {
        self.snapshot.range(keyspace, range)
    }

    pub(super) fn iter(&self, keyspace: &Keyspace) -> fjall::Iter {
        self.snapshot.iter(keyspace)
    }
}

impl std::ops::Deref for View {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl View {
    /// A conversation's last seq and that message's time; `None` while it has
    /// no message.
    pub(super) fn head(&self, conversation: ConversationId) -> Result<Option<(Seq, u64)>, StoreError> {
        let Some(guard) = self.prefix(&self.messages, conversation.to_key()).next_back() else {
            return Ok(None);
        };
        let (key, value) = guard.into_inner().map_err(fjall_error)?;
        let stored = StoredTime::decode(&*value).map_err(corrupt)?;
        Ok(Some((seq_of_key(&key)?, stored.server_time_ms)))
    }

    /// A user's receipt watermarks across its devices.
    pub(super) fn user_marks(&self, conversation: ConversationId, user: UserId) -> Result<Marks, StoreError> {
        let mut prefix = conversation.to_key().as_ref().to_vec();
        prefix.extend_from_slice(&user.get().to_be_bytes());
        let mut marks = Marks::default();
        for guard in self.prefix(&self.marks, prefix) {
            let (delivered_seq, read_seq) = decode_pair(&guard.value().map_err(fjall_error)?)?;
            marks = marks.merged(Marks {
                delivered_seq,
                read_seq,
            });
        }
        Ok(marks)
    }

    pub(super) fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let Some(bytes) = self.get(&self.devices, device_key(user, device)).map_err(fjall_error)? else {
            return Ok(None);
        };
        let stored = StoredDevice::decode(&*bytes).map_err(corrupt)?;
        Ok(Some(stored.into_record(user, device)?))
    }

    pub(super) fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        let Some(bytes) = self.get(&self.users, id.get().to_be_bytes()).map_err(fjall_error)? else {
            return Ok(None);
        };
        let stored = StoredUser::decode(&*bytes).map_err(corrupt)?;
        Ok(Some(UserRecord {
            id,
            username: stored.username,
            password_hash: stored.password_hash,
            created_at_ms: stored.created_at_ms,
            display_name: stored.display_name,
        }))
    }

    pub(super) fn history(
        &self,
        conversation: ConversationId,
        range: HistoryRange,
        limit: usize,
    ) -> Result<HistoryPage, StoreError> {
        let key = |seq: Seq| message_key(conversation, seq);
        let (iter, newest_first): (Box<dyn Iterator<Item = fjall::Guard>>, bool) = match range {
            HistoryRange::Latest => (Box::new(self.prefix(&self.messages, conversation.to_key()).rev()), true),
            HistoryRange::Before(bound) => (Box::new(self.range(&self.messages, key(0)..key(bound)).rev()), true),
            HistoryRange::After(Seq::MAX) => return Ok(HistoryPage::default()),
            HistoryRange::After(bound) => (
                Box::new(self.range(&self.messages, key(bound + 1)..=key(Seq::MAX))),
                false,
            ),
        };
        let mut messages = Vec::with_capacity(limit.min(256) + 1);
        for guard in iter.take(limit + 1) {
            let (key, value) = guard.into_inner().map_err(fjall_error)?;
            let stored = StoredMessage::decode(&*value).map_err(corrupt)?;
            messages.push(stored.into_record(conversation, seq_of_key(&key)?)?);
        }
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        if newest_first {
            messages.reverse();
        }
        Ok(HistoryPage { messages, has_more })
    }
}
