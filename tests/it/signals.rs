//! Ephemeral signals: coalesced receipt updates and typing, to members only.

use crate::common::{TestServer, code, new_user, second_device, within};
use confab_client::proto::{ErrorCode, Receipt, TypingUpdate};
use confab_client::{Client, Event};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn next_receipt(client: &Client) -> Receipt {
    loop {
        match within(WAIT, client.next_event()).await {
            Some(Event::Receipt(receipt)) => return receipt,
            Some(Event::Message(_) | Event::Typing(_) | Event::Presence(_) | Event::GoingAway(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

async fn next_typing(client: &Client) -> TypingUpdate {
    loop {
        match within(WAIT, client.next_event()).await {
            Some(Event::Typing(typing)) => return typing,
            Some(Event::Message(_) | Event::Receipt(_) | Event::Presence(_) | Event::GoingAway(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_hundred_messages_sends_few_coalesced_receipts() {
    // One flush a second: the 100 marks below are one store write each, which on
    // a loaded machine with the Cassandra store spans several of the default
    // 200 ms intervals, and the bound is about coalescing, not store speed.
    let mut node = TestServer::start_with(2, &[("CONFAB_CHAT__RECEIPT_FLUSH_INTERVAL", "1s")]).await;
    let (alice, _, _) = new_user(node.addr, "sender").await;
    let (bob, bob_login, bob_name) = new_user(node.addr, "reader").await;
    let (bob_phone, _) = second_device(node.addr, &bob_name).await;
    let mut conversation = String::new();
    for i in 0..100 {
        conversation = alice
            .send_direct(bob_login.user_id, &format!("m{i}"), "read me")
            .await
            .unwrap()
            .conversation_id;
    }
    for seq in 1..=100 {
        bob.mark_read(&conversation, seq).await.unwrap();
    }
    // Alice hears about it in a handful of updates at most, ending at 100.
    let mut updates = 0;
    loop {
        let receipt = next_receipt(&alice).await;
        updates += 1;
        assert_eq!(receipt.user_id, bob_login.user_id.get());
        if receipt.read_seq == 100 {
            assert_eq!(receipt.delivered_seq, 100);
            break;
        }
    }
    assert!(updates <= 10, "{updates} receipt updates for 100 reads");
    // Bob's other device learns the read state too.
    loop {
        if next_receipt(&bob_phone).await.read_seq == 100 {
            break;
        }
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_members_only_and_is_rate_limited() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, _) = new_user(node.addr, "typist").await;
    let (bob, bob_login, _) = new_user(node.addr, "typist").await;
    let (carol, carol_login, _) = new_user(node.addr, "typist").await;
    let (outsider, _, _) = new_user(node.addr, "typist").await;
    let group = alice
        .create_group("g", "typing", &[bob_login.user_id, carol_login.user_id])
        .await
        .unwrap()
        .conversation_id;

    alice.typing(&group, true).await.unwrap();
    for member in [&bob, &carol] {
        let typing = next_typing(member).await;
        assert_eq!(
            (typing.user_id, typing.typing, typing.conversation_id.as_str()),
            (alice_login.user_id.get(), true, group.as_str())
        );
        assert!(typing.expires_in_ms > 0);
    }
    assert_eq!(code(alice.typing(&group, true).await), ErrorCode::RateLimited);
    alice.typing(&group, false).await.unwrap();
    assert!(!next_typing(&bob).await.typing);
    // The typist does not hear itself; outsiders cannot type here.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                if let Some(Event::Typing(_)) = alice.next_event().await {
                    return;
                }
            }
        })
        .await
        .is_err()
    );
    assert_eq!(code(outsider.typing(&group, true).await), ErrorCode::Forbidden);
    node.shutdown().await;
}
