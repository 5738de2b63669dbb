//! Resource limits: a peer that stops reading is cut off without slowing anyone
//! else; connections beyond the node's limit, or beyond one address's share, are
//! refused with a reason (tests/it/faults.rs: a flood cannot starve the store).
#![allow(clippy::unwrap_used)]

mod common;

use common::{RawConnection, TestServer, new_user, second_device, within};
use confab_client::proto::{Authenticate, ErrorCode, ProtocolVersion, client_frame::Kind, server_frame};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_cut_off_and_nobody_else_waits() {
    const MESSAGES: usize = 400;
    let mut node = TestServer::start_with(
        2,
        &[
            ("CONFAB_PROTOCOL__OUTBOUND_QUEUE_FRAMES", "32"),
            ("CONFAB_PROTOCOL__MAX_IN_FLIGHT_REQUESTS", "4"),
            ("CONFAB_STORE__DURABILITY", "buffered"),
        ],
    )
    .await;
    // Over TCP whatever the run's transport: the 32-frame queue (~2 MB) is sized
    // for socket buffers, and a fresh QUIC connection's congestion window would
    // make even a prompt reader look slow under this burst. (With 8 frames a
    // prompt reader on a loaded machine was cut off now and then: a committed
    // batch of the pipelined sends reaches it as one burst.)
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
                access_token: bob_login.tokens.access_token,
                resume: None,
                device: String::new(),
            }),
        )
        .await;
    let reply = stalled.recv().await.unwrap();
    assert!(
        matches!(reply.kind, Some(server_frame::Kind::Authenticated(_))),
        "{reply:?}"
    );

    // ~24 MB of pushes: far more than socket buffers and the 32-frame queue hold.
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

/// A raw TCP connection from `source` (any 127.0.0.0/8 address) to `addr`.
async fn connect_from(source: &str, addr: std::net::SocketAddr) -> RawConnection {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    RawConnection::from_stream(socket.connect(addr).await.unwrap())
}

/// Asserts `connection` was refused with `code` and closed.
async fn assert_refused(connection: &mut RawConnection, code: ErrorCode) {
    assert_eq!(connection.expect_error(code).await, 0);
    assert!(connection.recv().await.is_none(), "a refused connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_refuses_clearly_and_frees_slots_as_connections_close() {
    let mut node = TestServer::start_with(1, &[("CONFAB_SERVER__MAX_CONNECTIONS", "2")]).await;
    let mut first = RawConnection::connect(node.tcp).await;
    first.hello(ProtocolVersion::V1 as i32).await;
    let mut second = RawConnection::connect(node.tcp).await;
    second.hello(ProtocolVersion::V1 as i32).await;
    // Refused at once with a reason, not left waiting in the backlog.
    let mut third = RawConnection::connect(node.tcp).await;
    assert_refused(&mut third, ErrorCode::Unavailable).await;
    drop(first);
    let welcome = within(Duration::from_secs(10), async {
        loop {
            let mut next = RawConnection::connect(node.tcp).await;
            if let Some(frame) = next.try_hello().await {
                return frame;
            }
        }
    })
    .await;
    assert!(
        matches!(welcome.kind, Some(server_frame::Kind::Welcome(_))),
        "{welcome:?}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let mut node = TestServer::start_with(
        2,
        &[
            ("CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP", "3"),
            ("CONFAB_LIMITS__EXEMPT_LOOPBACK", "false"),
        ],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut connection = connect_from("127.0.0.2", node.tcp).await;
        connection.hello(ProtocolVersion::V1 as i32).await;
        held.push(connection);
    }
    let mut fourth = connect_from("127.0.0.2", node.tcp).await;
    assert_refused(&mut fourth, ErrorCode::RateLimited).await;
    // Over WebSocket the refusal is an HTTP status before the upgrade.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut websocket = socket
        .connect(node.server.as_ref().unwrap().websocket_addr().unwrap())
        .await
        .unwrap();
    let mut response = Vec::new();
    within(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut websocket, &mut response),
    )
    .await
    .unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 429"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    // Other addresses are not affected.
    let mut other = connect_from("127.0.0.3", node.tcp).await;
    other.hello(ProtocolVersion::V1 as i32).await;
    common::server_still_serves(confab_client::Endpoint::tcp(node.tcp)).await;
    node.shutdown().await;
}

