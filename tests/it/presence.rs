//! Presence: visible only to users who share a conversation, online while a device
//! is connected, offline after a grace period, no flapping on quick reconnects.

use crate::common;
use crate::common::{TestServer, new_user, within};
use confab_client::proto::PresenceUpdate;
use confab_client::{Client, Event};
use std::time::Duration;

pub(crate) async fn next_presence(client: &Client) -> PresenceUpdate {
    loop {
        match within(Duration::from_secs(10), client.next_event()).await {
            Some(Event::Presence(presence)) => return presence,
            Some(Event::Closed(reason)) => panic!("connection ended: {reason:?}"),
            None => panic!("connection ended"),
            Some(_) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_see_presence_with_a_grace_period_and_strangers_do_not() {
    let mut node = TestServer::start_with(
        2,
        &[
            ("CONFAB_CHAT__PRESENCE_GRACE", "500ms"),
            ("CONFAB_CHAT__PRESENCE_MIN_INTERVAL", "100ms"),
        ],
    )
    .await;
    let (alice, alice_login, alice_name) = new_user(node.addr, "seen").await;
    let (bob, _, _) = new_user(node.addr, "watcher").await;
    let (carol, _, _) = new_user(node.addr, "stranger").await;
    bob.send_direct(alice_login.user_id, "hi", "hi").await.unwrap();

    let stranger = carol.subscribe_presence(&[alice_login.user_id]).await.unwrap();
    assert!(stranger.users.is_empty());
    assert_eq!(stranger.hidden, vec![alice_login.user_id.get()]);

    let list = bob
        .subscribe_presence(&[alice_login.user_id, confab_client::UserId::new(987_654).unwrap()])
        .await
        .unwrap();
    assert_eq!(list.users.len(), 1);
    assert!(list.users[0].online);
    assert_eq!(list.hidden, vec![987_654]);

    // A quick reconnect within the grace period: no update at all.
    drop(alice);
    let (alice, _) = common::second_device(node.addr, &alice_name).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(900), next_presence(&bob))
            .await
            .is_err(),
        "a reconnect inside the grace period must not flap"
    );

    // Gone for good: offline after the grace period, with last_seen.
    drop(alice);
    let offline = next_presence(&bob).await;
    assert_eq!(offline.user_id, alice_login.user_id.get());
    assert!(!offline.online);
    assert!(offline.last_seen_ms > 0);

    // And back online.
    let (_alice_again, _) = common::second_device(node.addr, &alice_name).await;
    let online = next_presence(&bob).await;
    assert!(online.online);
    node.shutdown().await;
}

/// A member removed from a group used to keep receiving the presence of the
/// members it subscribed to through that group. Its subscriptions end with the
/// membership (both ways), unless they still share another conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_subscriptions_end_when_the_shared_membership_does() {
    let mut node = TestServer::start_with(
        2,
        &[
            ("CONFAB_CHAT__PRESENCE_GRACE", "100ms"),
            ("CONFAB_CHAT__PRESENCE_MIN_INTERVAL", "50ms"),
        ],
    )
    .await;
    let (alice, alice_login, _) = new_user(node.addr, "owner").await;
    let (bob, bob_login, _) = new_user(node.addr, "removed").await;
    let (carol, carol_login, _) = new_user(node.addr, "stays").await;
    let (dave, dave_login, dave_name) = new_user(node.addr, "watched").await;
    let group = alice
        .create_group(
            "g",
            "team",
            &[bob_login.user_id, carol_login.user_id, dave_login.user_id],
        )
        .await
        .unwrap()
        .conversation_id;
    // Bob and Carol follow Dave through the group; Bob also follows Alice, with
    // whom he has a direct conversation as well.
    bob.send_direct(alice_login.user_id, "hi", "hi").await.unwrap();
    for watcher in [&bob, &carol] {
        let list = watcher.subscribe_presence(&[dave_login.user_id]).await.unwrap();
        assert_eq!(list.users.len(), 1, "{list:?}");
    }
    assert_eq!(
        bob.subscribe_presence(&[alice_login.user_id])
            .await
            .unwrap()
            .users
            .len(),
        1
    );

    alice.remove_member(&group, "rm-bob", bob_login.user_id).await.unwrap();
    // Dave's next changes reach Carol, not Bob.
    let dave_again = {
        drop(dave);
        let offline = next_presence(&carol).await;
        assert!(!offline.online);
        common::second_device(node.addr, &dave_name).await
    };
    let online = next_presence(&carol).await;
    assert!(online.online && online.user_id == dave_login.user_id.get());
    // Bob hears nothing about Dave (Carol heard both changes already)...
    loop {
        match tokio::time::timeout(Duration::from_millis(300), next_presence(&bob)).await {
            Err(_) => break,
            Ok(update) => assert_ne!(update.user_id, dave_login.user_id.get(), "removed, yet told about Dave"),
        }
    }
    // ...and may not follow him again, while Alice, still a direct contact, stays visible.
    let again = bob
        .subscribe_presence(&[dave_login.user_id, alice_login.user_id])
        .await
        .unwrap();
    assert_eq!(again.hidden, vec![dave_login.user_id.get()]);
    assert_eq!(again.users.len(), 1);
    drop(dave_again);
    node.shutdown().await;
}
