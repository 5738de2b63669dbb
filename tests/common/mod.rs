//! Test helpers: a real confab node on 127.0.0.1:0 with a fresh data dir, clients,
//! and polling with a deadline (tests never sleep to wait for something).
//!
//! Clients reach the node over the transport named by `TEST_TRANSPORT`
//! (`tcp`, the default; `ws`; `quic`; `tls`; `wss`): the test command runs the
//! end-to-end suites once per transport. With `TEST_STORE=cassandra` and
//! `TEST_CASSANDRA=<host:port>` (scripts/cassandra), nodes keep their state in
//! that Cassandra node, each in a keyspace of its own.
#![allow(dead_code, clippy::unwrap_used)]

use confab::{Config, Server};
use confab_client::Login;
use confab_client::{Client, ClientError, Endpoint, Transport};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Settings every test node uses, plus the test's own overrides.
pub fn config(data_dir: &Path, shards: usize, overrides: &[(&str, &str)]) -> Config {
    let mut env = vec![
        ("CONFAB_SERVER__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("CONFAB_WEBSOCKET__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("CONFAB_QUIC__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("CONFAB_SERVER__SHARDS".to_owned(), shards.to_string()),
        ("CONFAB_SERVER__PIN_THREADS".to_owned(), "false".to_owned()),
        ("CONFAB_SERVER__SHUTDOWN_GRACE".to_owned(), "1s".to_owned()),
        ("CONFAB_STORE__DATA_DIR".to_owned(), data_dir.display().to_string()),
        // Cheaper hashing keeps the suite fast; the code path is the same.
        ("CONFAB_AUTH__ARGON2_MEMORY_KIB".to_owned(), "1024".to_owned()),
        ("CONFAB_AUTH__ARGON2_ITERATIONS".to_owned(), "1".to_owned()),
    ];
    env.extend(
        TEST_LIMITS
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned())),
    );
    if std::env::var("TEST_STORE").as_deref() == Ok("cassandra") {
        let contact = std::env::var("TEST_CASSANDRA").expect("TEST_CASSANDRA=<host:port> with TEST_STORE=cassandra");
        env.push(("CONFAB_STORE__BACKEND".to_owned(), "cassandra".to_owned()));
        env.push((
            "CONFAB_CASSANDRA__CONTACT_POINTS".to_owned(),
            format!("[\"{contact}\"]"),
        ));
        // One keyspace per test process (created by its first node; schema changes
        // are slow and serialize in Cassandra): users, groups and conversations
        // have random ids, so tests sharing it do not meet, and a restarted node
        // finds its data.
        env.push(("CONFAB_CASSANDRA__KEYSPACE".to_owned(), cassandra_keyspace().to_owned()));
    }
    env.extend(overrides.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Config::load_from(None, env).unwrap()
}

/// Abuse limits out of the way of tests, which sign up hundreds of users from
/// loopback and pipeline thousands of messages from one device; the limits have
/// tests of their own (tests/limits.rs, tests/accounts.rs).
pub const TEST_LIMITS: [(&str, &str); 11] = [
    ("CONFAB_LIMITS__EXEMPT_LOOPBACK", "true"),
    ("CONFAB_LIMITS__MAX_CONNECTIONS_PER_USER", "1000000"),
    ("CONFAB_LIMITS__SEND_RATE_PER_DEVICE", "1000000"),
    ("CONFAB_LIMITS__SEND_BURST_PER_DEVICE", "1000000"),
    ("CONFAB_LIMITS__SEND_RATE_PER_USER", "1000000"),
    ("CONFAB_LIMITS__SEND_BURST_PER_USER", "1000000"),
    ("CONFAB_LIMITS__SEND_MIB_PER_USER_PER_DAY", "1000000"),
    ("CONFAB_LIMITS__READ_RATE_PER_DEVICE", "1000000"),
    ("CONFAB_LIMITS__READ_BURST_PER_DEVICE", "1000000"),
    ("CONFAB_LIMITS__READ_RATE_PER_USER", "1000000"),
    ("CONFAB_LIMITS__READ_BURST_PER_USER", "1000000"),
];

/// The transport this test run uses.
pub fn transport() -> Transport {
    match std::env::var("TEST_TRANSPORT") {
        Ok(name) => name.parse().unwrap(),
        Err(_) => Transport::Tcp,
    }
}

/// How a client reaches `server` over `transport`.
pub fn endpoint(server: &Server, transport: Transport) -> Endpoint {
    let pin = |fingerprint: Option<&str>| confab_client::parse_fingerprint(fingerprint.unwrap()).unwrap();
    match transport {
        Transport::Tcp => Endpoint::tcp(server.local_addr()),
        Transport::WebSocket => Endpoint::websocket(server.websocket_addr().unwrap()),
        Transport::Tls => Endpoint::pinned(server.local_addr(), transport, pin(server.tls_fingerprint())),
        Transport::WebSocketTls => Endpoint::pinned(
            server.websocket_addr().unwrap(),
            transport,
            pin(server.tls_fingerprint()),
        ),
        Transport::Quic => Endpoint::pinned(server.quic_addr().unwrap(), transport, pin(server.quic_fingerprint())),
    }
}

fn cassandra_keyspace() -> &'static str {
    static KEYSPACE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEYSPACE.get_or_init(|| format!("t{}_{:x}", std::process::id(), rand_suffix()))
}

