//! Idempotent send: a retried `Send` (same device, same client_msg_id) returns the
//! original SendAck and stores nothing new: on the same connection, concurrently,
//! after a reconnect, and after a restart.

use crate::common;
use crate::common::{TestServer, new_user, within};
use confab_client::Client;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_returns_the_original_ack_and_is_stored_once() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, alice_name) = new_user(node.addr, "retry").await;
    let (bob, bob_login, _) = new_user(node.addr, "retry").await;

    let first = alice.send_direct(bob_login.user_id, "m-1", "hello").await.unwrap();
    let again = alice.send_direct(bob_login.user_id, "m-1", "hello").await.unwrap();
    assert_eq!(again, first, "same seq, same server time");

    // Concurrent retries of one new message: one seq for all of them.
    let copies = (0..8).map(|_| alice.send_direct(bob_login.user_id, "m-2", "burst"));
    let acks: Vec<_> = futures::future::join_all(copies)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(acks.iter().all(|ack| *ack == acks[0]), "{acks:?}");
    assert_eq!(acks[0].seq, 2);

    // The ack was "lost": the device reconnects and retries.
    drop(alice);
    let alice = Client::connect(node.addr).await.unwrap();
    alice
        .authenticate(&alice_login.tokens.clone().access_token)
        .await
        .unwrap();
    let after_reconnect = alice.send_direct(bob_login.user_id, "m-2", "burst").await.unwrap();
    assert_eq!(after_reconnect, acks[0]);

    // Another device may use the same client_msg_id: it is a different message.
    let (phone, _) = common::second_device(node.addr, &alice_name).await;
    let from_phone = phone
        .send_direct(bob_login.user_id, "m-1", "from my phone")
        .await
        .unwrap();
    assert_eq!(from_phone.seq, 3);

    // Bob received each message exactly once.
    for expected in 1..=3 {
        let message = within(Duration::from_secs(10), bob.next_message()).await.unwrap();
        assert_eq!(message.seq, expected);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), bob.next_message())
            .await
            .is_err()
    );
    let history = bob.full_history(&first.conversation_id).await.unwrap();
    assert_eq!(history.len(), 3);

    // After a restart the original acks still come back.
    node.shutdown().await;
    let server = common::start_server(common::config(node.dir.path(), 2, &[]));
    let alice = Client::connect(common::endpoint(&server, common::transport()))
        .await
        .unwrap();
    alice.authenticate(&alice_login.tokens.access_token).await.unwrap();
    assert_eq!(
        alice.send_direct(bob_login.user_id, "m-1", "hello").await.unwrap(),
        first
    );
    let next = alice.send_direct(bob_login.user_id, "m-3", "new").await.unwrap();
    assert_eq!(next.seq, 4);
    server.shutdown().await.unwrap();
}
