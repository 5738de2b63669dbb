//! The [`Store`] on Apache Cassandra (or ScyllaDB), through the `scylla` driver,
//! for cluster mode (`store.backend = "cassandra"`).
//!
//! The driver runs on a small runtime of its own (two worker threads), never on a
//! shard: every call hops there and back. Writes of messages go through one
//! [`writer`] that groups them into unlogged batches per partition.
//!
//! Tables ([`schema.cql`](schema.cql)) and the query each serves — every query hits
//! one partition, or a small set known in advance:
//!
//! | table | partition key | clustering | serves |
//! |---|---|---|---|
//! | `users` | `id` | | a user by id (auth, `GetUser` replies) |
//! | `usernames` | `username` | | sign-up uniqueness (lightweight transaction), login by name |
//! | `devices` | `user_id` | `device_id` | authenticate a device; refresh tokens (rotated and deleted by lightweight transactions) |
//! | `messages` | `(conversation, bucket)` | `seq` DESC | history pages, sync, `messages_at`, the stored maximum seq |
//! | `sends` | `conversation` | `device_id, client_msg_id` | idempotent send lookups; rows expire after the dedup window (TTL) |
//! | `heads` | `conversation` | | a conversation's last seq and time, for conversation lists |
//! | `user_conversations` | `user_id` | `conversation` | a user's conversations, and when it left a group (sync; a list's rows) |
//! | `user_activity` | `user_id` | `day` DESC, `conversation` DESC | conversation lists by last activity, newest day first |
//! | `groups` | `group_id` | | a group's title |
//! | `members` | `group_id` | `user_id` | membership checks, member pages, fan-out |
//! | `marks` | `(conversation, user_id)` | `device_id` | receipt watermarks of one user's devices |
//!
//! A bucket is [`BUCKET_SIZE`] consecutive seqs, so no partition grows forever and
//! a page knows which partitions to read: its bound's bucket, then the next ones
//! in the page's direction. The stored maximum seq (where sequencing continues
//! after a restart) is read from `messages` itself, starting at the bucket the
//! `heads` row points to and moving up while later buckets hold rows, so a head
//! that lags its messages can never make a seq be reused.
//!
//! Rows that several flushes may update (`heads`, `members`, `groups`,
//! `user_conversations`) are written `USING TIMESTAMP <seq>`: the write for the
//! highest seq wins whatever order the writes land in.
//!
//! One confab node writes a keyspace: its owner shards sequence every
//! conversation, so what the node has read or written stays current in memory.
//! Idempotency checks read `sends` once per (conversation, device) and then
//! answer from the `sends` module's cache, which the writer keeps complete; heads and
//! users' receipt watermarks, which only grow, are kept in `highest`
//! caches, so a conversation list or sync reads only what the node has not seen.
//!
//! `user_activity` orders a user's conversations by the day of their last
//! activity: the writer adds a conversation's row for each member on the first
//! message of each day (and for a member a group event adds or removes, on the
//! event's day), deleting the row of the day before when it wrote it. So a list
//! reads days newest first and stops once the days read hold more than a page:
//! a conversation not read yet was last active earlier. Within the days read,
//! the heads give the exact order. An index kept in exact order would cost a
//! delete and an insert per member per message, and its tombstones would pile
//! up at the top of the partition that every list reads; per day it is one row
//! per member per conversation per active day, and stale rows (left behind when
//! a restart forgot the day written) cost only a longer read.

mod highest;
mod sends;
mod writer;

use super::encoding::StoredMessage;
use super::{
    ConversationHead, DeviceRecord, GroupRecord, HistoryPage, MemberRecord, MessageRecord, NewUser, Rotation, Store,
    StoreError, StoredSend, UserRecord, follows, page_by_activity,
};
use crate::config::{CassandraConfig, Consistency};
use async_trait::async_trait;
use confab_protocol::ids::{ConversationId, DeviceId, GroupId, Seq, UserId};
use confab_protocol::{HistoryRange, Marks, Role};
use futures::future::try_join_all;
use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use highest::Highest;
use prost::Message as _;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Seqs per `messages` partition.
pub const BUCKET_SIZE: u64 = 1000;
/// A history read stops after this many empty buckets in a row: below the head
/// every bucket holds messages, so more would mean reading past the end.
const MAX_EMPTY_BUCKETS: usize = 4;
const SCHEMA: &str = include_str!("schema.cql");
/// Threads of the driver's runtime.
const DRIVER_THREADS: usize = 2;
/// Keys looked up by one query (`IN` on the clustering key).
const MAX_KEYS_PER_READ: usize = 100;
/// Longest wait for a contact point at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `user_activity` rows are per day of activity.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// `user_activity` rows read per query.
const ACTIVITY_ROWS_PER_READ: usize = 200;

/// The day `time_ms` falls in (days since the Unix epoch).
fn day(time_ms: u64) -> i64 {
    to_cql(time_ms / DAY_MS)
}

/// The bucket holding `seq`.
pub fn bucket(seq: Seq) -> i64 {
    (seq / BUCKET_SIZE) as i64
}

/// Ids and seqs are u64; CQL `bigint` is i64: the bits are kept as they are.
fn to_cql(value: u64) -> i64 {
    value as i64
}

