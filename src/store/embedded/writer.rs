//! The embedded store's single writer: batching, staging every kind of write into
//! one atomic fjall batch, committing and persisting it, answering the callers
//! with the batch's fate, and publishing what readers may see.
//!
//! One [`Writer`] behind a mutex, so one batch at a time. Its thread drains the
//! queue of jobs; with `durability = "buffered"`, a shard that appends messages
//! while the writer is free commits them itself (see
//! `EmbeddedStore::append_messages`): the batch is a journal write and memtable
//! inserts, microseconds, and the hand-off to the writer thread and back (two
//! wake-ups on a busy machine) was most of a send's time between sequenced and
//! committed. With `"sync"`, every batch goes through the thread, whose fsync
//! covers whatever queued meanwhile.
//!
//! Faults pass instead of ending the store:
//! - Before each batch the writer checks the free space under the data dir; below
//!   `store.min_free_mib` it refuses writes with `UNAVAILABLE` ("storage is full")
//!   without touching fjall, and takes them again as soon as space is back.
//! - A commit, fsync or background flush that fails anyway (ENOSPC after all,
//!   EMFILE, EIO) leaves fjall refusing every later write. The writer then refuses
//!   writes too (`UNAVAILABLE`, with the cause), and on the next write or probe
//!   after its backoff (100 ms, doubling to 10 s) closes the database and reopens
//!   it from disk. A batch that failed was never acknowledged; if its bytes did
//!   reach the journal, the reopened database has it, and its senders' retries
//!   find their original acks.

use super::keys::*;
use super::{Inner, Shared, View, corrupt, fjall_error, io_error};
use crate::config::{Durability, StoreConfig};
use crate::store::encoding::{MAX_EDIT_CHAIN, StoredMessage};
use crate::store::{Amendment, DeviceRecord, GroupEvent, MessageRecord, NewUser, Rotation, StoreError, UserRecord};
use confab_protocol::ids::{ConversationId, DeviceId, GroupId, UserId};
use confab_protocol::{Marks, PushToken};
use fjall::PersistMode;
use prost::Message as _;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// First wait before reopening a failed database; it doubles up to the maximum.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long a reopen waits for readers to let go of the old database.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// A batch whose commit (journal write and memtable inserts) or fsync takes
/// longer than this is logged with the LSM trees' state at that moment.
const SLOW_COMMIT: Duration = Duration::from_millis(50);
/// How often the LSM gauges are sampled (each sample takes the trees' locks).
const LSM_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Direct conversations remembered as already in both members' conversation
/// index; past this many the memory starts over (each is written once more).
const MAX_INDEXED_DIRECTS: usize = 64 * 1024;

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A change to one user's record.
pub(super) enum UserUpdate {
    Password(String),
    DisplayName(String),
}

pub(super) enum WriteJob {
    CreateUser(NewUser, Reply<UserRecord>),
    PutDevice(DeviceRecord, Reply<()>),
    DeleteDevice(UserId, DeviceId, Reply<bool>),
    Append(Vec<MessageRecord>, Reply<()>),
    Purge(Vec<fjall::UserKey>, Reply<usize>),
    Mark(ConversationId, UserId, DeviceId, Marks, Reply<(Marks, bool)>),
    RotateRefresh(Rotation, Reply<bool>),
    UpdateUser(UserId, UserUpdate, Reply<()>),
    DeleteUser(UserId, Reply<bool>),
    PushToken(UserId, DeviceId, Option<PushToken>, Reply<()>),
    PendingPush(UserId, Option<Vec<u8>>, Reply<()>),
    Mute(UserId, ConversationId, bool, Reply<()>),
    /// Answers whether writes are taken now (recovering first if it is time).
    Probe(Reply<()>),
    Close(Reply<()>),
}

/// Whether the writer takes writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Condition {
    Healthy,
    /// Free space is below the minimum; fjall itself is fine.
    Full(String),
    /// A commit or flush failed; the database is reopened before the next write.
    Failed(String),
}

