//! The Cassandra write path: one task on the driver runtime collects appends from
//! every shard for `cassandra.batch_window` (or up to `max_batch_rows` rows), turns
//! them into rows, groups the rows by partition and writes each partition as one
//! unlogged batch (never a multi-partition batch), at most `max_in_flight` at once.
//!
//! A flush is one round trip: messages, send records, heads and direct
//! conversations' index and activity rows all at once — except that a
//! conversation's buckets are written in ascending order, stopping at the first
//! failure, so a failed flush never leaves a later seq stored above a missing
//! one. Group state (members, titles, the members' index rows) follows only once
//! every message is stored, so a membership never changes without its event in
//! the history. A group's first message of a day adds one more step: its
//! current members are read and their activity rows written.
//!
//! A failed flush can leave a send record without its message, or a head past
//! the stored maximum: readers allow for both (`find_sends` confirms a send
//! record against its message, `last_seq` steps down from an empty head bucket).
//!
//! Every append of a flush is answered once all its partitions were confirmed at
//! the configured consistency, or all fail with `Unavailable`: nothing is
//! acknowledged that Cassandra did not confirm. Up to [`MAX_FLUSHES_IN_FLIGHT`]
//! flushes run at once; they never share a conversation, because an owner sends
//! a conversation's next append only once the previous one was answered — so an
//! edit always finds the message it edits, stored by an earlier flush.
//!
//! Receipt marks are read-modify-write, so they go through the same task, in order.

use super::ownership::ClusterNode;
use super::{Inner, bucket, day, to_cql, unavailable};
use crate::config::CassandraConfig;
use crate::store::encoding::{MAX_EDIT_CHAIN, StoredMessage};
use crate::store::ownership::{Epoch, write_timestamp};
use crate::store::{Amendment, GroupEvent, MessageRecord, StoreError};
use confab_protocol::Marks;
use confab_protocol::ids::{ConversationId, DeviceId, GroupId, Seq, UserId};
use futures::FutureExt as _;
use futures::future::{BoxFuture, try_join_all};
use futures::stream::{self, FuturesUnordered, StreamExt as _};
use prost::Message as _;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Jobs waiting for the writer; beyond it, callers wait (back-pressure).
const QUEUE: usize = 16 * 1024;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Job {
    Append(Vec<MessageRecord>, Reply<()>),
    Mark {
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        marks: Marks,
        reply: Reply<(Marks, bool)>,
    },
    Close(Reply<()>),
}

/// Sends jobs to the writer task.
#[derive(Debug, Clone)]
pub(super) struct Handle {
    jobs: mpsc::Sender<Job>,
}

