//! The `Store` contract, written once and run on whichever backend the run uses:
//! the embedded store by default, Cassandra with `TEST_STORE=cassandra` (the test
//! command runs both). Ids are random, so tests sharing a Cassandra keyspace
//! never meet.

use crate::common;
use confab::store::{DeviceRecord, GroupEvent, HistoryPage, MessageRecord, NewUser, Store, StoreError, StoredSend};
use confab_client::proto::PushPlatform;
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};
use confab_protocol::{HistoryRange, PushToken};
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

/// A security review's finding: `History{before_seq: u64::MAX}` walked the
/// Cassandra store down one empty bucket per query from bucket 2^54, ~10^16
/// queries in a task that outlived the connection. Bounds past the end read from
/// the end, in a few queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_bounds_past_the_end_read_from_the_end_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (me, you) = (UserId::random(), UserId::random());
    let ours = ConversationId::direct(me, you);
    store
        .append_messages((1..=1005).map(|seq| message(ours, me, seq)).collect())
        .await
        .unwrap();
    let empty = ConversationId::direct(me, UserId::random());
    for bound in [Seq::MAX, Seq::MAX - 1, i64::MAX as Seq + 1, i64::MAX as Seq, 1 << 40] {
        let page = common::within(
            std::time::Duration::from_secs(5),
            store.history(ours, HistoryRange::Before(bound), 10),
        )
        .await
        .unwrap();
        assert_eq!(
            (seqs(&page), page.has_more),
            ((996..=1005).collect(), true),
            "before {bound}"
        );
        let nothing = common::within(
            std::time::Duration::from_secs(5),
            store.history(empty, HistoryRange::Before(bound), 10),
        )
        .await
        .unwrap();
        assert!(nothing.messages.is_empty());
        let after = store.history(ours, HistoryRange::After(bound), 10).await.unwrap();
        assert!(after.messages.is_empty(), "after {bound}");
    }
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
                    display_name: "Alice".into(),
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
    assert_eq!(store.user_by_id(found.id).await.unwrap(), Some(found.clone()));
    assert_eq!(found.display_name, "Alice");
    // A new display name replaces it, and nothing else.
    store.set_display_name(found.id, "Alice L.".into()).await.unwrap();
    let renamed = store.user_by_name(&name).await.unwrap().unwrap();
    assert_eq!(renamed.display_name, "Alice L.");
    assert_eq!((renamed.password_hash.as_str(), renamed.created_at_ms), ("hash", 1));
    // Deleted: gone by id and name, the name free again, and updates of it
    // change nothing.
    assert!(store.delete_user(found.id).await.unwrap());
    assert!(!store.delete_user(found.id).await.unwrap());
    store.set_display_name(found.id, "ghost".into()).await.unwrap();
    assert_eq!(store.user_by_id(found.id).await.unwrap(), None);
    assert_eq!(store.user_by_name(&name).await.unwrap(), None);
    assert_eq!(store.missing_users(vec![found.id]).await.unwrap(), vec![found.id]);
    let again = NewUser {
        username: name.clone(),
        password_hash: "hash".into(),
        created_at_ms: 2,
        display_name: String::new(),
    };
    let reborn = store.create_user(again).await.unwrap();
    assert_ne!(reborn.id, found.id);
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
async fn a_device_sent_ids_are_listed_in_full_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let me = UserId::random();
    let ours = ConversationId::direct(me, UserId::random());
    let device = DeviceId::new(9).unwrap();
    let mut from_another_device = message(ours, me, 4);
    from_another_device.sender_device = DeviceId::new(10).unwrap();
    let mut messages: Vec<MessageRecord> = (1..=3).map(|seq| message(ours, me, seq)).collect();
    messages.push(from_another_device);
    store.append_messages(messages).await.unwrap();

    let mut ids = store
        .sent_ids(ours, device, 3)
        .await
        .unwrap()
        .expect("three fit a limit of three");
    ids.sort();
    assert_eq!(ids, vec!["m1", "m2", "m3"], "this device's ids only");
    assert_eq!(
        store.sent_ids(ours, device, 2).await.unwrap(),
        None,
        "more than the limit: none"
    );
    let elsewhere = ConversationId::direct(me, UserId::random());
    assert_eq!(store.sent_ids(elsewhere, device, 3).await.unwrap(), Some(Vec::new()));
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
        previous_refresh_hash: [0; 32],
        refresh_expires_at_ms: 99,
        created_at_ms: 1,
        refreshed_at_ms: 1,
    };
    store.put_device(device.clone()).await.unwrap();
    assert_eq!(
        store.device(device.user, device.id).await.unwrap(),
        Some(device.clone())
    );
    let other = DeviceRecord {
        id: DeviceId::new(3).unwrap(),
        ..device.clone()
    };
    store.put_device(other.clone()).await.unwrap();
    assert_eq!(store.devices(device.user).await.unwrap(), vec![device.clone(), other]);

    // A rotation happens only from the expected secret, and keeps the one it replaced.
    let rotation = |expected: [u8; 32], next: [u8; 32]| confab::store::Rotation {
        user: device.user,
        device: device.id,
        expected,
        refresh_hash: next,
        refresh_expires_at_ms: 200,
        refreshed_at_ms: 50,
    };
    assert!(!store.rotate_refresh(rotation([1; 32], [8; 32])).await.unwrap());
    assert!(store.rotate_refresh(rotation([7; 32], [8; 32])).await.unwrap());
    assert!(
        !store.rotate_refresh(rotation([7; 32], [9; 32])).await.unwrap(),
        "the same secret twice"
    );
    let rotated = store.device(device.user, device.id).await.unwrap().unwrap();
    assert_eq!(
        (
            rotated.refresh_hash,
            rotated.previous_refresh_hash,
            rotated.refresh_expires_at_ms,
            rotated.refreshed_at_ms
        ),
        ([8; 32], [7; 32], 200, 50)
    );
    // Push tokens: set, replaced, removed, and gone with their device.
    let token = |platform, token: &str| PushToken {
        platform,
        token: token.into(),
    };
    let (phone, laptop) = (device.id, DeviceId::new(3).unwrap());
    store
        .set_push_token(device.user, phone, Some(token(PushPlatform::Fcm, "a")))
        .await
        .unwrap();
    store
        .set_push_token(device.user, phone, Some(token(PushPlatform::Apns, "b")))
        .await
        .unwrap();
    store
        .set_push_token(device.user, laptop, Some(token(PushPlatform::Webpush, "c")))
        .await
        .unwrap();
    assert_eq!(
        store.push_tokens(device.user).await.unwrap(),
        vec![
            (phone, token(PushPlatform::Apns, "b")),
            (laptop, token(PushPlatform::Webpush, "c"))
        ]
    );
    store.set_push_token(device.user, laptop, None).await.unwrap();
    assert_eq!(store.push_tokens(device.user).await.unwrap().len(), 1);

    assert!(store.delete_device(device.user, device.id).await.unwrap());
    assert!(!store.delete_device(device.user, device.id).await.unwrap());
    assert_eq!(
        store.push_tokens(device.user).await.unwrap(),
        vec![],
        "gone with the device"
    );
    assert!(
        !store.rotate_refresh(rotation([8; 32], [9; 32])).await.unwrap(),
        "a deleted device is not brought back"
    );
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

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// Some day well after the epoch; tests add days and hours to it.
const EPOCH_DAY: u64 = 20_000;

