//! Sends through a node that does not hold their conversation are forwarded
//! to the one that does; committed messages reach the members' sessions on
//! every node, once and in order.

use super::*;

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
    let forwarded = sample(
        &scrape(b.metrics.unwrap()).await,
        "confab_send_stage_seconds_count{stage=\"forwarded\"}",
    );
    assert_eq!(forwarded, Some(1.0), "the retry was forwarded to a and timed");
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
async fn a_relay_lost_on_the_way_is_filled_in_from_the_store() {
    let mut cluster = Cluster::new("5s");
    let (a, b) = (cluster.start(), cluster.start());
    sees_live(&b, 2.0).await;
    let (alice, _, _) = user_on(&a, "alice").await;
    let (bob, bob_id, _) = user_on(&b, "bob").await;
    let first = alice.send_direct(bob_id, "m1", "hi").await.unwrap();
    let conversation = first.conversation_id;
    assert_eq!(pushes(&bob, &conversation, 1).await, vec![(1, "m1".to_owned())]);
    // b stops reading while a commits four more; the relay of the second
    // is lost (as a Redis failover can lose it).
    signal(&b, "-STOP");
    for n in 2..=5 {
        alice.send_direct(bob_id, &format!("m{n}"), "hi").await.unwrap();
    }
    // The relay of m3 in b's inbox (found by its frame's client_msg_id, once
    // m5's is there too: relays leave after the acks).
    let inboxes: Vec<String> = redis(&["--scan", "--pattern", &format!("{}:inbox:*", cluster.prefix())])
        .iter()
        .map(|key| key.trim_matches('"').to_owned())
        .collect();
    let relay_of = |n: u32| {
        inboxes
            .iter()
            .find_map(|inbox| Some((inbox.clone(), entry_with(inbox, &[&conversation, &format!("m{n}")])?)))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay_of(5).is_none() {
        assert!(Instant::now() < deadline, "m5 never relayed to b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (inbox, m3) = relay_of(3).expect("m3's relay");
    assert_eq!(redis(&["XDEL", &inbox, &m3]), vec!["(integer) 1"]);
    signal(&b, "-CONT");

    assert_eq!(
        pushes(&bob, &conversation, 4).await,
        (2..=5).map(|n| (n, format!("m{n}"))).collect::<Vec<_>>(),
        "m3 filled in from the store, in its place"
    );
    let metrics = scrape(b.metrics.unwrap()).await;
    assert_eq!(
        sample(&metrics, "confab_cluster_gaps_total{outcome=\"filled\"}"),
        Some(1.0)
    );
}

/// The id of the first entry of a stream whose text has every one of `needles`.
fn entry_with(key: &str, needles: &[&str]) -> Option<String> {
    let lines = redis(&["XRANGE", key, "-", "+"]);
    // An entry: `N) 1) "id"`, then its field and value on lines of their own.
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in lines {
        let id = line
            .split_once(") 1) \"")
            .filter(|_| line.starts_with(|first: char| first.is_ascii_digit()))
            .and_then(|(_, rest)| rest.strip_suffix('"'));
        match (id, entries.last_mut()) {
            (Some(id), _) => entries.push((id.to_owned(), String::new())),
            (None, Some((_, text))) => text.push_str(&line),
            (None, None) => {}
        }
    }
    entries
        .into_iter()
        .find(|(_, text)| needles.iter().all(|needle| text.contains(needle)))
        .map(|(id, _)| id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn a_read_marked_on_one_node_shows_in_the_conversation_list_on_another() {
    let Pair {
        cluster: _cluster,
        a: _a,
        b,
        alice,
        alice_id,
        alice_name,
        bob,
        bob_id: _,
    } = pair().await;
    let sent = bob.send_direct(alice_id, "m1", "hi").await.unwrap();
    bob.send_direct(alice_id, "m2", "hi").await.unwrap();
    let unread = |list: confab_client::proto::ConversationList| {
        list.conversations
            .into_iter()
            .find(|state| state.conversation_id == sent.conversation_id)
            .map(|state| (state.read_seq, state.unread_count))
    };
    // Alice's phone on a lists her conversations (a remembers her marks)...
    assert_eq!(unread(alice.list_conversations("", 10).await.unwrap()), Some((0, 2)));
    // ...her tablet on b reads both...
    let tablet = device_on(&b, &alice_name).await;
    tablet.mark_read(&sent.conversation_id, 2).await.unwrap();
    // ...and the phone's list on a shows them read.
    assert_eq!(unread(alice.list_conversations("", 10).await.unwrap()), Some((2, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn a_holder_reads_the_store_for_a_conversations_first_sends_only() {
    let two = pair().await;
    for n in 0..20 {
        two.alice.send_direct(two.bob_id, &format!("m{n}"), "hi").await.unwrap();
    }
    // The first send takes the conversation and lists alice's sends; from
    // then on the holder knows every id without asking the store.
    let metrics = scrape(two.a.metrics.unwrap()).await;
    let checks = sample(&metrics, "confab_store_check_seconds_count").unwrap();
    assert!(checks <= 3.0, "{checks} store reads for 20 sends");
}
