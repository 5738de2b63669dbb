//! Cassandra dies while clients send: sends fail with UNAVAILABLE (never an ack
//! for a message Cassandra did not confirm); once it is back, sending resumes and
//! every acknowledged message is stored exactly once, with no seq gap.
//!
//! Kills and restarts the shared node of scripts/test, so it runs alone, last:
//! `TEST_STORE=cassandra TEST_CASSANDRA=... cargo test --test cassandra_outage -- --ignored`.

use crate::common::{TestServer, new_user, script};
use confab_client::proto::ErrorCode;
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills the Cassandra node of scripts/test; run alone with TEST_STORE=cassandra"]
async fn sends_fail_cleanly_while_cassandra_is_down_and_resume_after() {
    assert_eq!(
        std::env::var("TEST_STORE").as_deref(),
        Ok("cassandra"),
        "needs TEST_STORE=cassandra"
    );
    let mut node = TestServer::start_with(1, &[("CONFAB_CASSANDRA__REQUEST_TIMEOUT", "1s")]).await;
    let (alice, _, _) = new_user(node.addr, "outage").await;
    let (_bob, bob_login, _) = new_user(node.addr, "outage").await;
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut conversation = String::new();
    for i in 0..20 {
        let id = format!("before-{i}");
        let ack = alice.send_direct(bob_login.user_id, &id, "before").await.unwrap();
        conversation = ack.conversation_id;
        acked.insert(id, ack.seq);
    }

    script("cassandra", "kill");
    // While the node is down: no ack, a clear UNAVAILABLE. Sends go four at a
    // time, so some are sequenced behind a commit that fails.
    let mut refused = Vec::new();
    for round in 0..5 {
        let ids: Vec<String> = (0..4).map(|i| format!("during-{round}-{i}")).collect();
        let sends = ids.iter().map(|id| alice.send_direct(bob_login.user_id, id, "during"));
        let results = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(sends))
            .await
            .expect("a send while Cassandra is down must fail, not hang");
        for result in results {
            match result {
                Err(err) => assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}"),
                Ok(ack) => panic!("acknowledged while Cassandra was down: {ack:?}"),
            }
        }
        refused.extend(ids);
    }

    script("cassandra", "start");
    // The driver reconnects by itself; retries of the refused sends (same ids) and
    // new sends go through.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for id in refused.iter().cloned().chain((0..5).map(|i| format!("after-{i}"))) {
        loop {
            match alice.send_direct(bob_login.user_id, &id, "again").await {
                Ok(ack) => {
                    acked.insert(id, ack.seq);
                    break;
                }
                Err(err) if err.code() == Some(ErrorCode::Unavailable) => {
                    assert!(tokio::time::Instant::now() < deadline, "sends did not resume: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("unexpected error after the restart: {err}"),
            }
        }
    }

    // Every acknowledged message is stored exactly once, at its acked seq, and
    // the seqs have no gap.
    let history = alice.full_history(&conversation).await.unwrap();
    let seqs: Vec<u64> = history.iter().map(|message| message.seq).collect();
    assert_eq!(
        seqs,
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "seqs must have no gap"
    );
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    for message in &history {
        stored
            .entry(message.client_msg_id.clone())
            .or_default()
            .push(message.seq);
    }
    for (id, seq) in &acked {
        assert_eq!(
            stored.get(id),
            Some(&vec![*seq]),
            "{id} must be stored once, at seq {seq}"
        );
    }
    node.shutdown().await;
}
