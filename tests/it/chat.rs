//! End-to-end chat over real TCP: accounts, direct messages, multi-device, history,
//! and many concurrent clients across shards.

use crate::common;
use crate::common::{TestServer, new_user, second_device, within};
use confab_client::Client;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_with_gap_free_seqs_multi_device_and_history() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, alice_name) = new_user(node.addr, "alice").await;
    let (bob, bob_login, _) = new_user(node.addr, "bob").await;
    let (alice_phone, _) = second_device(node.addr, &alice_name).await;

    // Alternate directions: one conversation, one sequence.
    let mut sent = Vec::new();
    for i in 0..10u64 {
        let (from, to_id, label) = if i % 2 == 0 {
            (&alice, bob_login.user_id, "a")
        } else {
            (&bob, alice_login.user_id, "b")
        };
        let ack = from
            .send_direct(to_id, &format!("{label}{i}"), &format!("message {i}"))
            .await
            .unwrap();
        assert_eq!(ack.seq, i + 1, "seqs are 1..n without gaps");
        sent.push((ack.conversation_id.clone(), ack.seq));
    }
    let conversation = sent[0].0.clone();
    assert!(sent.iter().all(|(id, _)| *id == conversation));

    // Bob receives Alice's five messages, in order.
    for expected in [1, 3, 5, 7, 9] {
        let message = within(WAIT, bob.next_message()).await.unwrap();
        assert_eq!(
            (message.seq, message.sender_user_id),
            (expected, alice_login.user_id.get())
        );
    }
    // Alice's first device receives only Bob's (it got SendAcks for its own).
    for expected in [2, 4, 6, 8, 10] {
        let message = within(WAIT, alice.next_message()).await.unwrap();
        assert_eq!(message.seq, expected);
        assert_eq!(message.sender_user_id, bob_login.user_id.get());
    }
    // Alice's phone receives everything, including what her laptop sent.
    for expected in 1..=10 {
        let message = within(WAIT, alice_phone.next_message()).await.unwrap();
        assert_eq!(message.seq, expected);
        assert_eq!(message.body, format!("message {}", expected - 1));
    }

    // History pages match what was sent, in both directions.
    let latest = bob.history(&conversation, None, None, 4).await.unwrap();
    assert_eq!(
        latest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![7, 8, 9, 10]
    );
    assert!(latest.has_more);
    let before = bob.history(&conversation, Some(7), None, 4).await.unwrap();
    assert_eq!(
        before.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    assert!(before.has_more);
    let oldest = bob.history(&conversation, Some(3), None, 4).await.unwrap();
    assert_eq!(oldest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert!(!oldest.has_more);
    let after = alice.history(&conversation, None, Some(8), 50).await.unwrap();
    assert_eq!(after.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![9, 10]);
    assert!(!after.has_more);
    let all = alice.full_history(&conversation).await.unwrap();
    assert_eq!(all.len(), 10);
    assert_eq!(all[4].client_msg_id, "a4");
    assert_eq!(all[4].sender_device_id, alice_login.device_id.get());

    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_self_reach_other_devices_only() {
    let mut node = TestServer::start(2).await;
    let (laptop, login, name) = new_user(node.addr, "notes").await;
    let (phone, _) = second_device(node.addr, &name).await;
    let ack = laptop.send_direct(login.user_id, "n1", "buy milk").await.unwrap();
    assert_eq!(ack.seq, 1);
    let message = within(WAIT, phone.next_message()).await.unwrap();
    assert_eq!(message.body, "buy milk");
    node.shutdown().await;
}

/// 200 clients on 2 shards, in 100 pairs, each sending 20 messages to its partner
/// concurrently: every message is delivered exactly once, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_exchange_exactly_once_in_order() {
    const PAIRS: usize = 100;
    const PER_CLIENT: u64 = 20;
    let mut node = TestServer::start(2).await;
    let addr = node.addr;

    let mut setups = Vec::new();
    for _ in 0..PAIRS * 2 {
        setups.push(tokio::spawn(async move { new_user(addr, "load").await }));
    }
    let mut clients = Vec::new();
    for setup in setups {
        let (client, login, _) = setup.await.unwrap();
        clients.push((Arc::new(client), login.user_id));
    }

    let mut tasks = Vec::new();
    for pair in clients.chunks(2) {
        for (me, partner) in [(0, 1), (1, 0)] {
            let (client, my_id) = pair[me].clone();
            let partner_id = pair[partner].1;
            tasks.push(tokio::spawn(async move {
                // Pipelined sends: all in flight at once.
                let sends = (0..PER_CLIENT).map(|i| {
                    let client = client.clone();
                    async move {
                        client
                            .send_direct(partner_id, &format!("{my_id}-{i}"), &format!("{i}"))
                            .await
                    }
                });
                let acks = futures::future::join_all(sends).await;
                let mut acked_seqs: Vec<u64> = acks.into_iter().map(|ack| ack.unwrap().seq).collect();
                acked_seqs.sort_unstable();
                // Receive exactly the partner's messages, in increasing seq order.
                let mut received: HashMap<String, u64> = HashMap::new();
                let mut last_seq = 0;
                while received.len() < PER_CLIENT as usize {
                    let message = within(WAIT, client.next_message()).await.unwrap();
                    assert_eq!(message.sender_user_id, partner_id.get());
                    assert!(message.seq > last_seq, "out of order: {} after {last_seq}", message.seq);
                    last_seq = message.seq;
                    assert!(
                        received.insert(message.client_msg_id.clone(), message.seq).is_none(),
                        "duplicate"
                    );
                }
                (acked_seqs, received.into_values().collect::<Vec<_>>())
            }));
        }
    }
    for pair in tasks.chunks_mut(2) {
        let (acked_a, received_a) = (&mut pair[0]).await.unwrap();
        let (acked_b, received_b) = (&mut pair[1]).await.unwrap();
        // The two directions share one conversation: together they are 1..=40.
        let mut all: Vec<u64> = acked_a.iter().chain(&acked_b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (1..=PER_CLIENT * 2).collect::<Vec<_>>());
        let mut received_by_a = received_a.clone();
        received_by_a.sort_unstable();
        assert_eq!(received_by_a, acked_b, "a received exactly what b sent");
        let mut received_by_b = received_b.clone();
        received_by_b.sort_unstable();
        assert_eq!(received_by_b, acked_a);
    }
    // Nothing extra arrives afterwards.
    let (probe, _) = &clients[0];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), probe.next_message())
            .await
            .is_err()
    );

    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_user_finds_users_by_name() {
    let mut node = TestServer::start(1).await;
    let (alice, _, _) = new_user(node.addr, "finder").await;
    let (_, bob_login, bob_name) = new_user(node.addr, "findee").await;
    let found = alice.user(&bob_name.to_uppercase()).await.unwrap();
    assert_eq!((found.user_id, found.username), (bob_login.user_id, bob_name));
    assert_eq!(
        common::code(alice.user("nobody-here").await),
        confab_client::proto::ErrorCode::NotFound
    );
    let anonymous = Client::connect(node.addr).await.unwrap();
    assert_eq!(
        common::code(anonymous.user("whoever").await),
        confab_client::proto::ErrorCode::Unauthenticated
    );
    node.shutdown().await;
}