/// Connecting costs the node an accept and a handshake even when the peer drops
/// the connection at once: an address gets a connect rate, and beyond it is
/// refused with a reason, while other addresses connect as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_connect_faster_than_its_rate() {
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_LIMITS__EXEMPT_LOOPBACK", "false"),
            ("CONFAB_LIMITS__CONNECT_RATE_PER_IP", "0.1"),
            ("CONFAB_LIMITS__CONNECT_BURST_PER_IP", "3"),
        ],
    )
    .await;
    for _ in 0..3 {
        let mut connection = connect_from("127.0.0.4", node.tcp).await;
        connection.hello(ProtocolVersion::V1 as i32).await;
    }
    let mut fourth = connect_from("127.0.0.4", node.tcp).await;
    assert_refused(&mut fourth, ErrorCode::RateLimited).await;
    let mut other = connect_from("127.0.0.5", node.tcp).await;
    other.hello(ProtocolVersion::V1 as i32).await;
    node.shutdown().await;
}

/// One account cannot hold every connection, whatever its addresses: beyond
/// its share, Authenticate is refused and the connection stays open; a slot
/// comes back when one of its connections closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_account_cannot_hold_more_than_its_share_of_connections() {
    let mut node = TestServer::start_with(2, &[("CONFAB_LIMITS__MAX_CONNECTIONS_PER_USER", "2")]).await;
    let (first, login, _) = new_user(node.addr, "share").await;
    let token = login.tokens.access_token;
    let second = confab_client::Client::connect(node.addr).await.unwrap();
    second.authenticate(&token).await.unwrap();
    let third = confab_client::Client::connect(node.addr).await.unwrap();
    assert_eq!(common::code(third.authenticate(&token).await), ErrorCode::RateLimited);
    assert_eq!(third.ping(7).await.unwrap(), 7, "the refused connection stays open");
    drop(first);
    within(Duration::from_secs(10), async {
        while third.authenticate(&token).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(second);
    node.shutdown().await;
}

/// One account used to pipeline 2.1 M messages in a minute. Now a device and a
/// user each have a send rate; beyond it a send is answered RATE_LIMITED (with
/// when to retry) and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beyond_a_devices_or_users_rate_are_refused_and_the_connection_stays() {
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_LIMITS__SEND_RATE_PER_DEVICE", "0.5"),
            ("CONFAB_LIMITS__SEND_BURST_PER_DEVICE", "20"),
            ("CONFAB_LIMITS__SEND_RATE_PER_USER", "0.5"),
            ("CONFAB_LIMITS__SEND_BURST_PER_USER", "30"),
        ],
    )
    .await;
    let (laptop, _, name) = new_user(node.addr, "rate").await;
    let (phone, _) = second_device(node.addr, &name).await;
    let (_, bob_login, _) = new_user(node.addr, "rate").await;
    let to = bob_login.user_id;
    // The laptop's burst of 20, then its rate.
    assert_eq!(send_burst(&laptop, to, "l", 25).await, 20);
    // The phone has a burst of its own, but the user's (30) has 10 left.
    assert_eq!(send_burst(&phone, to, "p", 25).await, 10);
    // Refused, not closed: the connection answers, and sends again once its
    // bucket has refilled.
    assert_eq!(laptop.ping(3).await.unwrap(), 3);
    within(Duration::from_secs(10), async {
        while laptop.send_direct(to, "later", "later").await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    node.shutdown().await;
}

/// Sends `count` messages at once; returns how many were taken. The others must
/// be RATE_LIMITED, saying when to retry.
async fn send_burst(client: &confab_client::Client, to: confab_client::UserId, prefix: &str, count: usize) -> usize {
    let ids: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    let sends = ids.iter().map(|id| client.send_direct(to, id, "flood"));
    answered(futures::future::join_all(sends).await)
}

/// How many of `results` were answered; asserts the others were RATE_LIMITED,
/// saying when to retry.
fn answered<T>(results: Vec<Result<T, confab_client::ClientError>>) -> usize {
    let count = results.len();
    let refused: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    for err in &refused {
        assert_eq!(err.code(), Some(ErrorCode::RateLimited), "{err}");
        assert!(err.to_string().contains("retry in"), "{err}");
    }
    count - refused.len()
}

/// Reads cost the node store reads for a few bytes of request; a device and a
/// user each have a read rate, and beyond it a read is answered RATE_LIMITED and
/// the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_beyond_a_devices_or_users_rate_are_refused_and_the_connection_stays() {
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_LIMITS__READ_RATE_PER_DEVICE", "0.5"),
            ("CONFAB_LIMITS__READ_BURST_PER_DEVICE", "20"),
            ("CONFAB_LIMITS__READ_RATE_PER_USER", "0.5"),
            ("CONFAB_LIMITS__READ_BURST_PER_USER", "30"),
        ],
    )
    .await;
    let (laptop, _, name) = new_user(node.addr, "reads").await;
    let (phone, _) = second_device(node.addr, &name).await;
    // The laptop's burst of 20, then its rate; the phone has a burst of its
    // own, but the user's (30) has 10 left.
    assert_eq!(read_burst(&laptop, &name, 25).await, 20);
    assert_eq!(read_burst(&phone, &name, 25).await, 10);
    // Sends are not reads.
    let (_, bob_login, _) = new_user(node.addr, "reads").await;
    laptop.send_direct(bob_login.user_id, "m1", "hi").await.unwrap();
    within(Duration::from_secs(10), async {
        while laptop.user(&name).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    node.shutdown().await;
}

/// Looks `name` up `count` times at once; returns how many were answered. The
/// others must be RATE_LIMITED, saying when to retry.
async fn read_burst(client: &confab_client::Client, name: &str, count: usize) -> usize {
    answered(futures::future::join_all((0..count).map(|_| client.user(name))).await)
}

/// Pages read ahead of a peer that reads nothing used to pile up: one connection
/// that pipelined History requests for 240 KB pages, or resumed from the start,
/// held ~300 MB (its queue's 1 024 frames, plus a page per request in flight, plus
/// the whole replay). Now a connection's queue holds at most
/// `protocol.outbound_reply_bytes` of replies (plus a frame), a page is read only
/// once room for it is reserved, and a replay is read in chunks of that size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_ask_for_pages_and_read_nothing_hold_a_bounded_amount() {
    let _gauges = GAUGES.lock().await;
    const REPLY_BYTES: f64 = 1024.0 * 1024.0;
    const FRAME_BYTES: f64 = 256.0 * 1024.0;
    const MESSAGES: usize = 100;
    const HOARDERS: usize = 8;
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_METRICS__LISTEN", "127.0.0.1:0"),
            ("CONFAB_STORE__DURABILITY", "buffered"),
        ],
    )
    .await;
    let metrics = node.server.as_ref().unwrap().metrics_addr().unwrap();
    let tcp = confab_client::Endpoint::tcp(node.tcp);
    let (alice, login, _) = new_user(tcp, "hoard").await;
    // 6 MB in one conversation: a History page holds four of these.
    let body = "y".repeat(60_000);
    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("h{i}")).collect();
    // 6 MB at once can time a loaded test Cassandra node's writes out
    // (UNAVAILABLE, nothing stored): retried with the same id, as a client does.
    let sends = ids.iter().map(|id| async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match alice.send_direct(login.user_id, id, &body).await {
                Err(err) if err.code() == Some(ErrorCode::Unavailable) && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                ack => return ack,
            }
        }
    });
    for ack in futures::future::join_all(sends).await {
        ack.unwrap();
    }
    let token = login.tokens.access_token;
    let rss_before = resident_bytes();

    let mut hoarders = Vec::new();
    for i in 0..HOARDERS {
        // Half resume from the start and never read the replay.
        if i % 2 == 1 {
            hoarders.push(RawConnection::resuming(node.tcp, token.clone()).await.into_stream());
            continue;
        }
        let raw = RawConnection::connect(node.tcp).await;
        let stream = history_hoarder(raw, token.clone(), login.user_id.get()).await;
        hoarders.push(stream);
    }

    let (total, fullest) = settled_outbound_bytes(metrics, HOARDERS as f64 * FRAME_BYTES).await;
    assert!(
        fullest <= REPLY_BYTES + FRAME_BYTES,
        "a queue holds {fullest} bytes (all {HOARDERS}: {total})"
    );
    let grown = resident_bytes().saturating_sub(rss_before);
    // Without the reservation ~1.5 GB; other tests of this binary run beside it.
    assert!(grown < 600 << 20, "the node grew by {} MB", grown >> 20);

    // A resumed hoarder that starts reading gets every message, then the reply.
    let mut late = RawConnection::from_stream(hoarders.swap_remove(1));
    for seq in 1..=MESSAGES as u64 {
        let frame = late.recv().await.unwrap();
        match frame.kind {
            Some(server_frame::Kind::Message(message)) => assert_eq!(message.seq, seq),
            other => panic!("expected message {seq}, got {other:?}"),
        }
    }
    match late.recv().await.unwrap().kind {
        Some(server_frame::Kind::Authenticated(reply)) => {
            assert!(reply.recovered);
            assert_eq!(reply.replayed, MESSAGES as u32);
        }
        other => panic!("expected Authenticated, got {other:?}"),
    }
    common::server_still_serves(tcp).await;
    drop(hoarders);
    node.shutdown().await;
}

