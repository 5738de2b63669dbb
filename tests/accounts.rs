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
