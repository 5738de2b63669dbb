//! Redis dies under a cluster (docs/CLUSTER.md, "Redis lost"): a node keeps
//! sequencing the conversations it holds and acknowledges nothing it did not
//! store; no node takes another's conversation while it cannot see who is
//! live, and a send that needs another node is refused with UNAVAILABLE; once
//! Redis is back, the nodes find each other again, forward and relay again,
//! and the other node's sessions get every message, once, in order.
//!
//! Kills and restarts the Redis server of scripts/test, so it runs alone,
//! after the cluster suite: `TEST_REDIS=... TEST_CASSANDRA=... cargo test
//! --test it -- --ignored redis_outage::`.

use crate::cluster::{history, pair, pushes, sees_live, send_once_taken};
use crate::common::{code, script};
use confab_client::proto::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills the Redis server of scripts/test; run alone with TEST_REDIS and TEST_CASSANDRA"]
async fn a_node_keeps_its_conversations_while_redis_is_down_and_rejoins_after() {
    let two = pair().await;
    let (alice, bob) = (&two.alice, &two.bob);
    let (alice_id, bob_id) = (two.alice_id, two.bob_id);
    let mut conversation = String::new();
    for i in 1..=5 {
        conversation = alice
            .send_direct(bob_id, &format!("m{i}"), "before")
            .await
            .unwrap()
            .conversation_id;
    }

    script("redis", "kill");
    for i in 6..=10 {
        let ack = alice.send_direct(bob_id, &format!("m{i}"), "during").await.unwrap();
        assert_eq!(ack.seq, i, "the holder goes on without Redis");
    }
    // b still sees a live (its last view): it does not fence a and take
    // over, and cannot forward to it without Redis.
    assert_eq!(
        code(bob.send_direct(alice_id, "b1", "during").await),
        ErrorCode::Unavailable
    );

    script("redis", "start");
    sees_live(&two.a, 2.0).await;
    sees_live(&two.b, 2.0).await;
    let expected: Vec<(u64, String)> = (1..=10).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(history(alice, &conversation).await, expected);
    assert_eq!(alice.send_direct(bob_id, "m11", "after").await.unwrap().seq, 11);
    // Relayed to bob's node again; m6..m10, committed while Redis was down,
    // reach bob too (relayed once Redis is back, or filled in from the store
    // where their relays were lost): every message pushed once, in order.
    let expected: Vec<(u64, String)> = (1..=11).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(pushes(bob, &conversation, 11).await, expected);
    // And forwarded from bob's node to alice's again.
    assert_eq!(send_once_taken(bob, alice_id, "b1").await, 12);
}