/// Connections from one address share its reply bytes on a shard: eight that
/// ask for pages and read nothing hold `limits.reply_bytes_per_ip` together,
/// not eight times their own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_one_address_share_its_reply_bytes() {
    let _gauges = GAUGES.lock().await;
    const SHARE: f64 = 2.0 * 1024.0 * 1024.0;
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_METRICS__LISTEN", "127.0.0.1:0"),
            ("CONFAB_STORE__DURABILITY", "buffered"),
            ("CONFAB_LIMITS__EXEMPT_LOOPBACK", "false"),
            ("CONFAB_LIMITS__REPLY_BYTES_PER_IP", "2097152"),
        ],
    )
    .await;
    let metrics = node.server.as_ref().unwrap().metrics_addr().unwrap();
    let tcp = confab_client::Endpoint::tcp(node.tcp);
    let (alice, login, _) = new_user(tcp, "crowd").await;
    let body = "y".repeat(60_000);
    let ids: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    let sends = ids.iter().map(|id| alice.send_direct(login.user_id, id, &body));
    for ack in futures::future::join_all(sends).await {
        ack.unwrap();
    }
    let token = login.tokens.access_token;
    let mut hoarders = Vec::new();
    for _ in 0..8 {
        let raw = connect_from("127.0.0.7", node.tcp).await;
        hoarders.push(history_hoarder(raw, token.clone(), login.user_id.get()).await);
    }
    let (total, _) = settled_outbound_bytes(metrics, SHARE / 2.0).await;
    assert!(total <= SHARE, "the address's connections hold {total} bytes");
    drop(hoarders);
    node.shutdown().await;
}

