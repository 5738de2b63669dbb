//! Presence spans the nodes: a user is online while it has a session on any
//! node, a node that joins learns who is online on the others, a node that
//! dies takes its users' sessions along; push notifications go only to users
//! with no session on any node.

use super::*;
use crate::presence::next_presence;
use crate::push::{Receiver, until_offline, webhook_env};
use confab_client::proto::PushPlatform;

/// Subscribes `watcher` to `user` until it is reported online (the news
/// travels through Redis).
async fn until_seen_online(watcher: &Client, user: UserId) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = watcher.subscribe_presence(&[user]).await.unwrap();
        if list.users.first().is_some_and(|presence| presence.online) {
            return;
        }
        assert!(Instant::now() < deadline, "never seen online: {list:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn a_user_is_online_while_it_has_a_session_on_any_node() {
    let mut cluster = Cluster::new("1s").with(&[
        ("CONFAB_CHAT__PRESENCE_GRACE", "100ms"),
        ("CONFAB_CHAT__PRESENCE_MIN_INTERVAL", "50ms"),
    ]);
    let (a, b) = (cluster.start(), cluster.start());
    sees_live(&b, 2.0).await;
    let (alice, alice_id, _) = user_on(&a, "watcher").await;
    let (bob, bob_id, bob_name) = user_on(&b, "watched").await;
    bob.send_direct(alice_id, "hi", "hi").await.unwrap();
    until_seen_online(&alice, bob_id).await;

    // Bob's tablet on a, then his phone on b goes: still online, no update.
    let tablet = device_on(&a, &bob_name).await;
    drop(bob);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), next_presence(&alice))
            .await
            .is_err(),
        "online on a all along"
    );
    // His last session goes: offline. Back on b: online.
    drop(tablet);
    let update = next_presence(&alice).await;
    assert_eq!((update.user_id, update.online), (bob_id.get(), false));
    let phone = device_on(&b, &bob_name).await;
    let update = next_presence(&alice).await;
    assert_eq!((update.user_id, update.online), (bob_id.get(), true));

    // A node that joins now learns that bob is online on b (from b's whole
    // set, sent when it joined: the periodic one is 30 s away).
    let c = cluster.start();
    sees_live(&c, 3.0).await;
    let (carol, carol_id, _) = user_on(&c, "late").await;
    phone.send_direct(carol_id, "hi", "hi").await.unwrap();
    until_seen_online(&carol, bob_id).await;

    // b dies: bob's session went with it, once b's lease lapses.
    b.kill();
    let update = next_presence(&alice).await;
    assert_eq!((update.user_id, update.online), (bob_id.get(), false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis and Cassandra: TEST_REDIS, TEST_CASSANDRA (scripts/test)"]
async fn only_a_user_with_no_session_on_any_node_is_notified() {
    let receiver = Receiver::start(&[]).await;
    let mut cluster = Cluster::new("1s").with(&webhook_env(&receiver, "300ms"));
    let (a, b) = (cluster.start(), cluster.start());
    sees_live(&b, 2.0).await;
    let (alice, _, _) = user_on(&a, "sender").await;
    let (bob, bob_id, _) = user_on(&b, "receiver").await;
    bob.register_push_token(PushPlatform::Fcm, "bob-phone").await.unwrap();
    // a takes the conversation (alice's send comes first) and holds it; bob
    // is connected to b only: no notification.
    alice.send_direct(bob_id, "m1", "you are on b").await.unwrap();
    until_seen_online(&alice, bob_id).await;
    alice.send_direct(bob_id, "m2", "still on b").await.unwrap();
    drop(bob);
    until_offline(&alice).await;
    alice.send_direct(bob_id, "m3", "now you are gone").await.unwrap();
    let notified = receiver.until_notified(bob_id, 1).await;
    assert_eq!(notified[0]["count"], 1, "only the message after bob left: {notified:?}");
    assert_eq!(notified[0]["conversations"][0]["body"], "now you are gone");
}
