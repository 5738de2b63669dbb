//! Edits and deletes: sequenced events by the author, pushed like messages; history
//! shows the current state.

use crate::common::{TestServer, code, new_user, within};
use confab_client::proto::ErrorCode;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authors_edit_and_delete_and_history_shows_the_current_state() {
    let mut node = TestServer::start(2).await;
    let (alice, _, _) = new_user(node.addr, "author").await;
    let (bob, bob_login, _) = new_user(node.addr, "reader").await;
    let first = alice.send_direct(bob_login.user_id, "m1", "helo").await.unwrap();
    let second = alice.send_direct(bob_login.user_id, "m2", "oops").await.unwrap();
    let conversation = first.conversation_id.clone();
    let bobs = bob
        .send(
            confab_client::proto::conversation_ref::Target::ConversationId(conversation.clone()),
            "b1",
            "hi",
        )
        .await
        .unwrap();

    let edit = alice
        .edit_message(&conversation, "e1", first.seq, "hello")
        .await
        .unwrap();
    assert_eq!(edit.seq, 4, "an edit is a sequenced event");
    let delete = alice.delete_message(&conversation, "d1", second.seq).await.unwrap();
    assert_eq!(delete.seq, 5);
    // Retrying the edit is idempotent.
    assert_eq!(
        alice
            .edit_message(&conversation, "e1", first.seq, "hello")
            .await
            .unwrap(),
        edit
    );

    // Bob receives the events in order, after the messages.
    let mut received = Vec::new();
    while received.len() < 4 {
        received.push(within(Duration::from_secs(10), bob.next_message()).await.unwrap());
    }
    assert_eq!(
        (received[2].seq, received[2].edits_seq, received[2].body.as_str()),
        (4, first.seq, "hello")
    );
    assert_eq!((received[3].seq, received[3].deletes_seq), (5, second.seq));

    // History shows the current state of each message, and the events themselves.
    let history = bob.full_history(&conversation).await.unwrap();
    assert_eq!(
        (history[0].body.as_str(), history[0].edited_by_seq),
        ("hello", edit.seq)
    );
    assert!(history[1].deleted && history[1].body.is_empty());
    assert_eq!(history.len(), 5);

    // Only the author; only existing, undeleted, ordinary messages.
    assert_eq!(
        code(alice.edit_message(&conversation, "e2", bobs.seq, "mine now").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(alice.edit_message(&conversation, "e3", second.seq, "back").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(alice.delete_message(&conversation, "d2", second.seq).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(alice.delete_message(&conversation, "d3", 999).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(alice.edit_message(&conversation, "e4", edit.seq, "edit the edit").await),
        ErrorCode::BadRequest
    );
    // A delete and an edit of one message in flight together: the edit loses.
    let (deleted, edited) = tokio::join!(
        alice.delete_message(&conversation, "d4", first.seq),
        alice.edit_message(&conversation, "e5", first.seq, "too late")
    );
    deleted.unwrap();
    assert_eq!(code(edited), ErrorCode::NotFound);
    node.shutdown().await;
}

/// A security review's finding: a delete cleared only its target's row, so the
/// text of the message's edits stayed in History, Sync and previews, also for
/// members who joined later. Every edit's text goes with the message now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_message_takes_the_text_of_its_edits_with_it() {
    let mut node = TestServer::start(2).await;
    let (alice, _, _) = new_user(node.addr, "redact").await;
    let (bob, bob_login, _) = new_user(node.addr, "redact").await;
    let (carol, carol_login, _) = new_user(node.addr, "redact").await;
    let group = alice
        .create_group("g", "secrets", &[bob_login.user_id])
        .await
        .unwrap()
        .conversation_id;
    let target = confab_client::proto::conversation_ref::Target::ConversationId(group.clone());
    let original = alice.send(target.clone(), "m1", "first draft").await.unwrap();
    let kept = alice.send(target.clone(), "m2", "stays").await.unwrap();
    for (i, text) in ["second draft", "third draft"].iter().enumerate() {
        alice
            .edit_message(&group, &format!("e{i}"), original.seq, text)
            .await
            .unwrap();
    }
    alice
        .edit_message(&group, "e-kept", kept.seq, "stays, edited")
        .await
        .unwrap();
    alice.delete_message(&group, "d1", original.seq).await.unwrap();
    // The last thing in the conversation is the delete; an edit of the deleted
    // message must not be what a preview shows either.
    alice
        .add_members(&group, "add-carol", &[carol_login.user_id])
        .await
        .unwrap();

    let draft = |body: &str| body.contains("draft");
    for reader in [&bob, &carol] {
        let history = reader.full_history(&group).await.unwrap();
        assert!(!history.iter().any(|m| draft(&m.body)), "{history:?}");
        let edits_of_original: Vec<_> = history.iter().filter(|m| m.edits_seq == original.seq).collect();
        assert_eq!(edits_of_original.len(), 2);
        assert!(edits_of_original.iter().all(|m| m.deleted && m.body.is_empty()));
        assert!(history.iter().any(|m| m.body == "stays, edited"), "other edits stay");
        let sync = reader.sync("", &[], 0).await.unwrap();
        for state in &sync.conversations {
            assert!(!state.messages.iter().any(|m| draft(&m.body)));
            assert!(!state.last_message.as_ref().is_some_and(|m| draft(&m.body)));
        }
    }
    node.shutdown().await;
}