impl Handle {
    async fn submit<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(job(reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub(super) async fn append(&self, messages: Vec<MessageRecord>) -> Result<(), StoreError> {
        self.submit(|reply| Job::Append(messages, reply)).await
    }

    pub(super) async fn mark(
        &self,
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        marks: Marks,
    ) -> Result<(Marks, bool), StoreError> {
        self.submit(|reply| Job::Mark {
            conversation,
            user,
            device,
            marks,
            reply,
        })
        .await
    }

    pub(super) async fn close(&self) -> Result<(), StoreError> {
        self.submit(Job::Close).await
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    window: Duration,
    max_rows: usize,
    max_in_flight: usize,
}

pub(super) fn spawn(runtime: &tokio::runtime::Handle, inner: Arc<Inner>, config: &CassandraConfig) -> Handle {
    let (jobs, queue) = mpsc::channel(QUEUE);
    let limits = Limits {
        window: config.batch_window,
        max_rows: config.max_batch_rows,
        max_in_flight: config.max_in_flight,
    };
    runtime.spawn(run(inner, queue, limits));
    Handle { jobs }
}

fn rows_of(job: &Job) -> usize {
    match job {
        Job::Append(messages, _) => messages.len(),
        Job::Mark { .. } | Job::Close(_) => 1,
    }
}

/// Conversations the [`ActivityIndex`] remembers, at most (each map); forgetting
/// only costs a rewrite.
const MAX_INDEXED: usize = 100_000;

/// A conversation whose members' activity rows a flush writes.
#[derive(Debug, Clone, Copy)]
struct Activity {
    day: i64,
    /// The day of the rows it replaces, if this writer wrote them.
    previous: Option<i64>,
    /// Time and seq of the conversation's last message in the flush.
    time_ms: u64,
    seq: Seq,
}

/// Which conversations' members' `user_activity` rows (and for a direct
/// conversation its `user_conversations` rows, which never change) a flush must
/// write: those not written yet for the day of their last message, and those a
/// failed flush was writing — its message may be stored even so, and a retry of
/// the send is then answered from its send record, with no append to index it.
#[derive(Default)]
struct ActivityIndex {
    /// Conversation → the day its rows were written for.
    written: HashMap<ConversationId, i64>,
    retry: HashMap<ConversationId, Activity>,
}

impl ActivityIndex {
    fn needed_by(&mut self, appends: &[(Vec<MessageRecord>, Reply<()>)]) -> HashMap<ConversationId, Activity> {
        let mut needed = HashMap::new();
        for message in appends.iter().flat_map(|(messages, _)| messages) {
            // Messages arrive in seq order per conversation: the last one counts.
            let previous = self.written.get(&message.conversation).copied();
            let activity = Activity {
                day: day(message.server_time_ms),
                previous,
                time_ms: message.server_time_ms,
                seq: message.seq,
            };
            if previous == Some(activity.day) {
                needed.remove(&message.conversation);
            } else {
                needed.insert(message.conversation, activity);
            }
        }
        for (conversation, activity) in self.retry.drain() {
            needed.entry(conversation).or_insert(activity);
        }
        needed
    }

    fn written(&mut self, indexed: HashMap<ConversationId, Activity>) {
        if self.written.len() > MAX_INDEXED {
            self.written.clear();
        }
        for (conversation, activity) in indexed {
            let day = self.written.entry(conversation).or_insert(activity.day);
            *day = activity.day.max(*day);
        }
    }

    fn failed(&mut self, indexed: HashMap<ConversationId, Activity>) {
        if self.retry.len() > MAX_INDEXED {
            self.retry.clear();
        }
        self.retry.extend(indexed);
    }
}

/// Flushes under way at once. Owners never have two appends of one conversation
/// in the store at once, so concurrent flushes touch different conversations.
const MAX_FLUSHES_IN_FLIGHT: usize = 4;

/// A flush once Cassandra answered.
struct Flushed {
    appends: Vec<(Vec<MessageRecord>, Reply<()>)>,
    /// Conversations whose activity rows it wrote.
    indexed: HashMap<ConversationId, Activity>,
    result: Result<(), StoreError>,
}

async fn run(inner: Arc<Inner>, mut queue: mpsc::Receiver<Job>, limits: Limits) {
    let mut closed = false;
    let mut closers = Vec::new();
    let mut index = ActivityIndex::default();
    let mut flushing = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(flushed) = flushing.next() => finish(&inner, &mut index, flushed),
            first = queue.recv(), if flushing.len() < MAX_FLUSHES_IN_FLIGHT => {
                let Some(first) = first else { break };
                let mut appends = Vec::new();
                for job in collect(first, &mut queue, limits).await {
                    match job {
                        Job::Append(_, reply) | Job::Close(reply) if closed => {
                            let _ = reply.send(Err(StoreError::Closed));
                        }
                        Job::Mark { reply, .. } if closed => {
                            let _ = reply.send(Err(StoreError::Closed));
                        }
                        Job::Append(messages, reply) => match unclaimed(&inner, &messages) {
                            Some(refusal) => {
                                let _ = reply.send(Err(refusal));
                            }
                            None => appends.push((messages, reply)),
                        },
                        Job::Mark {
                            conversation,
                            user,
                            device,
                            marks,
                            reply,
                        } => {
                            let _ = reply.send(mark(&inner, conversation, user, device, marks).await);
                        }
                        Job::Close(reply) => {
                            closed = true;
                            closers.push(reply);
                        }
                    }
                }
                if !appends.is_empty() {
                    let needs_index = index.needed_by(&appends);
                    flushing.push(spawn_flush(inner.clone(), appends, needs_index, limits.max_in_flight));
                }
            }
        }
        if flushing.is_empty() {
            for reply in closers.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }
    }
    while let Some(flushed) = flushing.next().await {
        finish(&inner, &mut index, flushed);
    }
}

/// In cluster mode, why an append may not be written here: this node holds no
/// claim on one of its conversations (or has been fenced).
fn unclaimed(inner: &Inner, messages: &[MessageRecord]) -> Option<StoreError> {
    let node = inner.cluster.get()?;
    let message = messages
        .iter()
        .find(|message| node.epoch(message.conversation).is_none())?;
    Some(StoreError::unavailable(format!(
        "this node holds no claim on {}",
        message.conversation
    )))
}

/// `first` and whatever else arrives within the batch window, up to the row limit.
async fn collect(first: Job, queue: &mut mpsc::Receiver<Job>, limits: Limits) -> Vec<Job> {
    let mut rows = rows_of(&first);
    let mut jobs = vec![first];
    let deadline = tokio::time::Instant::now() + limits.window;
    while rows < limits.max_rows {
        match tokio::time::timeout_at(deadline, queue.recv()).await {
            Ok(Some(job)) => {
                rows += rows_of(&job);
                jobs.push(job);
            }
            Ok(None) | Err(_) => break,
        }
    }
    jobs
}

/// The lowest seq of each conversation among `appends`: where a failed flush
/// may have left messages without their send records.
type Lowest = HashMap<ConversationId, Seq>;

/// Runs a flush as a task of its own, so it progresses while the writer
/// collects the next one or updates marks. Resolves to the flush, or to the
/// task's failure with what the flush held.
fn spawn_flush(
    inner: Arc<Inner>,
    appends: Vec<(Vec<MessageRecord>, Reply<()>)>,
    needs_index: HashMap<ConversationId, Activity>,
    max_in_flight: usize,
) -> impl Future<Output = (Lowest, Result<Flushed, tokio::task::JoinError>)> {
    let mut lowest = Lowest::new();
    for message in appends.iter().flat_map(|(messages, _)| messages) {
        lowest.entry(message.conversation).or_insert(message.seq);
    }
    let task = tokio::spawn(async move {
        let result = {
            let messages: Vec<&MessageRecord> = appends.iter().flat_map(|(messages, _)| messages).collect();
            flush(&inner, &messages, &needs_index, max_in_flight).await
        };
        Flushed {
            appends,
            indexed: needs_index,
            result,
        }
    });
    async move { (lowest, task.await) }
}

/// Answers a flush's appends, after noting what it stored (or may have).
fn finish(
    inner: &Inner,
    index: &mut ActivityIndex,
    (lowest, flushed): (Lowest, Result<Flushed, tokio::task::JoinError>),
) {
    let flushed = match flushed {
        Ok(flushed) => flushed,
        Err(err) => {
            // Its appends' callers see the writer gone (`Closed`); what it
            // stored is unknown, as after any failed flush.
            tracing::error!(error = %err, "a Cassandra flush task failed");
            forget_failed(inner, &lowest);
            return;
        }
    };
    let messages: Vec<&MessageRecord> = flushed.appends.iter().flat_map(|(messages, _)| messages).collect();
    match &flushed.result {
        Ok(()) => {
            for message in &messages {
                inner
                    .known_heads
                    .raise(message.conversation, (message.seq, message.server_time_ms));
            }
            index.written(flushed.indexed);
        }
        Err(err) => {
            tracing::warn!(error = %err, messages = messages.len(), "Cassandra write failed; appends not acknowledged");
            forget_failed(inner, &lowest);
            index.failed(flushed.indexed);
        }
    }
    for (_, reply) in flushed.appends {
        let _ = reply.send(flushed.result.clone());
    }
}

/// After a failed flush: its conversations' send records may be missing or
/// without their messages, so their lookups scan and their ids are not listed.
fn forget_failed(inner: &Inner, lowest: &Lowest) {
    for (conversation, from) in lowest {
        inner.suspect(*conversation, *from);
    }
}

/// Raises one device's watermarks; returns the user's across devices and whether they rose.
async fn mark(
    inner: &Inner,
    conversation: ConversationId,
    user: UserId,
    device: DeviceId,
    raised: Marks,
) -> Result<(Marks, bool), StoreError> {
    let (before_user, devices) = inner.user_marks(conversation, user).await?;
    let stored = devices.get(&device.get()).copied().unwrap_or_default();
    let updated = stored.merged(raised);
    if updated != stored {
        inner
            .execute(
                &inner.statements.upsert_mark,
                (
                    conversation.to_string(),
                    to_cql(user.get()),
                    to_cql(device.get()),
                    to_cql(updated.delivered_seq),
                    to_cql(updated.read_seq),
                ),
            )
            .await?;
    }
    let after_user = before_user.merged(updated);
    inner.known_marks.raise((conversation, user), after_user);
    Ok((after_user, after_user != before_user))
}

/// Bound values of one row, per statement: `insert_message`, `insert_send`,
/// `upsert_head`, `upsert_user_conversation`, `upsert_title`, `upsert_member`,
/// `upsert_activity`, `delete_activity`.
type MessageRow = (String, i64, i64, Vec<u8>);
type EpochMessageRow = (String, i64, i64, Vec<u8>, i64, i64);
type SendRow = (String, i64, String, i64, i64, i32);
type HeadRow = (String, i64, i64, i64);
type UserConversationRow = (i64, String, i64, i64, i64);
type TitleRow = (i64, String, i64);
type MemberRow = (i64, i64, i8, i64, i64);
type ActivityRow = (i64, i64, String, i64);
type StaleActivityRow = (i64, i64, i64, String);

/// The rows of one flush, by table and partition.
#[derive(Default)]
struct Rows {
    /// (conversation, seq) → the message as it must end up (amendments applied).
    messages: BTreeMap<(String, Seq), StoredMessage>,
    sends: HashMap<String, Vec<SendRow>>,
    heads: HashMap<String, HeadRow>,
    /// Index rows of direct conversations (their members never change).
    direct_user_conversations: HashMap<i64, Vec<UserConversationRow>>,
    direct_activity: ActivityRows,
    group: GroupRows,
}

/// Rows that group events change: written only after their messages.
#[derive(Default)]
struct GroupRows {
    user_conversations: HashMap<i64, Vec<UserConversationRow>>,
    titles: HashMap<i64, Vec<TitleRow>>,
    members: HashMap<i64, Vec<MemberRow>>,
    /// The members an event adds or removes, on the event's day.
    activity: ActivityRows,
}

impl GroupRows {
    fn is_empty(&self) -> bool {
        self.user_conversations.is_empty() && self.titles.is_empty() && self.members.is_empty()
    }
}

/// `user_activity` rows to write, and the older rows they replace, by user.
#[derive(Default)]
struct ActivityRows {
    current: HashMap<i64, Vec<ActivityRow>>,
    stale: HashMap<i64, Vec<StaleActivityRow>>,
}

impl ActivityRows {
    /// `user`'s row for `conversation` on the activity's day, replacing the one
    /// of the day before it (when known). Written at the activity's time, in µs.
    fn stage(&mut self, user: UserId, conversation: &str, activity: Activity) {
        let user = to_cql(user.get());
        let timestamp = to_cql(activity.time_ms.saturating_mul(1000));
        self.current
            .entry(user)
            .or_default()
            .push((user, activity.day, conversation.to_owned(), timestamp));
        if let Some(previous) = activity.previous.filter(|previous| *previous != activity.day) {
            self.stale
                .entry(user)
                .or_default()
                .push((timestamp, user, previous, conversation.to_owned()));
        }
    }

