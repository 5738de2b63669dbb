//! Bad input: every case gets its documented error code (and a close where the
//! protocol says so), and the server keeps serving the next client.

use crate::common::{PASSWORD, RawConnection, TestServer, code, new_user, server_still_serves, unique_name, within};
use bytes::BufMut as _;
use confab_client::proto::{self, ErrorCode, ProtocolVersion, client_frame::Kind, conversation_ref::Target};
use confab_client::{Client, ClientOptions, Event, UserId};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frame_must_be_hello() {
    let mut node = TestServer::start(2).await;
    let mut raw = RawConnection::connect(node.tcp).await;
    raw.send(5, Kind::Ping(proto::Ping { nonce: 1 })).await;
    assert_eq!(raw.expect_error(ErrorCode::BadRequest).await, 5);
    raw.expect_closed().await;
    server_still_serves(node.addr).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_version_is_refused_and_closed() {
    let mut node = TestServer::start(2).await;
    for version in [0, 2, 99] {
        let mut raw = RawConnection::connect(node.tcp).await;
        let reply = raw.hello(version).await;
        let Some(proto::server_frame::Kind::Error(error)) = reply.kind else {
            panic!("expected an error, got {reply:?}");
        };
        assert_eq!(error.code, ErrorCode::UnsupportedVersion as i32);
        raw.expect_closed().await;
    }
    server_still_serves(node.addr).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_before_reading_it() {
    let mut node = TestServer::start(2).await;
    let mut raw = RawConnection::connect(node.tcp).await;
    raw.hello(ProtocolVersion::V1 as i32).await;
    // Claim 1 GiB and send nothing more: the server must answer from the prefix alone.
    raw.send_bytes(&(1u32 << 30).to_be_bytes()).await;
    raw.expect_error(ErrorCode::TooLarge).await;
    raw.expect_closed().await;
    server_still_serves(node.addr).await;
    node.shutdown().await;
}

/// A frame that trickles in, a few bytes at a time, never counts as activity:
/// the connection is closed when the heartbeat deadline passes, however long
/// its frame claims to be and however steadily its bytes come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_never_completes_runs_into_the_heartbeat_deadline() {
    let mut node = TestServer::start_with(1, &[("CONFAB_PROTOCOL__HEARTBEAT_INTERVAL", "200ms")]).await;
    let mut raw = RawConnection::connect(node.tcp).await;
    raw.hello(ProtocolVersion::V1 as i32).await;
    let stream = raw.into_stream();
    let (mut read, mut write) = stream.into_split();
    let trickle = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        write.write_all(&100_000u32.to_be_bytes()).await.unwrap();
        // Ten bytes every 50 ms: about 200 bytes a second, for as long as it may.
        while write.write_all(&[0x0a; 10]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut bytes = Vec::new();
    within(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut read, &mut bytes),
    )
    .await
    .ok();
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let reply: proto::ServerFrame = confab_proto::FrameDecoder::new(1 << 20)
        .decode(&mut buf)
        .unwrap()
        .expect("an error frame before the close");
    assert!(
        matches!(reply.kind, Some(proto::server_frame::Kind::Error(ref e)) if e.code == ErrorCode::Timeout as i32),
        "{reply:?}"
    );
    trickle.abort();
    server_still_serves(node.addr).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_are_a_bad_request_not_a_crash() {
    let mut node = TestServer::start(2).await;
    let mut raw = RawConnection::connect(node.tcp).await;
    raw.hello(ProtocolVersion::V1 as i32).await;
    let mut frame = bytes::BytesMut::new();
    frame.put_u32(6);
    frame.put_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    raw.send_bytes(&frame).await;
    raw.expect_error(ErrorCode::BadRequest).await;
    raw.expect_closed().await;
    // Random bytes before any Hello.
    let mut raw = RawConnection::connect(node.tcp).await;
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    raw.expect_error(ErrorCode::TooLarge).await;
    raw.expect_closed().await;
    server_still_serves(node.addr).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_frame_is_answered_not_fatal() {
    let mut node = TestServer::start(1).await;
    let mut raw = RawConnection::connect(node.tcp).await;
    raw.hello(ProtocolVersion::V1 as i32).await;
    raw.send_bytes(&confab_proto::encode_frame(&proto::ClientFrame {
        request_id: 9,
        kind: None,
    }))
    .await;
    assert_eq!(raw.expect_error(ErrorCode::BadRequest).await, 9);
    raw.send(10, Kind::Ping(proto::Ping { nonce: 77 })).await;
    let pong = raw.recv().await.unwrap();
    assert_eq!(pong.request_id, 10);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_tokens_get_clear_codes() {
    let mut node = TestServer::start(2).await;
    let client = Client::connect(node.addr).await.unwrap();
    assert_eq!(code(client.sign_up("x", PASSWORD).await), ErrorCode::BadRequest);
    assert_eq!(code(client.sign_up("has space", PASSWORD).await), ErrorCode::BadRequest);
    let name = unique_name("dup");
    assert_eq!(code(client.sign_up(&name, "short").await), ErrorCode::BadRequest);
    client.sign_up(&name, PASSWORD).await.unwrap();
    assert_eq!(code(client.sign_up(&name, PASSWORD).await), ErrorCode::AlreadyExists);

    // Unknown user and wrong password look the same.
    let unknown = client.log_in(&unique_name("ghost"), PASSWORD, "d").await.unwrap_err();
    let wrong = client.log_in(&name, "wrong password", "d").await.unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::Unauthenticated));
    assert_eq!(unknown.to_string(), wrong.to_string());

    let fresh = Client::connect(node.addr).await.unwrap();
    assert_eq!(
        code(fresh.authenticate("not-a-token").await),
        ErrorCode::Unauthenticated
    );
    assert_eq!(
        code(fresh.send_direct(UserId::new(1).unwrap(), "m", "hi").await),
        ErrorCode::Unauthenticated
    );
    // Still open: the same connection can log in properly.
    let login = fresh.log_in(&name, PASSWORD, "d").await.unwrap();
    fresh.authenticate(&login.tokens.access_token).await.unwrap();
    server_still_serves(node.addr).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_auth_failures_close_the_connection() {
    let mut node = TestServer::start(1).await;
    let client = Client::connect(node.addr).await.unwrap();
    for _ in 0..4 {
        assert_eq!(
            code(client.authenticate("v1.bad.token").await),
            ErrorCode::Unauthenticated
        );
    }
    assert_eq!(
        code(client.authenticate("v1.bad.token").await),
        ErrorCode::Unauthenticated
    );
    let closed = within(Duration::from_secs(10), client.next_event()).await;
    let Some(Event::Closed(Some(error))) = closed else {
        panic!("expected a close, got {closed:?}");
    };
    assert_eq!(error.code, ErrorCode::RateLimited as i32);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_foreign_conversations_are_refused() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, _) = new_user(node.addr, "conv").await;
    let (_, bob_login, _) = new_user(node.addr, "conv").await;
    let (_, carol_login, _) = new_user(node.addr, "conv").await;

    // A user id nobody has.
    assert_eq!(
        code(alice.send_direct(UserId::new(12_345).unwrap(), "m1", "hello?").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(alice.send(Target::DirectUserId(0), "m1", "hello?").await),
        ErrorCode::BadRequest
    );
    // Bob and Carol's conversation is not Alice's.
    let (low, high) = (
        bob_login.user_id.min(carol_login.user_id),
        bob_login.user_id.max(carol_login.user_id),
    );
    let theirs = format!("d:{low}:{high}");
    assert_eq!(
        code(alice.send(Target::ConversationId(theirs.clone()), "m2", "hi").await),
        ErrorCode::Forbidden
    );
    assert_eq!(code(alice.history(&theirs, None, None, 10).await), ErrorCode::Forbidden);
    assert_eq!(
        code(alice.history("not-an-id", None, None, 10).await),
        ErrorCode::BadRequest
    );
    // Her own conversation works by id too.
    let (low, high) = (
        alice_login.user_id.min(bob_login.user_id),
        alice_login.user_id.max(bob_login.user_id),
    );
    let ack = alice
        .send(Target::ConversationId(format!("d:{low}:{high}")), "m3", "hi bob")
        .await
        .unwrap();
    assert_eq!(ack.seq, 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_ids_are_refused_without_closing() {
    let mut node = TestServer::start(2).await;
    let (alice, _, _) = new_user(node.addr, "big").await;
    let (_, bob_login, _) = new_user(node.addr, "big").await;
    let too_long = "a".repeat(100_001);
    assert_eq!(
        code(alice.send_direct(bob_login.user_id, "m1", &too_long).await),
        ErrorCode::TooLarge
    );
    // Under the character limit and inside one frame (261 300 bytes), but over the
    // room a frame keeps for a body (262 144 - 16 384): its push, History page or
    // Sync reply might not fit a frame.
    let too_wide = "€".repeat(87_100);
    assert_eq!(
        code(alice.send_direct(bob_login.user_id, "m2", &too_wide).await),
        ErrorCode::TooLarge
    );
    assert_eq!(
        code(alice.send_direct(bob_login.user_id, &"x".repeat(65), "hi").await),
        ErrorCode::TooLarge
    );
    assert_eq!(
        code(alice.send_direct(bob_login.user_id, "m3", "").await),
        ErrorCode::BadRequest
    );
    // The largest body that is allowed goes through and comes back in history.
    let largest = "a".repeat(100_000);
    let ack = alice.send_direct(bob_login.user_id, "m4", &largest).await.unwrap();
    assert_eq!(ack.seq, 1);
    let page = alice.history(&ack.conversation_id, None, None, 0).await.unwrap();
    assert_eq!(page.messages[0].body.len(), 100_000);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_never_exceed_the_frame_limit() {
    let mut node = TestServer::start(1).await;
    let (alice, _, _) = new_user(node.addr, "pages").await;
    let (_, bob_login, _) = new_user(node.addr, "pages").await;
    let body = "b".repeat(100_000);
    let mut conversation = String::new();
    for i in 0..5 {
        conversation = alice
            .send_direct(bob_login.user_id, &format!("m{i}"), &body)
            .await
            .unwrap()
            .conversation_id;
    }
    // Five 100 kB messages cannot fit one 256 KiB frame: the page is cut, newest kept.
    let page = alice.history(&conversation, None, None, 200).await.unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert!(page.has_more);
    assert_eq!(alice.full_history(&conversation).await.unwrap().len(), 5);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_is_timed_out() {
    let mut node = TestServer::start_with(1, &[("CONFAB_SERVER__HANDSHAKE_TIMEOUT", "300ms")]).await;
    let mut raw = RawConnection::connect(node.tcp).await;
    raw.expect_error(ErrorCode::Timeout).await;
    raw.expect_closed().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_pinging_ones_kept() {
    let mut node = TestServer::start_with(1, &[("CONFAB_PROTOCOL__HEARTBEAT_INTERVAL", "100ms")]).await;
    let silent = Client::connect_with(
        node.addr,
        ClientOptions {
            heartbeat: false,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let pinging = Client::connect(node.addr).await.unwrap();
    let closed = within(Duration::from_secs(10), silent.next_event()).await;
    let Some(Event::Closed(Some(error))) = closed else {
        panic!("expected a timeout close, got {closed:?}");
    };
    assert_eq!(error.code, ErrorCode::Timeout as i32);
    // The pinging client outlived three intervals and still gets answers.
    assert_eq!(pinging.ping(5).await.unwrap(), 5);
    node.shutdown().await;
}
