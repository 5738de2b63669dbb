//! Cluster mode (docs/CLUSTER.md) with real processes: `confab` binaries over
//! one Redis (scripts/redis) and one Cassandra node (scripts/cassandra), each
//! test with a Redis key prefix of its own. Run by scripts/test:
//! `TEST_REDIS=<host:port> TEST_CASSANDRA=<host:port> cargo test --test it --
//! --ignored cluster::`.
//!
//! Helpers here; the tests by concern: [`failover`] (membership, handover,
//! fencing, drain, kill -9 under load), [`forwarding`] (sends forwarded to
//! the holding node, fan-out to every node's sessions, gaps filled) and
//! [`presence`] (online on any node, notifications only when on none).
//!
//! Nodes announce themselves and see each other; a node killed with SIGKILL
//! drops out once its lease lapses; a node stopped with SIGTERM hands its
//! conversations over and leaves at once; a conversation is sequenced by one
//! node at a time, which other nodes forward sends to, and moves to another,
//! gap-free, when its node dies or is paused past its lease (the paused node's
//! late writes are refused); every device of a group's members gets every
//! message once and in order, whichever node it is connected to.

use crate::common::{BinaryNode, PASSWORD, code, http_get, sample, scrape, unique_name};
use confab_client::proto::ErrorCode;
use confab_client::{Client, Endpoint, UserId};
use std::process::Command;
use std::time::{Duration, Instant};

mod failover;
mod forwarding;
mod presence;

/// One keyspace for every cluster of this test process (schema changes are
/// slow and serialize in Cassandra): users and conversations have random ids,
/// so clusters sharing it do not meet; each has a Redis prefix of its own.
fn keyspace() -> &'static str {
    static KEYSPACE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEYSPACE.get_or_init(|| unique_name("cluster"))
}

/// Nodes start one at a time, so only the first creates the keyspace.
static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A cluster's nodes: the same keyspace, token key and Redis prefix.
pub(crate) struct Cluster {
    env: Vec<(String, String)>,
    dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    pub(crate) fn new(lease: &str) -> Self {
        let redis = std::env::var("TEST_REDIS").expect("TEST_REDIS=<host:port>");
        let cassandra = std::env::var("TEST_CASSANDRA").expect("TEST_CASSANDRA=<host:port>");
        let env = [
            ("CONFAB_STORE__BACKEND", "cassandra".to_owned()),
            ("CONFAB_CASSANDRA__CONTACT_POINTS", format!("[\"{cassandra}\"]")),
            ("CONFAB_CASSANDRA__KEYSPACE", keyspace().to_owned()),
            (
                "CONFAB_AUTH__TOKEN_KEY",
                "Y2x1c3Rlci10ZXN0LXRva2VuLWtleS0zMi1ieXRlcyE=".to_owned(),
            ),
            ("CONFAB_CLUSTER__REDIS", format!("redis://{redis}")),
            ("CONFAB_CLUSTER__PREFIX", unique_name("cluster")),
            ("CONFAB_CLUSTER__HEARTBEAT", "100ms".to_owned()),
            ("CONFAB_CLUSTER__LEASE", lease.to_owned()),
            ("CONFAB_METRICS__LISTEN", "127.0.0.1:0".to_owned()),
        ];
        Self {
            env: env.into_iter().map(|(key, value)| (key.to_owned(), value)).collect(),
            dirs: Vec::new(),
        }
    }

    /// Adds settings for the nodes started after.
    pub(crate) fn with(mut self, env: &[(&str, &str)]) -> Self {
        self.env
            .extend(env.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())));
        self
    }

    /// The Redis key prefix of this cluster's nodes.
    pub(crate) fn prefix(&self) -> &str {
        self.env
            .iter()
            .find(|(key, _)| key == "CONFAB_CLUSTER__PREFIX")
            .map(|(_, value)| value.as_str())
            .unwrap()
    }

    /// Starts one more node.
    pub(crate) fn start(&mut self) -> BinaryNode {
        let dir = tempfile::tempdir().unwrap();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let node = {
            let _one_at_a_time = STARTING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            BinaryNode::start(dir.path(), &env, None)
        };
        self.dirs.push(dir);
        node
    }
}

/// A session on the test keyspace, to look at what the nodes stored.
async fn cql() -> scylla::client::session::Session {
    scylla::client::session_builder::SessionBuilder::new()
        .known_node(std::env::var("TEST_CASSANDRA").unwrap())
        .build()
        .await
        .unwrap()
}