    fn writes(self, inner: &Inner) -> impl Iterator<Item = BoxFuture<'_, Result<(), StoreError>>> {
        let statements = &inner.statements;
        let current = self
            .current
            .into_values()
            .map(|rows| write(inner, &statements.upsert_activity, rows).boxed());
        let stale = self
            .stale
            .into_values()
            .map(|rows| write(inner, &statements.delete_activity, rows).boxed());
        current.chain(stale)
    }
}

/// Applies an edit or delete to its target's row (read into `messages`, which
/// the flush writes back), so history shows the current state; a delete removes
/// the text of every edit of the target too. Returns, for an edit, the edit it
/// follows (0: none).
async fn amend(
    inner: &Inner,
    messages: &mut BTreeMap<(String, Seq), StoredMessage>,
    message: &MessageRecord,
    amendment: Amendment,
) -> Result<Seq, StoreError> {
    let (Amendment::Edit(target) | Amendment::Delete(target)) = amendment;
    let Some(stored) = staged_message(inner, messages, message.conversation, target).await? else {
        tracing::error!(target, "amended message is missing; the amendment is kept");
        return Ok(0);
    };
    let previous_edit = stored.amend(message, amendment);
    if let Amendment::Edit(_) = amendment {
        return Ok(previous_edit);
    }
    let mut next = previous_edit;
    for _ in 0..MAX_EDIT_CHAIN {
        let Some(edit) = staged_message(inner, messages, message.conversation, next).await? else {
            break;
        };
        let before = edit.redact();
        // The chain only goes back; anything else is a corrupt record.
        if before >= next {
            break;
        }
        next = before;
    }
    Ok(0)
}

