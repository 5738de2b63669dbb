//! Nodes joining and leaving: the live set, handover on SIGTERM and drain,
//! fencing a node killed or paused past its lease, and kill -9 under steady
//! sends.

use super::*;

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
        // Live on b all along: what a committed but had not relayed when it
        // died is filled in from the store, in its place.
        assert_eq!(
            pushes(receiver, &conversation, stored.len()).await,
            stored,
            "every message pushed once, in order, across the kill"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn the_loadgen_check_passes_across_a_node_killed_mid_run() {
    use confab_loadgen::scenario::{self, Measure, Mode};
    use confab_loadgen::traffic::Load;
    let mut cluster = Cluster::new("1s");
    let mut nodes: Vec<BinaryNode> = (0..3).map(|_| cluster.start()).collect();
    sees_live(&nodes[2], 3.0).await;
    let servers: Vec<Endpoint> = nodes.iter().map(|node| Endpoint::tcp(node.addr)).collect();
    let load = Load {
        rate: 300.0,
        duration: Duration::from_secs(4),
        body_bytes: 64,
        drain: Duration::from_secs(30),
        round: 0,
    };
    // Users i on node i % 3: a third of the members, and the conversations
    // their first sends took, are on the node killed.
    let run = tokio::spawn(scenario::direct(
        servers,
        12,
        load,
        Mode::Once,
        Measure::default(),
        serde_json::json!({}),
    ));
    let doomed = nodes.remove(0);
    let metrics = doomed.metrics.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let acked = sample(
            &scrape(metrics).await,
            "confab_send_stage_seconds_count{stage=\"acked\"}",
        );
        if acked.is_some_and(|acked| acked >= 100.0) {
            break;
        }
        assert!(Instant::now() < deadline, "node 0 acknowledged {acked:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill();

    let report = run.await.unwrap().unwrap();
    assert_eq!(
        report.violations,
        Vec::<String>::new(),
        "nothing lost, repeated or out of order"
    );
    assert_eq!(report.errors, 0, "every send acknowledged, after retries");
    assert_eq!(report.acked, report.sent);
    assert_eq!(report.deliveries, report.acked, "one recipient per message");
}