/// The single writer: owns batching, commit, persistence and recovery.
pub(super) struct Writer {
    shared: Arc<Shared>,
    /// The open database; `None` once a reopen has let go of it.
    inner: Option<Arc<Inner>>,
    /// A database let go of for a reopen, until its last reader is done.
    closing: Option<Weak<Inner>>,
    path: PathBuf,
    durability: Durability,
    max_batch: usize,
    min_free_bytes: u64,
    /// When to try reopening a failed database, and the wait after that.
    retry: (Instant, Duration),
    closed: bool,
    /// Direct conversations whose `user_convs` rows a committed batch wrote:
    /// those rows never change, so later batches leave them alone.
    indexed_directs: HashSet<ConversationId>,
    /// The LSM state of the two keyspaces every message writes to, as gauges.
    lsm: LsmGauges,
}

/// Tables waiting in level 0 and sealed memtables waiting for a flush, for the
/// keyspaces every message writes to: fjall slows writes down once level 0
/// holds 20 runs, halts them at 30, and halts them (100 ms at a time) while a
/// keyspace has 4 sealed memtables, so these say how close the store is to that.
struct LsmGauges {
    messages: (metrics::Gauge, metrics::Gauge),
    sends: (metrics::Gauge, metrics::Gauge),
    /// Bytes in every keyspace's active and sealed memtables: the store's
    /// largest share of the process's memory.
    write_buffer: metrics::Gauge,
    /// When the gauges were last sampled.
    sampled_at: Option<Instant>,
}

impl LsmGauges {
    fn new() -> Self {
        let pair = |keyspace: &'static str| {
            (
                metrics::gauge!("confab_store_l0_tables", "keyspace" => keyspace),
                metrics::gauge!("confab_store_sealed_memtables", "keyspace" => keyspace),
            )
        };
        Self {
            messages: pair("messages"),
            sends: pair("sends"),
            write_buffer: metrics::gauge!("confab_store_write_buffer_bytes"),
            sampled_at: None,
        }
    }

    /// Sets the gauges from `inner`; returns (l0 tables, sealed memtables) of
    /// messages, then of sends.
    fn sample(&mut self, inner: &Inner) -> [(usize, usize); 2] {
        self.sampled_at = Some(Instant::now());
        self.write_buffer.set(inner.db.write_buffer_size() as f64);
        let state = |keyspace: &fjall::Keyspace, (l0, sealed): &(metrics::Gauge, metrics::Gauge)| {
            let now = (keyspace.l0_table_count(), keyspace.sealed_memtable_count());
            l0.set(now.0 as f64);
            sealed.set(now.1 as f64);
            now
        };
        [state(&inner.messages, &self.messages), state(&inner.sends, &self.sends)]
    }
}

/// Answers one job once the batch's fate is known: `Ok` when it is durable.
type Answer = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Answers `reply` with `value` if the batch commits.
fn on_commit<T: Send + 'static>(reply: Reply<T>, value: T) -> Answer {
    Box::new(move |outcome| {
        // A caller that went away no longer needs its answer.
        let _ = reply.send(outcome.map(|()| value));
    })
}

/// Answers `reply` with `err` whatever happens to the batch.
fn refuse<T: Send + 'static>(reply: Reply<T>, err: StoreError) -> Answer {
    Box::new(move |_| {
        let _ = reply.send(Err(err));
    })
}

impl Writer {
    pub(super) fn new(shared: Arc<Shared>, inner: Arc<Inner>, path: PathBuf, config: &StoreConfig) -> Self {
        Self {
            shared,
            inner: Some(inner),
            closing: None,
            path,
            durability: config.durability,
            max_batch: config.max_batch,
            min_free_bytes: config.min_free_mib.saturating_mul(1024 * 1024),
            retry: (Instant::now(), FIRST_RETRY),
            closed: false,
            indexed_directs: HashSet::new(),
            lsm: LsmGauges::new(),
        }
    }

