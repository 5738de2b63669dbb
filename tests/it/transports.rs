//! What differs between transports: a group mixing TCP, WebSocket and QUIC users;
//! QUIC migration and 0-RTT; TLS with a pinned self-signed certificate; and bad
//! input specific to each transport (text WebSocket messages, oversized messages,
//! foreign origins, wrong ALPN, garbage on the QUIC stream).

use crate::common;
use crate::common::{TestServer, endpoint, new_user, within};
use confab_client::proto::{ErrorCode, conversation_ref::Target, server_frame};
use confab_client::{Client, ClientError, Endpoint, Transport, parse_fingerprint};
use confab_proto::ProstMessage as _;
use futures::{SinkExt as _, StreamExt as _};
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

const WAIT: Duration = Duration::from_secs(10);

fn group(id: &str) -> Target {
    Target::ConversationId(id.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_websocket_and_quic_users_share_a_group_in_order() {
    let mut node = TestServer::start(2).await;
    let server = node.server.as_ref().unwrap();
    let (tcp, _, _) = new_user(endpoint(server, Transport::Tcp), "tcp").await;
    let (ws, ws_login, _) = new_user(endpoint(server, Transport::WebSocket), "ws").await;
    let (quic, quic_login, _) = new_user(endpoint(server, Transport::Quic), "quic").await;
    let created = tcp
        .create_group("g", "mixed", &[ws_login.user_id, quic_login.user_id])
        .await
        .unwrap();
    let id = created.conversation_id;
    const EACH: usize = 30;
    let clients = [("tcp", &tcp), ("ws", &ws), ("quic", &quic)];
    // Seqs each client was acknowledged (the creator also owns seq 1).
    let mut own: Vec<Vec<u64>> = vec![vec![created.seq], vec![], vec![]];
    for round in 0..EACH {
        for (index, (name, client)) in clients.iter().enumerate() {
            let ack = client
                .send(group(&id), &format!("{name}-{round}"), &format!("{name} {round}"))
                .await
                .unwrap();
            own[index].push(ack.seq);
        }
    }
    // A device is pushed everyone else's messages, each once, in seq order.
    let total = (1 + 3 * EACH) as u64;
    for (index, (name, client)) in clients.iter().enumerate() {
        let expected: Vec<u64> = (1..=total).filter(|seq| !own[index].contains(seq)).collect();
        let mut seqs = Vec::new();
        while seqs.len() < expected.len() {
            seqs.push(within(WAIT, client.next_message()).await.unwrap().seq);
        }
        assert_eq!(seqs, expected, "{name}");
    }
    node.shutdown().await;
}

/// `Authenticate` written together with `Hello` (one round trip) binds the
/// connection on every transport: it is answered after the `Welcome`, and pushes
/// follow; a bad token is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_sent_with_hello_binds_the_connection_on_every_transport() {
    let mut node = TestServer::start(2).await;
    let server = node.server.as_ref().unwrap();
    let (sender, _, _) = new_user(endpoint(server, Transport::Tcp), "sender").await;
    for transport in [Transport::Tcp, Transport::WebSocket, Transport::Quic] {
        let (first, login, _) = new_user(endpoint(server, transport), "opening").await;
        drop(first);
        let token = &login.tokens.access_token;
        let (client, authenticated) =
            Client::connect_authenticated(endpoint(server, transport), Default::default(), token)
                .await
                .unwrap();
        assert_eq!(authenticated.user_id, login.user_id.get(), "{transport:?}");
        assert_eq!(authenticated.device_id, login.device_id.get(), "{transport:?}");
        let ack = sender
            .send_direct(login.user_id, &format!("opening-{transport:?}"), "hi")
            .await
            .unwrap();
        let pushed = within(WAIT, client.next_message()).await.unwrap();
        assert_eq!((pushed.seq, pushed.body.as_str()), (ack.seq, "hi"), "{transport:?}");
        // Requests after the opening pair get their own ids and replies.
        assert_eq!(client.ping(7).await.unwrap(), 7);

        let refused = Client::connect_authenticated(endpoint(server, transport), Default::default(), "v1.bad.token")
            .await
            .map(|(_, authenticated)| authenticated);
        assert_eq!(common::code(refused), ErrorCode::Unauthenticated, "{transport:?}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_client_that_changes_address_keeps_its_session() {
    let mut node = TestServer::start(2).await;
    let server = node.server.as_ref().unwrap();
    let (sender, sender_login, _) = new_user(endpoint(server, Transport::Tcp), "sender").await;
    let (phone, phone_login, _) = new_user(endpoint(server, Transport::Quic), "phone").await;
    let before = phone.quic_local_addr().unwrap();
    for i in 0..20 {
        sender
            .send_direct(phone_login.user_id, &format!("a{i}"), "before")
            .await
            .unwrap();
        if i == 9 {
            // The phone moves to another network mid-conversation.
            phone.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        }
    }
    assert_ne!(phone.quic_local_addr().unwrap(), before, "the socket moved");
    for expected in 1..=20 {
        let message = within(WAIT, phone.next_message()).await.unwrap();
        assert_eq!(message.seq, expected);
    }
    // And it can still send on the same session.
    phone.send_direct(sender_login.user_id, "after", "hi").await.unwrap();
    assert_eq!(within(WAIT, sender.next_message()).await.unwrap().body, "hi");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_quic_client_resumes_with_0rtt() {
    let mut node = TestServer::start(1).await;
    let quic = endpoint(node.server.as_ref().unwrap(), Transport::Quic);
    let first = Client::connect(quic).await.unwrap();
    assert_eq!(first.zero_rtt_accepted(), None, "a first connection has no ticket");
    // A round trip after the handshake: the session ticket has arrived.
    first.ping(7).await.unwrap();
    let second = Client::connect(quic).await.unwrap();
    assert_eq!(
        second.zero_rtt_accepted(),
        Some(true),
        "Hello went out as accepted 0-RTT"
    );
    assert_eq!(second.ping(8).await.unwrap(), 8);
    node.shutdown().await;
}

/// A node with `tls.mode = "self-signed"` and its pinned endpoints.
async fn tls_node() -> (TestServer, [u8; 32]) {
    let node = TestServer::start_with(1, &[("CONFAB_TLS__MODE", "self-signed")]).await;
    let pin = parse_fingerprint(node.server.as_ref().unwrap().tls_fingerprint().unwrap()).unwrap();
    (node, pin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_wss_clients_with_the_pinned_certificate_chat() {
    let (mut node, pin) = tls_node().await;
    let server = node.server.as_ref().unwrap();
    let tls = Endpoint::pinned(server.local_addr(), Transport::Tls, pin);
    let wss = Endpoint::pinned(server.websocket_addr().unwrap(), Transport::WebSocketTls, pin);
    let (alice, _, _) = new_user(tls, "tls").await;
    let (bob, bob_login, _) = new_user(wss, "wss").await;
    let ack = alice.send_direct(bob_login.user_id, "m1", "over TLS").await.unwrap();
    let message = within(WAIT, bob.next_message()).await.unwrap();
    assert_eq!((message.seq, message.body.as_str()), (ack.seq, "over TLS"));

    // The wrong pin is refused by the client, before any protocol byte.
    let wrong = Endpoint::pinned(server.local_addr(), Transport::Tls, [7; 32]);
    assert!(matches!(Client::connect(wrong).await, Err(ClientError::Io(_))));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_on_a_tls_port_fails_cleanly_and_others_go_on() {
    let (mut node, pin) = tls_node().await;
    let server = node.server.as_ref().unwrap();
    let mut raw = common::RawConnection::connect(server.local_addr()).await;
    raw.send_bytes(&confab_proto::encode_frame(
        &confab_client::proto::ClientFrame::default(),
    ))
    .await;
    let reply = raw.read_to_end().await;
    assert_eq!(reply.first(), Some(&0x15), "a TLS alert record, then close: {reply:?}");
    let (alice, _, _) = new_user(Endpoint::pinned(server.local_addr(), Transport::Tls, pin), "after").await;
    alice.ping(1).await.unwrap();
    node.shutdown().await;
}

type RawWebSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn raw_websocket(
    node: &TestServer,
    path_and_query: &str,
    origin: Option<&str>,
) -> Result<RawWebSocket, tungstenite::Error> {
    let addr = node.server.as_ref().unwrap().websocket_addr().unwrap();
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}{path_and_query}"))?;
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", origin.parse().unwrap());
    }
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (socket, _) = tokio_tungstenite::client_async(request, stream).await?;
    Ok(socket)
}

fn hello() -> Message {
    let frame = confab_client::proto::ClientFrame {
        request_id: 1,
        kind: Some(confab_client::proto::client_frame::Kind::Hello(
            confab_client::proto::Hello {
                protocol_version: confab_client::proto::ProtocolVersion::V1 as i32,
                client_name: "raw-ws".into(),
                client_version: "0".into(),
            },
        )),
    };
    Message::Binary(frame.encode_to_vec().into())
}

/// Frames until the server's Close; returns the error frames seen and the close code.
async fn until_close(socket: &mut RawWebSocket) -> (Vec<confab_client::proto::Error>, Option<CloseCode>) {
    let mut errors = Vec::new();
    loop {
        match within(WAIT, socket.next()).await {
            Some(Ok(Message::Binary(payload))) => {
                let frame = confab_client::proto::ServerFrame::decode(payload).unwrap();
                if let Some(server_frame::Kind::Error(error)) = frame.kind {
                    errors.push(error);
                }
            }
            Some(Ok(Message::Close(close))) => return (errors, close.map(|close| close.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (errors, None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_text_and_oversized_messages_close_with_their_codes() {
    let mut node = TestServer::start(1).await;
    let mut text = raw_websocket(&node, "/v1/ws", None).await.unwrap();
    text.send(hello()).await.unwrap();
    text.send(Message::Text("{\"hello\":1}".into())).await.unwrap();
    let (errors, code) = until_close(&mut text).await;
    assert_eq!(code, Some(CloseCode::Unsupported));
    assert!(
        errors.iter().any(|error| error.code == ErrorCode::BadRequest as i32),
        "{errors:?}"
    );

    let mut big = raw_websocket(&node, "/v1/ws", None).await.unwrap();
    big.send(hello()).await.unwrap();
    big.send(Message::Binary(vec![0u8; 300 * 1024].into())).await.unwrap();
    let (errors, code) = until_close(&mut big).await;
    assert_eq!(code, Some(CloseCode::Size));
    assert!(
        errors.iter().any(|error| error.code == ErrorCode::TooLarge as i32),
        "{errors:?}"
    );

    let mut garbage = raw_websocket(&node, "/v1/ws", None).await.unwrap();
    garbage.send(Message::Binary(vec![0xff; 16].into())).await.unwrap();
    let (_, code) = until_close(&mut garbage).await;
    assert_eq!(code, Some(CloseCode::Protocol));

    common::server_still_serves(node.addr).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_check_path_origin_and_token() {
    let mut node = TestServer::start_with(
        1,
        &[("CONFAB_WEBSOCKET__ALLOWED_ORIGINS", "[\"https://chat.example\"]")],
    )
    .await;
    let status = |result: Result<RawWebSocket, tungstenite::Error>| match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected the upgrade to be refused"),
    };
    assert_eq!(
        status(raw_websocket(&node, "/elsewhere", Some("https://chat.example")).await),
        404
    );
    assert_eq!(
        status(raw_websocket(&node, "/v1/ws", Some("https://evil.example")).await),
        403
    );
    assert_eq!(status(raw_websocket(&node, "/v1/ws", None).await), 403);
    assert_eq!(
        status(raw_websocket(&node, "/v1/ws?token=forged", Some("https://chat.example")).await),
        401
    );

    // A valid token at upgrade authenticates the connection right after Hello.
    let (_, login, _) = new_user(node.addr, "upgrade").await;
    let token = login.tokens.access_token;
    let mut socket = raw_websocket(&node, &format!("/v1/ws?token={token}"), Some("https://chat.example"))
        .await
        .unwrap();
    socket.send(hello()).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        if let Some(Ok(Message::Binary(payload))) = within(WAIT, socket.next()).await {
            kinds.push(
                confab_client::proto::ServerFrame::decode(payload)
                    .unwrap()
                    .kind
                    .unwrap(),
            );
        }
    }
    assert!(matches!(kinds[0], server_frame::Kind::Welcome(_)), "{kinds:?}");
    match &kinds[1] {
        server_frame::Kind::Authenticated(authenticated) => assert_eq!(authenticated.user_id, login.user_id.get()),
        other => panic!("expected Authenticated, got {other:?}"),
    }
    node.shutdown().await;
}

/// A raw QUIC connection offering `alpn`, trusting the node's certificate.
async fn raw_quic(node: &TestServer, alpn: &[u8]) -> Result<quinn::Connection, quinn::ConnectionError> {
    let server = node.server.as_ref().unwrap();
    let pin = parse_fingerprint(server.quic_fingerprint().unwrap()).unwrap();
    let tls = confab_client::pinned_tls_config(pin, &[alpn]).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    endpoint
        .connect(server.quic_addr().unwrap(), "localhost")
        .unwrap()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_refuses_a_wrong_alpn_and_closes_on_garbage() {
    let mut node = TestServer::start(1).await;
    match raw_quic(&node, b"h3").await {
        // TLS alert 120 (no_application_protocol) as a QUIC crypto error.
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(u64::from(close.error_code), 0x100 + 120, "{close:?}");
        }
        other => panic!("expected the handshake to be refused, got {other:?}"),
    }

    let connection = raw_quic(&node, confab_client::QUIC_ALPN).await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    // A length prefix of 4, then bytes that are no protobuf message.
    send.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let reply = within(WAIT, recv.read_to_end(64 * 1024)).await.unwrap();
    let frame = confab_proto::FrameDecoder::new(64 * 1024)
        .decode::<confab_client::proto::ServerFrame>(&mut bytes::BytesMut::from(&reply[..]))
        .unwrap()
        .unwrap();
    assert!(
        matches!(&frame.kind, Some(server_frame::Kind::Error(error)) if error.code == ErrorCode::BadRequest as i32),
        "{frame:?}"
    );
    match within(WAIT, connection.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(u64::from(close.error_code), 2),
        other => panic!("expected an application close, got {other:?}"),
    }
    common::server_still_serves(node.addr).await;
    node.shutdown().await;
}

/// The types of the QUIC packets coalesced in a datagram (RFC 9000 §17): 0
/// Initial, 1 0-RTT, 2 Handshake, 3 Retry, 4 for a short-header (1-RTT) packet.
fn quic_packet_types(datagram: &[u8]) -> Vec<u8> {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<usize> {
        let first = *bytes.get(*at)?;
        let len = 1 << (first >> 6);
        let mut value = u64::from(first & 0x3f);
        for byte in bytes.get(*at + 1..*at + len)? {
            value = (value << 8) | u64::from(*byte);
        }
        *at += len;
        usize::try_from(value).ok()
    }
    let mut types = Vec::new();
    let mut at = 0;
    while let Some(&first) = datagram.get(at) {
        if first & 0x80 == 0 {
            types.push(4);
            break;
        }
        let kind = (first >> 4) & 0x03;
        types.push(kind);
        at += 5;
        for _ in 0..2 {
            let Some(&len) = datagram.get(at) else { return types };
            at += 1 + usize::from(len);
        }
        if kind == 0 {
            let Some(token) = varint(datagram, &mut at) else {
                return types;
            };
            at += token;
        }
        let Some(len) = varint(datagram, &mut at) else {
            return types;
        };
        at += len;
    }
    types
}

/// A UDP relay between a QUIC client and `server` that lets the server see
/// what a replay of captured packets looks like: the client's first flight
/// (its ClientHello and 0-RTT data) and nothing after, so the handshake never
/// completes. The server's answers are held until the client's early data has
/// passed, so the client cannot finish its handshake first.
async fn first_flight_only(server: std::net::SocketAddr) -> std::net::SocketAddr {
    let outside = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let inside = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    inside.connect(server).await.unwrap();
    let addr = outside.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut up, mut down) = (vec![0; 65536], vec![0; 65536]);
        let mut client = None;
        let mut early_passed = false;
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut answered = false;
        loop {
            tokio::select! {
                Ok((len, from)) = outside.recv_from(&mut up) => {
                    client = Some(from);
                    let types = quic_packet_types(&up[..len]);
                    let only_early = types.iter().all(|kind| *kind == 1);
                    if answered && !only_early {
                        continue;
                    }
                    let _ = inside.send(&up[..len]).await;
                    early_passed |= types.contains(&1);
                }
                Ok(len) = inside.recv(&mut down) => held.push(down[..len].to_vec()),
            }
            if early_passed && let Some(client) = client {
                for datagram in held.drain(..) {
                    answered = true;
                    let _ = outside.send_to(&datagram, client).await;
                }
            }
        }
    });
    addr
}

/// Early data can be replayed by whoever captured it. A replayed connection
/// never completes its handshake, so the frames the server reads before the
/// handshake completes are screened: a `Send` among them is refused and stores
/// nothing, even after an `Authenticate` in the same early data. And a
/// replayed session does not outlive the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_0rtt_data_sends_nothing_and_its_session_ends_at_the_handshake_timeout() {
    use confab_client::proto::{self, ClientFrame, client_frame::Kind};
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_SERVER__HANDSHAKE_TIMEOUT", "3s"),
            ("CONFAB_METRICS__LISTEN", "127.0.0.1:0"),
        ],
    )
    .await;
    let (alice, _, alice_name) = new_user(node.addr, "early").await;
    let (bob, bob_login, _) = new_user(node.addr, "early").await;
    // The early data authenticates Alice's phone, which is not connected.
    let (phone, phone_login) = common::second_device(node.addr, &alice_name).await;
    drop(phone);
    let server = node.server.as_ref().unwrap();
    let metrics = server.metrics_addr().unwrap();
    let sessions_become = |expected: f64| async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        let series = "confab_connections{shard=\"0\"}";
        loop {
            let now = common::sample(&common::scrape(metrics).await, series);
            if now == Some(expected) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {expected} sessions (still {now:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    sessions_become(2.0).await;

    let pin = parse_fingerprint(server.quic_fingerprint().unwrap()).unwrap();
    let tls = confab_client::pinned_tls_config(pin, &[confab_client::QUIC_ALPN]).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let addr = server.quic_addr().unwrap();
    let frame = |request_id: u64, kind: Kind| {
        confab_proto::encode_frame(&ClientFrame {
            request_id,
            kind: Some(kind),
        })
    };
    let hello = frame(
        1,
        Kind::Hello(proto::Hello {
            protocol_version: proto::ProtocolVersion::V1 as i32,
            client_name: "early".into(),
            client_version: "0".into(),
        }),
    );
    let authenticate = frame(
        2,
        Kind::Authenticate(proto::Authenticate {
            access_token: phone_login.tokens.clone().access_token,
            resume: None,
            device: String::new(),
        }),
    );
    let message = frame(
        3,
        Kind::Send(proto::Send {
            conversation: Some(proto::ConversationRef {
                target: Some(Target::DirectUserId(bob_login.user_id.get())),
            }),
            client_msg_id: "replayable".into(),
            body: "sent in 0-RTT".into(),
        }),
    );
    // Sends `early` as the early data of a connection of which only the first
    // flight reaches the server (after a full connection that leaves a session
    // ticket), and reads the replies until one to `last` arrives.
    let replay = |early: Vec<u8>, last: u64| {
        let endpoint = endpoint.clone();
        let hello = hello.clone();
        async move {
            let first = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
            let (mut send, mut recv) = first.open_bi().await.unwrap();
            send.write_all(&hello).await.unwrap();
            let mut welcome = vec![0; 4096];
            let read = within(WAIT, recv.read(&mut welcome)).await.unwrap().unwrap();
            assert!(read > 0, "no Welcome");
            first.close(0u32.into(), b"done");

            let relay = first_flight_only(addr).await;
            let (connection, _) = endpoint
                .connect(relay, "localhost")
                .unwrap()
                .into_0rtt()
                .unwrap_or_else(|_| panic!("no session ticket for 0-RTT"));
            let (mut send, mut recv) = connection.open_bi().await.unwrap();
            send.write_all(&early).await.unwrap();
            let decoder = confab_proto::FrameDecoder::new(1024 * 1024);
            let mut buf = bytes::BytesMut::new();
            let mut frames: Vec<proto::ServerFrame> = Vec::new();
            let mut chunk = vec![0; 4096];
            while !frames.iter().any(|frame| frame.request_id == last) {
                match within(WAIT, recv.read(&mut chunk)).await {
                    Ok(Some(read)) => buf.extend_from_slice(&chunk[..read]),
                    ended => panic!("the stream ended ({ended:?}) after {frames:?}"),
                }
                frames.extend(std::iter::from_fn(|| decoder.decode(&mut buf).unwrap()));
            }
            (connection, frames)
        }
    };

    // Replayed Hello and Authenticate: the session is the phone's until the
    // handshake timeout, not until the idle timeout (a minute).
    let (_replayed, frames) = replay([hello.clone(), authenticate.clone()].concat(), 2).await;
    assert!(
        matches!(
            frames.last().and_then(|f| f.kind.as_ref()),
            Some(server_frame::Kind::Authenticated(_))
        ),
        "{frames:?}"
    );
    sessions_become(3.0).await;
    sessions_become(2.0).await;

    // A replayed Send is refused, whatever comes before it.
    let (_replayed, frames) = replay([hello.clone(), authenticate, message].concat(), 3).await;
    assert!(
        frames.iter().any(|frame| frame.request_id == 3
            && matches!(&frame.kind, Some(server_frame::Kind::Error(error)) if error.code == ErrorCode::BadRequest as i32)),
        "{frames:?}"
    );
    assert!(
        !frames
            .iter()
            .any(|frame| matches!(frame.kind, Some(server_frame::Kind::SendAck(_)))),
        "{frames:?}"
    );
    // Nothing was stored: the first real message is seq 1, and Bob gets only it.
    let ack = alice.send_direct(bob_login.user_id, "real", "hello").await.unwrap();
    assert_eq!(ack.seq, 1, "the early Send was stored");
    assert_eq!(within(WAIT, bob.next_message()).await.unwrap().body, "hello");
    node.shutdown().await;
}

/// Self-signed certificates used to change on every start, so a client's pin
/// broke with each restart. They are kept in the data dir (0700, key 0600).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_signed_certificate_survives_a_restart() {
    let mut node = TestServer::start_with(1, &[("CONFAB_TLS__MODE", "self-signed")]).await;
    let server = node.server.take().unwrap();
    let (tls, quic) = (
        server.tls_fingerprint().unwrap().to_owned(),
        server.quic_fingerprint().unwrap().to_owned(),
    );
    server.shutdown().await.unwrap();
    let again = common::start_server(common::config(
        node.dir.path(),
        1,
        &[("CONFAB_TLS__MODE", "self-signed")],
    ));
    assert_eq!(again.tls_fingerprint(), Some(tls.as_str()));
    assert_eq!(again.quic_fingerprint(), Some(quic.as_str()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&node.dir.path().join("self-signed.key")), 0o600);
        assert_eq!(mode(&node.dir.path().join("token.key")), 0o600);
    }
    again.shutdown().await.unwrap();
}

/// The plain TCP reader forgets a socket's readiness after a read that did not
/// fill its buffer, instead of reading again to hear `WouldBlock`. Bytes that
/// come later must still be read: a Hello trickled a byte at a time, then
/// frames back to back in one write, then one frame split across two writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frames_are_read_however_their_bytes_arrive() {
    use confab_client::proto::{self, Hello, ProtocolVersion, client_frame::Kind};
    let mut node = TestServer::start(1).await;
    let mut raw = common::RawConnection::connect(node.tcp).await;
    let frame = |request_id, kind| {
        confab_proto::encode_frame(&proto::ClientFrame {
            request_id,
            kind: Some(kind),
        })
    };
    let hello = frame(
        1,
        Kind::Hello(Hello {
            protocol_version: ProtocolVersion::V1 as i32,
            client_name: "trickle".into(),
            client_version: "0".into(),
        }),
    );
    for byte in hello.iter() {
        raw.send_bytes(&[*byte]).await;
        // Shapes the input (one read per byte on the server), not a wait.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(matches!(
        raw.recv().await.unwrap().kind,
        Some(server_frame::Kind::Welcome(_))
    ));
    let ping = |request_id| frame(request_id, Kind::Ping(proto::Ping { nonce: request_id }));
    raw.send_bytes(&[ping(2), ping(3), ping(4)].concat()).await;
    let split = ping(5);
    raw.send_bytes(&split[..3]).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    raw.send_bytes(&split[3..]).await;
    for request_id in 2..=5 {
        assert_eq!(raw.recv().await.unwrap().request_id, request_id);
    }
    node.shutdown().await;
}

/// A client given several nodes passes over one that is down (refused at
/// once) and connects to the next; with none up, it gives up after its rounds
/// with the last failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_several_nodes_passes_over_a_dead_one() {
    let mut node = TestServer::start(1).await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Endpoint::tcp(listener.local_addr().unwrap())
    };
    let failover = confab_client::Failover {
        first_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        rounds: 2,
    };
    let options = confab_client::ClientOptions::default;
    let nodes = [dead, node.addr];
    let (client, index) = within(WAIT, Client::connect_any(&nodes, 0, options(), &failover))
        .await
        .unwrap();
    assert_eq!(index, 1);
    assert!(client.welcome().limits.is_some());
    let (_, index) = within(WAIT, Client::connect_any(&nodes, 1, options(), &failover))
        .await
        .unwrap();
    assert_eq!(index, 1, "starts where it is told");

    let err = within(WAIT, Client::connect_any(&[dead, dead], 0, options(), &failover))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Io(_) | ClientError::Transport(_)), "{err}");
    node.shutdown().await;
}
