//! Multi-device sync and recovery: Sync pages everything a device missed across its
//! conversations; a device resuming with its sync token gets exactly what it missed,
//! then live messages, with no gap and no duplicate; receipts and unread counts.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestServer, new_user, second_device, within};
use confab_client::proto::{Message, conversation_ref::Target};
use confab_client::{Client, Event};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn group(id: &str) -> Target {
    Target::ConversationId(id.to_owned())
}

/// Checks that `messages` continue every conversation from `from` with no gap and
/// no duplicate, up to `to`; returns how many there were.
fn assert_contiguous(messages: &[Message], from: &BTreeMap<String, u64>, to: &BTreeMap<String, u64>) -> usize {
    let mut last: HashMap<&str, u64> = from.iter().map(|(id, seq)| (id.as_str(), *seq)).collect();
    for message in messages {
        let previous = last.entry(message.conversation_id.as_str()).or_insert(0);
        assert_eq!(
            message.seq,
            *previous + 1,
            "gap or duplicate in {}",
            message.conversation_id
        );
        *previous = message.seq;
    }
    for (id, seq) in to {
        assert_eq!(last.get(id.as_str()).copied().unwrap_or(0), *seq, "{id} incomplete");
    }
    messages.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_resumes_with_exactly_what_it_missed_then_live() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, alice_name) = new_user(node.addr, "resume").await;
    let (bob, bob_login, _) = new_user(node.addr, "resume").await;
    // A 50-member group (with Alice and Bob); three of the others send.
    let addr = node.addr;
    let others = futures::future::join_all((0..48).map(|_| new_user(addr, "resume"))).await;
    let mut members: Vec<u64> = others.iter().map(|(_, login, _)| login.user_id).collect();
    members.push(alice_login.user_id);
    let team = bob
        .create_group("team", "team", &members)
        .await
        .unwrap()
        .conversation_id;
    let direct = bob
        .send_direct(alice_login.user_id, "d0", "hello")
        .await
        .unwrap()
        .conversation_id;

    // Alice's phone syncs, then goes offline.
    let (phone, phone_login) = second_device(node.addr, &alice_name).await;
    let first = phone.sync("", &[], 0).await.unwrap();
    assert!(!first.has_more);
    let before: BTreeMap<String, u64> = first
        .conversations
        .iter()
        .map(|state| (state.conversation_id.clone(), state.last_seq))
        .collect();
    assert_eq!(before.get(&team), Some(&1));
    assert_eq!(before.get(&direct), Some(&1));
    let token = first.sync_token;
    drop(phone);

    // 500 messages while it is away, from several senders and conversations.
    let sends = others[..3].iter().enumerate().map(|(index, (client, _, _))| {
        let team = team.clone();
        async move {
            for i in 0..150 {
                client
                    .send(group(&team), &format!("g{index}-{i}"), "while away")
                    .await
                    .unwrap();
            }
        }
    });
    futures::future::join_all(sends).await;
    for i in 0..50 {
        bob.send_direct(alice_login.user_id, &format!("d{}", i + 1), "while away")
            .await
            .unwrap();
    }

    // It comes back while traffic continues.
    let live_sender = {
        let client = Client::connect(node.addr).await.unwrap();
        client
            .authenticate(&bob_login.tokens.clone().unwrap().access_token)
            .await
            .unwrap();
        let team = team.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                client.send(group(&team), &format!("live-{i}"), "live").await.unwrap();
            }
            client
        })
    };
    let phone = Client::connect(node.addr).await.unwrap();
    let resumed = phone
        .authenticate_resume(&phone_login.tokens.unwrap().access_token, &token, &[])
        .await
        .unwrap();
    assert!(resumed.recovered, "500 missed messages fit the replay");
    assert!(resumed.replayed >= 500);
    let live_sender = live_sender.await.unwrap();
    let final_team = live_sender.send(group(&team), "last", "last").await.unwrap().seq;
    let final_direct = 51;

    let mut received = Vec::new();
    let expected = (final_team - 1) + (final_direct - 1);
    while (received.len() as u64) < expected {
        match within(WAIT, phone.next_event()).await {
            Some(Event::Message(message)) => received.push(message),
            other => panic!("unexpected {other:?}"),
        }
    }
    let to = BTreeMap::from([(team.clone(), final_team), (direct.clone(), final_direct)]);
    assert_contiguous(&received, &before, &to);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), phone.next_message())
            .await
            .is_err(),
        "no extras"
    );
    drop(alice);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_absence_is_reported_unrecovered_and_sync_pages_the_rest() {
    let mut node = TestServer::start_with(2, &[("CONFAB_STORE__DURABILITY", "buffered")]).await;
    let (_, alice_login, alice_name) = new_user(node.addr, "away").await;
    let (bob, _, _) = new_user(node.addr, "away").await;
    let (phone, phone_login) = second_device(node.addr, &alice_name).await;
    let token = phone.sync("", &[], 0).await.unwrap().sync_token;
    drop(phone);

    let acks = common::send_pipelined(&bob, alice_login.user_id, 1500).await;
    let conversation = acks[0].conversation_id.clone();

    let phone = Client::connect(node.addr).await.unwrap();
    let resumed = phone
        .authenticate_resume(&phone_login.tokens.unwrap().access_token, &token, &[])
        .await
        .unwrap();
    assert!(!resumed.recovered, "the replay limit is explicit");
    assert_eq!(resumed.replayed, 1000);
    let mut seqs = Vec::new();
    for _ in 0..resumed.replayed {
        seqs.push(within(WAIT, phone.next_message()).await.unwrap().seq);
    }
    // Sync from the token it got continues exactly where the replay stopped.
    let mut token = resumed.sync_token;
    loop {
        let page = phone.sync(&token, &[], 200).await.unwrap();
        for state in &page.conversations {
            assert_eq!(state.conversation_id, conversation);
            seqs.extend(state.messages.iter().map(|m| m.seq));
        }
        token = page.sync_token;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seqs, (1..=1500).collect::<Vec<_>>());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_reports_unread_counts_and_lists_conversations_by_activity() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, _) = new_user(node.addr, "unread").await;
    let (bob, bob_login, _) = new_user(node.addr, "unread").await;
    let (carol, carol_login, _) = new_user(node.addr, "unread").await;
    for i in 0..5 {
        bob.send_direct(alice_login.user_id, &format!("b{i}"), "from bob")
            .await
            .unwrap();
    }
    let group = carol
        .create_group("g", "carol's", &[alice_login.user_id])
        .await
        .unwrap()
        .conversation_id;
    for i in 0..3 {
        carol
            .send(group_target(&group), &format!("c{i}"), "from carol")
            .await
            .unwrap();
    }
    let with_bob = bob
        .send_direct(alice_login.user_id, "b5", "latest")
        .await
        .unwrap()
        .conversation_id;

    // Marks are monotonic and bounded by the conversation.
    assert_eq!(alice.mark_read(&with_bob, 4).await.unwrap().read_seq, 4);
    assert_eq!(
        alice.mark_read(&with_bob, 2).await.unwrap().read_seq,
        4,
        "lower marks are ignored"
    );
    assert_eq!(
        alice.mark_delivered(&with_bob, 99).await.unwrap().delivered_seq,
        6,
        "capped at the last seq"
    );
    let receipt = alice.mark_read(&group, 3).await.unwrap();
    assert_eq!(receipt.user_id, alice_login.user_id);

    let sync = alice.sync("", &[], 0).await.unwrap();
    let unread: HashMap<&str, (u64, u64, &str)> = sync
        .conversations
        .iter()
        .map(|state| {
            (
                state.conversation_id.as_str(),
                (state.last_seq, state.unread_count, state.title.as_str()),
            )
        })
        .collect();
    assert_eq!(unread[with_bob.as_str()], (6, 2, ""));
    let latest = sync
        .conversations
        .iter()
        .find(|state| state.conversation_id == with_bob)
        .unwrap();
    assert_eq!(latest.last_message.as_ref().map(|m| m.body.as_str()), Some("latest"));
    assert_eq!(unread[group.as_str()], (4, 1, "carol's"));

    // ListConversations pages by last activity, newest first.
    let first = alice.list_conversations("", 1).await.unwrap();
    assert_eq!(first.conversations[0].conversation_id, with_bob);
    assert_eq!(first.conversations[0].last_message.as_ref().unwrap().seq, 6);
    let second = alice.list_conversations(&first.next_page_token, 1).await.unwrap();
    assert_eq!(second.conversations[0].conversation_id, group);
    assert!(second.next_page_token.is_empty());

    // Nobody marks or syncs someone else's conversation.
    let (low, high) = (
        bob_login.user_id.min(carol_login.user_id),
        bob_login.user_id.max(carol_login.user_id),
    );
    let theirs = format!("d:{low}:{high}");
    assert_eq!(
        common::code(alice.mark_read(&theirs, 1).await),
        confab_client::proto::ErrorCode::Forbidden
    );
    let (outsider, _, _) = new_user(node.addr, "unread").await;
    assert_eq!(
        common::code(outsider.mark_read(&group, 1).await),
        confab_client::proto::ErrorCode::Forbidden
    );
    assert!(outsider.sync("", &[], 0).await.unwrap().conversations.is_empty());
    assert_eq!(
        common::code(alice.sync("s1.garbage!", &[], 0).await),
        confab_client::proto::ErrorCode::BadRequest
    );
    node.shutdown().await;
}