/// The metrics are the process's: tests that read the outbound gauges (named
/// by shard, like every node's) take turns.
static GAUGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Authenticates `raw` with `access_token`, then asks for History pages of
/// `user`'s conversation with itself until the server stops reading; reads
/// nothing.
async fn history_hoarder(mut raw: RawConnection, access_token: String, user: u64) -> tokio::net::TcpStream {
    use confab_client::proto::{ClientFrame, ConversationRef, History, conversation_ref::Target};
    use tokio::io::AsyncWriteExt as _;
    raw.hello(ProtocolVersion::V1 as i32).await;
    raw.send(
        2,
        Kind::Authenticate(Authenticate {
            access_token,
            resume: None,
            device: String::new(),
        }),
    )
    .await;
    let reply = raw.recv().await.unwrap();
    assert!(
        matches!(reply.kind, Some(server_frame::Kind::Authenticated(_))),
        "{reply:?}"
    );
    let history = ClientFrame {
        request_id: 3,
        kind: Some(Kind::History(History {
            conversation: Some(ConversationRef {
                target: Some(Target::DirectUserId(user)),
            }),
            before_seq: None,
            after_seq: None,
            limit: 200,
        })),
    };
    let bytes = confab_proto::encode_frame(&history);
    let mut stream = raw.into_stream();
    for _ in 0..1500 {
        if tokio::time::timeout(Duration::from_millis(100), stream.write_all(&bytes))
            .await
            .is_err()
        {
            break;
        }
    }
    stream
}

/// The bytes queued on shard 0's connections, all together and in the fullest
/// queue, once at least `at_least` are and they stay the same between two
/// samples (the gauges are sampled once a second).
async fn settled_outbound_bytes(metrics: std::net::SocketAddr, at_least: f64) -> (f64, f64) {
    within(Duration::from_secs(30), async {
        let mut last = 0.0;
        loop {
            let body = common::scrape(metrics).await;
            let total = common::sample(&body, "confab_outbound_bytes{shard=\"0\"}").unwrap_or(0.0);
            let fullest = common::sample(&body, "confab_outbound_bytes_max{shard=\"0\"}").unwrap_or(0.0);
            if total >= at_least && total == last {
                return (total, fullest);
            }
            last = total;
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    })
    .await
}

/// This process's resident memory.
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .unwrap();
    kib * 1024
}
