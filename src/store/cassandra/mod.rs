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
//! | `push_tokens` | `user_id` | `device_id` | where a user's devices are reached while offline |
//! | `push_pending` | `user_id` | | users' open notification windows (read whole once at start) |
//! | `mutes` | `user_id` | `conversation` | conversations a user muted in its notifications |
//! | `node_fences` | `incarnation` | | cluster mode: whether a node was fenced ([`ownership`]) |
//! | `conversation_owners` | `conversation` | | cluster mode: a conversation's epoch and owner |
//! | `conversation_epochs` | `conversation` | `epoch` | cluster mode: the seq each epoch started at |
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
//! Idempotency checks read `sends` rows; the owner keeps what they say of a
//! device ([`crate::store::Store::sent_ids`]) and asks only for keys it cannot
//! answer. Heads and users' receipt watermarks, which only grow, are kept in
//! `highest` caches, so a conversation list or sync reads only what the node
//! has not seen.
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

mod accounts;
mod conversations;
mod groups;
mod highest;
mod messages;
mod ownership;
mod push;
mod reads;
mod rows;
mod statements;
mod writer;

use super::{Store, StoreError};
use crate::config::CassandraConfig;
use async_trait::async_trait;
use confab_protocol::Marks;
use confab_protocol::ids::{ConversationId, Seq, UserId};
use highest::Highest;
pub use rows::bucket;
use rows::day;
use rows::{role_code, to_cql, unavailable};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use statements::{Statements, consistency};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Seqs per `messages` partition.
pub const BUCKET_SIZE: u64 = 1000;
/// A history read stops after this many empty buckets in a row: below the head
/// every bucket holds messages, so more would mean reading past the end.
const MAX_EMPTY_BUCKETS: usize = 4;
/// Threads of the driver's runtime.
const DRIVER_THREADS: usize = 2;
/// Longest wait for a contact point at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `user_activity` rows read per query.
const ACTIVITY_ROWS_PER_READ: usize = 200;

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
    /// Set once this store writes as one node of a cluster.
    cluster: std::sync::OnceLock<ownership::ClusterNode>,
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
        statements::apply_schema(&session, config).await?;
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
        known_heads: Highest::new(std::cmp::max),
        known_marks: Highest::new(Marks::merged),
        dedup_window,
        cluster: std::sync::OnceLock::new(),
    })
}

#[async_trait]
impl Store for CassandraStore {
    /// In cluster mode, a node that found itself fenced writes nothing more:
    /// it says so (in `/readyz` and the log) until it restarts and joins again.
    async fn probe_writes(&self) -> Result<(), StoreError> {
        match self.inner.cluster.get() {
            Some(node) if node.is_fenced() => Err(StoreError::unavailable(format!(
                "this node ({}) was fenced, as another node found it dead: restart it to join again",
                node.me
            ))),
            _ => Ok(()),
        }
    }

    /// Every acknowledged write was confirmed by Cassandra already: stop the
    /// writer; in cluster mode, then hand over the conversations held.
    async fn close(&self) -> Result<(), StoreError> {
        self.writer.close().await?;
        self.release_all().await;
        Ok(())
    }

    async fn join_cluster(
        &self,
        me: crate::store::ownership::Incarnation,
        is_live: crate::store::ownership::Liveness,
    ) -> Result<(), StoreError> {
        self.join(me, is_live).await
    }
}

/// What a failed flush can leave behind — a send record without its message, a
/// head past the stored maximum — read right. They need a Cassandra node, so they
/// are ignored unless asked for: `TEST_CASSANDRA=<host:port> cargo test --lib
/// store::cassandra -- --ignored` (scripts/test runs them).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Consistency;
    use crate::store::{MessageRecord, MessageStore as _};
    use confab_protocol::ids::DeviceId;

    /// The keyspace of this test process's stores.
    pub(super) fn keyspace() -> &'static str {
        static KEYSPACE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        KEYSPACE.get_or_init(|| format!("unit{}_{:x}", std::process::id(), rand::random::<u32>()))
    }

    pub(super) fn store() -> CassandraStore {
        static OPENING: Mutex<()> = Mutex::new(());
        let mut config = crate::Config::defaults().unwrap().cassandra;
        config.contact_points = vec![std::env::var("TEST_CASSANDRA").expect("TEST_CASSANDRA=<host:port>")];
        config.keyspace = keyspace().to_owned();
        config.consistency = Consistency::One;
        // Keyspace and tables are created by the first test only: schema changes serialize.
        let _one_at_a_time = OPENING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        CassandraStore::open(&config, Duration::from_secs(3600)).unwrap()
    }

    pub(super) fn conversation() -> ConversationId {
        let user = || UserId::new(rand::random::<u64>() | 1).unwrap();
        ConversationId::direct(user(), user())
    }

    pub(super) fn message(conversation: ConversationId, seq: Seq, client_msg_id: &str) -> MessageRecord {
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
    async fn a_keyspace_made_before_display_names_gets_the_column() {
        use crate::store::AccountStore as _;
        let mut config = crate::Config::defaults().unwrap().cassandra;
        config.contact_points = vec![std::env::var("TEST_CASSANDRA").expect("TEST_CASSANDRA=<host:port>")];
        config.keyspace = format!("upgrade{}_{:x}", std::process::id(), rand::random::<u32>());
        config.consistency = Consistency::One;
        let old = CassandraStore::open(&config, Duration::from_secs(3600)).unwrap();
        // The users table as the first release made it.
        let drop = format!("ALTER TABLE {}.users DROP display_name", config.keyspace);
        old.on_driver(|inner| async move {
            inner
                .session
                .query_unpaged(drop, ())
                .await
                .map_err(|err| StoreError::io_because("drop", err))?;
            Ok(())
        })
        .await
        .unwrap();
        old.close().await.unwrap();

        let store = CassandraStore::open(&config, Duration::from_secs(3600)).unwrap();
        let user = crate::store::NewUser {
            username: format!("upgraded{:x}", rand::random::<u32>()),
            password_hash: String::new(),
            created_at_ms: 1,
            display_name: "Ada".into(),
        };
        let created = store.create_user(user).await.unwrap();
        assert_eq!(store.user_by_id(created.id).await.unwrap().unwrap().display_name, "Ada");
        store.close().await.unwrap();
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
