//! Resource limits: a peer that stops reading is cut off without slowing anyone
//! else, and the node-wide connection limit holds new connections back.
#![allow(clippy::unwrap_used)]

mod common;

use common::{RawConnection, TestServer, new_user, second_device, within};
use confab_client::Client;
use confab_client::proto::{Authenticate, ProtocolVersion, client_frame::Kind, server_frame};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_cut_off_and_nobody_else_waits() {
    const MESSAGES: usize = 400;
    let mut node = TestServer::start_with(
        2,
        &[
            ("CONFAB_PROTOCOL__OUTBOUND_QUEUE_FRAMES", "8"),
            ("CONFAB_PROTOCOL__MAX_IN_FLIGHT_REQUESTS", "4"),
            ("CONFAB_STORE__DURABILITY", "buffered"),
        ],
    )
    .await;
    // Over TCP whatever the run's transport: the 8-frame queue is sized for
    // socket buffers, and a fresh QUIC connection's congestion window would make
    // even a prompt reader look slow under this burst.
    let tcp = confab_client::Endpoint::tcp(node.tcp);
    let (alice, _, _) = new_user(tcp, "flood").await;
    let (bob, bob_login, bob_name) = new_user(tcp, "stall").await;
    drop(bob);
    // Bob's phone reads normally; his stalled laptop authenticates, then never reads.
    let (phone, _) = second_device(tcp, &bob_name).await;
    let mut stalled = RawConnection::connect(node.tcp).await;
    stalled.hello(ProtocolVersion::V1 as i32).await;
    stalled
        .send(
            2,
            Kind::Authenticate(Authenticate {
                access_token: bob_login.tokens.unwrap().access_token,
                resume: None,
            }),
        )
        .await;
    let reply = stalled.recv().await.unwrap();
    assert!(
        matches!(reply.kind, Some(server_frame::Kind::Authenticated(_))),
        "{reply:?}"
    );

    // ~24 MB of pushes: far more than socket buffers and the 8-frame queue hold.
    let body = "x".repeat(60_000);
    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("f{i}")).collect();
    let sends = ids.iter().map(|id| alice.send_direct(bob_login.user_id, id, &body));
    for ack in futures::future::join_all(sends).await {
        ack.unwrap();
    }
    for expected in 1..=MESSAGES as u64 {
        let message = within(Duration::from_secs(30), phone.next_message()).await.unwrap();
        assert_eq!(message.seq, expected);
    }

    // The stalled connection was closed: reading it now ends in EOF, short of all.
    let mut received = 0;
    while let Some(frame) = stalled.recv().await {
        if matches!(frame.kind, Some(server_frame::Kind::Message(_))) {
            received += 1;
        }
    }
    assert!(received < MESSAGES, "the stalled peer got everything ({received})");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_new_connections_until_one_closes() {
    let mut node = TestServer::start_with(1, &[("CONFAB_SERVER__MAX_CONNECTIONS", "2")]).await;
    let first = Client::connect(node.addr).await.unwrap();
    let _second = Client::connect(node.addr).await.unwrap();
    let mut third = RawConnection::connect(node.tcp).await;
    third
        .send(
            1,
            Kind::Hello(confab_client::proto::Hello {
                protocol_version: ProtocolVersion::V1 as i32,
                client_name: "third".into(),
                client_version: "0".into(),
            }),
        )
        .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.recv())
            .await
            .is_err(),
        "a third connection must wait while two are open"
    );
    drop(first);
    let welcome = third.recv().await.unwrap();
    assert!(
        matches!(welcome.kind, Some(server_frame::Kind::Welcome(_))),
        "{welcome:?}"
    );
    node.shutdown().await;
}
