//! Cluster mode (docs/CLUSTER.md) with real processes: `confab` binaries over
//! one Redis (scripts/redis) and one Cassandra node (scripts/cassandra), each
//! test with a Redis key prefix of its own. Run by scripts/test:
//! `TEST_REDIS=<host:port> TEST_CASSANDRA=<host:port> cargo test --test it --
//! --ignored cluster::`.
//!
//! So far: nodes announce themselves and see each other; a node killed with
//! SIGKILL drops out once its lease lapses; a node stopped with SIGTERM leaves
//! at once.

use crate::common::{BinaryNode, sample, scrape, unique_name};
use std::process::Command;
use std::time::{Duration, Instant};

/// A cluster's nodes: the same keyspace, token key and Redis prefix.
struct Cluster {
    env: Vec<(String, String)>,
    dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn new(lease: &str) -> Self {
        let redis = std::env::var("TEST_REDIS").expect("TEST_REDIS=<host:port>");
        let cassandra = std::env::var("TEST_CASSANDRA").expect("TEST_CASSANDRA=<host:port>");
        let env = [
            ("CONFAB_STORE__BACKEND", "cassandra".to_owned()),
            ("CONFAB_CASSANDRA__CONTACT_POINTS", format!("[\"{cassandra}\"]")),
            ("CONFAB_CASSANDRA__KEYSPACE", unique_name("cluster")),
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

    /// Starts one more node (one at a time: the first creates the keyspace).
    fn start(&mut self) -> BinaryNode {
        let dir = tempfile::tempdir().unwrap();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let node = BinaryNode::start(dir.path(), &env, None);
        self.dirs.push(dir);
        node
    }
}

/// Polls `node`'s metrics until it counts `expected` live nodes.
async fn sees_live(node: &BinaryNode, expected: f64) {
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
async fn a_node_stopped_with_sigterm_leaves_at_once() {
    // A lease far longer than the test: only leaving can drop the node.
    let mut cluster = Cluster::new("10m");
    let (mut leaving, staying) = (cluster.start(), cluster.start());
    sees_live(&staying, 2.0).await;
    let status = Command::new("kill")
        .args(["-TERM", &leaving.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    sees_live(&staying, 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while leaving.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the drained node did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
