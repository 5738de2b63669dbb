//! Edits and deletes: sequenced events by the author, pushed like messages; history
//! shows the current state.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestServer, code, new_user, within};
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