    /// The writer thread: commits what is queued, a batch at a time, until the
    /// store is closed.
    pub(super) fn run(writer: &Mutex<Self>, mut jobs: mpsc::Receiver<WriteJob>) {
        let max_batch = writer.lock().unwrap_or_else(PoisonError::into_inner).max_batch;
        let mut queue = Vec::with_capacity(max_batch);
        while let Some(job) = jobs.blocking_recv() {
            queue.push(job);
            while queue.len() < max_batch {
                match jobs.try_recv() {
                    Ok(job) => queue.push(job),
                    Err(_) => break,
                }
            }
            let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
            writer.commit(&mut queue);
            if writer.closed {
                break;
            }
        }
        // Later senders see a closed channel and get `StoreError::Closed`.
    }

    /// Stages `jobs` into one batch, commits and persists it, and answers them.
    pub(super) fn commit(&mut self, jobs: &mut Vec<WriteJob>) {
        let writable = self.writable();
        // Edits and deletes rewrite earlier rows, maybe staged in this very batch:
        // only then are staged messages kept at hand.
        let amends = jobs.iter().any(|job| {
            matches!(job, WriteJob::Append(messages, _) if messages.iter().any(|message| message.amends.is_some()))
        });
        if self.indexed_directs.len() > MAX_INDEXED_DIRECTS {
            self.indexed_directs.clear();
        }
        let indexed = std::mem::take(&mut self.indexed_directs);
        let mut staging = writable
            .as_ref()
            .ok()
            .map(|inner| Staging::new(inner.clone(), amends, indexed));
        let mut answers: Vec<Answer> = Vec::new();
        let mut closers: Vec<Reply<()>> = Vec::new();
        for job in jobs.drain(..) {
            if self.closed || !closers.is_empty() {
                answers.push(refuse_job(job, StoreError::Closed));
                continue;
            }
            match (job, &mut staging, &writable) {
                (WriteJob::Close(reply), ..) => closers.push(reply),
                (WriteJob::Probe(reply), _, Ok(_)) => answers.push(on_commit(reply, ())),
                (job, Some(staging), _) => answers.push(staging.stage(job)),
                (job, _, Err(err)) => answers.push(refuse_job(job, err.clone())),
                (job, None, Ok(_)) => answers.push(refuse_job(job, StoreError::Closed)),
            }
        }
        let outcome = match staging {
            Some(staging) if !staging.batch.is_empty() => self.persist(staging),
            Some(staging) => {
                self.indexed_directs = staging.indexed_directs;
                Ok(())
            }
            None => Ok(()),
        };
        for answer in answers {
            answer(outcome.clone());
        }
        if !closers.is_empty() {
            self.closed = true;
            let closed = self.close();
            for reply in closers {
                on_commit(reply, ())(closed.clone());
            }
        }
    }

