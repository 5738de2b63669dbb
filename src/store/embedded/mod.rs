//! The embedded store: everything on local disk in one [fjall] database.
//!
//! Why fjall: it is an LSM tree, so appending messages (the dominant write) is a
//! sequential journal write, and history pages are ordered range scans over
//! `(conversation, seq)` keys. Writes are buffered in the journal until
//! `Database::persist` is called, which gives us an explicit group-commit point: one
//! fsync covers every write in a batch. redb was the alternative; it is a B-tree with
//! one fsync per write transaction, which we could batch too, but random-ish B-tree
//! page writes cost more than journal appends for a write-heavy chat log.
//!
//! Layout (one keyspace per record kind, all integers big-endian so keys sort
//! numerically):
//! - `users`:     user id → user record
//! - `usernames`: username → user id (uniqueness)
//! - `devices`:   user id ++ device id → device record
//! - `messages`:  conversation key ++ seq → message (a conversation is one contiguous
//!   key range, newest last, so "latest page" is a reverse scan)
//! - `sends`:     conversation key ++ device id ++ client_msg_id → seq ++ server time,
//!   written in the same batch as the message, so a retried send finds its original
//!   seq; swept when older than the dedup window
//! - `groups`:    group id → title
//! - `members`:   group id ++ user id → role and, for a former member, the seq it
//!   left at. Both are projections of the group events in `messages`, written in
//!   the same batch as the event, so they never disagree with history.
//! - `user_convs`: user id ++ conversation key → the seq the user left at ++ that
//!   message's time (0 ++ 0 while in it): the index Sync and ListConversations
//!   start from
//! - `marks`:     conversation key ++ user id ++ device id → delivered ++ read seq
//! - `push_tokens`: user id ++ device id → push platform ++ token (removed with
//!   the device)
//! - `push_pending`: user id → its open notification window (docs/PUSH.md)
//! - `mutes`:     user id ++ conversation key → nothing: conversations the user
//!   muted in its notifications
//!
//! All writes go through one writer, one batch at a time: its thread drains
//! whatever is queued (up to `max_batch` jobs), commits it as one atomic fjall
//! batch, then persists once: fsync with `durability = "sync"`, a hand-off to the
//! OS with `"buffered"`. Only then are the callers answered. With `"buffered"`, a
//! shard appending messages while the writer is free commits them itself, on its
//! own thread, instead of queueing them (no hand-off, no wake-ups; see
//! `writer.rs`). Being the only writer at a time also makes "is this username free"
//! and "create it" one atomic step.
//!
//! Reads see only what is durable: they read a snapshot the writer publishes after
//! each batch is persisted, never a batch whose fsync is still running (or failed).
//! So nothing a reader saw can be lost with a failed commit, and no seq shown to
//! one client can later be taken by another message.
//!
//! Faults pass (see [`writer`]): below `store.min_free_mib` of free space the
//! writer refuses writes (`UNAVAILABLE`, "storage is full") before fjall sees an
//! ENOSPC; if a commit, fsync or background flush fails anyway (disk full after
//! all, EMFILE), fjall refuses every later write, so the writer closes the
//! database and reopens it from disk (journal recovery), retrying with backoff
//! until it succeeds. Nothing acknowledged is lost: every acknowledged batch was
//! durable, and a batch that failed was never acknowledged (its senders retry and
//! get the original ack if it did reach the disk).
//!
//! Reads run on the blocking pool, never on a shard thread.

mod accounts;
mod conversations;
mod groups;
mod keys;
mod messages;
mod push;
mod view;
mod writer;

use super::{MessageRecord, Store, StoreError};
use crate::config::{Durability, StoreConfig};
use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::sync::{mpsc, oneshot};
use view::View;
use writer::{Condition, Reply, WriteJob, Writer};

/// Segment files fjall keeps open at most: well inside the descriptors the node
/// keeps from connections (`limits.reserved_file_descriptors`).
const MAX_CACHED_FILES: usize = 256;
/// Journal kept on disk before the memtables holding its oldest writes are
/// flushed so that it can go (fjall's default is 512 MiB). Rarely written
/// keyspaces (users, devices, groups) keep old journals alive until this forces
/// their memtables out, so it bounds the journals' share of the data dir; and as
/// every unflushed write is in a live journal, it bounds the memtables' memory
/// too.
const MAX_JOURNALING_BYTES: u64 = 128 * 1024 * 1024;

