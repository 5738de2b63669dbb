//! Cluster mode (docs/CLUSTER.md) with real processes: `confab` binaries over
//! one Redis (scripts/redis) and one Cassandra node (scripts/cassandra), each
//! test with a Redis key prefix of its own. Run by scripts/test:
//! `TEST_REDIS=<host:port> TEST_CASSANDRA=<host:port> cargo test --test it --
//! --ignored cluster::`.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn three_nodes_see_each_other_and_a_killed_one_drops_out_after_its_lease() {
    let mut cluster = Cluster::new("500ms");
    let nodes: Vec<BinaryNode> = (0..3).map(|_| cluster.start()).collect();
    for node in &nodes {
        sees_live(node, 3.0).await;
    }
    let mut nodes = nodes.into_iter();
    nodes.next().unwrap().kill();
    for node in nodes {
        sees_live(&node, 2.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn a_node_stopped_with_sigterm_hands_its_conversations_over_and_leaves() {
    // A lease far longer than the test: only leaving can drop the node, and
    // only a release can move its conversation.
    let mut cluster = Cluster::new("10m");
    let (mut leaving, staying) = (cluster.start(), cluster.start());
    sees_live(&staying, 2.0).await;
    let (alice, alice_id, _) = user_on(&leaving, "alice").await;
    let (bob, bob_id, _) = user_on(&staying, "bob").await;
    let first = alice.send_direct(bob_id, "a1", "hi").await.unwrap();
    assert_eq!(first.seq, 1);
    let forwarded = bob.send_direct(alice_id, "b1", "hi").await.unwrap();
    assert_eq!(forwarded.seq, 2, "sequenced by the leaving node, through it");

    signal(&leaving, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while leaving.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the drained node did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sees_live(&staying, 1.0).await;
    let (epoch, leaver, released) = holder(&first.conversation_id).await;
    assert_eq!((epoch, released), (1, true), "handed over");
    assert!(!is_fenced(leaver).await, "and so not fenced");
    assert_eq!(send_once_taken(&bob, alice_id, "b2").await, 3);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn a_conversation_moves_gap_free_to_another_node_when_its_node_is_killed() {
    let Pair {
        cluster: _cluster,
        a,
        b: _b,
        alice,
        alice_id,
        bob,
        bob_id,
        ..
    } = pair().await;
    let mut conversation = String::new();
    for i in 1..=3 {
        let ack = alice.send_direct(bob_id, &format!("a{i}"), "hi").await.unwrap();
        assert_eq!(ack.seq, i);
        conversation = ack.conversation_id;
    }
    // a sequences the conversation while it is live: b forwards to it.
    assert_eq!(bob.send_direct(alice_id, "b1", "hi").await.unwrap().seq, 4);

    let (_, held_by_a, _) = holder(&conversation).await;
    a.kill();
    assert_eq!(
        send_once_taken(&bob, alice_id, "b2").await,
        5,
        "continues after a's last seq"
    );
    let (epoch, held_by_b, _) = holder(&conversation).await;
    assert_eq!(epoch, 2);
    assert_ne!(held_by_b, held_by_a);
    assert!(is_fenced(held_by_a).await, "the dead node was fenced first");
    let expected: Vec<(u64, String)> = [(1, "a1"), (2, "a2"), (3, "a3"), (4, "b1"), (5, "b2")]
        .into_iter()
        .map(|(seq, id)| (seq, id.to_owned()))
        .collect();
    assert_eq!(history(&bob, &conversation).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn a_node_paused_past_its_lease_is_fenced_and_acknowledges_nothing_after() {
    let Pair {
        cluster: _cluster,
        a,
        b,
        alice,
        alice_id,
        alice_name,
        bob,
        bob_id,
    } = pair().await;
    let first = alice.send_direct(bob_id, "a1", "before the pause").await.unwrap();
    assert_eq!(first.seq, 1);

    signal(&a, "-STOP");
    // b takes the conversation once a's lease lapsed, fencing a.
    assert_eq!(send_once_taken(&bob, alice_id, "b1").await, 2);
    signal(&a, "-CONT");
    // a wakes up still holding the conversation: its write lands, its fence
    // check refuses it, and nothing is acknowledged.
    let late = alice.send_direct(bob_id, "a2", "after the pause").await;
    assert_eq!(code(late), ErrorCode::Unavailable);
    let (status, reason) = http_get(a.metrics.unwrap(), "/readyz").await;
    assert!(
        status.contains("503") && reason.contains("fenced"),
        "{status}: {reason}"
    );
    let expected: Vec<(u64, String)> = vec![(1, "a1".into()), (2, "b1".into())];
    assert_eq!(
        history(&bob, &first.conversation_id).await,
        expected,
        "a's late write is not read"
    );
    // Alice retries the refused send through b: it gets the next seq, once.
    let alice_on_b = device_on(&b, &alice_name).await;
    assert_eq!(send_once_taken(&alice_on_b, bob_id, "a2").await, 3);
    assert_eq!(
        send_once_taken(&alice_on_b, bob_id, "a2").await,
        3,
        "a retry gets the original ack"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn every_device_of_a_group_spread_over_three_nodes_gets_every_message_once_in_order() {
    const MEMBERS: usize = 30;
    const SENDERS: usize = 6;
    const PER_SENDER: usize = 5;
    let mut cluster = Cluster::new("2s");
    let nodes: Vec<BinaryNode> = (0..3).map(|_| cluster.start()).collect();
    sees_live(&nodes[2], 3.0).await;
    // Member i has its phone on node i % 3 and its tablet on the next node.
    let mut phones = Vec::new();
    let mut tablets = Vec::new();
    let mut ids = Vec::new();
    for i in 0..MEMBERS {
        let (phone, id, name) = user_on(&nodes[i % 3], "member").await;
        tablets.push(device_on(&nodes[(i + 1) % 3], &name).await);
        phones.push(phone);
        ids.push(id);
    }
    let created = phones[0].create_group("g", "thirty", &ids[1..]).await.unwrap();
    let group = created.conversation_id.clone();
    let target = || confab_client::proto::conversation_ref::Target::ConversationId(group.clone());

    // Senders on every node, each sending in order; their sends are
    // forwarded to the node that holds the group.
    let sends = (1..=SENDERS).map(|sender| {
        let (phone, target) = (&phones[sender], target());
        async move {
            let mut seqs = Vec::new();
            for n in 0..PER_SENDER {
                let ack = phone
                    .send(target.clone(), &format!("s{sender}-{n}"), "hi")
                    .await
                    .unwrap();
                seqs.push(ack.seq);
            }
            assert!(seqs.is_sorted(), "one sender's sends keep their order: {seqs:?}");
        }
    });
    futures::future::join_all(sends).await;

    let total = 1 + SENDERS * PER_SENDER;
    let history = history(&phones[1], &group).await;
    assert_eq!(history.len(), total);
    assert!(
        history.iter().map(|(seq, _)| *seq).eq(1..=total as u64),
        "gap-free: {history:?}"
    );
    for (member, (phone, tablet)) in phones.iter().zip(&tablets).enumerate() {
        // A phone does not get its own sends pushed (it got the acks); the
        // tablet of the same user does.
        let own = |(_, id): &&(u64, String)| {
            (member == 0 && *id == "g") || (1..=SENDERS).contains(&member) && id.starts_with(&format!("s{member}-"))
        };
        let for_phone: Vec<(u64, String)> = history.iter().filter(|entry| !own(entry)).cloned().collect();
        assert_eq!(
            pushes(phone, &group, for_phone.len()).await,
            for_phone,
            "member {member}'s phone"
        );
        assert_eq!(pushes(tablet, &group, total).await, history, "member {member}'s tablet");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn a_retry_through_another_node_gets_the_original_ack() {
    let Pair {
        cluster: _cluster,
        a,
        b,
        alice,
        alice_id: _,
        alice_name,
        bob,
        bob_id,
    } = pair().await;
    let first = alice.send_direct(bob_id, "once", "hi").await.unwrap();
    // Another device of alice's sends through a, then reconnects through b
    // (its connection to a was lost before the ack, say) and retries.
    let laptop = Client::connect(Endpoint::tcp(a.addr)).await.unwrap();
    let login = laptop.log_in(&alice_name, PASSWORD, "laptop").await.unwrap();
    laptop.authenticate(&login.tokens.access_token).await.unwrap();
    let sent = laptop.send_direct(bob_id, "twice", "hi").await.unwrap();
    drop(laptop);
    let laptop_on_b = Client::connect(Endpoint::tcp(b.addr)).await.unwrap();
    laptop_on_b.authenticate(&login.tokens.access_token).await.unwrap();
    let retried = laptop_on_b.send_direct(bob_id, "twice", "hi").await.unwrap();
    assert_eq!((retried.seq, retried.server_time_ms), (sent.seq, sent.server_time_ms));
    assert_eq!(
        history(&bob, &first.conversation_id).await,
        vec![(1, "once".to_owned()), (2, "twice".to_owned())],
        "stored once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn the_first_sends_of_a_conversation_through_two_nodes_at_once_are_both_acknowledged() {
    const PAIRS: usize = 30;
    let mut cluster = Cluster::new("2s");
    let (a, b) = (cluster.start(), cluster.start());
    sees_live(&b, 2.0).await;
    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        let (left, left_id, _) = user_on(&a, "left").await;
        let (right, right_id, _) = user_on(&b, "right").await;
        pairs.push((left, left_id, right, right_id));
    }
    // Both nodes race to claim each new conversation: the loser forwards.
    let races = pairs.iter().map(|(left, left_id, right, right_id)| async move {
        let (from_left, from_right) = tokio::join!(
            left.send_direct(*right_id, "l", "hi"),
            right.send_direct(*left_id, "r", "hi")
        );
        let (from_left, from_right) = (from_left.unwrap(), from_right.unwrap());
        let mut seqs = [from_left.seq, from_right.seq];
        seqs.sort_unstable();
        assert_eq!(seqs, [1, 2], "{}", from_left.conversation_id);
    });
    futures::future::join_all(races).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn a_drained_nodes_clients_move_to_another_and_lose_nothing() {
    let mut cluster = Cluster::new("10m");
    let (mut draining, staying) = (cluster.start(), cluster.start());
    sees_live(&staying, 2.0).await;
    let alice_name = unique_name("alice");
    let alice = Client::connect(Endpoint::tcp(draining.addr)).await.unwrap();
    let login = alice
        .register_and_authenticate(&alice_name, PASSWORD, "phone")
        .await
        .unwrap();
    let (bob, bob_id, _) = user_on(&staying, "bob").await;
    let mut conversation = String::new();
    for i in 1..=3 {
        let ack = alice.send_direct(bob_id, &format!("m{i}"), "before").await.unwrap();
        assert_eq!(ack.seq, i);
        conversation = ack.conversation_id;
    }

    signal(&draining, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, alice.next_event())
            .await
            .expect("told to go away")
        {
            Some(confab_client::Event::GoingAway(_)) => break,
            Some(_) => {}
            None => panic!("closed without GoingAway"),
        }
    }
    // Alice's phone moves to the other node with its token and goes on.
    let moved = Client::connect(Endpoint::tcp(staying.addr)).await.unwrap();
    moved.authenticate(&login.tokens.access_token).await.unwrap();
    assert_eq!(history(&moved, &conversation).await.len(), 3, "nothing lost");
    assert_eq!(send_once_taken(&moved, bob_id, "m4").await, 4);
    while draining.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the drained node did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Bob got each message once, in order: m1..m3 relayed from the drained
    // node, m4 sequenced where he is.
    let expected: Vec<(u64, String)> = (1..=4).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(pushes(&bob, &conversation, 4).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn killing_the_holding_node_under_steady_sends_loses_and_repeats_nothing() {
    const PAIRS: usize = 4;
    const PER_SENDER: u64 = 40;
    let mut cluster = Cluster::new("1s");
    let (a, b) = (cluster.start(), cluster.start());
    sees_live(&b, 2.0).await;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..PAIRS {
        let name = unique_name("sender");
        let client = Client::connect(Endpoint::tcp(a.addr)).await.unwrap();
        let login = client
            .register_and_authenticate(&name, PASSWORD, "phone")
            .await
            .unwrap();
        senders.push((client, login.tokens.access_token));
        receivers.push(user_on(&b, "receiver").await);
    }
    let acked_on_a = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let b_addr = b.addr;
    let sending = senders
        .into_iter()
        .zip(receivers.iter().map(|(_, id, _)| *id))
        .enumerate()
        .map(|(index, ((client, token), to))| {
            let acked_on_a = acked_on_a.clone();
            tokio::spawn(async move {
                let mut client = client;
                let mut moved = false;
                let mut acks = Vec::new();
                for n in 1..=PER_SENDER {
                    let id = format!("s{index}-{n}");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let ack = loop {
                        match client.send_direct(to, &id, "steady").await {
                            Ok(ack) => break ack,
                            Err(err) => {
                                assert!(Instant::now() < deadline, "{id} never acknowledged: {err}");
                                if !moved && err.code() != Some(ErrorCode::Unavailable) {
                                    // a is gone: reconnect to b and retry the same id.
                                    client = Client::connect(Endpoint::tcp(b_addr)).await.unwrap();
                                    client.authenticate(&token).await.unwrap();
                                    moved = true;
                                } else {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    };
                    if !moved {
                        acked_on_a.add_permits(1);
                    }
                    acks.push((ack.seq, id, ack.conversation_id));
                }
                acks
            })
        })
        .collect::<Vec<_>>();
    // Kill a once it has acknowledged a quarter of the load.
    let quarter = u32::try_from(PAIRS as u64 * PER_SENDER / 4).unwrap();
    let _ = acked_on_a.acquire_many(quarter).await.unwrap();
    a.kill();

    for (sending, (receiver, _, _)) in sending.into_iter().zip(&receivers) {
        let acks = sending.await.unwrap();
        let conversation = acks[0].2.clone();
        let stored = history(receiver, &conversation).await;
        let seqs: Vec<u64> = stored.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=PER_SENDER).collect::<Vec<_>>(),
            "gap-free, each once: {stored:?}"
        );
        let acked: Vec<(u64, String)> = acks.into_iter().map(|(seq, id, _)| (seq, id)).collect();
        assert_eq!(stored, acked, "every ack names the stored message, in order");
    }
}