/// Who holds a conversation, as the store says: (epoch, holder's
/// incarnation, whether it released it).
async fn holder(conversation: &str) -> (i64, i64, bool) {
    let query = format!(
        "SELECT epoch, owner, released FROM {}.conversation_owners WHERE conversation = ?",
        keyspace()
    );
    let rows = cql().await.query_unpaged(query, (conversation,)).await.unwrap();
    let (epoch, owner, released): (i64, i64, Option<bool>) = rows.into_rows_result().unwrap().single_row().unwrap();
    (epoch, owner, released == Some(true))
}

/// Whether a node's incarnation has been fenced.
async fn is_fenced(incarnation: i64) -> bool {
    let query = format!("SELECT fenced FROM {}.node_fences WHERE incarnation = ?", keyspace());
    let rows = cql().await.query_unpaged(query, (incarnation,)).await.unwrap();
    let (fenced,): (Option<bool>,) = rows.into_rows_result().unwrap().single_row().unwrap();
    fenced == Some(true)
}

/// Polls `node`'s metrics until it counts `expected` live nodes.
pub(crate) async fn sees_live(node: &BinaryNode, expected: f64) {
    let metrics = node.metrics.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = scrape(metrics).await;
        let live = sample(&body, "confab_cluster_live_nodes");
        if live == Some(expected) {
            return;
        }
        assert!(Instant::now() < deadline, "live nodes {live:?}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two nodes with a 500 ms lease, alice signed up on the first, bob on the
/// second.
pub(crate) struct Pair {
    pub(crate) cluster: Cluster,
    pub(crate) a: BinaryNode,
    pub(crate) b: BinaryNode,
    pub(crate) alice: Client,
    pub(crate) alice_id: UserId,
    pub(crate) alice_name: String,
    pub(crate) bob: Client,
    pub(crate) bob_id: UserId,
}

pub(crate) async fn pair() -> Pair {
    let mut cluster = Cluster::new("500ms");
    let (a, b) = (cluster.start(), cluster.start());
    sees_live(&b, 2.0).await;
    let (alice, alice_id, alice_name) = user_on(&a, "alice").await;
    let (bob, bob_id, _) = user_on(&b, "bob").await;
    Pair {
        cluster,
        a,
        b,
        alice,
        alice_id,
        alice_name,
        bob,
        bob_id,
    }
}

/// A user signed up and connected through `node`.
pub(crate) async fn user_on(node: &BinaryNode, name: &str) -> (Client, UserId, String) {
    let name = unique_name(name);
    let client = Client::connect(Endpoint::tcp(node.addr)).await.unwrap();
    let login = client
        .register_and_authenticate(&name, PASSWORD, "phone")
        .await
        .unwrap();
    (client, login.user_id, name)
}

/// Another device of user `name`, connected through `node`.
async fn device_on(node: &BinaryNode, name: &str) -> Client {
    let client = Client::connect(Endpoint::tcp(node.addr)).await.unwrap();
    let login = client.log_in(name, PASSWORD, "tablet").await.unwrap();
    client.authenticate(&login.tokens.access_token).await.unwrap();
    client
}

/// Sends through `client` until the send is acknowledged: refused with
/// UNAVAILABLE while the conversation's node is still taken for live.
pub(crate) async fn send_once_taken(client: &Client, to: UserId, client_msg_id: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.send_direct(to, client_msg_id, "hello").await {
            Ok(ack) => return ack.seq,
            Err(err) => {
                assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
                assert!(Instant::now() < deadline, "never taken over: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs a command on the test Redis; its reply, one item per line.
fn redis(args: &[&str]) -> Vec<String> {
    let redis = std::env::var("TEST_REDIS").unwrap();
    let (host, port) = redis.rsplit_once(':').unwrap();
    let output = Command::new("redis-cli")
        .args(["-h", host, "-p", port, "--no-raw"])
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn signal(node: &BinaryNode, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The conversation's history as (seq, client_msg_id), read through `client`.
pub(crate) async fn history(client: &Client, conversation: &str) -> Vec<(u64, String)> {
    let page = client.history(conversation, None, None, 100).await.unwrap();
    page.messages.into_iter().map(|m| (m.seq, m.client_msg_id)).collect()
}

/// Every pushed message of `conversation` a device gets until it has
/// `expected` of them, as (seq, client_msg_id).
pub(crate) async fn pushes(client: &Client, conversation: &str, expected: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, client.next_message())
            .await
            .unwrap_or_else(|_| panic!("{} of {expected} pushes arrived: {got:?}", got.len()))
            .unwrap();
        if message.conversation_id == conversation {
            got.push((message.seq, message.client_msg_id));
        }
    }
    got
}