/// Jobs queued for the writer before `append_messages` and friends wait.
const WRITE_QUEUE: usize = 16 * 1024;

/// The embedded store: fjall on local disk; cheap to share.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// The writer, for the thread and for appends committed in place.
    writer: Arc<Mutex<Writer>>,
    /// Jobs for the writer thread.
    jobs: mpsc::Sender<WriteJob>,
    /// Whether an append may be committed on the caller's thread (buffered
    /// durability: no fsync to wait for).
    appends_in_place: bool,
    /// Appends committed on the caller's thread, and handed to the writer
    /// thread (`confab_store_appends_total{path}`).
    appended_in_place: metrics::Counter,
    appended_by_writer: metrics::Counter,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("appends_in_place", &self.appends_in_place)
            .finish_non_exhaustive()
    }
}

/// What the writer publishes for readers.
#[derive(Debug)]
struct Shared {
    /// The open database as of its last durable batch; `None` while the writer
    /// reopens it after a failure.
    view: RwLock<Option<View>>,
    /// Whether writes are taken, and if not, why.
    condition: RwLock<Condition>,
}

impl Shared {
    fn view(&self) -> Result<View, StoreError> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::unavailable("the store is reopening after a failure"))
    }

    fn condition(&self) -> Condition {
        self.condition.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Refuses reads that decide what is written next (sequencing, idempotency)
    /// while a failed batch may yet reappear when the database is reopened.
    fn before_sequencing(&self) -> Result<(), StoreError> {
        match self.condition() {
            Condition::Failed(reason) => Err(StoreError::unavailable(reason)),
            Condition::Healthy | Condition::Full(_) => Ok(()),
        }
    }
}

struct Inner {
    db: Database,
    users: Keyspace,
    usernames: Keyspace,
    devices: Keyspace,
    messages: Keyspace,
    sends: Keyspace,
    groups: Keyspace,
    members: Keyspace,
    user_convs: Keyspace,
    marks: Keyspace,
    push_tokens: Keyspace,
    push_pending: Keyspace,
    mutes: Keyspace,
}

/// The keyspace older data dirs kept conversation heads in.
const RETIRED_HEADS: &str = "heads";

