//! Account lifecycle: refresh rotation, log-out revocation, keys that survive restarts.

use crate::common;
use crate::common::{PASSWORD, TestServer, code, new_user, second_device, within};
use confab_client::Client;
use confab_client::proto::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_and_the_old_refresh_token_dies() {
    let mut node = TestServer::start(2).await;
    let (_, login, _) = new_user(node.addr, "refresh").await;
    let old = login.tokens;
    let client = Client::connect(node.addr).await.unwrap();
    let renewed = client.refresh(&old.refresh_token).await.unwrap();
    let new = renewed.tokens;
    assert_eq!((renewed.user_id, renewed.device_id), (login.user_id, login.device_id));
    assert_ne!(new.refresh_token, old.refresh_token);
    client.authenticate(&new.access_token).await.unwrap();
    // The old one no longer refreshes; presenting it at all logs the device out
    // (see the reuse test below).
    let other = Client::connect(node.addr).await.unwrap();
    assert_eq!(
        code(other.refresh(&old.refresh_token).await),
        ErrorCode::Unauthenticated
    );
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
    let tokens = laptop_login.tokens;
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
    other.authenticate(&phone_login.tokens.access_token).await.unwrap();
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
    let me = client.authenticate(&login.tokens.access_token).await.unwrap();
    assert_eq!((me.user_id, me.username.as_str()), (login.user_id.get(), name.as_str()));
    assert_eq!(code(client.sign_up(&name, PASSWORD).await), ErrorCode::AlreadyExists);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_out_closes_the_devices_other_connections() {
    let mut node = TestServer::start(2).await;
    let (first, login, _) = new_user(node.addr, "revoke").await;
    let token = login.tokens.access_token;
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
    let tokens = login.tokens;
    // Tokens carry their expiry in ms: let the refreshed one expire later.
    common::eventually(std::time::Duration::from_secs(5), || {
        confab::clock::unix_ms() > tokens.access_expires_at_ms - 2000
    })
    .await;

    // Before the first token expires, the second connection re-authenticates
    // in-band with a refreshed one.
    let refreshed = renewing.refresh(&tokens.refresh_token).await.unwrap().tokens;
    assert!(refreshed.access_expires_at_ms > tokens.access_expires_at_ms);
    let again = renewing.authenticate(&refreshed.access_token).await.unwrap();
    assert_eq!(
        (again.user_id, again.device_id),
        (login.user_id.get(), login.device_id.get())
    );

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
        code(renewing.authenticate(&other.tokens.access_token).await),
        ErrorCode::BadRequest
    );
    node.shutdown().await;
}

/// A client connecting from `ip` (any 127.0.0.0/8 address).
async fn client_from(node: &TestServer, ip: [u8; 4]) -> Client {
    let options = confab_client::ClientOptions {
        local_ip: Some(ip.into()),
        ..confab_client::ClientOptions::default()
    };
    Client::connect_with(confab_client::Endpoint::tcp(node.tcp), options)
        .await
        .unwrap()
}

/// Wrong-password log-ins were limited only per connection: reconnecting reset
/// the count, and every attempt took a hash from the one shared pool. Now an
/// account and an address back off, then lock, without locking out the
/// account's devices; sign-ups per address are limited too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_passwords_backs_off_per_account_and_per_address() {
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_LIMITS__EXEMPT_LOOPBACK", "false"),
            ("CONFAB_LIMITS__LOGIN_FAILURES_PER_ACCOUNT", "3"),
            ("CONFAB_LIMITS__LOGIN_FAILURES_BEFORE_LOCKOUT", "4"),
            ("CONFAB_LIMITS__LOGIN_FAILURES_PER_IP", "6"),
            ("CONFAB_LIMITS__SIGNUPS_PER_IP_PER_HOUR", "3"),
        ],
    )
    .await;
    let victim_name = common::unique_name("victim");
    let victim = client_from(&node, [127, 0, 0, 2]).await;
    let victim_login = victim
        .register_and_authenticate(&victim_name, PASSWORD, "phone")
        .await
        .unwrap();

    // Guesses from one address, a fresh connection each (so the per-connection
    // limit never closes one): the account backs off, then locks.
    let mut refused = None;
    for attempt in 0..6 {
        let attacker = client_from(&node, [127, 0, 0, 3]).await;
        match attacker.log_in(&victim_name, "wrong password", "x").await {
            Err(err) if err.code() == Some(ErrorCode::Unauthenticated) => {}
            Err(err) if err.code() == Some(ErrorCode::RateLimited) => {
                assert!(attempt >= 3, "refused after {attempt} failures: {err}");
                assert!(err.to_string().contains("retry in"), "{err}");
                // Refused, not closed.
                assert_eq!(attacker.ping(1).await.unwrap(), 1);
                refused = Some(err);
                break;
            }
            other => panic!("attempt {attempt}: {other:?}"),
        }
    }
    assert!(refused.is_some(), "the account never backed off");
    // Even the right password waits now, from anywhere...
    let owner = client_from(&node, [127, 0, 0, 4]).await;
    assert_eq!(
        code(owner.log_in(&victim_name, PASSWORD, "laptop").await),
        ErrorCode::RateLimited
    );
    // ...but the owner's device refreshes its tokens and stays in.
    let refreshed = owner.refresh(&victim_login.tokens.refresh_token).await.unwrap();
    owner.authenticate(&refreshed.tokens.access_token).await.unwrap();

    // One address guessing many accounts backs off as a whole.
    let mut address_refused = false;
    for attempt in 0..10 {
        let attacker = client_from(&node, [127, 0, 0, 5]).await;
        let name = common::unique_name("nobody");
        match attacker.log_in(&name, "wrong password", "x").await {
            Err(err) if err.code() == Some(ErrorCode::Unauthenticated) => assert!(attempt < 6),
            Err(err) if err.code() == Some(ErrorCode::RateLimited) => {
                assert!(err.to_string().contains("your address"), "{err}");
                address_refused = true;
                break;
            }
            other => panic!("attempt {attempt}: {other:?}"),
        }
    }
    assert!(address_refused, "the address never backed off");
    // Others log in as usual.
    let (_, _, other_name) = new_user(node.addr, "bystander").await;
    client_from(&node, [127, 0, 0, 6])
        .await
        .log_in(&other_name, PASSWORD, "phone")
        .await
        .unwrap();

    // Sign-ups: three an hour from one address.
    let signer = client_from(&node, [127, 0, 0, 7]).await;
    for _ in 0..3 {
        signer.sign_up(&common::unique_name("many"), PASSWORD).await.unwrap();
    }
    assert_eq!(
        code(signer.sign_up(&common::unique_name("many"), PASSWORD).await),
        ErrorCode::RateLimited
    );
    node.shutdown().await;
}