fn group_target(id: &str) -> Target {
    group(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_after_a_restart_returns_everything_acknowledged() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, _) = new_user(node.addr, "restart").await;
    let (bob, _, _) = new_user(node.addr, "restart").await;
    let token = alice.sync("", &[], 0).await.unwrap().sync_token;
    let mut acked = Vec::new();
    for i in 0..40 {
        acked.push(
            bob.send_direct(alice_login.user_id, &format!("r{i}"), "before restart")
                .await
                .unwrap()
                .seq,
        );
    }
    node.shutdown().await;

    let server = common::start_server(common::config(node.dir.path(), 2, &[]));
    let alice = Client::connect(common::endpoint(&server, common::transport()))
        .await
        .unwrap();
    alice
        .authenticate(&alice_login.tokens.unwrap().access_token)
        .await
        .unwrap();
    let sync = alice.sync(&token, &[], 0).await.unwrap();
    let seqs: Vec<u64> = sync.conversations[0].messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, acked);
    server.shutdown().await.unwrap();
}

/// Large messages in several conversations: Sync pages them by frame size and
/// every message still arrives exactly once across pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pages_large_messages_without_skipping_any() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, _) = new_user(node.addr, "big").await;
    let (bob, _, _) = new_user(node.addr, "big").await;
    let (carol, _, _) = new_user(node.addr, "big").await;
    // An older conversation with a 150 kB message, a newer one with a 10 kB one:
    // both fit one 256 KiB reply only if nothing is counted twice.
    let with_carol = carol
        .send_direct(alice_login.user_id, "c", &"é".repeat(75_000))
        .await
        .unwrap();
    let with_bob = bob
        .send_direct(alice_login.user_id, "b", &"b".repeat(10_000))
        .await
        .unwrap();
    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let page = alice.sync(&token, &[], 0).await.unwrap();
        for state in &page.conversations {
            seen.extend(state.messages.iter().map(|m| (m.conversation_id.clone(), m.seq)));
        }
        token = page.sync_token;
        if !page.has_more {
            break;
        }
    }
    seen.sort();
    let mut expected = vec![(with_bob.conversation_id, 1), (with_carol.conversation_id, 1)];
    expected.sort();
    assert_eq!(seen, expected);
    node.shutdown().await;
}
