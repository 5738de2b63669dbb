//! "Acknowledged means durable", tested on the real binary: SIGKILL it after acks,
//! start it again on the same data dir, and every acknowledged message is there.
//! Also the graceful path: SIGTERM sends GoingAway and exits 0.

use crate::common;
use crate::common::{BinaryNode, PASSWORD, unique_name, within};
use confab_client::{Client, Event};
use std::process::Command;
use std::time::Duration;

async fn acknowledged_messages_survive_sigkill(durability: &str) {
    let dir = tempfile::tempdir().unwrap();
    let node = BinaryNode::start(dir.path(), &[("CONFAB_STORE__DURABILITY", durability)], None);
    let alice_name = unique_name("alice");
    let alice = Client::connect(node.addr).await.unwrap();
    let alice_login = alice
        .register_and_authenticate(&alice_name, PASSWORD, "phone")
        .await
        .unwrap();
    let bob = Client::connect(node.addr).await.unwrap();
    let bob_login = bob
        .register_and_authenticate(&unique_name("bob"), PASSWORD, "phone")
        .await
        .unwrap();

    // 300 pipelined sends; keep exactly what was acknowledged.
    let acks = common::send_pipelined(&alice, bob_login.user_id, 300).await;
    let conversation = acks[0].conversation_id.clone();
    node.kill();

    let node = BinaryNode::start(dir.path(), &[("CONFAB_STORE__DURABILITY", durability)], None);
    let alice = Client::connect(node.addr).await.unwrap();
    alice.authenticate(&alice_login.tokens.access_token).await.unwrap();
    let history = alice.full_history(&conversation).await.unwrap();
    for ack in &acks {
        let stored = &history[(ack.seq - 1) as usize];
        assert_eq!((stored.seq, &stored.client_msg_id), (ack.seq, &ack.client_msg_id));
        assert_eq!(stored.body, format!("body {}", &ack.client_msg_id[1..]));
    }
    assert_eq!(history.len(), acks.len());
    // Sequencing continues after the stored maximum: no seq is reused.
    let next = alice
        .send_direct(bob_login.user_id, "after-restart", "hello again")
        .await
        .unwrap();
    assert_eq!(next.seq, acks.len() as u64 + 1);
    node.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_with_sync_durability() {
    acknowledged_messages_survive_sigkill("sync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_with_buffered_durability() {
    acknowledged_messages_survive_sigkill("buffered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_going_away_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = BinaryNode::start(dir.path(), &[("CONFAB_STORE__DURABILITY", "buffered")], None);
    let alice = Client::connect(node.addr).await.unwrap();
    alice
        .register_and_authenticate(&unique_name("term"), PASSWORD, "phone")
        .await
        .unwrap();
    let bob = Client::connect(node.addr).await.unwrap();
    let bob_login = bob
        .register_and_authenticate(&unique_name("term"), PASSWORD, "phone")
        .await
        .unwrap();
    let ack = alice
        .send_direct(bob_login.user_id, "last", "before shutdown")
        .await
        .unwrap();

    let status = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let mut saw_going_away = false;
    loop {
        match within(Duration::from_secs(10), alice.next_event()).await {
            Some(Event::GoingAway(going_away)) => {
                assert!(going_away.reconnect_after_ms <= 1000);
                saw_going_away = true;
            }
            Some(Event::Closed(_)) | None => break,
            Some(Event::Message(_) | Event::Receipt(_) | Event::Typing(_) | Event::Presence(_)) => {}
        }
    }
    assert!(saw_going_away, "clients are told to reconnect");
    let exit = within(Duration::from_secs(10), async {
        loop {
            if let Some(status) = node.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(exit.success(), "exit status {exit:?}");

    // Restarted, the message is there.
    let node = BinaryNode::start(dir.path(), &[("CONFAB_STORE__DURABILITY", "buffered")], None);
    let bob = Client::connect(node.addr).await.unwrap();
    bob.authenticate(&bob_login.tokens.access_token).await.unwrap();
    let history = bob.full_history(&ack.conversation_id).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].body, "before shutdown");
    node.kill();
}

/// With buffered durability an acknowledged write must be in the OS's hands,
/// not in a buffer of the process (the journal writer buffers 8 KiB): a lone
/// small message survives SIGKILL too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_acknowledged_message_survives_sigkill_with_buffered_durability() {
    let dir = tempfile::tempdir().unwrap();
    let node = BinaryNode::start(dir.path(), &[("CONFAB_STORE__DURABILITY", "buffered")], None);
    let alice = Client::connect(node.addr).await.unwrap();
    let alice_login = alice
        .register_and_authenticate(&unique_name("lone"), PASSWORD, "phone")
        .await
        .unwrap();
    let bob = Client::connect(node.addr).await.unwrap();
    let bob_login = bob
        .register_and_authenticate(&unique_name("lone"), PASSWORD, "phone")
        .await
        .unwrap();
    let ack = alice.send_direct(bob_login.user_id, "lone", "only me").await.unwrap();
    node.kill();

    let node = BinaryNode::start(dir.path(), &[("CONFAB_STORE__DURABILITY", "buffered")], None);
    let alice = Client::connect(node.addr).await.unwrap();
    alice.authenticate(&alice_login.tokens.access_token).await.unwrap();
    let history = alice.full_history(&ack.conversation_id).await.unwrap();
    assert_eq!(history.len(), 1, "the acknowledged message was lost");
    node.kill();
}