fn from_cql(value: i64) -> u64 {
    value as u64
}

/// Reads one call keeps in flight at most (a user's conversations can be many).
const MAX_READS_IN_FLIGHT: usize = 64;

/// Runs `reads`, at most [`MAX_READS_IN_FLIGHT`] at once: their results in
/// order, or the first error.
async fn read_all<T>(
    reads: impl IntoIterator<Item = impl Future<Output = Result<T, StoreError>>>,
) -> Result<Vec<T>, StoreError> {
    stream::iter(reads).buffered(MAX_READS_IN_FLIGHT).try_collect().await
}

/// Send keys grouped by device.
fn by_device(keys: &[(DeviceId, String)]) -> HashMap<DeviceId, Vec<String>> {
    let mut grouped: HashMap<DeviceId, Vec<String>> = HashMap::new();
    for (device, client_msg_id) in keys {
        grouped.entry(*device).or_default().push(client_msg_id.clone());
    }
    grouped
}

fn stored_send(seq: i64, server_time_ms: i64) -> StoredSend {
    StoredSend {
        seq: from_cql(seq),
        server_time_ms: from_cql(server_time_ms),
    }
}

/// Prepared once at start.
#[derive(Debug)]
struct Statements {
    insert_user: PreparedStatement,
    claim_username: PreparedStatement,
    user_by_id: PreparedStatement,
    id_by_username: PreparedStatement,
    insert_device: PreparedStatement,
    device: PreparedStatement,
    devices: PreparedStatement,
    delete_device: PreparedStatement,
    rotate_refresh: PreparedStatement,
    set_password: PreparedStatement,
    insert_message: PreparedStatement,
    message_at: PreparedStatement,
    latest_in_bucket: PreparedStatement,
    before_in_bucket: PreparedStatement,
    after_in_bucket: PreparedStatement,
    insert_send: PreparedStatement,
    sends: PreparedStatement,
    device_sends: PreparedStatement,
    upsert_head: PreparedStatement,
    head: PreparedStatement,
    upsert_user_conversation: PreparedStatement,
    user_conversations: PreparedStatement,
    user_conversations_in: PreparedStatement,
    upsert_activity: PreparedStatement,
    delete_activity: PreparedStatement,
    activity: PreparedStatement,
    upsert_title: PreparedStatement,
    title: PreparedStatement,
    upsert_member: PreparedStatement,
    member: PreparedStatement,
    members: PreparedStatement,
    upsert_mark: PreparedStatement,
    marks: PreparedStatement,
}

#[derive(Debug)]
struct Inner {
    session: Session,
    statements: Statements,
    /// How long `sends` rows live: the dedup window.
    send_ttl_s: i32,
    /// Conversations a failed flush may have written in part, with the lowest seq
    /// of that flush and when: their send records may be missing (see
    /// [`Inner::scan_sends`]).
    suspects: Mutex<HashMap<ConversationId, (Seq, std::time::Instant)>>,
    /// Send records of this node's owners, so a check needs no read.
    send_cache: sends::SendCache,
    /// Conversations' (last seq, last time) as last read or written here.
    known_heads: Highest<ConversationId, (Seq, u64)>,
    /// Users' receipt watermarks across their devices, as last read or written here.
    known_marks: Highest<(ConversationId, UserId), Marks>,
    dedup_window: Duration,
    /// Group rows into one unlogged batch per partition (`cassandra.batch_writes`).
    batch_writes: bool,
    /// For batches (prepared statements carry their own).
    consistency: scylla::statement::Consistency,
    request_timeout: Duration,
}

/// Cassandra-backed store; cheap to share.
#[derive(Debug)]
pub struct CassandraStore {
    inner: Arc<Inner>,
    handle: tokio::runtime::Handle,
    writer: writer::Handle,
    /// Owned here and shut down without blocking on drop.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl CassandraStore {
    /// Connects, creates the schema if asked, prepares the statements and starts
    /// the writer. Callable from anywhere, async context included.
    pub fn open(config: &CassandraConfig, dedup_window: Duration) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(DRIVER_THREADS)
            .thread_name("confab-cassandra")
            .enable_all()
            .build()
            .map_err(|err| StoreError::io_because("building the driver runtime", err))?;
        let handle = runtime.handle().clone();
        let config = config.clone();
        // block_on must not run inside another runtime: use a plain thread.
        let connected = std::thread::scope(|scope| {
            scope
                .spawn(|| handle.block_on(connect(&config, dedup_window)))
                .join()
                .unwrap_or_else(|_| Err(StoreError::io("connecting panicked")))
        });
        let inner = match connected {
            Ok(inner) => Arc::new(inner),
            Err(err) => {
                runtime.shutdown_background();
                return Err(err);
            }
        };
        let writer = writer::spawn(&handle, inner.clone(), &config);
        Ok(Self {
            inner,
            handle,
            writer,
            runtime: Mutex::new(Some(runtime)),
        })
    }

    /// Runs a write on the driver's runtime. It runs to its end even if the
    /// caller goes away: a write stopped between its statements would leave a
    /// half-made record.
    async fn on_driver<T, F>(&self, work: impl FnOnce(Arc<Inner>) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.handle
            .spawn(work(self.inner.clone()))
            .await
            .map_err(|err| StoreError::io_because("driver task failed", err))?
    }

    /// Runs a read on the driver's runtime. A caller that goes away (its
    /// connection closed) takes the read with it: no read outlives its request.
    async fn read_on_driver<T, F>(&self, work: impl FnOnce(Arc<Inner>) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        AbortOnDrop(self.handle.spawn(work(self.inner.clone())))
            .await
            .map_err(|err| StoreError::io_because("driver task failed", err))?
    }
}