/// The message at `seq` as this flush leaves it: staged already, or read and
/// staged now (to be written back).
async fn staged_message<'a>(
    inner: &Inner,
    messages: &'a mut BTreeMap<(String, Seq), StoredMessage>,
    conversation: ConversationId,
    seq: Seq,
) -> Result<Option<&'a mut StoredMessage>, StoreError> {
    let key = (conversation.to_string(), seq);
    if !messages.contains_key(&key) {
        if seq == 0 {
            return Ok(None);
        }
        let Some(stored) = inner.message(conversation, seq).await? else {
            return Ok(None);
        };
        messages.insert(key.clone(), stored);
    }
    Ok(messages.get_mut(&key))
}

/// Writes `messages` and their rows; activity rows (and direct conversations'
/// index rows) only for the conversations in `needs_index`.
async fn flush(
    inner: &Inner,
    messages: &[&MessageRecord],
    needs_index: &HashMap<ConversationId, Activity>,
    max_in_flight: usize,
) -> Result<(), StoreError> {
    let mut rows = Rows::default();
    for message in messages {
        let key = message.conversation.to_string();
        let seq = to_cql(message.seq);
        let mut previous_edit = 0;
        if let Some(amendment) = message.amends {
            previous_edit = amend(inner, &mut rows.messages, message, amendment).await?;
        }
        if let (ConversationId::Group(group), Some(event)) = (message.conversation, &message.event) {
            stage_group_event(&mut rows.group, group, message, event);
        }
        rows.sends.entry(key.clone()).or_default().push((
            key.clone(),
            to_cql(message.sender_device.get()),
            message.client_msg_id.clone(),
            seq,
            to_cql(message.server_time_ms),
            inner.send_ttl_s,
        ));
        // Messages arrive in seq order per conversation: the last one is the head.
        rows.heads
            .insert(key.clone(), (key.clone(), seq, to_cql(message.server_time_ms), seq));
        let mut stored = StoredMessage::of(message);
        stored.previous_edit = previous_edit;
        rows.messages.insert((key, message.seq), stored);
    }
    for (conversation, activity) in needs_index {
        let key = conversation.to_string();
        for member in conversation.direct_members() {
            rows.direct_user_conversations
                .entry(to_cql(member.get()))
                .or_default()
                .push((to_cql(member.get()), key.clone(), 0, 0, to_cql(activity.seq)));
            rows.direct_activity.stage(member, &key, *activity);
        }
    }

    let statements = &inner.statements;
    // Per conversation its buckets of messages in ascending order, stopping at
    // the first failure; send records beside them.
    let (mut writes, visible) = match inner.cluster.get() {
        None => (message_writes(inner, rows.messages), Vec::new()),
        Some(node) => {
            let epochs = epochs_of(node, messages)?;
            // Amendments rewrite rows that may be visible already: only once
            // the fence check passed (docs/CLUSTER.md).
            let (new, amended): (BTreeMap<_, _>, BTreeMap<_, _>) = rows
                .messages
                .into_iter()
                .partition(|((key, seq), _)| epochs.get(key).is_some_and(|epoch| *seq >= epoch.lowest));
            (
                epoch_message_writes(inner, new, &epochs),
                epoch_message_writes(inner, amended, &epochs),
            )
        }
    };
    for partition in rows.sends.into_values() {
        writes.push(write(inner, &statements.insert_send, partition).boxed());
    }
    // Heads and index rows: in cluster mode only after the fence check, so no
    // reader is pointed at a row its node could not acknowledge.
    let mut after_check = visible;
    for head in rows.heads.into_values() {
        after_check.push(write(inner, &statements.upsert_head, vec![head]).boxed());
    }
    for partition in rows.direct_user_conversations.into_values() {
        after_check.push(write(inner, &statements.upsert_user_conversation, partition).boxed());
    }
    after_check.extend(rows.direct_activity.writes(inner));
    match inner.cluster.get() {
        None => {
            // One round trip.
            writes.extend(after_check);
            run_all(writes, max_in_flight).await?;
        }
        Some(node) => {
            run_all(writes, max_in_flight).await?;
            super::ownership::check_fence(inner, node).await?;
            run_all(after_check, max_in_flight).await?;
        }
    }

    if !rows.group.is_empty() {
        // Group state, only once every message (its events among them) is stored.
        let group = rows.group;
        let mut writes: Vec<BoxFuture<'_, Result<(), StoreError>>> = Vec::new();
        for partition in group.user_conversations.into_values() {
            writes.push(write(inner, &statements.upsert_user_conversation, partition).boxed());
        }
        for partition in group.titles.into_values() {
            writes.push(write(inner, &statements.upsert_title, partition).boxed());
        }
        for partition in group.members.into_values() {
            writes.push(write(inner, &statements.upsert_member, partition).boxed());
        }
        writes.extend(group.activity.writes(inner));
        run_all(writes, max_in_flight).await?;
    }

    // A group's first message of a day: its members' activity rows, once the
    // flush's events changed who they are.
    let groups = needs_index
        .iter()
        .filter_map(|(conversation, activity)| match conversation {
            ConversationId::Group(group) => Some(async move {
                let members = inner.current_members(*group).await?;
                Ok::<_, StoreError>((conversation.to_string(), *activity, members))
            }),
            ConversationId::Direct { .. } => None,
        });
    let mut activity = ActivityRows::default();
    for (key, day_activity, members) in try_join_all(groups).await? {
        for (member, _) in members {
            activity.stage(member, &key, day_activity);
        }
    }
    run_all(activity.writes(inner).collect(), max_in_flight).await
}

