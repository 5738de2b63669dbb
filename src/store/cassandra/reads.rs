//! The reads behind the store's calls: one partition (or a known set) per
//! query, answered from the node's caches where they are complete.

use super::rows::{
    DeviceRow, corrupt, device_record, from_cql, left, role_of, stored_send, to_cql, unavailable, user_id,
};
use super::{BUCKET_SIZE, Inner, MAX_EMPTY_BUCKETS, bucket};
use crate::store::encoding::StoredMessage;
use crate::store::{ConversationHead, DeviceRecord, HistoryPage, StoreError, StoredSend, UserRecord, follows};
use confab_protocol::ids::{ConversationId, DeviceId, GroupId, Seq, UserId};
use confab_protocol::{HistoryRange, Marks, Role};
use futures::future::try_join_all;
use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use prost::Message as _;
use scylla::statement::prepared::PreparedStatement;
use std::collections::HashMap;
use std::future::Future;

/// Keys looked up by one query (`IN` on the clustering key).
const MAX_KEYS_PER_READ: usize = 100;

/// Reads one call keeps in flight at most (a user's conversations can be many).
const MAX_READS_IN_FLIGHT: usize = 64;

/// Runs `reads`, at most [`MAX_READS_IN_FLIGHT`] at once: their results in
/// order, or the first error.
pub(super) async fn read_all<T>(
    reads: impl IntoIterator<Item = impl Future<Output = Result<T, StoreError>>>,
) -> Result<Vec<T>, StoreError> {
    stream::iter(reads).buffered(MAX_READS_IN_FLIGHT).try_collect().await
}

impl Inner {
    /// A failed flush wrote an unknown part of its rows: a message row may have
    /// landed without its send record, so a retry of that send would be stored
    /// twice. Until the dedup window passes, lookups that miss in such a
    /// conversation also scan its messages from the failed flush's lowest seq.
    pub(super) fn suspect(&self, conversation: ConversationId, from: Seq) {
        if let Ok(mut suspects) = self.suspects.lock() {
            let entry = suspects
                .entry(conversation)
                .or_insert((from, std::time::Instant::now()));
            entry.0 = entry.0.min(from);
            entry.1 = std::time::Instant::now();
        }
    }

    pub(super) fn suspect_from(&self, conversation: ConversationId) -> Option<Seq> {
        let mut suspects = self.suspects.lock().ok()?;
        let window = self.dedup_window;
        suspects.retain(|_, (_, since)| since.elapsed() < window);
        suspects.get(&conversation).map(|(from, _)| *from)
    }

    /// The stored send records among `keys`: clustering keys of one partition,
    /// read a chunk of them per query.
    pub(super) async fn read_sends(
        &self,
        conversation: ConversationId,
        keys: &[(DeviceId, String)],
    ) -> Result<Vec<((DeviceId, String), StoredSend)>, StoreError> {
        let reads = keys.chunks(MAX_KEYS_PER_READ).map(|chunk| {
            let wanted: Vec<(i64, String)> = chunk
                .iter()
                .map(|(device, client_msg_id)| (to_cql(device.get()), client_msg_id.clone()))
                .collect();
            self.rows::<(i64, String, i64, i64)>(&self.statements.sends, (conversation.to_string(), wanted))
        });
        Ok(try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
            .filter_map(|(device, client_msg_id, seq, server_time_ms)| {
                let device = DeviceId::new(from_cql(device))?;
                Some(((device, client_msg_id), stored_send(seq, server_time_ms)))
            })
            .collect())
    }

    /// Send records rebuilt from the stored messages with seq >= `from`.
    pub(super) async fn scan_sends(
        &self,
        conversation: ConversationId,
        from: Seq,
    ) -> Result<HashMap<(DeviceId, String), StoredSend>, StoreError> {
        let mut sends = HashMap::new();
        let mut after = from.saturating_sub(1);
        loop {
            let page = self.history(conversation, HistoryRange::After(after), 500).await?;
            for message in &page.messages {
                sends.insert(
                    (message.sender_device, message.client_msg_id.clone()),
                    StoredSend {
                        seq: message.seq,
                        server_time_ms: message.server_time_ms,
                    },
                );
            }
            match page.messages.last() {
                Some(last) if page.has_more => after = last.seq,
                _ => return Ok(sends),
            }
        }
    }