/// A driver task, aborted when its caller drops it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for CassandraStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.lock().ok().and_then(|mut slot| slot.take()) {
            runtime.shutdown_background();
        }
    }
}

async fn connect(config: &CassandraConfig, dedup_window: Duration) -> Result<Inner, StoreError> {
    let session = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .connection_timeout(CONNECT_TIMEOUT)
        .build()
        .await
        .map_err(|err| {
            StoreError::unavailable_because(format!("connecting to {}", config.contact_points.join(", ")), err)
        })?;
    if config.create_schema {
        for statement in SCHEMA
            .replace("{keyspace}", &config.keyspace)
            .replace("{replication}", &config.replication)
            .split(";\n")
            .map(strip_comments)
            .filter(|statement| !statement.is_empty())
        {
            session
                .query_unpaged(statement.clone(), ())
                .await
                .map_err(|err| StoreError::io_because(format!("applying the schema ({statement})"), err))?;
        }
    }
    let statements = Statements::prepare(&session, &config.keyspace, config).await?;
    Ok(Inner {
        session,
        statements,
        batch_writes: config.batch_writes,
        consistency: consistency(config.consistency),
        request_timeout: config.request_timeout,
        send_ttl_s: i32::try_from(dedup_window.as_secs()).unwrap_or(i32::MAX).max(1),
        suspects: Mutex::default(),
        send_cache: sends::SendCache::default(),
        known_heads: Highest::new(std::cmp::max),
        known_marks: Highest::new(Marks::merged),
        dedup_window,
    })
}

fn consistency(level: Consistency) -> scylla::statement::Consistency {
    match level {
        Consistency::One => scylla::statement::Consistency::One,
        Consistency::Quorum => scylla::statement::Consistency::Quorum,
        Consistency::LocalQuorum => scylla::statement::Consistency::LocalQuorum,
        Consistency::All => scylla::statement::Consistency::All,
    }
}