impl Inner {
    /// Opens (or creates) the database at `path`, recovering from its journal.
    fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::builder(path)
            .max_cached_files(Some(MAX_CACHED_FILES))
            .max_journaling_size(MAX_JOURNALING_BYTES)
            .open()
            .map_err(fjall_error)?;
        let keyspace = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).map_err(fjall_error);
        // Data dirs from before 2026-12-04 kept each conversation's last seq in
        // a keyspace of its own, rewritten with every batch; it is read from
        // the conversation's last message now.
        if db.keyspace_exists(RETIRED_HEADS) {
            db.delete_keyspace(keyspace(RETIRED_HEADS)?).map_err(fjall_error)?;
        }
        Ok(Self {
            users: keyspace("users")?,
            usernames: keyspace("usernames")?,
            devices: keyspace("devices")?,
            messages: keyspace("messages")?,
            sends: keyspace("sends")?,
            groups: keyspace("groups")?,
            members: keyspace("members")?,
            user_convs: keyspace("user_convs")?,
            marks: keyspace("marks")?,
            push_tokens: keyspace("push_tokens")?,
            push_pending: keyspace("push_pending")?,
            mutes: keyspace("mutes")?,
            db,
        })
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the database under `config.data_dir` and starts its writer.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let path = config.data_dir.join("embedded");
        std::fs::create_dir_all(&path).map_err(|err| io_error(&path, err))?;
        let inner = Arc::new(Inner::open(&path)?);
        let shared = Arc::new(Shared {
            view: RwLock::new(Some(View::latest(inner.clone()))),
            condition: RwLock::new(Condition::Healthy),
        });
        let (jobs, queued) = mpsc::channel(WRITE_QUEUE);
        let writer = Arc::new(Mutex::new(Writer::new(shared.clone(), inner, path.clone(), config)));
        let thread_writer = writer.clone();
        let writer_thread = std::thread::Builder::new()
            .name("confab-store-writer".into())
            .spawn(move || Writer::run(&thread_writer, queued))
            .map_err(|err| io_error(&path, err))?;
        Ok(Self {
            shared,
            writer,
            jobs,
            appends_in_place: config.durability == Durability::Buffered,
            appended_in_place: metrics::counter!("confab_store_appends_total", "path" => "in_place"),
            appended_by_writer: metrics::counter!("confab_store_appends_total", "path" => "writer"),
            writer_thread: Mutex::new(Some(writer_thread)),
        })
    }

    async fn write<T>(&self, job: impl FnOnce(Reply<T>) -> WriteJob) -> Result<T, StoreError> {
        let (reply, result) = oneshot::channel();
        self.jobs.send(job(reply)).await.map_err(|_| StoreError::Closed)?;
        result.await.map_err(|_| StoreError::Closed)?
    }

    /// With buffered durability, commits `messages` on this thread if the
    /// writer is free; hands them back if it is busy, failed, or the store is
    /// synchronous, to be queued instead.
    fn append_in_place(
        &self,
        messages: Vec<MessageRecord>,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, Vec<MessageRecord>> {
        // A failed database is reopened by the writer thread, which may wait
        // seconds for readers to let go of it: never on a shard.
        let failed = matches!(
            *self.shared.condition.read().unwrap_or_else(PoisonError::into_inner),
            Condition::Failed(_)
        );
        if !self.appends_in_place || failed {
            return Err(messages);
        }
        let Ok(mut writer) = self.writer.try_lock() else {
            return Err(messages);
        };
        let (reply, committed) = oneshot::channel();
        writer.commit(&mut vec![WriteJob::Append(messages, reply)]);
        Ok(committed)
    }

    /// Runs `read` on the blocking pool against the last durable state.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&View) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let view = self.shared.view()?;
        tokio::task::spawn_blocking(move || read(&view))
            .await
            .map_err(|err| StoreError::io_because("read task failed", err))?
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn probe_writes(&self) -> Result<(), StoreError> {
        self.write(WriteJob::Probe).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        let result = self.write(WriteJob::Close).await;
        let thread = self.writer_thread.lock().ok().and_then(|mut slot| slot.take());
        if let Some(thread) = thread {
            // The writer exits right after answering Close; joining cannot block long.
            tokio::task::spawn_blocking(move || thread.join()).await.ok();
        }
        result
    }
}

pub(super) fn fjall_error(err: fjall::Error) -> StoreError {
    match err {
        fjall::Error::Poisoned => StoreError::Poisoned,
        other => StoreError::io_because("the embedded database", other),
    }
}

pub(super) fn corrupt(err: prost::DecodeError) -> StoreError {
    StoreError::corrupt_because("a stored record does not decode", err)
}

fn io_error(path: &Path, err: std::io::Error) -> StoreError {
    StoreError::io_because(path.display().to_string(), err)
}