    /// The database, if writes may go to it now: a failed one is reopened once
    /// its retry time has come, and free space is checked.
    fn writable(&mut self) -> Result<Arc<Inner>, StoreError> {
        if let Condition::Failed(reason) = self.shared.condition() {
            if Instant::now() < self.retry.0 {
                return Err(StoreError::unavailable(reason));
            }
            if let Err(err) = self.reopen() {
                let wait = self.retry.1;
                self.retry = (Instant::now() + wait, (wait * 2).min(MAX_RETRY));
                tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "reopening the store failed");
                return Err(StoreError::unavailable(reason));
            }
            tracing::info!("store reopened after a failure; writes are taken again");
        }
        let Some(inner) = self.inner.clone() else {
            return Err(StoreError::Closed);
        };
        match free_bytes(&self.path) {
            Ok(free) if free < self.min_free_bytes => {
                let reason = "storage is full; writes resume once space is freed".to_owned();
                if !matches!(self.shared.condition(), Condition::Full(_)) {
                    tracing::error!(
                        free_mib = free / (1024 * 1024),
                        min_free_mib = self.min_free_bytes / (1024 * 1024),
                        path = %self.path.display(),
                        "free space below store.min_free_mib: refusing writes"
                    );
                }
                self.set_condition(Condition::Full(reason.clone()));
                return Err(StoreError::unavailable(reason));
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "cannot read the free space of the data dir"),
        }
        if matches!(self.shared.condition(), Condition::Full(_)) {
            tracing::info!("free space is back above store.min_free_mib; writes are taken again");
        }
        self.set_condition(Condition::Healthy);
        Ok(inner)
    }

    /// Commits the batch, then makes it as durable as configured, then lets
    /// readers see it. A failure fails the store until it is reopened.
    fn persist(&mut self, staging: Staging) -> Result<(), StoreError> {
        let Staging {
            inner,
            batch,
            indexed_directs,
            ..
        } = staging;
        let started = Instant::now();
        let result = batch.commit().and_then(|()| {
            let committed = started.elapsed();
            let synced = match self.durability {
                Durability::Sync => inner.db.persist(PersistMode::SyncData),
                Durability::Buffered => Ok(()),
            };
            let took = started.elapsed();
            let slow = took >= SLOW_COMMIT;
            // Off the hot path: sampled at most once a second, and for a slow batch.
            if !slow && self.lsm.sampled_at.is_some_and(|at| at.elapsed() < LSM_SAMPLE_INTERVAL) {
                return synced;
            }
            let [messages, sends] = self.lsm.sample(&inner);
            if slow {
                tracing::warn!(
                    commit_ms = committed.as_millis() as u64,
                    sync_ms = (took - committed).as_millis() as u64,
                    messages_l0_tables = messages.0,
                    messages_sealed_memtables = messages.1,
                    sends_l0_tables = sends.0,
                    sends_sealed_memtables = sends.1,
                    "slow store batch"
                );
            }
            synced
        });
        match result {
            Ok(()) => {
                self.publish(View::latest(inner));
                self.indexed_directs = indexed_directs;
                Ok(())
            }
            Err(err) => {
                let reason = describe(&err);
                tracing::error!(error = %err, "store commit failed; refusing writes until the store is reopened");
                self.set_condition(Condition::Failed(reason.clone()));
                self.retry = (Instant::now() + FIRST_RETRY, FIRST_RETRY * 2);
                Err(StoreError::unavailable(reason))
            }
        }
    }

    /// Closes the database and opens it again from disk.
    fn reopen(&mut self) -> Result<(), StoreError> {
        // Readers are told the store is reopening until it is open again.
        *self.shared.view.write().unwrap_or_else(PoisonError::into_inner) = None;
        if let Some(inner) = self.inner.take() {
            self.closing = Some(Arc::downgrade(&inner));
        }
        if let Some(closing) = &self.closing {
            let deadline = Instant::now() + CLOSE_WAIT;
            while closing.strong_count() > 0 {
                if Instant::now() >= deadline {
                    return Err(StoreError::unavailable("readers still hold the failed database"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.closing = None;
        self.indexed_directs.clear();
        let inner = Arc::new(Inner::open(&self.path)?);
        self.publish(View::latest(inner.clone()));
        self.inner = Some(inner);
        self.set_condition(Condition::Healthy);
        self.retry.1 = FIRST_RETRY;
        Ok(())
    }

    /// At shutdown: makes everything acknowledged durable. A store that failed
    /// acknowledged nothing it could not make durable, so it closes quietly.
    fn close(&mut self) -> Result<(), StoreError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        match (inner.db.persist(PersistMode::SyncAll), self.shared.condition()) {
            (Ok(()), _) => Ok(()),
            (Err(err), Condition::Failed(reason)) => {
                tracing::warn!(error = %err, %reason, "closing a failed store; every acknowledged write was durable");
                Ok(())
            }
            (Err(err), _) => {
                tracing::error!(error = %err, "final store sync failed");
                Err(StoreError::io_because("the final sync", err))
            }
        }
    }

    fn publish(&self, view: View) {
        *self.shared.view.write().unwrap_or_else(PoisonError::into_inner) = Some(view);
    }

    fn set_condition(&self, condition: Condition) {
        let mut current = self.shared.condition.write().unwrap_or_else(PoisonError::into_inner);
        if *current != condition {
            *current = condition;
        }
    }
}

/// Bytes free for unprivileged writes on the file system holding `path`.
fn free_bytes(path: &std::path::Path) -> Result<u64, StoreError> {
    let stats = rustix::fs::statvfs(path).map_err(|err| io_error(path, err.into()))?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// What clients are told about a failed commit: the cause when it is one they
/// can understand (it will pass), not the server's paths.
fn describe(err: &fjall::Error) -> String {
    let io = match err {
        fjall::Error::Io(io) | fjall::Error::Storage(fjall::LsmError::Io(io)) => Some(io),
        _ => None,
    };
    match io {
        Some(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) =>
        {
            "storage is full; writes resume once space is freed".into()
        }
        Some(io) if matches!(io.raw_os_error(), Some(23 | 24)) => {
            "the server ran out of file descriptors; writes resume shortly".into()
        }
        Some(_) => "a storage write failed; writes resume once the store is reopened".into(),
        None if matches!(err, fjall::Error::Poisoned) => {
            "a background storage task failed; writes resume once the store is reopened".into()
        }
        None => "the store failed; writes resume once it is reopened".into(),
    }
}

/// One batch being staged: the writes, and what earlier jobs of it changed
/// that reads of the database do not see yet.
struct Staging {
    inner: Arc<Inner>,
    /// The database as last committed, for the checks staging makes.
    latest: View,
    batch: fjall::OwnedWriteBatch,
    new_names: HashSet<String>,
    new_ids: HashSet<UserId>,
    marks: HashMap<Vec<u8>, Marks>,
    /// Devices written (`None`: deleted) earlier in this batch.
    devices: HashMap<[u8; 16], Option<StoredDevice>>,
    /// Users written (`None`: deleted) earlier in this batch.
    users: HashMap<[u8; 8], Option<StoredUser>>,
    /// Messages staged so far, kept only when the batch amends some.
    messages: Option<HashMap<Vec<u8>, StoredMessage>>,
    /// Direct conversations already in their members' index (the writer's,
    /// plus those this batch adds; kept only if it commits).
    indexed_directs: HashSet<ConversationId>,
}

impl Staging {
    fn new(inner: Arc<Inner>, amends: bool, indexed_directs: HashSet<ConversationId>) -> Self {
        Self {
            latest: View::latest(inner.clone()),
            batch: inner.db.batch(),
            inner,
            new_names: HashSet::new(),
            new_ids: HashSet::new(),
            marks: HashMap::new(),
            devices: HashMap::new(),
            users: HashMap::new(),
            messages: amends.then(HashMap::new),
            indexed_directs,
        }
    }

    fn stage(&mut self, job: WriteJob) -> Answer {
        match job {
            WriteJob::CreateUser(user, reply) => match self.stage_user(user) {
                Ok(record) => on_commit(reply, record),
                Err(err) => refuse(reply, err),
            },
            WriteJob::PutDevice(device, reply) => {
                self.stage_device(device_key(device.user, device.id), Some(StoredDevice::of(&device)));
                on_commit(reply, ())
            }
            WriteJob::DeleteDevice(user, device, reply) => {
                let key = device_key(user, device);
                match self.device(key) {
                    Ok(existed) => {
                        self.stage_device(key, None);
                        self.batch.remove(&self.inner.push_tokens, key);
                        on_commit(reply, existed.is_some())
                    }
                    Err(err) => refuse(reply, err),
                }
            }
            WriteJob::RotateRefresh(rotation, reply) => match self.stage_rotation(&rotation) {
                Ok(rotated) => on_commit(reply, rotated),
                Err(err) => refuse(reply, err),
            },
            WriteJob::UpdateUser(user, update, reply) => match self.stage_user_update(user, update) {
                Ok(()) => on_commit(reply, ()),
                Err(err) => refuse(reply, err),
            },
            WriteJob::DeleteUser(user, reply) => match self.stage_user_delete(user) {
                Ok(existed) => on_commit(reply, existed),
                Err(err) => refuse(reply, err),
            },
            WriteJob::Mute(user, conversation, muted, reply) => {
                let key = user_conv_key(user, conversation);
                match muted {
                    true => self.batch.insert(&self.inner.mutes, key, []),
                    false => self.batch.remove(&self.inner.mutes, key),
                }
                on_commit(reply, ())
            }
            WriteJob::PendingPush(user, pending, reply) => {
                let key = user.get().to_be_bytes();
                match pending {
                    Some(pending) => self.batch.insert(&self.inner.push_pending, key, pending),
                    None => self.batch.remove(&self.inner.push_pending, key),
                }
                on_commit(reply, ())
            }
            WriteJob::PushToken(user, device, token, reply) => {
                let key = device_key(user, device);
                match token {
                    Some(token) => self
                        .batch
                        .insert(&self.inner.push_tokens, key, encode_push_token(&token)),
                    None => self.batch.remove(&self.inner.push_tokens, key),
                }
                on_commit(reply, ())
            }
            WriteJob::Append(messages, reply) => {
                self.stage_messages(messages);
                on_commit(reply, ())
            }
            WriteJob::Mark(conversation, user, device, raised, reply) => {
                match self.stage_mark(conversation, user, device, raised) {
                    Ok(outcome) => on_commit(reply, outcome),
                    Err(err) => refuse(reply, err),
                }
            }
            WriteJob::Purge(keys, reply) => {
                let count = keys.len();
                for key in keys {
                    self.batch.remove(&self.inner.sends, key);
                }
                on_commit(reply, count)
            }
            WriteJob::Probe(reply) => on_commit(reply, ()),
            WriteJob::Close(reply) => refuse(reply, StoreError::Closed),
        }
    }

    /// A device as this batch leaves it.
    fn device(&self, key: [u8; 16]) -> Result<Option<StoredDevice>, StoreError> {
        if let Some(staged) = self.devices.get(&key) {
            return Ok(staged.clone());
        }
        match self.latest.get(&self.inner.devices, key).map_err(fjall_error)? {
            Some(value) => Ok(Some(StoredDevice::decode(&*value).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    fn stage_device(&mut self, key: [u8; 16], device: Option<StoredDevice>) {
        match &device {
            Some(stored) => self.batch.insert(&self.inner.devices, key, stored.encode_to_vec()),
            None => self.batch.remove(&self.inner.devices, key),
        }
        self.devices.insert(key, device);
    }

    /// Rotates a refresh secret if the device still has the expected one.
    fn stage_rotation(&mut self, rotation: &Rotation) -> Result<bool, StoreError> {
        let key = device_key(rotation.user, rotation.device);
        let Some(mut stored) = self.device(key)? else {
            return Ok(false);
        };
        if stored.refresh_hash != rotation.expected {
            return Ok(false);
        }
        stored.previous_refresh_hash = std::mem::replace(&mut stored.refresh_hash, rotation.refresh_hash.to_vec());
        stored.refresh_expires_at_ms = rotation.refresh_expires_at_ms;
        stored.refreshed_at_ms = rotation.refreshed_at_ms;
        self.stage_device(key, Some(stored));
        Ok(true)
    }

    /// A user as this batch leaves it.
    fn user(&self, key: [u8; 8]) -> Result<Option<StoredUser>, StoreError> {
        if let Some(staged) = self.users.get(&key) {
            return Ok(staged.clone());
        }
        match self.latest.get(&self.inner.users, key).map_err(fjall_error)? {
            Some(value) => Ok(Some(StoredUser::decode(&*value).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    fn stage_user_update(&mut self, user: UserId, update: UserUpdate) -> Result<(), StoreError> {
        let key = user.get().to_be_bytes();
        // Deleted meanwhile: nothing to change.
        let Some(mut stored) = self.user(key)? else {
            return Ok(());
        };
        match update {
            UserUpdate::Password(password_hash) => stored.password_hash = password_hash,
            UserUpdate::DisplayName(display_name) => stored.display_name = display_name,
        }
        self.batch.insert(&self.inner.users, key, stored.encode_to_vec());
        self.users.insert(key, Some(stored));
        Ok(())
    }

    /// Removes a user and its name; whether it existed.
    fn stage_user_delete(&mut self, user: UserId) -> Result<bool, StoreError> {
        let key = user.get().to_be_bytes();
        let Some(stored) = self.user(key)? else {
            return Ok(false);
        };
        self.batch.remove(&self.inner.users, key);
        self.batch.remove(&self.inner.usernames, stored.username.as_bytes());
        self.users.insert(key, None);
        Ok(true)
    }

    fn stage_messages(&mut self, messages: Vec<MessageRecord>) {
        // A direct conversation's two index rows, with the first batch that
        // holds one of its messages.
        for message in &messages {
            let conversation = message.conversation;
            if !matches!(conversation, ConversationId::Direct { .. }) || !self.indexed_directs.insert(conversation) {
                continue;
            }
            for member in conversation.direct_members() {
                self.batch.insert(
                    &self.inner.user_convs,
                    user_conv_key(member, conversation),
                    encode_pair(0, 0),
                );
            }
        }
        for message in messages {
            let key = message_key(message.conversation, message.seq);
            if let (ConversationId::Group(group), Some(event)) = (message.conversation, &message.event) {
                self.stage_group_event(group, &message, event);
            }
            let mut stored = StoredMessage::of(&message);
            if let Some(amendment) = message.amends {
                match self.stage_amendment(&message, amendment) {
                    Ok(previous_edit) => stored.previous_edit = previous_edit,
                    Err(err) => tracing::error!(error = %err, "amending a message failed; the amendment is kept"),
                }
            }
            self.batch
                .insert(&self.inner.messages, key.clone(), stored.encode_to_vec());
            let send = send_key(message.conversation, message.sender_device, &stored.client_msg_id);
            self.batch.insert(
                &self.inner.sends,
                send,
                encode_pair(message.seq, message.server_time_ms),
            );
            if let Some(staged) = &mut self.messages {
                staged.insert(key, stored);
            }
        }
    }

    fn stage_user(&mut self, user: NewUser) -> Result<UserRecord, StoreError> {
        let taken = self.new_names.contains(&user.username)
            || self
                .latest
                .contains_key(&self.inner.usernames, user.username.as_bytes())
                .map_err(fjall_error)?;
        if taken {
            return Err(StoreError::UsernameTaken);
        }
        let id = loop {
            let id = UserId::random();
            let exists = self.new_ids.contains(&id)
                || self
                    .latest
                    .contains_key(&self.inner.users, id.get().to_be_bytes())
                    .map_err(fjall_error)?;
            if !exists {
                break id;
            }
        };
        let stored = StoredUser {
            username: user.username.clone(),
            password_hash: user.password_hash.clone(),
            created_at_ms: user.created_at_ms,
            display_name: user.display_name.clone(),
        };
        self.batch
            .insert(&self.inner.users, id.get().to_be_bytes(), stored.encode_to_vec());
        self.users.insert(id.get().to_be_bytes(), Some(stored));
        self.batch
            .insert(&self.inner.usernames, user.username.as_bytes(), id.get().to_be_bytes());
        self.new_names.insert(user.username.clone());
        self.new_ids.insert(id);
        Ok(UserRecord {
            id,
            username: user.username,
            password_hash: user.password_hash,
            created_at_ms: user.created_at_ms,
            display_name: user.display_name,
        })
    }

    /// Applies an edit or delete to its target's row, so history shows the current
    /// state; a delete removes the text of every edit of the target too. Returns,
    /// for an edit, the edit it follows (0: none).
    fn stage_amendment(&mut self, amendment_message: &MessageRecord, amendment: Amendment) -> Result<u64, StoreError> {
        let conversation = amendment_message.conversation;
        let (Amendment::Edit(target) | Amendment::Delete(target)) = amendment;
        let mut stored = self
            .message(conversation, target)?
            .ok_or_else(|| StoreError::corrupt(format!("amended message {target} is missing")))?;
        let previous_edit = stored.amend(amendment_message, amendment);
        self.stage_message(conversation, target, stored);
        if let Amendment::Edit(_) = amendment {
            return Ok(previous_edit);
        }
        let mut next = previous_edit;
        for _ in 0..MAX_EDIT_CHAIN {
            let Some(mut edit) = self.message(conversation, next)? else {
                break;
            };
            let before = edit.redact();
            self.stage_message(conversation, next, edit);
            // The chain only goes back; anything else is a corrupt record.
            if before >= next {
                break;
            }
            next = before;
        }
        Ok(0)
    }

    /// A message as this batch leaves it: staged here, or as last committed.
    fn message(&self, conversation: ConversationId, seq: u64) -> Result<Option<StoredMessage>, StoreError> {
        let key = message_key(conversation, seq);
        if let Some(stored) = self.messages.as_ref().and_then(|staged| staged.get(&key)) {
            return Ok(Some(stored.clone()));
        }
        match self.latest.get(&self.inner.messages, &key).map_err(fjall_error)? {
            Some(value) => Ok(Some(StoredMessage::decode(&*value).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    fn stage_message(&mut self, conversation: ConversationId, seq: u64, stored: StoredMessage) {
        let key = message_key(conversation, seq);
        self.batch
            .insert(&self.inner.messages, key.clone(), stored.encode_to_vec());
        if let Some(staged) = &mut self.messages {
            staged.insert(key, stored);
        }
    }

    /// Raises one device's watermarks, counting marks staged earlier in this batch.
    fn stage_mark(
        &mut self,
        conversation: ConversationId,
        user: UserId,
        device: DeviceId,
        raised: Marks,
    ) -> Result<(Marks, bool), StoreError> {
        let mut key = conversation.to_key().as_ref().to_vec();
        key.extend_from_slice(&user.get().to_be_bytes());
        let before_user = self.latest.user_marks(conversation, user)?;
        let before_user = self
            .marks
            .iter()
            .filter(|(other, _)| other.starts_with(&key))
            .fold(before_user, |acc, (_, marks)| acc.merged(*marks));
        key.extend_from_slice(&device.get().to_be_bytes());
        let stored = match self.marks.get(&key) {
            Some(marks) => *marks,
            None => match self.latest.get(&self.inner.marks, &key).map_err(fjall_error)? {
                Some(value) => {
                    let (delivered_seq, read_seq) = decode_pair(&value)?;
                    Marks {
                        delivered_seq,
                        read_seq,
                    }
                }
                None => Marks::default(),
            },
        };
        let updated = stored.merged(raised);
        if updated != stored {
            self.batch.insert(
                &self.inner.marks,
                key.clone(),
                encode_pair(updated.delivered_seq, updated.read_seq),
            );
            self.marks.insert(key, updated);
        }
        let after_user = before_user.merged(updated);
        Ok((after_user, after_user != before_user))
    }

    /// Updates the group projections for `event`, carried by `message`.
    fn stage_group_event(&mut self, group: GroupId, message: &MessageRecord, event: &GroupEvent) {
        let conversation = ConversationId::Group(group);
        for (user, member) in event.member_updates(message.sender, message.seq) {
            self.batch
                .insert(&self.inner.members, member_key(group, user), encode_member(member));
            let left = match member.left_seq {
                Some(seq) => encode_pair(seq, message.server_time_ms),
                None => encode_pair(0, 0),
            };
            self.batch
                .insert(&self.inner.user_convs, user_conv_key(user, conversation), left);
        }
        if let Some(title) = event.title() {
            self.batch
                .insert(&self.inner.groups, group.get().to_be_bytes(), title.as_bytes());
        }
    }
}

fn refuse_job(job: WriteJob, err: StoreError) -> Answer {
    match job {
        WriteJob::CreateUser(_, reply) => refuse(reply, err),
        WriteJob::PutDevice(_, reply)
        | WriteJob::Append(_, reply)
        | WriteJob::Probe(reply)
        | WriteJob::Close(reply) => refuse(reply, err),
        WriteJob::DeleteDevice(_, _, reply) => refuse(reply, err),
        WriteJob::Purge(_, reply) => refuse(reply, err),
        WriteJob::Mark(.., reply) => refuse(reply, err),
        WriteJob::RotateRefresh(_, reply) => refuse(reply, err),
        WriteJob::UpdateUser(_, _, reply) => refuse(reply, err),
        WriteJob::DeleteUser(_, reply) => refuse(reply, err),
        WriteJob::PushToken(.., reply) => refuse(reply, err),
        WriteJob::PendingPush(_, _, reply) => refuse(reply, err),
        WriteJob::Mute(.., reply) => refuse(reply, err),
    }
}