fn strip_comments(statement: &str) -> String {
    statement
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

impl Statements {
    async fn prepare(session: &Session, keyspace: &str, config: &CassandraConfig) -> Result<Self, StoreError> {
        let consistency = consistency(config.consistency);
        let timeout = config.request_timeout;
        let prepare = |cql: String| async move {
            let mut statement = session
                .prepare(cql.clone())
                .await
                .map_err(|err| StoreError::io_because(format!("preparing {cql}"), err))?;
            statement.set_consistency(consistency);
            statement.set_request_timeout(Some(timeout));
            Ok::<_, StoreError>(statement)
        };
        // A lightweight transaction (a conditional write): Paxos among the replicas.
        let prepare_lwt = |cql: String| async move {
            let mut statement = prepare(cql).await?;
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::Serial));
            Ok::<_, StoreError>(statement)
        };
        let k = keyspace;
        Ok(Self {
            insert_user: prepare(format!(
                "INSERT INTO {k}.users (id, username, password_hash, created_at_ms) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            claim_username: prepare_lwt(format!(
                "INSERT INTO {k}.usernames (username, id) VALUES (?, ?) IF NOT EXISTS"
            ))
            .await?,
            user_by_id: prepare(format!(
                "SELECT username, password_hash, created_at_ms FROM {k}.users WHERE id = ?"
            ))
            .await?,
            id_by_username: prepare(format!("SELECT id FROM {k}.usernames WHERE username = ?")).await?,
            insert_device: prepare(format!(
                "INSERT INTO {k}.devices (user_id, device_id, name, refresh_hash, previous_refresh_hash, \
                 refresh_expires_at_ms, created_at_ms, refreshed_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            device: prepare(format!(
                "SELECT {DEVICE_COLUMNS} FROM {k}.devices WHERE user_id = ? AND device_id = ?"
            ))
            .await?,
            devices: prepare(format!("SELECT {DEVICE_COLUMNS} FROM {k}.devices WHERE user_id = ?")).await?,
            // Compare-and-set.
            rotate_refresh: prepare_lwt(format!(
                "UPDATE {k}.devices SET refresh_hash = ?, previous_refresh_hash = ?, refresh_expires_at_ms = ?, \
                 refreshed_at_ms = ? WHERE user_id = ? AND device_id = ? IF refresh_hash = ?"
            ))
            .await?,
            set_password: prepare(format!("UPDATE {k}.users SET password_hash = ? WHERE id = ?")).await?,
            // A lightweight transaction like the rotation: a plain DELETE
            // carries the client's timestamp, a rotation its Paxos ballot's, so
            // a rotation racing a log-out could outlive the delete and leave a
            // row of the rotated columns alone (a device with no name, read back
            // as an error). Paxos orders the two instead.
            delete_device: prepare_lwt(format!(
                "DELETE FROM {k}.devices WHERE user_id = ? AND device_id = ? IF EXISTS"
            ))
            .await?,
            insert_message: prepare(format!(
                "INSERT INTO {k}.messages (conversation, bucket, seq, data) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            message_at: prepare(format!(
                "SELECT data FROM {k}.messages WHERE conversation = ? AND bucket = ? AND seq = ?"
            ))
            .await?,
            latest_in_bucket: prepare(format!(
                "SELECT seq, data FROM {k}.messages WHERE conversation = ? AND bucket = ? LIMIT ?"
            ))
            .await?,
            before_in_bucket: prepare(format!(
                "SELECT seq, data FROM {k}.messages WHERE conversation = ? AND bucket = ? AND seq < ? LIMIT ?"
            ))
            .await?,
            after_in_bucket: prepare(format!(
                "SELECT seq, data FROM {k}.messages WHERE conversation = ? AND bucket = ? AND seq > ? \
                 ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            insert_send: prepare(format!(
                "INSERT INTO {k}.sends (conversation, device_id, client_msg_id, seq, server_time_ms) \
                 VALUES (?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            sends: prepare(format!(
                "SELECT device_id, client_msg_id, seq, server_time_ms FROM {k}.sends \
                 WHERE conversation = ? AND (device_id, client_msg_id) IN ?"
            ))
            .await?,
            device_sends: prepare(format!(
                "SELECT client_msg_id, seq, server_time_ms FROM {k}.sends \
                 WHERE conversation = ? AND device_id = ? LIMIT ?"
            ))
            .await?,
            upsert_head: prepare(format!(
                "INSERT INTO {k}.heads (conversation, last_seq, last_time_ms) VALUES (?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            head: prepare(format!(
                "SELECT last_seq, last_time_ms FROM {k}.heads WHERE conversation = ?"
            ))
            .await?,
            upsert_user_conversation: prepare(format!(
                "INSERT INTO {k}.user_conversations (user_id, conversation, left_seq, left_time_ms) \
                 VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            user_conversations: prepare(format!(
                "SELECT conversation, left_seq, left_time_ms FROM {k}.user_conversations WHERE user_id = ?"
            ))
            .await?,
            user_conversations_in: prepare(format!(
                "SELECT conversation, left_seq, left_time_ms FROM {k}.user_conversations \
                 WHERE user_id = ? AND conversation IN ?"
            ))
            .await?,
            upsert_activity: prepare(format!(
                "INSERT INTO {k}.user_activity (user_id, day, conversation) VALUES (?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            delete_activity: prepare(format!(
                "DELETE FROM {k}.user_activity USING TIMESTAMP ? WHERE user_id = ? AND day = ? AND conversation = ?"
            ))
            .await?,
            activity: prepare(format!(
                "SELECT day, conversation FROM {k}.user_activity WHERE user_id = ? AND (day, conversation) < (?, ?) \
                 LIMIT ?"
            ))
            .await?,
            upsert_title: prepare(format!(
                "INSERT INTO {k}.groups (group_id, title) VALUES (?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            title: prepare(format!("SELECT title FROM {k}.groups WHERE group_id = ?")).await?,
            upsert_member: prepare(format!(
                "INSERT INTO {k}.members (group_id, user_id, role, left_seq) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            member: prepare(format!(
                "SELECT role, left_seq FROM {k}.members WHERE group_id = ? AND user_id = ?"
            ))
            .await?,
            members: prepare(format!(
                "SELECT user_id, role, left_seq FROM {k}.members WHERE group_id = ?"
            ))
            .await?,
            upsert_mark: prepare(format!(
                "INSERT INTO {k}.marks (conversation, user_id, device_id, delivered_seq, read_seq) \
                 VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            marks: prepare(format!(
                "SELECT device_id, delivered_seq, read_seq FROM {k}.marks WHERE conversation = ? AND user_id = ?"
            ))
            .await?,
        })
    }
}

/// Maps a driver error: the database did not answer as asked.
fn unavailable(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable_because("the database did not answer as asked", err)
}

fn corrupt(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::corrupt_because("a row does not decode", err)
}

fn role_code(role: Role) -> i8 {
    match role {
        Role::Member => 0,
        Role::Admin => 1,
        Role::Owner => 2,
    }
}

fn role_of(code: i8) -> Result<Role, StoreError> {
    match code {
        0 => Ok(Role::Member),
        1 => Ok(Role::Admin),
        2 => Ok(Role::Owner),
        other => Err(StoreError::corrupt(format!("unknown role {other}"))),
    }
}

fn user_id(raw: i64) -> Result<UserId, StoreError> {
    UserId::new(from_cql(raw)).ok_or_else(|| StoreError::corrupt("user id 0"))
}

fn left(raw: Option<i64>) -> Option<Seq> {
    raw.map(from_cql).filter(|seq| *seq != 0)
}

impl Inner {
    /// A failed flush wrote an unknown part of its rows: a message row may have
    /// landed without its send record, so a retry of that send would be stored
    /// twice. Until the dedup window passes, lookups that miss in such a
    /// conversation also scan its messages from the failed flush's lowest seq.
    fn suspect(&self, conversation: ConversationId, from: Seq) {
        if let Ok(mut suspects) = self.suspects.lock() {
            let entry = suspects
                .entry(conversation)
                .or_insert((from, std::time::Instant::now()));
            entry.0 = entry.0.min(from);
            entry.1 = std::time::Instant::now();
        }
    }

    fn suspect_from(&self, conversation: ConversationId) -> Option<Seq> {
        let mut suspects = self.suspects.lock().ok()?;
        let window = self.dedup_window;
        suspects.retain(|_, (_, since)| since.elapsed() < window);
        suspects.get(&conversation).map(|(from, _)| *from)
    }

    /// Whether the send cache alone says none of `keys` is stored: every
    /// device's set is loaded, holds none of them, and no failed flush of the
    /// conversation may have left records it does not know.
    fn none_sent(&self, conversation: ConversationId, keys: &[(DeviceId, String)]) -> bool {
        if self.suspect_from(conversation).is_some() {
            return false;
        }
        by_device(keys).into_iter().all(|(device, ids)| {
            self.send_cache
                .cached(conversation, device, &ids)
                .is_some_and(|found| found.is_empty())
        })
    }

    /// Which of `ids` of `device` are stored, from the send cache (loading the
    /// device's set first when missing); `None` when the cache cannot say.
    async fn cached_sends(
        &self,
        conversation: ConversationId,
        device: DeviceId,
        ids: &[String],
    ) -> Result<Option<HashMap<String, StoredSend>>, StoreError> {
        if let Some(found) = self.send_cache.cached(conversation, device, ids) {
            return Ok(Some(found));
        }
        let Some(ticket) = self.send_cache.start_load(conversation, device) else {
            return Ok(None);
        };
        let limit = i32::try_from(sends::MAX_PER_SET + 1).unwrap_or(i32::MAX);
        let read = self
            .rows::<(String, i64, i64)>(
                &self.statements.device_sends,
                (conversation.to_string(), to_cql(device.get()), limit),
            )
            .await;
        let rows = match read {
            Ok(rows) => rows,
            Err(err) => {
                self.send_cache.finish_load(conversation, device, ticket, None);
                return Err(err);
            }
        };
        let loaded = (rows.len() <= sends::MAX_PER_SET).then(|| {
            rows.into_iter()
                .map(|(id, seq, server_time_ms)| (id, stored_send(seq, server_time_ms)))
                .collect()
        });
        self.send_cache.finish_load(conversation, device, ticket, loaded);
        Ok(self.send_cache.cached(conversation, device, ids))
    }

    /// The stored send records among `keys`: clustering keys of one partition,
    /// read a chunk of them per query.
    async fn read_sends(
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
    async fn scan_sends(
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
    async fn rows<R>(
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

    async fn execute(
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
    async fn applied(
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

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        let rows: Vec<(String, String, i64)> = self.rows(&self.statements.user_by_id, (to_cql(id.get()),)).await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(username, password_hash, created_at_ms)| UserRecord {
                id,
                username,
                password_hash,
                created_at_ms: from_cql(created_at_ms),
            }))
    }

    async fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let rows: Vec<DeviceRow> = self
            .rows(&self.statements.device, (to_cql(user.get()), to_cql(device.get())))
            .await?;
        rows.into_iter().next().map(|row| device_record(user, row)).transpose()
    }

    async fn message(&self, conversation: ConversationId, seq: Seq) -> Result<Option<StoredMessage>, StoreError> {
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
    async fn head(&self, conversation: ConversationId) -> Result<Option<(Seq, u64)>, StoreError> {
        if let Some(head) = self.known_heads.get(&conversation) {
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
    async fn conversation_head(
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
    async fn heads_after(
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
    async fn current_members(&self, group: GroupId) -> Result<Vec<(UserId, Role)>, StoreError> {
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
    async fn folded_marks(&self, conversation: ConversationId, user: UserId) -> Result<Marks, StoreError> {
        if let Some(marks) = self.known_marks.get(&(conversation, user)) {
            return Ok(marks);
        }
        let (marks, _) = self.user_marks(conversation, user).await?;
        Ok(self.known_marks.raise((conversation, user), marks))
    }

    /// Every device's marks of `user` in `conversation`, folded to the highest.
    async fn user_marks(
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
    async fn last_seq(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
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

    /// The seq the conversation's head row names (0 without one). It may run
    /// ahead of the stored messages after a failed flush, never far behind them.
    async fn head_seq(&self, key: &str) -> Result<Seq, StoreError> {
        let head: Vec<(i64, i64)> = self.rows(&self.statements.head, (key.to_owned(),)).await?;
        Ok(head.first().map_or(0, |(seq, _)| from_cql(*seq)))
    }

    async fn latest_in_bucket(&self, key: &str, bucket: i64) -> Result<Option<Seq>, StoreError> {
        let rows: Vec<(i64, Vec<u8>)> = self
            .rows(&self.statements.latest_in_bucket, (key.to_owned(), bucket, 1_i32))
            .await?;
        Ok(rows.first().map(|(seq, _)| from_cql(*seq)))
    }

    async fn history(
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
                let last = self.last_seq(conversation).await?;
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
            }
            HistoryRange::Latest | HistoryRange::Before(_) => {
                // A bound past the end (up to u64::MAX, from a client) starts at
                // the end: nothing is stored above it.
                let below = match range {
                    HistoryRange::Before(bound) if bound <= self.head_seq(&key).await?.saturating_add(1) => bound,
                    HistoryRange::Before(bound) => bound.min(self.last_seq(conversation).await?.saturating_add(1)),
                    _ => self.last_seq(conversation).await?.saturating_add(1),
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

/// The columns a device is read with, in [`DeviceRow`]'s order.
const DEVICE_COLUMNS: &str =
    "device_id, name, refresh_hash, previous_refresh_hash, refresh_expires_at_ms, created_at_ms, refreshed_at_ms";
type DeviceRow = (i64, String, Vec<u8>, Option<Vec<u8>>, i64, i64, Option<i64>);

fn device_record(user: UserId, row: DeviceRow) -> Result<DeviceRecord, StoreError> {
    let (id, name, refresh_hash, previous_refresh_hash, refresh_expires_at_ms, created_at_ms, refreshed_at_ms) = row;
    let hash = |bytes: Vec<u8>| -> Result<[u8; 32], StoreError> {
        bytes
            .try_into()
            .map_err(|_| StoreError::corrupt("refresh hash is not 32 bytes"))
    };
    Ok(DeviceRecord {
        user,
        id: DeviceId::new(from_cql(id)).ok_or_else(|| StoreError::corrupt("device id 0"))?,
        name,
        refresh_hash: hash(refresh_hash)?,
        previous_refresh_hash: previous_refresh_hash.map(hash).transpose()?.unwrap_or([0; 32]),
        refresh_expires_at_ms: from_cql(refresh_expires_at_ms),
        created_at_ms: from_cql(created_at_ms),
        refreshed_at_ms: refreshed_at_ms.map_or(0, from_cql),
    })
}

#[async_trait]
impl Store for CassandraStore {
    async fn create_user(&self, user: NewUser) -> Result<UserRecord, StoreError> {
        self.on_driver(move |inner| async move {
            let id = UserId::random();
            let applied = inner
                .applied(
                    &inner.statements.claim_username,
                    (user.username.clone(), to_cql(id.get())),
                )
                .await?;
            if !applied {
                return Err(StoreError::UsernameTaken);
            }
            inner
                .execute(
                    &inner.statements.insert_user,
                    (
                        to_cql(id.get()),
                        user.username.clone(),
                        user.password_hash.clone(),
                        to_cql(user.created_at_ms),
                    ),
                )
                .await?;
            Ok(UserRecord {
                id,
                username: user.username,
                password_hash: user.password_hash,
                created_at_ms: user.created_at_ms,
            })
        })
        .await
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let username = username.to_owned();
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(i64,)> = inner.rows(&inner.statements.id_by_username, (username,)).await?;
            match rows.first() {
                Some((id,)) => inner.user(user_id(*id)?).await,
                None => Ok(None),
            }
        })
        .await
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.read_on_driver(move |inner| async move { inner.user(id).await })
            .await
    }

    async fn missing_users(&self, ids: Vec<UserId>) -> Result<Vec<UserId>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let found = try_join_all(ids.iter().map(|id| inner.user(*id))).await?;
            Ok(ids
                .into_iter()
                .zip(found)
                .filter_map(|(id, user)| user.is_none().then_some(id))
                .collect())
        })
        .await
    }

    async fn put_device(&self, device: DeviceRecord) -> Result<(), StoreError> {
        self.on_driver(move |inner| async move {
            inner
                .execute(
                    &inner.statements.insert_device,
                    (
                        to_cql(device.user.get()),
                        to_cql(device.id.get()),
                        device.name,
                        device.refresh_hash.to_vec(),
                        device.previous_refresh_hash.to_vec(),
                        to_cql(device.refresh_expires_at_ms),
                        to_cql(device.created_at_ms),
                        to_cql(device.refreshed_at_ms),
                    ),
                )
                .await
        })
        .await
    }

    async fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.read_on_driver(move |inner| async move { inner.device(user, device).await })
            .await
    }

    async fn device_and_user(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<(DeviceRecord, UserRecord)>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let (device, user) = futures::try_join!(inner.device(user, device), inner.user(user))?;
            Ok(device.zip(user))
        })
        .await
    }

    async fn delete_device(&self, user: UserId, device: DeviceId) -> Result<bool, StoreError> {
        self.on_driver(move |inner| async move {
            inner
                .applied(
                    &inner.statements.delete_device,
                    (to_cql(user.get()), to_cql(device.get())),
                )
                .await
        })
        .await
    }

    async fn devices(&self, user: UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<DeviceRow> = inner.rows(&inner.statements.devices, (to_cql(user.get()),)).await?;
            rows.into_iter().map(|row| device_record(user, row)).collect()
        })
        .await
    }

    async fn rotate_refresh(&self, rotation: Rotation) -> Result<bool, StoreError> {
        self.on_driver(move |inner| async move {
            let values = (
                rotation.refresh_hash.to_vec(),
                rotation.expected.to_vec(),
                to_cql(rotation.refresh_expires_at_ms),
                to_cql(rotation.refreshed_at_ms),
                to_cql(rotation.user.get()),
                to_cql(rotation.device.get()),
                rotation.expected.to_vec(),
            );
            inner.applied(&inner.statements.rotate_refresh, values).await
        })
        .await
    }

    async fn set_password(&self, user: UserId, password_hash: String) -> Result<(), StoreError> {
        self.on_driver(move |inner| async move {
            inner
                .execute(&inner.statements.set_password, (password_hash, to_cql(user.get())))
                .await
        })
        .await
    }

    async fn append_messages(&self, messages: Vec<MessageRecord>) -> Result<(), StoreError> {
        self.writer.append(messages).await
    }

    async fn find_sends(
        &self,
        conversation: ConversationId,
        keys: Vec<(DeviceId, String)>,
        since_ms: u64,
    ) -> Result<HashMap<(DeviceId, String), StoredSend>, StoreError> {
        // A new message, the common case, is answered here without a hop to the
        // driver's runtime.
        if self.inner.none_sent(conversation, &keys) {
            return Ok(HashMap::new());
        }
        self.read_on_driver(move |inner| async move {
            let mut records: Vec<((DeviceId, String), StoredSend)> = Vec::new();
            let mut uncached: Vec<(DeviceId, String)> = Vec::new();
            for (device, ids) in by_device(&keys) {
                match inner.cached_sends(conversation, device, &ids).await? {
                    Some(found) => records.extend(found.into_iter().map(|(id, send)| ((device, id), send))),
                    None => uncached.extend(ids.into_iter().map(|id| (device, id))),
                }
            }
            records.extend(inner.read_sends(conversation, &uncached).await?);
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
            sends.retain(|_, send| send.server_time_ms >= since_ms);
            Ok(keys
                .into_iter()
                .filter_map(|key| sends.remove(&key).map(|send| (key, send)))
                .collect())
        })
        .await
    }

    /// Send records expire by themselves (TTL = the dedup window).
    async fn purge_sends(&self, _before_ms: u64) -> Result<usize, StoreError> {
        Ok(0)
    }

    async fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let titles: Vec<(Option<String>,)> = inner.rows(&inner.statements.title, (to_cql(group.get()),)).await?;
            let Some((title,)) = titles.into_iter().next() else {
                return Ok(None);
            };
            Ok(Some(GroupRecord {
                title: title.unwrap_or_default(),
                members: inner.current_members(group).await?,
            }))
        })
        .await
    }

    async fn member(&self, group: GroupId, user: UserId) -> Result<Option<MemberRecord>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(i8, Option<i64>)> = inner
                .rows(&inner.statements.member, (to_cql(group.get()), to_cql(user.get())))
                .await?;
            rows.into_iter()
                .next()
                .map(|(role, left_seq)| {
                    Ok(MemberRecord {
                        role: role_of(role)?,
                        left_seq: left(left_seq),
                    })
                })
                .transpose()
        })
        .await
    }

    async fn members_page(
        &self,
        group: GroupId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<(Vec<(UserId, Role)>, bool), StoreError> {
        let members = match self.group(group).await? {
            Some(record) => record.members,
            None => return Ok((Vec::new(), false)),
        };
        let mut page: Vec<(UserId, Role)> = members
            .into_iter()
            .filter(|(user, _)| after.is_none_or(|after| user.get() > after.get()))
            .take(limit + 1)
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }

    async fn conversations(&self, user: UserId) -> Result<Vec<ConversationHead>, StoreError> {
        self.read_on_driver(move |inner| async move {
            let rows: Vec<(String, Option<i64>, Option<i64>)> = inner
                .rows(&inner.statements.user_conversations, (to_cql(user.get()),))
                .await?;
            let heads = rows.into_iter().map(|(key, left_seq, left_time_ms)| {
                let inner = inner.clone();
                async move {
                    let conversation = ConversationId::parse(&key).map_err(corrupt)?;
                    inner
                        .conversation_head(user, conversation, left_seq, left_time_ms)
                        .await
                }
            });
            Ok(read_all(heads).await?.into_iter().flatten().collect())
        })
        .await
    }

    /// Reads `user_activity` newest day first, a day at a time, until the days
    /// read hold more than `limit` conversations after `after`: any conversation
    /// not read yet was last active on an earlier day.
    async fn recent_conversations(
        &self,
        user: UserId,
        after: Option<(u64, ConversationId)>,
        limit: usize,
    ) -> Result<(Vec<ConversationHead>, bool), StoreError> {
        self.read_on_driver(move |inner| async move {
            // Rows sort by (day, conversation) descending: read below this bound.
            let first_day = after.map_or(i64::MAX, |(time_ms, _)| day(time_ms).saturating_add(1));
            let mut bound = (first_day, String::new());
            let mut seen = HashSet::new();
            let mut found = Vec::new();
            let mut day_read = None;
            let mut fresh = Vec::new();
            loop {
                let rows: Vec<(i64, String)> = inner
                    .rows(
                        &inner.statements.activity,
                        (
                            to_cql(user.get()),
                            bound.0,
                            bound.1.clone(),
                            ACTIVITY_ROWS_PER_READ as i32,
                        ),
                    )
                    .await?;
                let exhausted = rows.len() < ACTIVITY_ROWS_PER_READ;
                for (row_day, key) in rows {
                    if day_read != Some(row_day) {
                        // Every row of the days before was read.
                        found.extend(inner.heads_after(user, std::mem::take(&mut fresh), after).await?);
                        if found.len() > limit {
                            return Ok(page_by_activity(found, after, limit));
                        }
                        day_read = Some(row_day);
                    }
                    let conversation = ConversationId::parse(&key).map_err(corrupt)?;
                    if seen.insert(conversation) {
                        fresh.push(conversation);
                    }
                    bound = (row_day, key);
                }
                if exhausted {
                    break;
                }
            }
            found.extend(inner.heads_after(user, fresh, after).await?);
            Ok(page_by_activity(found, after, limit))
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
        self.writer.mark(conversation, user, device, marks).await
    }

    async fn messages_at(
        &self,
        conversation: ConversationId,
        seqs: Vec<Seq>,
    ) -> Result<HashMap<Seq, MessageRecord>, StoreError> {
        self.read_on_driver(move |inner| async move {
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

    async fn last_seq(&self, conversation: ConversationId) -> Result<Seq, StoreError> {
        self.read_on_driver(move |inner| async move { inner.last_seq(conversation).await })
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

    /// Every acknowledged write was confirmed by Cassandra already: stop the writer.
    async fn close(&self) -> Result<(), StoreError> {
        self.writer.close().await
    }
}

/// What a failed flush can leave behind — a send record without its message, a
/// head past the stored maximum — read right. They need a Cassandra node, so they
/// are ignored unless asked for: `TEST_CASSANDRA=<host:port> cargo test --lib
/// store::cassandra -- --ignored` (scripts/test runs them).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MessageRecord;

    fn store() -> CassandraStore {
        static KEYSPACE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        static OPENING: Mutex<()> = Mutex::new(());
        let mut config = crate::Config::defaults().unwrap().cassandra;
        config.contact_points = vec![std::env::var("TEST_CASSANDRA").expect("TEST_CASSANDRA=<host:port>")];
        config.keyspace = KEYSPACE
            .get_or_init(|| format!("unit{}_{:x}", std::process::id(), rand::random::<u32>()))
            .clone();
        config.consistency = Consistency::One;
        // Keyspace and tables are created by the first test only: schema changes serialize.
        let _one_at_a_time = OPENING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        CassandraStore::open(&config, Duration::from_secs(3600)).unwrap()
    }

    fn conversation() -> ConversationId {
        let user = || UserId::new(rand::random::<u64>() | 1).unwrap();
        ConversationId::direct(user(), user())
    }

    fn message(conversation: ConversationId, seq: Seq, client_msg_id: &str) -> MessageRecord {
        let sender = conversation.direct_members().next().unwrap();
        MessageRecord {
            conversation,
            seq,
            sender,
            sender_device: DeviceId::new(9).unwrap(),
            client_msg_id: client_msg_id.to_owned(),
            body: format!("body {seq}"),
            server_time_ms: crate::clock::unix_ms(),
            event: None,
            amends: None,
            deleted: false,
            edited_by: None,
        }
    }

    /// Writes the row a flush writes beside `message`, without `message` itself.
    async fn send_record_alone(store: &CassandraStore, message: &MessageRecord) {
        let key = message.conversation.to_string();
        let row = (
            key,
            to_cql(message.sender_device.get()),
            message.client_msg_id.clone(),
            to_cql(message.seq),
            to_cql(message.server_time_ms),
            3600_i32,
        );
        let statement = store.inner.statements.insert_send.clone();
        store
            .on_driver(|inner| async move { inner.execute(&statement, row).await })
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a Cassandra node: TEST_CASSANDRA=<host:port>"]
    async fn a_send_record_counts_only_with_its_message() {
        let store = store();
        let conversation = conversation();
        let lost = message(conversation, 1, "lost");
        let key = (lost.sender_device, "lost".to_owned());
        send_record_alone(&store, &lost).await;
        let found = store.find_sends(conversation, vec![key.clone()], 0).await.unwrap();
        assert!(found.is_empty(), "a send record without its message: {found:?}");

        // Its seq now holds another message: still not that send.
        store
            .append_messages(vec![message(conversation, 1, "other")])
            .await
            .unwrap();
        let other = (lost.sender_device, "other".to_owned());
        let found = store
            .find_sends(conversation, vec![key, other.clone()], 0)
            .await
            .unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), vec![&other]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a Cassandra node: TEST_CASSANDRA=<host:port>"]
    async fn last_seq_steps_down_from_a_head_past_the_stored_messages() {
        let store = store();
        let conversation = conversation();
        let messages = (1..=3)
            .map(|seq| message(conversation, seq, &format!("m{seq}")))
            .collect();
        store.append_messages(messages).await.unwrap();
        for head in [BUCKET_SIZE, 2 * BUCKET_SIZE + 5] {
            let key = conversation.to_string();
            let row = (key.clone(), to_cql(head), 0_i64, to_cql(head));
            let statement = store.inner.statements.upsert_head.clone();
            store
                .on_driver(|inner| async move { inner.execute(&statement, row).await })
                .await
                .unwrap();
            assert_eq!(store.last_seq(conversation).await.unwrap(), 3, "head at {head}");
        }
    }
}