    /// Rows of one query, deserialized as `R`.
    pub(super) async fn rows<R>(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
    {
        let result = self
            .session
            .execute_unpaged(statement, values)
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?;
        result
            .rows::<R>()
            .map_err(corrupt)?
            .collect::<Result<Vec<R>, _>>()
            .map_err(corrupt)
    }

    pub(super) async fn execute(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Runs a lightweight transaction; returns whether it applied.
    pub(super) async fn applied(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<bool, StoreError> {
        let reply: Vec<scylla::value::Row> = self.rows(statement, values).await?;
        // The first column of a lightweight transaction's reply is `[applied]`.
        Ok(reply
            .into_iter()
            .next()
            .and_then(|row| row.columns.into_iter().next().flatten())
            .and_then(|value| value.as_boolean())
            .unwrap_or(false))
    }

    pub(super) async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        type Row = (Option<String>, Option<String>, Option<i64>, Option<String>);
        let rows: Vec<Row> = self.rows(&self.statements.user_by_id, (to_cql(id.get()),)).await?;
        // An update racing a delete leaves a row without a username: no user.
        Ok(rows
            .into_iter()
            .next()
            .and_then(|(username, password_hash, created_at_ms, display_name)| {
                Some(UserRecord {
                    id,
                    username: username?,
                    password_hash: password_hash.unwrap_or_default(),
                    created_at_ms: from_cql(created_at_ms.unwrap_or_default()),
                    // Null for users made before the column.
                    display_name: display_name.unwrap_or_default(),
                })
            }))
    }

    pub(super) async fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let rows: Vec<DeviceRow> = self
            .rows(&self.statements.device, (to_cql(user.get()), to_cql(device.get())))
            .await?;
        rows.into_iter().next().map(|row| device_record(user, row)).transpose()
    }

    pub(super) async fn message(
        &self,
        conversation: ConversationId,
        seq: Seq,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let rows: Vec<(Vec<u8>,)> = self
            .rows(
                &self.statements.message_at,
                (conversation.to_string(), bucket(seq), to_cql(seq)),
            )
            .await?;
        rows.into_iter()
            .next()
            .map(|(data,)| StoredMessage::decode(data.as_slice()).map_err(corrupt))
            .transpose()
    }

    /// A conversation's (last seq, last time), `None` before its first message.
    /// The head this node wrote or read last serves, unless another node of
    /// a cluster sequences the conversation (it moves there).
    pub(super) async fn head(&self, conversation: ConversationId) -> Result<Option<(Seq, u64)>, StoreError> {
        let writes_here = self.cluster.get().is_none_or(|node| node.epoch(conversation).is_some());
        if writes_here && let Some(head) = self.known_heads.get(&conversation) {
            return Ok(Some(head));
        }
        let rows: Vec<(i64, i64)> = self.rows(&self.statements.head, (conversation.to_string(),)).await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(seq, time_ms)| self.known_heads.raise(conversation, (from_cql(seq), from_cql(time_ms)))))
    }

    /// `user`'s view of a conversation it is or was in, given its index row's
    /// values; `None` while the conversation has no messages.
    pub(super) async fn conversation_head(
        &self,
        user: UserId,
        conversation: ConversationId,
        left_seq: Option<i64>,
        left_time_ms: Option<i64>,
    ) -> Result<Option<ConversationHead>, StoreError> {
        let Some((last_seq, last_time_ms)) = self.head(conversation).await? else {
            return Ok(None);
        };
        let left_seq = left(left_seq);
        let left_time_ms = left_seq.and(left_time_ms.map(from_cql).filter(|time_ms| *time_ms != 0));
        let marks = self.folded_marks(conversation, user).await?;
        let title = match conversation {
            ConversationId::Group(group) => {
                let titles: Vec<(Option<String>,)> = self.rows(&self.statements.title, (to_cql(group.get()),)).await?;
                titles.into_iter().next().and_then(|(title,)| title)
            }
            ConversationId::Direct { .. } => None,
        };
        Ok(Some(ConversationHead {
            conversation,
            last_seq: left_seq.map_or(last_seq, |left| left.min(last_seq)),
            last_time_ms: left_time_ms.unwrap_or(last_time_ms),
            left_seq,
            read_seq: marks.read_seq,
            title,
        }))
    }

    /// The heads of those of `conversations` in `user`'s index that come after
    /// `after` by activity. Index rows are read [`MAX_KEYS_PER_READ`] at a time.
    pub(super) async fn heads_after(
        &self,
        user: UserId,
        conversations: Vec<ConversationId>,
        after: Option<(u64, ConversationId)>,
    ) -> Result<Vec<ConversationHead>, StoreError> {
        let chunks: Vec<Vec<String>> = conversations
            .chunks(MAX_KEYS_PER_READ)
            .map(|chunk| chunk.iter().map(ConversationId::to_string).collect())
            .collect();
        let reads = chunks.into_iter().map(|keys| {
            self.rows::<(String, Option<i64>, Option<i64>)>(
                &self.statements.user_conversations_in,
                (to_cql(user.get()), keys),
            )
        });
        let rows = read_all(reads).await?.into_iter().flatten();
        let heads = read_all(rows.map(|(key, left_seq, left_time_ms)| async move {
            let conversation = ConversationId::parse(&key).map_err(corrupt)?;
            self.conversation_head(user, conversation, left_seq, left_time_ms).await
        }))
        .await?;
        Ok(heads
            .into_iter()
            .flatten()
            .filter(|head| follows(head, after))
            .collect())
    }

    /// A group's current members, by user id.
    pub(super) async fn current_members(&self, group: GroupId) -> Result<Vec<(UserId, Role)>, StoreError> {
        let rows: Vec<(i64, i8, Option<i64>)> = self.rows(&self.statements.members, (to_cql(group.get()),)).await?;
        let mut members = Vec::new();
        for (user, role, left_seq) in rows {
            if left(left_seq).is_none() {
                members.push((user_id(user)?, role_of(role)?));
            }
        }
        members.sort_by_key(|(user, _)| user.get());
        Ok(members)
    }

    /// `user`'s watermarks in `conversation`, highest across its devices.
    /// In a cluster the user's devices may mark through other nodes, so the
    /// store is read each time.
    pub(super) async fn folded_marks(&self, conversation: ConversationId, user: UserId) -> Result<Marks, StoreError> {
        if self.cluster.get().is_none()
            && let Some(marks) = self.known_marks.get(&(conversation, user))
        {
            return Ok(marks);
        }
        let (marks, _) = self.user_marks(conversation, user).await?;
        Ok(self.known_marks.raise((conversation, user), marks))
    }

    /// Every device's marks of `user` in `conversation`, folded to the highest.
    pub(super) async fn user_marks(
        &self,
        conversation: ConversationId,
        user: UserId,
    ) -> Result<(Marks, HashMap<u64, Marks>), StoreError> {
        let rows: Vec<(i64, i64, i64)> = self
            .rows(&self.statements.marks, (conversation.to_string(), to_cql(user.get())))
            .await?;
        let mut devices = HashMap::new();
        let mut all = Marks::default();
        for (device, delivered_seq, read_seq) in rows {
            let marks = Marks {
                delivered_seq: from_cql(delivered_seq),
                read_seq: from_cql(read_seq),
            };
            all = all.merged(marks);
            devices.insert(from_cql(device), marks);
        }
        Ok((all, devices))
    }

    /// The stored maximum seq: up from the head's bucket while later buckets hold
    /// rows (a head lags its messages while a flush is under way); down from it
    /// when the head's bucket is empty (a failed flush stored the head and not
    /// its message).
    pub(super) async fn last_seq(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
        let key = conversation.to_string();
        let start = bucket(self.head_seq(&key).await?);
        let mut highest = None;
        let mut current = start;
        while let Some(seq) = self.latest_in_bucket(&key, current).await? {
            highest = Some(seq);
            current += 1;
        }
        if let Some(highest) = highest {
            return Ok(highest);
        }
        for current in (0..start).rev() {
            if let Some(seq) = self.latest_in_bucket(&key, current).await? {
                return Ok(seq);
            }
        }
        Ok(0)
    }

    /// The highest seq readers may see. On a single node, the stored maximum.
    /// In cluster mode, the head row, which an owner writes only after its
    /// fence check (docs/CLUSTER.md): rows above it, such as a fenced owner's
    /// late writes, are never read.
    pub(super) async fn readable_seq(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
        match self.cluster.get() {
            None => self.last_seq(conversation).await,
            Some(_) => self.head_seq(&conversation.to_string()).await,
        }
    }

    /// The highest seq a read of stored rows may return: no bound on a single
    /// node (what is stored is readable), [`Inner::readable_seq`] in cluster mode.
    pub(super) async fn read_bound(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
        match self.cluster.get() {
            None => Ok(Seq::MAX),
            Some(_) => self.readable_seq(conversation).await,
        }
    }

    /// The seq the conversation's head row names (0 without one). It may run
    /// ahead of the stored messages after a failed flush, never far behind them.
    pub(super) async fn head_seq(&self, key: &str) -> Result<Seq, StoreError> {
        let head: Vec<(i64, i64)> = self.rows(&self.statements.head, (key.to_owned(),)).await?;
        Ok(head.first().map_or(0, |(seq, _)| from_cql(*seq)))
    }

    pub(super) async fn latest_in_bucket(&self, key: &str, bucket: i64) -> Result<Option<Seq>, StoreError> {
        let rows: Vec<(i64, Vec<u8>)> = self
            .rows(&self.statements.latest_in_bucket, (key.to_owned(), bucket, 1_i32))
            .await?;
        Ok(rows.first().map(|(seq, _)| from_cql(*seq)))
    }

    pub(super) async fn history(
        &self,
        conversation: ConversationId,
        range: HistoryRange,
        limit: usize,
    ) -> Result<HistoryPage, StoreError> {
        let key = conversation.to_string();
        let wanted = limit + 1;
        let mut found: Vec<(Seq, Vec<u8>)> = Vec::with_capacity(wanted.min(256));
        // Seqs are gap-free from 1, so a page spans at most this many buckets; a
        // few more allow for a head a failed flush left ahead of the messages.
        let mut budget = wanted.div_ceil(BUCKET_SIZE as usize) + MAX_EMPTY_BUCKETS + 1;
        let mut empty_in_a_row = 0;
        let mut read_bucket = |rows: Vec<(i64, Vec<u8>)>, found: &mut Vec<(Seq, Vec<u8>)>| {
            budget = budget.saturating_sub(1);
            empty_in_a_row = if rows.is_empty() { empty_in_a_row + 1 } else { 0 };
            found.extend(rows.into_iter().map(|(seq, data)| (from_cql(seq), data)));
            budget > 0 && empty_in_a_row < MAX_EMPTY_BUCKETS
        };
        match range {
            HistoryRange::After(bound) => {
                let last = self.readable_seq(conversation).await?;
                if bound >= last {
                    return Ok(HistoryPage::default());
                }
                let mut current = bucket(bound + 1);
                while found.len() < wanted && current <= bucket(last) {
                    let left = i32::try_from(wanted - found.len()).unwrap_or(i32::MAX);
                    let rows = self
                        .rows(
                            &self.statements.after_in_bucket,
                            (key.clone(), current, to_cql(bound), left),
                        )
                        .await?;
                    if !read_bucket(rows, &mut found) {
                        break;
                    }
                    current += 1;
                }
                // The last bucket may hold rows above the readable end.
                found.retain(|(seq, _)| *seq <= last);
            }
            HistoryRange::Latest | HistoryRange::Before(_) => {
                // A bound past the end (up to u64::MAX, from a client) starts at
                // the end: nothing is stored above it.
                let below = match range {
                    // On a single node a bound up to the head needs no look for the end.
                    HistoryRange::Before(bound)
                        if self.cluster.get().is_none() && bound <= self.head_seq(&key).await?.saturating_add(1) =>
                    {
                        bound
                    }
                    HistoryRange::Before(bound) => bound.min(self.readable_seq(conversation).await?.saturating_add(1)),
                    _ => self.readable_seq(conversation).await?.saturating_add(1),
                };
                if below <= 1 {
                    return Ok(HistoryPage::default());
                }
                let mut current = bucket(below - 1);
                while found.len() < wanted && current >= 0 {
                    let left = i32::try_from(wanted - found.len()).unwrap_or(i32::MAX);
                    let rows = self
                        .rows(
                            &self.statements.before_in_bucket,
                            (key.clone(), current, to_cql(below), left),
                        )
                        .await?;
                    if !read_bucket(rows, &mut found) {
                        break;
                    }
                    current -= 1;
                }
                found.reverse();
            }
        }
        let has_more = found.len() > limit;
        match range {
            HistoryRange::After(_) => found.truncate(limit),
            _ => {
                let excess = found.len().saturating_sub(limit);
                found.drain(..excess);
            }
        }
        let messages = found
            .into_iter()
            .map(|(seq, data)| {
                StoredMessage::decode(data.as_slice())
                    .map_err(corrupt)?
                    .into_record(conversation, seq)
            })
            .collect::<Result<_, _>>()?;
        Ok(HistoryPage { messages, has_more })
    }
}
