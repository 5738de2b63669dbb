//! Account lifecycle: refresh rotation, log-out revocation, keys that survive restarts.
#![allow(clippy::unwrap_used)]

mod common;

use common::{PASSWORD, TestServer, code, new_user};
use confab_client::Client;
use confab_client::proto::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_and_the_old_refresh_token_dies() {
    let mut node = TestServer::start(2).await;
    let (_, login, _) = new_user(node.addr, "refresh").await;
    let old = login.tokens.unwrap();
    let client = Client::connect(node.addr).await.unwrap();
    let renewed = client.refresh(&old.refresh_token).await.unwrap();
    let new = renewed.tokens.unwrap();
    assert_eq!((renewed.user_id, renewed.device_id), (login.user_id, login.device_id));
    assert_ne!(new.refresh_token, old.refresh_token);
    assert_eq!(
        code(client.refresh(&old.refresh_token).await),
        ErrorCode::Unauthenticated
    );
    client.authenticate(&new.access_token).await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_out_revokes_the_devices_tokens_only() {
    let mut node = TestServer::start(2).await;
    let (laptop, laptop_login, name) = new_user(node.addr, "logout").await;
    let (_, phone_login) = common::second_device(node.addr, &name).await;
    laptop.log_out().await.unwrap();
    // The connection is unauthenticated again.
    assert_eq!(
        code(laptop.send_direct(phone_login.user_id, "m", "hi").await),
        ErrorCode::Unauthenticated
    );
    let tokens = laptop_login.tokens.unwrap();
    let other = Client::connect(node.addr).await.unwrap();
    assert_eq!(
        code(other.authenticate(&tokens.access_token).await),
        ErrorCode::Unauthenticated
    );
    assert_eq!(
        code(other.refresh(&tokens.refresh_token).await),
        ErrorCode::Unauthenticated
    );
    // The phone's device is untouched.
    other
        .authenticate(&phone_login.tokens.unwrap().access_token)
        .await
        .unwrap();
    // And the user can log in again.
    laptop.log_in(&name, PASSWORD, "laptop again").await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_accounts_survive_a_restart() {
    let mut node = TestServer::start(2).await;
    let (_, login, name) = new_user(node.addr, "restart").await;
    node.shutdown().await;

    let server = common::start_server(common::config(node.dir.path(), 2, &[]));
    let client = Client::connect(common::endpoint(&server, common::transport()))
        .await
        .unwrap();
    let me = client.authenticate(&login.tokens.unwrap().access_token).await.unwrap();
    assert_eq!((me.user_id, me.username.as_str()), (login.user_id, name.as_str()));
    assert_eq!(code(client.sign_up(&name, PASSWORD).await), ErrorCode::AlreadyExists);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_out_closes_the_devices_other_connections() {
    let mut node = TestServer::start(2).await;
    let (first, login, _) = new_user(node.addr, "revoke").await;
    let token = login.tokens.unwrap().access_token;
    // More connections of the same device, likely spread over both shards.
    let mut others = Vec::new();
    for _ in 0..4 {
        let other = Client::connect(node.addr).await.unwrap();
        other.authenticate(&token).await.unwrap();
        others.push(other);
    }
    first.log_out().await.unwrap();
    for other in &others {
        let event = common::within(std::time::Duration::from_secs(10), other.next_event()).await;
        let Some(confab_client::Event::Closed(Some(error))) = event else {
            panic!("expected the connection to be closed, got {event:?}");
        };
        assert_eq!(error.code, ErrorCode::Unauthenticated as i32);
    }
    node.shutdown().await;
}

/// Until now an access token's expiry ended nothing: a connection authenticated
/// with it stayed logged in for as long as it lived. Now the connection is
/// closed (UNAUTHENTICATED) when its token expires, unless the device refreshes
/// and authenticates again on it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_with_its_access_token_unless_it_authenticates_again() {
    let mut node = TestServer::start_with(1, &[("CONFAB_AUTH__ACCESS_TOKEN_TTL", "3s")]).await;
    let (lapsing, _, name) = new_user(node.addr, "expiry").await;
    let (renewing, login) = common::second_device(node.addr, &name).await;
    let tokens = login.tokens.unwrap();
    // Tokens carry their expiry in ms: let the refreshed one expire later.
    common::eventually(std::time::Duration::from_secs(5), || {
        confab::clock::unix_ms() > tokens.access_expires_at_ms - 2000
    })
    .await;

    // Before the first token expires, the second connection re-authenticates
    // in-band with a refreshed one.
    let refreshed = renewing.refresh(&tokens.refresh_token).await.unwrap().tokens.unwrap();
    assert!(refreshed.access_expires_at_ms > tokens.access_expires_at_ms);
    let again = renewing.authenticate(&refreshed.access_token).await.unwrap();
    assert_eq!((again.user_id, again.device_id), (login.user_id, login.device_id));

    // The first connection is closed when its token expires.
    match common::within(std::time::Duration::from_secs(10), async {
        loop {
            match lapsing.next_event().await {
                Some(confab_client::Event::Closed(reason)) => return reason,
                None => return None,
                Some(_) => {}
            }
        }
    })
    .await
    {
        Some(error) => assert_eq!(error.code, ErrorCode::Unauthenticated as i32, "{error:?}"),
        None => panic!("closed without a reason"),
    }
    // The renewed one outlives the first token.
    common::eventually(std::time::Duration::from_secs(10), || {
        confab::clock::unix_ms() > tokens.access_expires_at_ms + 100
    })
    .await;
    assert_eq!(renewing.ping(7).await.unwrap(), 7);
    // Authenticating as another device on it is refused.
    let (_, other, _) = new_user(node.addr, "expiry").await;
    assert_eq!(
        code(renewing.authenticate(&other.tokens.unwrap().access_token).await),
        ErrorCode::BadRequest
    );
    node.shutdown().await;
}