/// Nodes start one at a time against Cassandra, so only the first one of a
/// process creates the keyspace.
pub fn start_server(config: Config) -> Server {
    show_warnings();
    let _one_at_a_time = STARTING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    Server::start(config).unwrap()
}

/// The store `config` names, opened one at a time like nodes.
pub fn open_store(config: &Config) -> std::sync::Arc<dyn confab::store::Store> {
    let _one_at_a_time = STARTING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    confab::store::open(config).unwrap()
}

static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// In-process nodes log their warnings and errors into the test's captured
/// output, so a failing test shows why its node refused or gave up
/// (`RUST_LOG` overrides the level). Once per process.
fn show_warnings() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A running in-process node and the temp dir it owns.
pub struct TestServer {
    pub server: Option<Server>,
    /// Where clients connect, over this run's transport.
    pub addr: Endpoint,
    /// The plain TCP listener, for raw-socket tests.
    pub tcp: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(shards: usize) -> Self {
        Self::start_with(shards, &[]).await
    }

    pub async fn start_with(shards: usize, overrides: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let transport = transport();
        let mut overrides = overrides.to_vec();
        if matches!(transport, Transport::Tls | Transport::WebSocketTls) {
            overrides.push(("CONFAB_TLS__MODE", "self-signed"));
        }
        let server = start_server(config(dir.path(), shards, &overrides));
        Self {
            addr: endpoint(&server, transport),
            tcp: server.local_addr(),
            server: Some(server),
            dir,
        }
    }

    pub async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
    }
}

/// The `confab` binary serving on 127.0.0.1:0 with a data dir, killed when dropped.
pub struct BinaryNode {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub websocket: SocketAddr,
    /// The metrics endpoint, when `env` set `CONFAB_METRICS__LISTEN`.
    pub metrics: Option<SocketAddr>,
}