/// A single node's message rows: per conversation, its buckets in ascending
/// order, one after another.
fn message_writes(
    inner: &Inner,
    messages: BTreeMap<(String, Seq), StoredMessage>,
) -> Vec<BoxFuture<'_, Result<(), StoreError>>> {
    let mut conversations: HashMap<String, BTreeMap<i64, Vec<MessageRow>>> = HashMap::new();
    for ((key, seq), stored) in messages {
        conversations
            .entry(key.clone())
            .or_default()
            .entry(bucket(seq))
            .or_default()
            .push((key, bucket(seq), to_cql(seq), stored.encode_to_vec()));
    }
    conversations
        .into_values()
        .map(|buckets| in_order(inner, &inner.statements.insert_message, buckets))
        .collect()
}

/// A conversation's epoch in a flush, and the flush's seqs of it.
struct FlushEpoch {
    epoch: Epoch,
    /// The flush's lowest seq of the conversation: rows below it are amended.
    lowest: Seq,
    /// Its highest: the write timestamp's seq.
    highest: Seq,
}

/// In cluster mode, each conversation's epoch (this node's claim) and seqs,
/// by conversation key; an error if a claim is gone (released or fenced since
/// the append was taken).
fn epochs_of(node: &ClusterNode, messages: &[&MessageRecord]) -> Result<HashMap<String, FlushEpoch>, StoreError> {
    let mut epochs: HashMap<String, FlushEpoch> = HashMap::new();
    for message in messages {
        let key = message.conversation.to_string();
        match epochs.get_mut(&key) {
            Some(epoch) => {
                epoch.lowest = epoch.lowest.min(message.seq);
                epoch.highest = epoch.highest.max(message.seq);
            }
            None => {
                let epoch = node.epoch(message.conversation).ok_or_else(|| {
                    StoreError::unavailable(format!("this node no longer holds {}", message.conversation))
                })?;
                epochs.insert(
                    key,
                    FlushEpoch {
                        epoch,
                        lowest: message.seq,
                        highest: message.seq,
                    },
                );
            }
        }
    }
    Ok(epochs)
}

