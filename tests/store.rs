//! The `Store` contract, written once and run on whichever backend the run uses:
//! the embedded store by default, Cassandra with `TEST_STORE=cassandra` (the test
//! command runs both). Ids are random, so tests sharing a Cassandra keyspace
//! never meet.
#![allow(clippy::unwrap_used)]

mod common;

use confab::ids::{ConversationId, DeviceId, Seq, UserId};
use confab::store::{DeviceRecord, HistoryPage, HistoryRange, MessageRecord, NewUser, Store, StoreError, StoredSend};
use std::path::Path;
use std::sync::Arc;

fn open(dir: &Path) -> Arc<dyn Store> {
    common::open_store(&common::config(dir, 1, &[("CONFAB_STORE__DURABILITY", "sync")]))
}

fn message(conversation: ConversationId, sender: UserId, seq: Seq) -> MessageRecord {
    MessageRecord {
        conversation,
        seq,
        sender,
        sender_device: DeviceId::new(9).unwrap(),
        client_msg_id: format!("m{seq}"),
        body: format!("body {seq}"),
        server_time_ms: seq,
        event: None,
        amends: None,
        deleted: false,
        edited_by: None,
    }
}

fn seqs(page: &HistoryPage) -> Vec<Seq> {
    page.messages.iter().map(|m| m.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_ranges_page_in_both_directions_and_stay_in_their_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (me, you, them) = (UserId::random(), UserId::random(), UserId::random());
    let ours = ConversationId::direct(me, you);
    let neighbour = ConversationId::direct(me, them);
    store
        .append_messages((1..=10).map(|seq| message(ours, me, seq)).collect())
        .await
        .unwrap();
    store
        .append_messages((1..=5).map(|seq| message(neighbour, me, seq)).collect())
        .await
        .unwrap();

    assert_eq!(store.last_seq(ours).await.unwrap(), 10);
    assert_eq!(store.last_seq(neighbour).await.unwrap(), 5);
    let untouched = ConversationId::direct(UserId::random(), UserId::random());
    assert_eq!(store.last_seq(untouched).await.unwrap(), 0);

    let latest = store.history(ours, HistoryRange::Latest, 3).await.unwrap();
    assert_eq!((seqs(&latest), latest.has_more), (vec![8, 9, 10], true));
    let before = store.history(ours, HistoryRange::Before(3), 5).await.unwrap();
    assert_eq!((seqs(&before), before.has_more), (vec![1, 2], false));
    let after = store.history(ours, HistoryRange::After(0), 4).await.unwrap();
    assert_eq!((seqs(&after), after.has_more), (vec![1, 2, 3, 4], true));
    let tail = store.history(ours, HistoryRange::After(8), 4).await.unwrap();
    assert_eq!((seqs(&tail), tail.has_more), (vec![9, 10], false));
    let beyond = store.history(ours, HistoryRange::After(Seq::MAX), 4).await.unwrap();
    assert!(beyond.messages.is_empty());
    assert_eq!(tail.messages[0], message(ours, me, 9));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sign_ups_of_one_name_create_one_user() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let name = common::unique_name("alice");
    let attempts = (0..16).map(|_| {
        let store = store.clone();
        let name = name.clone();
        tokio::spawn(async move {
            store
                .create_user(NewUser {
                    username: name,
                    password_hash: "hash".into(),
                    created_at_ms: 1,
                })
                .await
        })
    });
    let results = futures::future::join_all(attempts).await;
    let mut created = Vec::new();
    for result in results {
        match result.unwrap() {
            Ok(user) => created.push(user),
            Err(err) => assert!(matches!(err, StoreError::UsernameTaken), "{err}"),
        }
    }
    assert_eq!(created.len(), 1);
    let found = store.user_by_name(&name).await.unwrap().unwrap();
    assert_eq!(found, created[0]);
    assert_eq!(store.user_by_id(found.id).await.unwrap(), Some(found));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_found_within_the_window_and_in_their_conversation_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let me = UserId::random();
    let ours = ConversationId::direct(me, UserId::random());
    let other = ConversationId::direct(me, UserId::random());
    // message() stores seq N at server time N ms.
    store
        .append_messages((1..=3).map(|seq| message(ours, me, seq)).collect())
        .await
        .unwrap();
    let key = |seq: Seq| (DeviceId::new(9).unwrap(), format!("m{seq}"));
    let keys = vec![key(1), key(2), key(3), key(4)];

    let found = store.find_sends(ours, keys.clone(), 0).await.unwrap();
    assert_eq!(found.len(), 3);
    assert_eq!(
        found[&key(2)],
        StoredSend {
            seq: 2,
            server_time_ms: 2
        }
    );
    assert!(
        store.find_sends(other, keys.clone(), 0).await.unwrap().is_empty(),
        "scoped to the conversation"
    );
    let recent = store.find_sends(ours, keys, 3).await.unwrap();
    assert_eq!(
        recent.keys().collect::<Vec<_>>(),
        vec![&key(3)],
        "older entries are outside the window"
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_round_trip_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let device = DeviceRecord {
        user: UserId::random(),
        id: DeviceId::new(2).unwrap(),
        name: "phone".into(),
        refresh_hash: [7; 32],
        refresh_expires_at_ms: 99,
        created_at_ms: 1,
    };
    store.put_device(device.clone()).await.unwrap();
    assert_eq!(
        store.device(device.user, device.id).await.unwrap(),
        Some(device.clone())
    );
    assert!(store.delete_device(device.user, device.id).await.unwrap());
    assert!(!store.delete_device(device.user, device.id).await.unwrap());
    assert_eq!(store.device(device.user, device.id).await.unwrap(), None);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reopening_and_a_closed_store_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let me = UserId::random();
    let conversation = ConversationId::direct(me, UserId::random());
    let store = open(dir.path());
    store.append_messages(vec![message(conversation, me, 1)]).await.unwrap();
    store.close().await.unwrap();
    assert!(matches!(
        store.append_messages(vec![message(conversation, me, 2)]).await,
        Err(StoreError::Closed)
    ));
    drop(store);

    let reopened = open(dir.path());
    assert_eq!(reopened.last_seq(conversation).await.unwrap(), 1);
    // The send record too: a retry after a restart is still recognised.
    let key = (DeviceId::new(9).unwrap(), "m1".to_owned());
    let found = reopened.find_sends(conversation, vec![key.clone()], 0).await.unwrap();
    assert_eq!(found.get(&key).map(|send| send.seq), Some(1));
    reopened.close().await.unwrap();
}