fn at(conversation: ConversationId, sender: UserId, seq: Seq, day: u64, hour: u64) -> MessageRecord {
    MessageRecord {
        server_time_ms: (EPOCH_DAY + day) * DAY_MS + hour * 60 * 60 * 1000,
        ..message(conversation, sender, seq)
    }
}

/// Every page of `user`'s list, `limit` at a time, as the conversations in order.
async fn list_pages(store: &dyn Store, user: UserId, limit: usize) -> Vec<Vec<ConversationId>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let (heads, more) = store.recent_conversations(user, after, limit).await.unwrap();
        assert!(heads.len() <= limit);
        pages.push(heads.iter().map(|head| head.conversation).collect());
        match heads.last() {
            Some(last) if more => after = Some(last.activity()),
            _ => return pages,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_list_by_last_activity_newest_first_across_days() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let me = UserId::random();
    let [c1, c2, c3, c4, c5] = std::array::from_fn(|_| ConversationId::direct(me, UserId::random()));
    // Each append is its own commit, as separate sends would be.
    for (conversation, seq, day, hour) in [
        (c1, 1, 1, 9),
        (c5, 1, 0, 9),
        (c4, 1, 3, 8),
        (c3, 1, 2, 9),
        (c2, 1, 3, 10),
        (c1, 2, 4, 9),
    ] {
        store
            .append_messages(vec![at(conversation, me, seq, day, hour)])
            .await
            .unwrap();
    }

    let expected = vec![c1, c2, c4, c3, c5];
    assert_eq!(list_pages(&*store, me, 10).await, vec![expected.clone()]);
    assert_eq!(
        list_pages(&*store, me, 2).await,
        vec![vec![c1, c2], vec![c4, c3], vec![c5]]
    );
    let (first, more) = store.recent_conversations(me, None, 1).await.unwrap();
    assert!(more);
    assert_eq!(
        (first[0].last_seq, first[0].last_time_ms),
        (2, at(c1, me, 2, 4, 9).server_time_ms)
    );
    // The same heads as the unordered index.
    let mut all = store.conversations(me).await.unwrap();
    all.sort_by_key(|head| expected.iter().position(|c| *c == head.conversation));
    assert_eq!(store.recent_conversations(me, None, 10).await.unwrap().0, all);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_member_sees_a_group_where_it_left_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (me, owner) = (UserId::random(), UserId::random());
    let group = ConversationId::Group(confab_protocol::ids::GroupId::random());
    let direct = ConversationId::direct(me, owner);
    let created = MessageRecord {
        event: Some(GroupEvent::Created {
            title: "g".into(),
            members: vec![owner, me],
        }),
        ..at(group, owner, 1, 1, 9)
    };
    let removed = MessageRecord {
        event: Some(GroupEvent::MemberRemoved(me)),
        ..at(group, owner, 2, 2, 9)
    };
    store.append_messages(vec![created]).await.unwrap();
    store.append_messages(vec![removed.clone()]).await.unwrap();
    store.append_messages(vec![at(direct, owner, 1, 3, 9)]).await.unwrap();
    let elsewhere = ConversationId::direct(owner, UserId::random());
    store
        .append_messages(vec![at(elsewhere, owner, 1, 4, 9)])
        .await
        .unwrap();
    store.append_messages(vec![at(group, owner, 3, 5, 9)]).await.unwrap();

    let (mine, more) = store.recent_conversations(me, None, 10).await.unwrap();
    assert!(!more);
    assert_eq!(
        mine.iter().map(|head| head.conversation).collect::<Vec<_>>(),
        vec![direct, group]
    );
    assert_eq!(
        (mine[1].last_seq, mine[1].last_time_ms, mine[1].left_seq),
        (2, removed.server_time_ms, Some(2))
    );
    // The owner sees the group's latest message, on top of a one-item page too:
    // a group's later day counts for every member.
    assert_eq!(
        list_pages(&*store, owner, 1).await,
        vec![vec![group], vec![elsewhere], vec![direct]]
    );
    let (theirs, _) = store.recent_conversations(owner, None, 1).await.unwrap();
    assert_eq!(theirs[0].last_seq, 3);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_day_pages_in_order_with_the_days_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let me = UserId::random();
    // More conversations in one day than a backend may read at once.
    let busy: Vec<ConversationId> = (0..260).map(|_| ConversationId::direct(me, UserId::random())).collect();
    let earlier: Vec<ConversationId> = (0..3).map(|_| ConversationId::direct(me, UserId::random())).collect();
    store
        .append_messages(earlier.iter().map(|c| at(*c, me, 1, 1, 9)).collect())
        .await
        .unwrap();
    // One hour apart would overflow the day: spread over its milliseconds instead.
    store
        .append_messages(
            busy.iter()
                .enumerate()
                .map(|(i, c)| MessageRecord {
                    server_time_ms: at(*c, me, 1, 2, 0).server_time_ms + i as u64 * 1000,
                    ..at(*c, me, 1, 2, 0)
                })
                .collect(),
        )
        .await
        .unwrap();

    let mut expected: Vec<ConversationId> = busy.iter().rev().copied().collect();
    let mut same_time = earlier.clone();
    same_time.sort();
    expected.extend(same_time);
    let pages = list_pages(&*store, me, 100).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![100, 100, 63]);
    assert_eq!(pages.concat(), expected);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_active_again_after_reopening_is_listed_once_in_its_new_place() {
    let dir = tempfile::tempdir().unwrap();
    let me = UserId::random();
    let [old, new] = std::array::from_fn(|_| ConversationId::direct(me, UserId::random()));
    let store = open(dir.path());
    store.append_messages(vec![at(old, me, 1, 1, 9)]).await.unwrap();
    store.append_messages(vec![at(new, me, 1, 2, 9)]).await.unwrap();
    store.close().await.unwrap();
    drop(store);

    let reopened = open(dir.path());
    reopened.append_messages(vec![at(old, me, 2, 3, 9)]).await.unwrap();
    assert_eq!(list_pages(&*reopened, me, 1).await, vec![vec![old], vec![new]]);
    reopened.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_pushes_are_kept_replaced_listed_and_forgotten() {
    use confab::store::{PendingConversation, PendingPush};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (me, other) = (UserId::random(), UserId::random());
    let pending = |count| PendingPush {
        since_ms: 7,
        count,
        conversations: vec![PendingConversation {
            conversation: ConversationId::direct(me, other),
            count,
            last_seq: 41,
            sender: other,
            body: "see you at 8".into(),
        }],
    };
    store.put_pending_push(me, pending(1)).await.unwrap();
    store.put_pending_push(me, pending(2)).await.unwrap();
    let listed = store.pending_pushes().await.unwrap();
    let mine: Vec<_> = listed.into_iter().filter(|(user, _)| *user == me).collect();
    assert_eq!(mine, vec![(me, pending(2))]);
    store.delete_pending_push(me).await.unwrap();
    assert!(
        store
            .pending_pushes()
            .await
            .unwrap()
            .iter()
            .all(|(user, _)| *user != me)
    );
    // Mutes: per user, set and cleared.
    let direct = ConversationId::direct(me, other);
    let group = ConversationId::Group(confab_protocol::ids::GroupId::random());
    store.set_muted(me, direct, true).await.unwrap();
    store.set_muted(me, group, true).await.unwrap();
    let sorted = |mut conversations: Vec<ConversationId>| {
        conversations.sort_by_key(|conversation| conversation.to_string());
        conversations
    };
    assert_eq!(sorted(store.muted(me).await.unwrap()), sorted(vec![direct, group]));
    store.set_muted(me, direct, false).await.unwrap();
    assert_eq!(store.muted(me).await.unwrap(), vec![group]);
    assert!(store.muted(other).await.unwrap().is_empty());
    store.close().await.unwrap();
}