/// Cluster mode's message rows: each stamped with its conversation's epoch and
/// written at [`write_timestamp`], so a later epoch's row wins.
fn epoch_message_writes<'a>(
    inner: &'a Inner,
    messages: BTreeMap<(String, Seq), StoredMessage>,
    epochs: &HashMap<String, FlushEpoch>,
) -> Vec<BoxFuture<'a, Result<(), StoreError>>> {
    let mut conversations: HashMap<String, BTreeMap<i64, Vec<EpochMessageRow>>> = HashMap::new();
    for ((key, seq), stored) in messages {
        let Some(epoch) = epochs.get(&key) else { continue };
        let timestamp = write_timestamp(epoch.epoch, epoch.highest);
        conversations
            .entry(key.clone())
            .or_default()
            .entry(bucket(seq))
            .or_default()
            .push((
                key,
                bucket(seq),
                to_cql(seq),
                stored.encode_to_vec(),
                to_cql(epoch.epoch),
                timestamp,
            ));
    }
    conversations
        .into_values()
        .map(|buckets| in_order(inner, &inner.statements.insert_message_in_epoch, buckets))
        .collect()
}

/// Writes one conversation's buckets in ascending order, stopping at the first
/// failure, so a failed flush never leaves a later seq stored above a missing one.
fn in_order<'a, V: SerializeRow + Send + Sync + 'a>(
    inner: &'a Inner,
    statement: &'a PreparedStatement,
    buckets: BTreeMap<i64, Vec<V>>,
) -> BoxFuture<'a, Result<(), StoreError>> {
    async move {
        for partition in buckets.into_values() {
            write(inner, statement, partition).await?;
        }
        Ok(())
    }
    .boxed()
}

