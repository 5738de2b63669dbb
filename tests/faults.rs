//! Faults from outside: a flood of connections up to the open-files limit, a full
//! disk. The store must refuse what it cannot make durable with a clear,
//! retryable error, never acknowledge it, and work again once the fault passes,
//! without a restart. Each test runs the real binary (its own process limits,
//! its own data dir).
#![allow(clippy::unwrap_used)]

mod common;

use common::{BinaryNode, RawConnection, new_user, within};
use confab_client::proto::{ErrorCode, server_frame};
use std::time::Duration;

/// Idle connections (no account needed) used to fill the open-files limit, after
/// which the store failed with EMFILE and refused every write until a restart.
/// Now the connection limit keeps descriptors for the store: connections beyond
/// it are refused, and chat goes on during and after the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_cannot_starve_the_store() {
    let dir = tempfile::tempdir().unwrap();
    // 1 024 descriptors with 512 kept: room for about 500 connections.
    let node = BinaryNode::start(
        dir.path(),
        &[
            ("CONFAB_LIMITS__EXEMPT_LOOPBACK", "true"),
            ("CONFAB_STORE__DURABILITY", "buffered"),
        ],
        Some(1024),
    );
    let addr = confab_client::Endpoint::tcp(node.addr);
    let (alice, _, _) = new_user(addr, "flood").await;
    let (bob, bob_login, _) = new_user(addr, "flood").await;

    let flood = futures::future::join_all((0..1200).map(|_| tokio::net::TcpStream::connect(node.addr))).await;
    let mut flood: Vec<RawConnection> = flood
        .into_iter()
        .map(|stream| RawConnection::from_stream(stream.unwrap()))
        .collect();
    // Those beyond the limit are told so at once and closed; the rest wait idle.
    let refused = futures::future::join_all(flood.iter_mut().map(|connection| async move {
        matches!(
            tokio::time::timeout(Duration::from_secs(3), connection.recv()).await,
            Ok(Some(frame)) if matches!(&frame.kind, Some(server_frame::Kind::Error(e)) if e.code == ErrorCode::Unavailable as i32)
        )
    }))
    .await;
    let refused = refused.into_iter().filter(|refused| *refused).count();
    assert!((600..=800).contains(&refused), "{refused} of 1 200 refused");

    // Meanwhile, the store writes and reads.
    let acks = common::send_pipelined(&alice, bob_login.user_id, 500).await;
    let history = bob.full_history(&acks[0].conversation_id).await.unwrap();
    assert_eq!(history.len(), 500);
    drop(flood);
    // And after it, new users sign up and chat.
    within(Duration::from_secs(20), async {
        loop {
            let client = confab_client::Client::connect(addr).await;
            if let Ok(client) = client {
                if client
                    .sign_up(&common::unique_name("after"), common::PASSWORD)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        }
    })
    .await;
    common::server_still_serves(addr).await;
}