impl BinaryNode {
    /// Starts the binary with the test settings plus `env`; with `open_files`,
    /// under that open-files limit.
    pub fn start(data_dir: &Path, env: &[(&str, &str)], open_files: Option<u64>) -> Self {
        use std::io::{BufRead as _, BufReader};
        let binary = env!("CARGO_BIN_EXE_confab");
        let mut command = match open_files {
            None => std::process::Command::new(binary),
            Some(limit) => {
                let mut shell = std::process::Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(binary);
                shell
            }
        };
        command
            .arg("serve")
            .env("CONFAB_SERVER__LISTEN", "127.0.0.1:0")
            .env("CONFAB_WEBSOCKET__LISTEN", "127.0.0.1:0")
            .env("CONFAB_QUIC__LISTEN", "127.0.0.1:0")
            .env("CONFAB_SERVER__SHARDS", "2")
            .env("CONFAB_SERVER__PIN_THREADS", "false")
            .env("CONFAB_SERVER__SHUTDOWN_GRACE", "1s")
            .env("CONFAB_STORE__DATA_DIR", data_dir)
            .env("CONFAB_AUTH__ARGON2_MEMORY_KIB", "1024")
            .env("CONFAB_AUTH__ARGON2_ITERATIONS", "1")
            .env("CONFAB_LOG__LEVEL", "warn")
            .envs(TEST_LIMITS)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = |prefix: &str| -> SocketAddr {
            let line = lines.next().unwrap().unwrap();
            line.strip_prefix(prefix).unwrap().parse().unwrap()
        };
        let tcp = addr("listening on ");
        let websocket = addr("websocket on ");
        let metrics = env.iter().any(|(key, _)| *key == "CONFAB_METRICS__LISTEN").then(|| {
            loop {
                let line = lines.next().unwrap().unwrap();
                if let Some(addr) = line.strip_prefix("metrics on ") {
                    break addr.parse().unwrap();
                }
            }
        });
        Self {
            child,
            addr: tcp,
            websocket,
            metrics,
        }
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for BinaryNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `scripts/<name> <action>` (a service of the test command's: kill it,
/// start it again), failing the test if it fails.
pub fn script(name: &str, action: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    let status = std::process::Command::new(&path).arg(action).status().unwrap();
    assert!(status.success(), "scripts/{name} {action} failed");
}

/// A name no other test (or earlier run) uses.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}{}x{:x}",
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    )
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

pub const PASSWORD: &str = "correct horse battery";

/// A connected, authenticated client for a new user named like `prefix`.
pub async fn new_user(addr: Endpoint, prefix: &str) -> (Client, Login, String) {
    let name = unique_name(prefix);
    let client = Client::connect(addr).await.unwrap();
    let login = client
        .register_and_authenticate(&name, PASSWORD, "test-device")
        .await
        .unwrap();
    (client, login, name)
}

/// Another device of an existing user, connected and authenticated.
pub async fn second_device(addr: Endpoint, name: &str) -> (Client, Login) {
    let client = Client::connect(addr).await.unwrap();
    let login = client.log_in(name, PASSWORD, "second-device").await.unwrap();
    client.authenticate(&login.tokens.access_token).await.unwrap();
    (client, login)
}

/// The error code of a failed request.
pub fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> confab_client::proto::ErrorCode {
    match result {
        Err(err) => err.code().unwrap_or_else(|| panic!("not a server error: {err}")),
        Ok(value) => panic!("expected an error, got {value:?}"),
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future).await.expect("timed out")
}

/// Polls `check` until it returns true or the deadline passes.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bare protocol connection, for sending what a well-behaved client never would.
pub struct RawConnection {
    stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
    decoder: confab_proto::FrameDecoder,
}

impl RawConnection {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::from_stream(tokio::net::TcpStream::connect(addr).await.unwrap())
    }

    /// The socket, for tests that read and write it on their own.
    pub fn into_stream(self) -> tokio::net::TcpStream {
        self.stream
    }

    pub fn from_stream(stream: tokio::net::TcpStream) -> Self {
        Self {
            stream,
            buf: bytes::BytesMut::new(),
            decoder: confab_proto::FrameDecoder::new(64 * 1024 * 1024),
        }
    }

    /// A connection that said Hello and sent Authenticate with `access_token`,
    /// resuming from nothing (so the whole history is replayed first); nothing
    /// of the reply is read.
    pub async fn resuming(addr: SocketAddr, access_token: String) -> Self {
        use confab_client::proto::{Authenticate, ProtocolVersion, Resume, client_frame::Kind};
        let mut connection = Self::connect(addr).await;
        connection.hello(ProtocolVersion::V1 as i32).await;
        let resume = Authenticate {
            access_token,
            resume: Some(Resume::default()),
            device: String::new(),
        };
        connection.send(2, Kind::Authenticate(resume)).await;
        connection
    }

    /// Sends Hello; the reply, or `None` if the server closed the connection.
    pub async fn try_hello(&mut self) -> Option<confab_client::proto::ServerFrame> {
        use confab_client::proto::{Hello, ProtocolVersion, client_frame::Kind};
        let hello = Kind::Hello(Hello {
            protocol_version: ProtocolVersion::V1 as i32,
            client_name: "raw".into(),
            client_version: "0".into(),
        });
        let frame = confab_client::proto::ClientFrame {
            request_id: 1,
            kind: Some(hello),
        };
        use tokio::io::AsyncWriteExt as _;
        self.stream.write_all(&confab_proto::encode_frame(&frame)).await.ok()?;
        match self.recv().await? {
            frame if matches!(frame.kind, Some(confab_client::proto::server_frame::Kind::Error(_))) => None,
            frame => Some(frame),
        }
    }

    /// Waits (bounded) until the server has sent something, without reading it.
    pub async fn readable(&self) {
        within(Duration::from_secs(10), self.stream.readable()).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt as _;
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn send(&mut self, request_id: u64, kind: confab_client::proto::client_frame::Kind) {
        let frame = confab_client::proto::ClientFrame {
            request_id,
            kind: Some(kind),
        };
        self.send_bytes(&confab_proto::encode_frame(&frame)).await;
    }

    pub async fn hello(&mut self, version: i32) -> confab_client::proto::ServerFrame {
        use confab_client::proto::{Hello, client_frame::Kind};
        self.send(
            1,
            Kind::Hello(Hello {
                protocol_version: version,
                client_name: "raw".into(),
                client_version: "0".into(),
            }),
        )
        .await;
        self.recv().await.expect("a reply to Hello")
    }

    /// The next frame, or `None` once the server closed the connection.
    pub async fn recv(&mut self) -> Option<confab_client::proto::ServerFrame> {
        use tokio::io::AsyncReadExt as _;
        within(Duration::from_secs(10), async {
            loop {
                if let Some(frame) = self.decoder.decode(&mut self.buf).unwrap() {
                    return Some(frame);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// Asserts the next frame is an error with `code`, and returns its request id.
    pub async fn expect_error(&mut self, code: confab_client::proto::ErrorCode) -> u64 {
        let frame = self.recv().await.expect("an error frame");
        match &frame.kind {
            Some(confab_client::proto::server_frame::Kind::Error(error)) => {
                assert_eq!(error.code, code as i32, "{error:?}");
                frame.request_id
            }
            other => panic!("expected error {code:?}, got {other:?}"),
        }
    }

    /// Every byte until the server closes (bounded by a deadline).
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut bytes = Vec::new();
        within(Duration::from_secs(10), self.stream.read_to_end(&mut bytes))
            .await
            .unwrap();
        bytes
    }

    /// Asserts the server closes the connection (after any frames already sent).
    pub async fn expect_closed(&mut self) {
        while let Some(frame) = self.recv().await {
            assert!(
                !matches!(frame.kind, Some(confab_client::proto::server_frame::Kind::Message(_))),
                "unexpected frame before close: {frame:?}"
            );
        }
    }
}

/// Sends `count` messages to `user_id` at once (pipelined), with client_msg_ids
/// `m0`, `m1`, ... and bodies `body 0`, `body 1`, ...; returns their acks in order.
pub async fn send_pipelined(
    client: &Client,
    user_id: confab_client::UserId,
    count: usize,
) -> Vec<confab_client::proto::SendAck> {
    let ids: Vec<(String, String)> = (0..count).map(|i| (format!("m{i}"), format!("body {i}"))).collect();
    let sends = ids.iter().map(|(id, body)| client.send_direct(user_id, id, body));
    futures::future::join_all(sends)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// After each bad client, a fresh one can still sign up and chat.
pub async fn server_still_serves(addr: confab_client::Endpoint) {
    let (alice, _, _) = new_user(addr, "after").await;
    let (bob, bob_login, _) = new_user(addr, "after").await;
    let ack = alice
        .send_direct(bob_login.user_id, "still-up", "still up")
        .await
        .unwrap();
    let message = within(Duration::from_secs(10), bob.next_message()).await.unwrap();
    assert_eq!((message.seq, message.body.as_str()), (ack.seq, "still up"));
}

/// The body of a scrape of the Prometheus endpoint at `addr`.
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    body
}

/// GETs `path` from the metrics endpoint: the status line and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: confab\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// The value of the sample named exactly `series` (name and labels).
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}