/// Runs `writes`, at most `max_in_flight` at once; the first error, if any.
async fn run_all(writes: Vec<BoxFuture<'_, Result<(), StoreError>>>, max_in_flight: usize) -> Result<(), StoreError> {
    let results: Vec<Result<(), StoreError>> = stream::iter(writes)
        .buffer_unordered(max_in_flight.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// The member, title, index and activity rows for a group event carried by `message`.
fn stage_group_event(rows: &mut GroupRows, group: GroupId, message: &MessageRecord, event: &GroupEvent) {
    let group_key = to_cql(group.get());
    let conversation = ConversationId::Group(group).to_string();
    let at = to_cql(message.seq);
    let activity = Activity {
        day: day(message.server_time_ms),
        previous: None,
        time_ms: message.server_time_ms,
        seq: message.seq,
    };
    for (user, member) in event.member_updates(message.sender, message.seq) {
        let (left_seq, left_time_ms) = match member.left_seq {
            Some(seq) => (to_cql(seq), to_cql(message.server_time_ms)),
            None => (0, 0),
        };
        rows.members.entry(group_key).or_default().push((
            group_key,
            to_cql(user.get()),
            super::role_code(member.role),
            left_seq,
            at,
        ));
        rows.user_conversations.entry(to_cql(user.get())).or_default().push((
            to_cql(user.get()),
            conversation.clone(),
            left_seq,
            left_time_ms,
            at,
        ));
        rows.activity.stage(user, &conversation, activity);
    }
    if let Some(title) = event.title() {
        rows.titles
            .entry(group_key)
            .or_default()
            .push((group_key, title.to_owned(), at));
    }
}

/// Writes rows of one partition: one statement, or one unlogged batch (or, with
/// `cassandra.batch_writes = false`, one statement per row).
async fn write<V: SerializeRow>(inner: &Inner, statement: &PreparedStatement, rows: Vec<V>) -> Result<(), StoreError> {
    if rows.len() == 1 || !inner.batch_writes {
        futures::future::try_join_all(rows.into_iter().map(|row| inner.execute(statement, row))).await?;
        return Ok(());
    }
    let mut batch = Batch::new(BatchType::Unlogged);
    for _ in 0..rows.len() {
        batch.append_statement(statement.clone());
    }
    batch.set_consistency(inner.consistency);
    batch.set_request_timeout(Some(inner.request_timeout));
    inner.session.batch(&batch, rows).await.map_err(unavailable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const DAY_MS: u64 = 24 * 60 * 60 * 1000;

    fn append(conversation: ConversationId, times_ms: &[u64]) -> (Vec<MessageRecord>, Reply<()>) {
        let messages = times_ms
            .iter()
            .enumerate()
            .map(|(i, time_ms)| MessageRecord {
                conversation,
                seq: i as u64 + 1,
                sender: UserId::new(1).unwrap(),
                sender_device: DeviceId::new(1).unwrap(),
                client_msg_id: i.to_string(),
                body: String::new(),
                server_time_ms: *time_ms,
                event: None,
                amends: None,
                deleted: false,
                edited_by: None,
            })
            .collect();
        (messages, oneshot::channel().0)
    }

    #[test]
    fn activity_rows_are_written_once_a_day_per_conversation_replacing_the_day_before() {
        let [same_day, next_day, unknown, past_midnight] =
            std::array::from_fn(|_| ConversationId::direct(UserId::random(), UserId::random()));
        let mut index = ActivityIndex {
            written: HashMap::from([(same_day, 10), (next_day, 10), (past_midnight, 10)]),
            ..Default::default()
        };
        let appends = [
            append(same_day, &[10 * DAY_MS + 5]),
            append(next_day, &[11 * DAY_MS]),
            append(unknown, &[10 * DAY_MS]),
            append(past_midnight, &[11 * DAY_MS - 1, 11 * DAY_MS + 1]),
        ];
        let needed = index.needed_by(&appends);
        let days = |conversation| {
            needed
                .get(&conversation)
                .map(|a: &Activity| (a.day, a.previous, a.time_ms))
        };
        assert_eq!(needed.len(), 3);
        assert_eq!(days(same_day), None);
        assert_eq!(days(next_day), Some((11, Some(10), 11 * DAY_MS)));
        assert_eq!(days(unknown), Some((10, None, 10 * DAY_MS)));
        assert_eq!(days(past_midnight), Some((11, Some(10), 11 * DAY_MS + 1)));
    }

    #[test]
    fn a_failed_flush_has_its_activity_rows_written_by_the_next_one() {
        let [failed, later] = std::array::from_fn(|_| ConversationId::direct(UserId::random(), UserId::random()));
        let mut index = ActivityIndex::default();
        let first = index.needed_by(&[append(failed, &[10 * DAY_MS])]);
        index.failed(first);
        // The next flush holds another conversation only, and still writes them.
        let next = index.needed_by(&[append(later, &[10 * DAY_MS])]);
        assert_eq!(
            next.keys().copied().collect::<HashSet<_>>(),
            HashSet::from([failed, later])
        );
        index.written(next);
        assert!(index.needed_by(&[append(failed, &[10 * DAY_MS + 1])]).is_empty());
        // A day written later is not taken back by an older one.
        let day_12 = index.needed_by(&[append(failed, &[12 * DAY_MS])]);
        let day_11 = Activity {
            day: 11,
            ..day_12[&failed]
        };
        index.written(day_12);
        index.written(HashMap::from([(failed, day_11)]));
        assert_eq!(index.written[&failed], 12);
    }
}