/// A refresh token presented again after it was replaced was stolen (or the
/// owner is using one a thief already replaced): the device is logged out. Of
/// two refreshes with one token only one wins, and a refresh racing LogOut does
/// not bring the device back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_tokens_rotate_as_compare_and_set_and_a_reused_one_logs_the_device_out() {
    let mut node = TestServer::start(2).await;
    let (phone, login, _) = new_user(node.addr, "family").await;
    let first = login.tokens;
    let client = Client::connect(node.addr).await.unwrap();
    let second = client.refresh(&first.refresh_token).await.unwrap().tokens;

    // The replaced token again: the device is logged out, everywhere.
    assert_eq!(
        code(client.refresh(&first.refresh_token).await),
        ErrorCode::Unauthenticated
    );
    assert_eq!(
        code(client.refresh(&second.refresh_token).await),
        ErrorCode::Unauthenticated
    );
    match within(std::time::Duration::from_secs(10), phone.next_event()).await {
        Some(confab_client::Event::Closed(Some(error))) => {
            assert_eq!(error.code, ErrorCode::Unauthenticated as i32)
        }
        other => panic!("the device's connection should be closed: {other:?}"),
    }
    let fresh = Client::connect(node.addr).await.unwrap();
    assert_eq!(
        code(fresh.authenticate(&second.access_token).await),
        ErrorCode::Unauthenticated
    );

    // Two refreshes with one token at once: exactly one succeeds.
    let (_, login, name) = new_user(node.addr, "race").await;
    let token = login.tokens.refresh_token;
    let (a, b) = (
        Client::connect(node.addr).await.unwrap(),
        Client::connect(node.addr).await.unwrap(),
    );
    let (first, second) = tokio::join!(a.refresh(&token), b.refresh(&token));
    assert_eq!(
        [first.is_ok(), second.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{first:?} {second:?}"
    );

    // A refresh racing LogOut cannot re-create the device.
    let (laptop, login) = common::second_device(node.addr, &name).await;
    let token = login.tokens.refresh_token;
    let other = Client::connect(node.addr).await.unwrap();
    let (logged_out, refreshed) = tokio::join!(laptop.log_out(), other.refresh(&token));
    logged_out.unwrap();
    if let Ok(refreshed) = refreshed {
        // The refresh went first: its new tokens die with the device.
        let tokens = refreshed.tokens;
        assert_eq!(
            code(other.refresh(&tokens.refresh_token).await),
            ErrorCode::Unauthenticated
        );
    }
    assert_eq!(code(other.refresh(&token).await), ErrorCode::Unauthenticated);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_listed_revoked_capped_and_a_password_change_logs_the_others_out() {
    let mut node = TestServer::start_with(1, &[("CONFAB_AUTH__MAX_DEVICES_PER_USER", "3")]).await;
    let (phone, phone_login, name) = new_user(node.addr, "devices").await;
    let (laptop, laptop_login) = common::second_device(node.addr, &name).await;
    let (tablet, tablet_login) = common::second_device(node.addr, &name).await;

    let devices = phone.list_devices().await.unwrap();
    assert_eq!(devices.len(), 3);
    assert!(
        devices
            .iter()
            .any(|d| d.device_id == phone_login.device_id.get() && d.current)
    );
    assert!(
        devices
            .iter()
            .all(|d| d.current == (d.device_id == phone_login.device_id.get()))
    );
    // A fourth device is refused until one goes.
    let extra = Client::connect(node.addr).await.unwrap();
    assert_eq!(code(extra.log_in(&name, PASSWORD, "fourth").await), ErrorCode::TooLarge);

    // Revoking the tablet closes its connection and frees a place.
    phone.revoke_device(tablet_login.device_id).await.unwrap();
    match within(std::time::Duration::from_secs(10), tablet.next_event()).await {
        Some(confab_client::Event::Closed(Some(error))) => {
            assert_eq!(error.code, ErrorCode::Unauthenticated as i32)
        }
        other => panic!("the tablet's connection should be closed: {other:?}"),
    }
    assert_eq!(
        code(phone.revoke_device(tablet_login.device_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(phone.revoke_device(phone_login.device_id).await),
        ErrorCode::BadRequest
    );
    let fourth = extra.log_in(&name, PASSWORD, "fourth").await.unwrap();

    // A password change needs the current password and logs every other device out.
    assert_eq!(
        code(phone.change_password("not my password", "new password 1").await),
        ErrorCode::Unauthenticated
    );
    phone.change_password(PASSWORD, "new password 1").await.unwrap();
    match within(std::time::Duration::from_secs(10), laptop.next_event()).await {
        Some(confab_client::Event::Closed(Some(_))) => {}
        other => panic!("the laptop's connection should be closed: {other:?}"),
    }
    let remaining: Vec<u64> = phone
        .list_devices()
        .await
        .unwrap()
        .iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(remaining, vec![phone_login.device_id.get()]);
    assert_eq!(
        code(extra.refresh(&laptop_login.tokens.refresh_token).await),
        ErrorCode::Unauthenticated
    );
    assert_eq!(
        code(extra.refresh(&fourth.tokens.refresh_token).await),
        ErrorCode::Unauthenticated
    );
    let again = Client::connect(node.addr).await.unwrap();
    assert_eq!(
        code(again.log_in(&name, PASSWORD, "old").await),
        ErrorCode::Unauthenticated
    );
    again.log_in(&name, "new password 1", "new").await.unwrap();
    node.shutdown().await;
}

/// Refreshing slides a device's expiry forward, but never past
/// `auth.session_lifetime` after it logged in with its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshing_does_not_outlive_the_session_lifetime() {
    let mut node = TestServer::start_with(1, &[("CONFAB_AUTH__SESSION_LIFETIME", "2s")]).await;
    let (_, login, _) = new_user(node.addr, "lifetime").await;
    let tokens = login.tokens;
    let client = Client::connect(node.addr).await.unwrap();
    let renewed = client.refresh(&tokens.refresh_token).await.unwrap().tokens;
    assert!(renewed.refresh_expires_at_ms <= tokens.refresh_expires_at_ms + 2000);
    common::eventually(std::time::Duration::from_secs(10), || {
        confab::clock::unix_ms() > renewed.refresh_expires_at_ms
    })
    .await;
    assert_eq!(
        code(client.refresh(&renewed.refresh_token).await),
        ErrorCode::Unauthenticated
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_registers_replaces_and_removes_its_push_token() {
    use confab_client::proto::PushPlatform;
    let mut node = TestServer::start(2).await;
    let (phone, _, name) = new_user(node.addr, "push").await;
    let (laptop, _) = second_device(node.addr, &name).await;
    phone
        .register_push_token(PushPlatform::Fcm, "fcm-token-1")
        .await
        .unwrap();
    phone
        .register_push_token(PushPlatform::Apns, "apns-token")
        .await
        .unwrap();
    let platforms = |devices: Vec<confab_client::proto::Device>| {
        let mut listed: Vec<(bool, i32)> = devices.iter().map(|d| (d.current, d.push_platform)).collect();
        listed.sort();
        listed
    };
    let listed = platforms(laptop.list_devices().await.unwrap());
    assert_eq!(
        listed,
        [
            (false, PushPlatform::Apns as i32),
            (true, PushPlatform::Unspecified as i32)
        ]
    );
    // Bad requests change nothing.
    let refused = phone.register_push_token(PushPlatform::Unspecified, "t").await;
    assert_eq!(code(refused), ErrorCode::BadRequest);
    let refused = phone.register_push_token(PushPlatform::Fcm, &"t".repeat(4097)).await;
    assert_eq!(code(refused), ErrorCode::TooLarge);
    let unauthenticated = Client::connect(node.addr).await.unwrap();
    let refused = unauthenticated.register_push_token(PushPlatform::Fcm, "t").await;
    assert_eq!(code(refused), ErrorCode::Unauthenticated);
    // An empty token removes it.
    phone.register_push_token(PushPlatform::Fcm, "").await.unwrap();
    let listed = platforms(laptop.list_devices().await.unwrap());
    assert_eq!(
        listed,
        [
            (false, PushPlatform::Unspecified as i32),
            (true, PushPlatform::Unspecified as i32)
        ]
    );
    node.shutdown().await;
}