/// 2 500 messages: more than two of the Cassandra store's 1 000-seq partitions.
/// Pages walk the whole conversation forward and backward, gap-free, on every
/// backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_across_partition_boundaries_in_both_directions() {
    const MESSAGES: u64 = 2500;
    let mut node = TestServer::start(2).await;
    let (alice, _, _) = new_user(node.addr, "pager").await;
    let (_bob, bob_login, _) = new_user(node.addr, "paged").await;
    let acks = common::send_pipelined(&alice, bob_login.user_id, MESSAGES as usize).await;
    let conversation = acks[0].conversation_id.clone();

    let mut forward: Vec<u64> = Vec::new();
    let mut after = 0;
    loop {
        let page = alice.history(&conversation, None, Some(after), 199).await.unwrap();
        forward.extend(page.messages.iter().map(|message| message.seq));
        match page.messages.last() {
            Some(last) if page.has_more => after = last.seq,
            _ => break,
        }
    }
    assert_eq!(forward, (1..=MESSAGES).collect::<Vec<_>>());

    let mut backward: Vec<u64> = Vec::new();
    let mut before = None;
    loop {
        let page = alice.history(&conversation, before, None, 199).await.unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|message| message.seq).collect();
        assert!(
            seqs.windows(2).all(|pair| pair[0] + 1 == pair[1]),
            "a page is ascending and gap-free"
        );
        backward.extend(seqs.iter().rev());
        match page.messages.first() {
            Some(first) if page.has_more => before = Some(first.seq),
            _ => break,
        }
    }
    assert_eq!(backward, (1..=MESSAGES).rev().collect::<Vec<_>>());
    let bodies: Vec<String> = alice
        .history(&conversation, Some(1002), None, 4)
        .await
        .unwrap()
        .messages
        .into_iter()
        .map(|message| message.body)
        .collect();
    assert_eq!(bodies, ["body 997", "body 998", "body 999", "body 1000"]);
    node.shutdown().await;
}