#[cfg(test)]
mod tests {
    use super::keys::{decode_user_conversation, encode_pair};
    use super::*;
    use crate::config::{Durability, StoreBackend};
    use crate::store::{ConversationStore as _, MessageStore as _};
    use confab_protocol::HistoryRange;
    use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};

    fn open(dir: &Path, durability: Durability) -> EmbeddedStore {
        EmbeddedStore::open(&StoreConfig {
            backend: StoreBackend::Embedded,
            data_dir: dir.to_owned(),
            durability,
            max_batch: 64,
            min_free_mib: 0,
        })
        .unwrap()
    }

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    #[test]
    fn user_conversation_entries_of_both_layouts_decode() {
        assert_eq!(decode_user_conversation(&encode_pair(0, 0)).unwrap(), (None, None));
        assert_eq!(
            decode_user_conversation(&encode_pair(7, 1234)).unwrap(),
            (Some(7), Some(1234))
        );
        // Written before the time was kept: the seq alone, and no time to show.
        assert_eq!(decode_user_conversation(&7u64.to_be_bytes()).unwrap(), (Some(7), None));
        assert_eq!(decode_user_conversation(&0u64.to_be_bytes()).unwrap(), (None, None));
        assert!(decode_user_conversation(&[1, 2, 3]).is_err());
    }

    fn message(conversation: ConversationId, seq: Seq) -> MessageRecord {
        MessageRecord {
            conversation,
            seq,
            sender: user(1),
            sender_device: DeviceId::new(9).unwrap(),
            client_msg_id: format!("m{seq}"),
            body: format!("body {seq}"),
            server_time_ms: seq,
            event: None,
            amends: None,
            deleted: false,
            edited_by: None,
        }
    }

    /// Buffered appends are committed by the caller while the writer is free,
    /// and queued for its thread while it is busy: both land, in either order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::await_holding_lock, reason = "holding the writer busy is the point")]
    async fn appends_commit_in_place_or_queue_behind_a_busy_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path(), Durability::Buffered));
        let ours = ConversationId::direct(user(1), user(2));
        store.append_messages(vec![message(ours, 1)]).await.unwrap();
        assert_eq!(store.last_seq(ours).await.unwrap(), 1);

        let busy = store.writer.lock().unwrap();
        let queued = tokio::spawn({
            let store = store.clone();
            async move { store.append_messages(vec![message(ours, 2)]).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // Queued: the writer thread answers it once it has the writer back.
        assert!(!queued.is_finished(), "committed while the writer was busy");
        drop(busy);
        queued.await.unwrap().unwrap();
        assert_eq!(store.last_seq(ours).await.unwrap(), 2);
    }

    /// The contract shared with the other backends is in tests/it/store.rs; purging
    /// is this backend's own (Cassandra's send records expire by TTL).
    #[tokio::test]
    async fn purging_forgets_older_sends_and_keeps_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Buffered);
        let ours = ConversationId::direct(user(1), user(2));
        // message() stores seq N at server time N ms.
        store
            .append_messages((1..=3).map(|seq| message(ours, seq)).collect())
            .await
            .unwrap();
        let key = |seq: Seq| (DeviceId::new(9).unwrap(), format!("m{seq}"));
        let keys = vec![key(1), key(2), key(3)];
        assert_eq!(store.purge_sends(3).await.unwrap(), 2);
        assert_eq!(store.find_sends(ours, keys, 0).await.unwrap().len(), 1);
        assert_eq!(
            store
                .history(ours, HistoryRange::Latest, 10)
                .await
                .unwrap()
                .messages
                .len(),
            3,
            "messages stay"
        );
    }

    /// A data dir from before heads were read from the last message: its
    /// `heads` keyspace goes, and the conversation list still shows each
    /// conversation's last seq and time.
    #[tokio::test]
    async fn an_old_data_dir_loses_its_heads_keyspace_and_keeps_its_heads() {
        let dir = tempfile::tempdir().unwrap();
        let ours = ConversationId::direct(user(1), user(2));
        let store = open(dir.path(), Durability::Sync);
        store
            .append_messages((1..=3).map(|seq| message(ours, seq)).collect())
            .await
            .unwrap();
        store.close().await.unwrap();
        drop(store);
        {
            let db = Database::builder(dir.path().join("embedded")).open().unwrap();
            let heads = db.keyspace(RETIRED_HEADS, KeyspaceCreateOptions::default).unwrap();
            heads.insert(ours.to_key().as_ref(), encode_pair(99, 99)).unwrap();
            db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        let store = open(dir.path(), Durability::Sync);
        let heads = store.conversations(user(2)).await.unwrap();
        assert_eq!(
            heads
                .iter()
                .map(|head| (head.conversation, head.last_seq, head.last_time_ms))
                .collect::<Vec<_>>(),
            vec![(ours, 3, 3)]
        );
        store.close().await.unwrap();
        drop(store);
        let db = Database::builder(dir.path().join("embedded")).open().unwrap();
        assert!(!db.keyspace_exists(RETIRED_HEADS));
    }
}
