//! Typed configuration, parsed once at startup.
//!
//! Layers, later wins: the built-in `config/default.toml` (embedded in the binary),
//! an optional file, then `CONFAB_<SECTION>__<KEY>` environment variables. Unknown
//! keys in a file and bad values are errors naming the key and where it came
//! from; an environment variable with the prefix that names no key (another
//! tool's, or a typo) is set aside in [`Config::ignored_env`] for a warning.

use confab_protocol::{Rate, SessionLimits};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULTS: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "CONFAB_";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// A key is unknown, or its value is not what the key takes.
    #[error("invalid config key `{key}`: {message}")]
    Invalid {
        /// The key, as a dotted path.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The node's whole configuration, one field per section of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `[tls]`.
    pub tls: TlsConfig,
    /// `[websocket]`.
    pub websocket: WebSocketConfig,
    /// `[quic]`.
    pub quic: QuicConfig,
    /// `[protocol]`.
    pub protocol: ProtocolConfig,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[chat]`.
    pub chat: ChatConfig,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[cassandra]`.
    pub cassandra: CassandraConfig,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[api]`.
    pub api: ApiConfig,
    /// `[push]`.
    pub push: PushConfig,
    /// `[cluster]`.
    pub cluster: ClusterConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `CONFAB_*` environment variables that name no config key: not applied,
    /// to be warned about once logging is up.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// The `[server]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address every shard listens on (SO_REUSEPORT: the kernel spreads connections).
    pub listen: SocketAddr,
    /// Number of shards (pinned single-threaded runtimes). 0 = one per available core.
    pub shards: usize,
    /// Pin each shard thread to a core where the OS allows it.
    pub pin_threads: bool,
    /// Connections accepted at once across all shards; further connects wait in the backlog.
    pub max_connections: usize,
    /// Time a new connection has to send Hello (and a QUIC connection that
    /// began with 0-RTT data, to complete its handshake).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time a new connection has to authenticate.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// On shutdown: longest wait for in-flight requests before connections are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Capacity of each bounded channel between shards.
    pub mesh_channel_capacity: usize,
}

/// The `[limits]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Descriptors kept for the store, listeners and everything else the process opens:
    /// the connection limit is the lower of server.max_connections and the open-files
    /// limit minus this, so a flood of connections cannot starve the store.
    pub reserved_file_descriptors: usize,
    /// Connections one source address may hold at once (IPv6: per /64). Further ones
    /// are refused (TCP: an Error frame RATE_LIMITED; WebSocket: HTTP 429).
    pub max_connections_per_ip: usize,
    /// New connections one address may open: a sustained rate per second after a
    /// burst. Each costs an accept and a handshake (TLS, QUIC: public-key crypto), so
    /// an address that connects and drops at once could keep the node busy. Refused
    /// like the limit above.
    pub connect_rate_per_ip: f64,
    /// Authenticated connections one account may hold at once, node-wide (all its
    /// devices together). Authenticate beyond it is answered RATE_LIMITED and the
    /// connection stays open, unauthenticated.
    pub max_connections_per_user: usize,
    /// Reply bytes (queued, and reserved for pages being read) that all connections
    /// from one address may hold on each shard together: what a crowd of connections
    /// that ask and never read can pin, beyond protocol.outbound_reply_bytes each.
    /// Replies beyond it wait, like a connection's own.
    pub reply_bytes_per_ip: usize,
    /// New connections one address may open: a sustained rate per second after a
    /// burst. Each costs an accept and a handshake (TLS, QUIC: public-key crypto), so
    /// an address that connects and drops at once could keep the node busy. Refused
    /// like the limit above.
    pub connect_burst_per_ip: f64,
    /// Loopback (127.0.0.0/8, ::1) is not limited per address: for load tests on one
    /// machine. Off by default, since a local reverse proxy would make every client
    /// one address.
    pub exempt_loopback: bool,
    /// Messages (sends, edits, deletes, group changes) one connection may send: a
    /// sustained rate per second and a burst. Beyond it the request is answered
    /// RATE_LIMITED ("retry in N ms") and the connection stays open.
    pub send_rate_per_device: f64,
    /// Messages (sends, edits, deletes, group changes) one connection may send: a
    /// sustained rate per second and a burst. Beyond it the request is answered
    /// RATE_LIMITED ("retry in N ms") and the connection stays open.
    pub send_burst_per_device: f64,
    /// The same for all of one user's connections together.
    pub send_rate_per_user: f64,
    /// The same for all of one user's connections together.
    pub send_burst_per_user: f64,
    /// Message text (bodies) one user may store, in MiB a day: a bucket that holds a
    /// day's worth and refills over the day. Bounds the disk one account can fill.
    pub send_mib_per_user_per_day: f64,
    /// Reads (History, Sync, ListConversations, ListMembers, GetUser,
    /// SubscribePresence): each costs the node store reads, up to a page of them, for
    /// a few bytes of request. The same kind of limits as for messages, and the same
    /// answer beyond them. Resuming (Authenticate with a sync token) is not counted.
    pub read_rate_per_device: f64,
    /// Reads (History, Sync, ListConversations, ListMembers, GetUser,
    /// SubscribePresence): each costs the node store reads, up to a page of them, for
    /// a few bytes of request. The same kind of limits as for messages, and the same
    /// answer beyond them. Resuming (Authenticate with a sync token) is not counted.
    pub read_burst_per_device: f64,
    /// Reads (History, Sync, ListConversations, ListMembers, GetUser,
    /// SubscribePresence): each costs the node store reads, up to a page of them, for
    /// a few bytes of request. The same kind of limits as for messages, and the same
    /// answer beyond them. Resuming (Authenticate with a sync token) is not counted.
    pub read_rate_per_user: f64,
    /// Reads (History, Sync, ListConversations, ListMembers, GetUser,
    /// SubscribePresence): each costs the node store reads, up to a page of them, for
    /// a few bytes of request. The same kind of limits as for messages, and the same
    /// answer beyond them. Resuming (Authenticate with a sync token) is not counted.
    pub read_burst_per_user: f64,
    /// Password guessing: after this many failed log-ins in a row to one account,
    /// each further attempt waits (1 s, doubling up to a minute, RATE_LIMITED with the
    /// delay) ...
    pub login_failures_per_account: u32,
    /// The same backoff for one address (IPv6: per /64) after this many failures,
    /// whatever the accounts. An address also gets at most half the password-hashing
    /// pool (auth.max_concurrent_hashes) at once.
    pub login_failures_per_ip: u32,
    /// ... and after this many its password log-ins are locked for login_lockout.
    /// Its devices keep refreshing their tokens (no password needed), so an attacker
    /// cannot log the owner out. Failures are forgotten after a quiet login_lockout.
    pub login_failures_before_lockout: u32,
    /// ... and after this many its password log-ins are locked for login_lockout.
    /// Its devices keep refreshing their tokens (no password needed), so an attacker
    /// cannot log the owner out. Failures are forgotten after a quiet login_lockout.
    #[serde(with = "humantime_serde")]
    pub login_lockout: Duration,
    /// Sign-ups one address may make per hour (a burst of as many).
    pub signups_per_ip_per_hour: u32,
}

/// The `[tls]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS for the TCP and WebSocket listeners: "off"; "self-signed", a certificate for
    /// "localhost" generated at start for development (its SHA-256 fingerprint is logged,
    /// clients pin it); or "files", the PEM files below.
    pub mode: TlsMode,
    /// TLS for the TCP and WebSocket listeners: "off"; "self-signed", a certificate for
    /// "localhost" generated at start for development (its SHA-256 fingerprint is logged,
    /// clients pin it); or "files", the PEM files below.
    pub cert_file: PathBuf,
    /// TLS for the TCP and WebSocket listeners: "off"; "self-signed", a certificate for
    /// "localhost" generated at start for development (its SHA-256 fingerprint is logged,
    /// clients pin it); or "files", the PEM files below.
    pub key_file: PathBuf,
}

/// Where the TCP and WebSocket listeners get their certificate, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP and WebSocket.
    Off,
    /// A certificate the node makes and keeps in its data dir.
    SelfSigned,
    /// `cert_file` and `key_file`.
    Files,
}

/// The `[websocket]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    /// WebSocket listener for browsers: binary messages carry one protobuf frame each.
    pub enabled: bool,
    /// WebSocket listener for browsers: binary messages carry one protobuf frame each.
    pub listen: SocketAddr,
    /// The only path that upgrades; others get 404.
    pub path: String,
    /// Origins allowed to open a WebSocket, exactly as browsers send them
    /// (e.g. "https://chat.example.com").
    /// EMPTY MEANS ANY ORIGIN: any web page, on any site, may open a WebSocket to this
    /// server from its visitors' browsers. Authentication is in-protocol (tokens,
    /// never cookies), so such a page gains no one's account, but it can use the
    /// server (and its limits) from your users' addresses. Set the list in
    /// production; the server warns at start when it is empty on a non-loopback
    /// address.
    pub allowed_origins: Vec<String>,
}

/// The `[quic]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicConfig {
    /// QUIC listener (UDP, ALPN "confab/1") for mobile networks. Always TLS 1.3: the
    /// [tls] certificate, or a self-signed one when tls.mode = "off".
    pub enabled: bool,
    /// QUIC listener (UDP, ALPN "confab/1") for mobile networks. Always TLS 1.3: the
    /// [tls] certificate, or a self-signed one when tls.mode = "off".
    pub listen: SocketAddr,
}

/// The `[protocol]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolConfig {
    /// Largest frame accepted or sent, in bytes (both directions).
    pub max_frame_bytes: usize,
    /// Clients ping at least this often; 3 silent intervals close the connection.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Frames queued for one connection before it counts as a slow consumer and is closed.
    pub outbound_queue_frames: usize,
    /// ... or bytes, whichever comes first. Pushes are encoded once and shared by
    /// every recipient's queue; beyond either bound the connection is a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Bytes of replies (and of a resume's replay) queued for one connection, which
    /// no other connection shares: what a peer that asks and does not read can hold.
    /// Beyond it (or beyond half the queue) replies wait; a request answered with a
    /// page (History, Sync, ListConversations, ListMembers) reads the store only once
    /// a frame's room is reserved in it. At least max_frame_bytes; the queue's bytes
    /// at least twice this.
    pub outbound_reply_bytes: usize,
    /// Requests of one connection processed concurrently (Send, History, GetUser).
    /// Must stay below outbound_queue_frames, so replies cannot crowd out pushes.
    pub max_in_flight_requests: usize,
    /// Failed LogIn/Authenticate/RefreshToken attempts before the connection is closed.
    pub max_auth_failures: u32,
    /// Messages a resuming device (Authenticate with a sync token) is sent before the
    /// Authenticated reply; beyond it the reply says recovered = false and the device
    /// calls Sync for the rest. Live pushes that arrive during the replay are held
    /// (up to outbound_queue_frames) and sent after the reply; more than that also
    /// answers recovered = false.
    pub max_replay_messages: usize,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Who may authenticate: accounts with passwords, tokens of the app's own
    /// sign-in (JWT), or both.
    pub mode: AuthMode,
    /// `[auth.jwt]`: how tokens of the app's sign-in are checked (with `mode`
    /// "jwt" or "both").
    pub jwt: JwtConfig,
    /// Base64 key (at least 32 bytes) that signs access tokens. Empty: generated on first
    /// start and kept in <store.data_dir>/token.key.
    pub token_key: String,
    /// How long an access token is valid.
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// A refresh token lasts this long; each refresh replaces it (the one it replaced,
    /// if presented again, logs the device out: it was copied) ...
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    /// ... but a device must log in with its password again this long after it did.
    #[serde(with = "humantime_serde")]
    pub session_lifetime: Duration,
    /// Devices one user may have logged in at once; devices whose refresh token
    /// expired are removed at the next log-in.
    pub max_devices_per_user: usize,
    /// argon2id cost (OWASP recommendation: 19 MiB, 2 iterations; less is warned about
    /// at start).
    pub argon2_memory_kib: u32,
    /// argon2id cost (OWASP recommendation: 19 MiB, 2 iterations; less is warned about
    /// at start).
    pub argon2_iterations: u32,
    /// Password hashes computed at once, node-wide. 0 = number of available cores.
    pub max_concurrent_hashes: usize,
}

/// Which credentials a node accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// confab's own accounts: sign-up, log-in with a password, confab's tokens.
    Local,
    /// Only tokens issued by the app's auth server (JWT); no passwords here.
    Jwt,
    /// Both: confab's accounts and the app's tokens.
    Both,
}

impl AuthMode {
    /// Whether confab's own accounts (passwords, confab's tokens) are accepted.
    pub fn local(self) -> bool {
        matches!(self, Self::Local | Self::Both)
    }

    /// Whether the app's tokens (JWT) are accepted.
    pub fn jwt(self) -> bool {
        matches!(self, Self::Jwt | Self::Both)
    }
}

/// The `[auth.jwt]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret of HS256 tokens (at least 32 bytes); empty: HS256 is refused.
    pub hs256_secret: String,
    /// Where the app's auth server publishes its public keys (a JWKS document), for
    /// RS256/384/512, PS256/384/512, ES256/384 and EdDSA tokens; empty: none.
    /// https, or http to a loopback address.
    pub jwks_url: String,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim (one of the token's audiences).
    pub audience: String,
    /// Clock difference allowed when checking `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// A token's user is the confab user named `<namespace>:<sub>`, created on first
    /// sight; the namespace keeps them apart from password accounts.
    pub namespace: String,
    /// The claim naming the device (e.g. "sid"); empty, or absent from a token: the
    /// device the client names in Authenticate, else "default".
    pub device_claim: String,
    /// The claim holding the user's display name, taken on every sign-in that
    /// has it (at most 64 characters); empty: none.
    pub display_name_claim: String,
    /// Longest wait for the JWKS document.
    #[serde(with = "humantime_serde")]
    pub jwks_timeout: Duration,
    /// The keys are fetched again this often ...
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_interval: Duration,
    /// ... and when a token names a key not known, but not more often than this.
    #[serde(with = "humantime_serde")]
    pub jwks_min_refetch_interval: Duration,
}

/// The `[chat]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    /// Longest message body, in Unicode scalar values. The frame limit applies as well.
    pub max_body_chars: usize,
    /// Longest client_msg_id, in bytes.
    pub max_client_msg_id_bytes: usize,
    /// Largest page a History request may ask for.
    pub max_history_limit: u32,
    /// Conversations whose sequencing state an owner shard keeps in memory.
    pub max_cached_conversations: usize,
    /// Appends an owner shard queues before it answers "unavailable".
    pub max_pending_appends: usize,
    /// How long a (device, client_msg_id) is remembered: a Send retried within this
    /// window returns the original SendAck instead of storing the message twice.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Members a group may have (large rooms work at 10 000 and more).
    pub max_group_members: usize,
    /// The longest group title, in characters.
    pub max_group_title_chars: usize,
    /// A device sends typing to one conversation at most this often.
    #[serde(with = "humantime_serde")]
    pub typing_min_interval: Duration,
    /// Receivers drop a typing signal not refreshed within this time.
    #[serde(with = "humantime_serde")]
    pub typing_expiry: Duration,
    /// Receipt updates to other members are coalesced and sent this often at most.
    #[serde(with = "humantime_serde")]
    pub receipt_flush_interval: Duration,
    /// A user stays online this long after its last device left (no flapping on a
    /// quick reconnect).
    #[serde(with = "humantime_serde")]
    pub presence_grace: Duration,
    /// Presence pushes about one user are sent at most this often.
    #[serde(with = "humantime_serde")]
    pub presence_min_interval: Duration,
    /// Users one SubscribePresence may name.
    pub max_presence_subscriptions: usize,
}

/// The `[store]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// "embedded": everything in this process, on disk under data_dir.
    /// "cassandra": users, devices, history and receipts in Cassandra or ScyllaDB
    /// ([cassandra] below; see config/cluster.toml). data_dir still holds token.key.
    pub backend: StoreBackend,
    /// Where the node keeps its files: the embedded store, token.key, a self-signed
    /// certificate.
    pub data_dir: PathBuf,
    /// "sync": fsync before acknowledging (survives power loss).
    /// "buffered": hand to the OS before acknowledging (survives a process crash).
    pub durability: Durability,
    /// Most writes grouped into one commit.
    pub max_batch: usize,
    /// Embedded store: below this much free space under data_dir, writes are refused
    /// with UNAVAILABLE ("storage is full") until space is freed; reads go on. It keeps
    /// room for the storage engine's own work (flushes, compactions). 0 turns the check
    /// off (a full disk still passes: the store reopens itself once space is back).
    pub min_free_mib: u64,
}

/// Where the node keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// fjall, in this process, under `data_dir`.
    Embedded,
    /// Cassandra or ScyllaDB (`[cassandra]`).
    Cassandra,
}

/// The `[cassandra]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CassandraConfig {
    /// Nodes to contact first, host:port (the driver discovers the rest).
    pub contact_points: Vec<String>,
    /// The keyspace confab keeps its tables in.
    pub keyspace: String,
    /// Create the keyspace and tables at start if missing (idempotent).
    pub create_schema: bool,
    /// Used when creating the keyspace (CQL map literal).
    pub replication: String,
    /// Consistency of every read and write: "one", "quorum", "local_quorum", "all".
    /// A send is acknowledged only once Cassandra confirmed it at this level.
    pub consistency: Consistency,
    /// Appends are collected this long (or up to max_batch_rows) before being written
    /// as one unlogged batch per partition. The runtime's timer ticks every
    /// millisecond, so a shorter window waits until the next tick; "0s" writes what
    /// is queued at once.
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// Appends are collected this long (or up to max_batch_rows) before being written
    /// as one unlogged batch per partition. The runtime's timer ticks every
    /// millisecond, so a shorter window waits until the next tick; "0s" writes what
    /// is queued at once.
    pub max_batch_rows: usize,
    /// false: one statement per row instead of a batch per partition (for comparing).
    pub batch_writes: bool,
    /// Requests to Cassandra in flight at once from the writer.
    pub max_in_flight: usize,
    /// A request not answered in time fails (and the send is not acknowledged).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// CQL consistency levels confab accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// One replica.
    One,
    /// A majority of all replicas.
    Quorum,
    /// A majority of the local datacenter's replicas.
    LocalQuorum,
    /// Every replica.
    All,
}

/// When an acknowledged write is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync'd before the acknowledgement: survives power loss.
    Sync,
    /// Written to the OS before the acknowledgement: survives a process crash.
    Buffered,
}

/// The `[metrics]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `None` when empty: off.
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
}

/// The `[api]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `None` when empty: off.
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    /// Bearer keys the API takes (each at least 32 characters).
    pub keys: Vec<String>,
    /// Largest request body; larger ones are answered 413.
    pub max_body_bytes: usize,
    /// Requests served at once; more wait.
    pub max_concurrent_requests: usize,
    /// Connections open at once; more wait in the listen backlog. Each also
    /// must send a request's head within 10 s and lives at most 5 minutes.
    pub max_connections: usize,
}

/// The `[push]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Where notifications for offline devices are POSTed (docs/PUSH.md):
    /// https, or http to a loopback address. Empty: off.
    pub webhook_url: String,
    /// Signs each call (HMAC-SHA256; at least 32 bytes).
    pub webhook_secret: String,
    /// A user's first message while offline opens a window this long; one
    /// notification per device goes out when it closes.
    #[serde(with = "humantime_serde")]
    pub collapse_window: Duration,
    /// Longest wait for the webhook's answer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A failed call is retried after 1 s, doubling up to this.
    #[serde(with = "humantime_serde")]
    pub max_retry_interval: Duration,
    /// Whether a notification carries the last message's text.
    pub include_body: bool,
    /// The text is cut to this many characters.
    pub max_body_chars: usize,
}

/// The `[cluster]` section: several nodes over one Redis (docs/CLUSTER.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Redis URL, e.g. "redis://127.0.0.1:6379". Empty: a single node.
    pub redis: String,
    /// Prefix of every Redis key of this cluster (letters, digits, `_`, `-`).
    pub prefix: String,
    /// How often a node announces itself and reads the live nodes.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A node not heard from for this long is no longer live.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl ClusterConfig {
    /// Whether this node is part of a cluster.
    pub fn enabled(&self) -> bool {
        !self.redis.is_empty()
    }
}

/// An address, or nothing for "".
fn optional_addr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.trim() {
        "" => Ok(None),
        addr => addr.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "confab=debug,info". RUST_LOG overrides it.
    /// The storage engine's own logs are quiet unless they warn.
    pub level: String,
}

impl Config {
    /// The limits each connection's protocol session enforces.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            max_frame_bytes: self.protocol.max_frame_bytes,
            heartbeat_interval: self.protocol.heartbeat_interval,
            handshake_timeout: self.server.handshake_timeout,
            auth_timeout: self.server.auth_timeout,
            max_body_chars: self.chat.max_body_chars,
            max_client_msg_id_bytes: self.chat.max_client_msg_id_bytes,
            max_history_limit: self.chat.max_history_limit,
            max_auth_failures: self.protocol.max_auth_failures,
            max_group_members: self.chat.max_group_members,
            max_group_title_chars: self.chat.max_group_title_chars,
            typing_min_interval: self.chat.typing_min_interval,
            max_presence_subscriptions: self.chat.max_presence_subscriptions,
            send_rate: Rate {
                per_second: self.limits.send_rate_per_device,
                burst: self.limits.send_burst_per_device,
            },
            read_rate: Rate {
                per_second: self.limits.read_rate_per_device,
                burst: self.limits.read_burst_per_device,
            },
        }
    }

    /// Built-in defaults < `file` < `CONFAB_*` variables of the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = match file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?),
            None => None,
        };
        Self::build(text.as_deref().zip(file), env)
    }

    /// The defaults < `file` (its text and where it came from) < `env`.
    fn build(
        file: Option<(&str, &Path)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = parse_toml(DEFAULTS, Path::new("<built-in defaults>"))?;
        if let Some((text, path)) = file {
            merge(&mut table, parse_toml(text, path)?);
        }
        let mut ignored_env = Vec::new();
        for (name, value) in env {
            if let Some(key) = name.strip_prefix(ENV_PREFIX)
                && !apply_env(&mut table, key, &value)
            {
                ignored_env.push(name);
            }
        }
        let mut config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| ConfigError::Invalid {
                key: err.path().to_string(),
                message: err.inner().message().to_owned(),
            })?;
        config.validate()?;
        config.ignored_env = ignored_env;
        Ok(config)
    }

    /// The defaults with `text` (a config file's contents) over them.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::build(Some((text, Path::new("<text>"))), std::iter::empty())
    }

    /// The defaults alone, with no file and no environment.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load_from(None, std::iter::empty())
    }

    /// Number of shards after resolving 0 to the available cores.
    pub fn shard_count(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                message: message.to_owned(),
            })
        };
        // Counts and durations that must not be zero.
        let at_least_one = [
            ("server.max_connections", self.server.max_connections as u128),
            (
                "limits.max_connections_per_ip",
                self.limits.max_connections_per_ip as u128,
            ),
            (
                "limits.max_connections_per_user",
                self.limits.max_connections_per_user as u128,
            ),
            (
                "server.mesh_channel_capacity",
                self.server.mesh_channel_capacity as u128,
            ),
            (
                "protocol.max_in_flight_requests",
                self.protocol.max_in_flight_requests as u128,
            ),
            (
                "protocol.max_replay_messages",
                self.protocol.max_replay_messages as u128,
            ),
            ("auth.argon2_iterations", u128::from(self.auth.argon2_iterations)),
            (
                "limits.login_failures_before_lockout",
                u128::from(self.limits.login_failures_before_lockout),
            ),
            ("limits.login_lockout", self.limits.login_lockout.as_millis()),
            (
                "limits.signups_per_ip_per_hour",
                u128::from(self.limits.signups_per_ip_per_hour),
            ),
            ("auth.access_token_ttl", self.auth.access_token_ttl.as_millis()),
            ("auth.refresh_token_ttl", self.auth.refresh_token_ttl.as_millis()),
            ("auth.session_lifetime", self.auth.session_lifetime.as_millis()),
            ("auth.max_devices_per_user", self.auth.max_devices_per_user as u128),
            ("chat.max_body_chars", self.chat.max_body_chars as u128),
            ("chat.max_history_limit", u128::from(self.chat.max_history_limit)),
            ("chat.max_group_title_chars", self.chat.max_group_title_chars as u128),
            (
                "chat.max_cached_conversations",
                self.chat.max_cached_conversations as u128,
            ),
            ("chat.max_pending_appends", self.chat.max_pending_appends as u128),
            (
                "chat.max_presence_subscriptions",
                self.chat.max_presence_subscriptions as u128,
            ),
            ("store.max_batch", self.store.max_batch as u128),
            ("cassandra.max_batch_rows", self.cassandra.max_batch_rows as u128),
            ("cassandra.max_in_flight", self.cassandra.max_in_flight as u128),
            ("cassandra.request_timeout", self.cassandra.request_timeout.as_millis()),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return invalid(key, "must be at least 1");
        }
        // Rates and bursts: positive numbers, bursts of at least one.
        let rates = [
            ("limits.send_rate_per_device", self.limits.send_rate_per_device, 0.0),
            ("limits.send_burst_per_device", self.limits.send_burst_per_device, 1.0),
            ("limits.send_rate_per_user", self.limits.send_rate_per_user, 0.0),
            ("limits.send_burst_per_user", self.limits.send_burst_per_user, 1.0),
            ("limits.connect_rate_per_ip", self.limits.connect_rate_per_ip, 0.0),
            ("limits.connect_burst_per_ip", self.limits.connect_burst_per_ip, 1.0),
            ("limits.read_rate_per_device", self.limits.read_rate_per_device, 0.0),
            ("limits.read_burst_per_device", self.limits.read_burst_per_device, 1.0),
            ("limits.read_rate_per_user", self.limits.read_rate_per_user, 0.0),
            ("limits.read_burst_per_user", self.limits.read_burst_per_user, 1.0),
            (
                "limits.send_mib_per_user_per_day",
                self.limits.send_mib_per_user_per_day,
                0.0,
            ),
        ];
        if let Some((key, _, least)) = rates
            .iter()
            .find(|(_, value, least)| !(value.is_finite() && *value > 0.0 && value >= least))
        {
            return invalid(
                key,
                if *least > 0.0 {
                    "must be at least 1"
                } else {
                    "must be a positive number"
                },
            );
        }
        if self.server.shards > crate::shard::MAX_SHARDS {
            return invalid("server.shards", "at most 64 shards are supported");
        }
        // A frame keeps 16 KiB for everything but a message body.
        if !(32 * 1024..=64 * 1024 * 1024).contains(&self.protocol.max_frame_bytes) {
            return invalid("protocol.max_frame_bytes", "must be between 32768 and 67108864");
        }
        if self.protocol.heartbeat_interval < Duration::from_millis(100) {
            return invalid("protocol.heartbeat_interval", "must be at least 100ms");
        }
        if self.protocol.outbound_queue_frames <= self.protocol.max_in_flight_requests {
            return invalid(
                "protocol.outbound_queue_frames",
                "must be larger than protocol.max_in_flight_requests, so replies cannot crowd out pushes",
            );
        }
        if self.protocol.outbound_reply_bytes < self.protocol.max_frame_bytes {
            return invalid(
                "protocol.outbound_reply_bytes",
                "must be at least protocol.max_frame_bytes, so a reply of a full frame fits",
            );
        }
        if self.limits.reply_bytes_per_ip < self.protocol.outbound_reply_bytes {
            return invalid(
                "limits.reply_bytes_per_ip",
                "must be at least protocol.outbound_reply_bytes, so one connection can use its own budget",
            );
        }
        if self.protocol.outbound_queue_bytes < 2 * self.protocol.outbound_reply_bytes {
            return invalid(
                "protocol.outbound_queue_bytes",
                "must be at least twice protocol.outbound_reply_bytes, so replies cannot crowd out pushes",
            );
        }
        if self.tls.mode == TlsMode::Files
            && (self.tls.cert_file.as_os_str().is_empty() || self.tls.key_file.as_os_str().is_empty())
        {
            return invalid(
                "tls.cert_file",
                "tls.mode = \"files\" needs tls.cert_file and tls.key_file",
            );
        }
        if self.cassandra.contact_points.is_empty() {
            return invalid("cassandra.contact_points", "needs at least one host:port");
        }
        let keyspace = &self.cassandra.keyspace;
        if keyspace.is_empty()
            || keyspace.len() > 48
            || !keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return invalid("cassandra.keyspace", "must be 1-48 letters, digits or underscores");
        }
        if !self.websocket.path.starts_with('/') {
            return invalid("websocket.path", "must start with /");
        }
        if self.auth.argon2_memory_kib < 8 {
            return invalid("auth.argon2_memory_kib", "must be at least 8");
        }
        if self.auth.mode.jwt() {
            self.validate_jwt()?;
        }
        if !self.push.webhook_url.is_empty() {
            if let Err(err) = crate::http::HttpUrl::parse(&self.push.webhook_url) {
                return invalid("push.webhook_url", &err.to_string());
            }
            if self.push.webhook_secret.len() < 32 {
                return invalid(
                    "push.webhook_secret",
                    "push.webhook_url is set: give a secret of at least 32 bytes",
                );
            }
            if self.push.collapse_window.is_zero() || self.push.timeout.is_zero() {
                return invalid(
                    "push.collapse_window",
                    "push.collapse_window and push.timeout must not be zero",
                );
            }
        }
        if self.api.listen.is_some() {
            if self.api.keys.is_empty() {
                return invalid("api.keys", "api.listen is set: give at least one key");
            }
            if self.api.keys.iter().any(|key| key.len() < 32) {
                return invalid("api.keys", "each key must be at least 32 characters");
            }
            if self.api.max_body_bytes < 1024 {
                return invalid("api.max_body_bytes", "must be at least 1024");
            }
            if self.api.max_concurrent_requests == 0 || self.api.max_connections == 0 {
                return invalid(
                    "api.max_connections",
                    "api.max_connections and api.max_concurrent_requests must be at least 1",
                );
            }
        }
        if self.chat.max_group_members < 2 {
            return invalid("chat.max_group_members", "must be at least 2");
        }
        if self.chat.dedup_window < Duration::from_secs(1) {
            return invalid("chat.dedup_window", "must be at least 1s");
        }
        if self.cluster.enabled() {
            self.validate_cluster()?;
        }
        Ok(())
    }

    /// `[cluster]` when `cluster.redis` is set.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                message: message.to_owned(),
            })
        };
        let cluster = &self.cluster;
        if self.store.backend != StoreBackend::Cassandra {
            return invalid(
                "cluster.redis",
                "cluster mode keeps history in Cassandra: set store.backend = \"cassandra\"",
            );
        }
        // A node taking a conversation over must read every row and fence its
        // holder acknowledged: majorities that overlap (docs/CLUSTER.md).
        if self.cassandra.consistency == Consistency::One {
            return invalid(
                "cassandra.consistency",
                "cluster mode needs \"quorum\", \"local_quorum\" or \"all\": with \"one\" a node taking a conversation over can miss acknowledged rows",
            );
        }
        if !cluster.redis.starts_with("redis://") && !cluster.redis.starts_with("rediss://") {
            return invalid("cluster.redis", "must be a redis:// or rediss:// URL");
        }
        let prefix = &cluster.prefix;
        if prefix.is_empty()
            || prefix.len() > 64
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return invalid("cluster.prefix", "must be 1-64 letters, digits, _ or -");
        }
        if cluster.heartbeat < Duration::from_millis(50) {
            return invalid("cluster.heartbeat", "must be at least 50ms");
        }
        if cluster.lease < 2 * cluster.heartbeat {
            return invalid(
                "cluster.lease",
                "must be at least twice cluster.heartbeat, so one late beat does not drop a node",
            );
        }
        Ok(())
    }

    /// `[auth.jwt]` when tokens of the app's sign-in are accepted.
    fn validate_jwt(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: format!("auth.jwt.{key}"),
                message: message.to_owned(),
            })
        };
        let jwt = &self.auth.jwt;
        if jwt.hs256_secret.is_empty() && jwt.jwks_url.is_empty() {
            return invalid(
                "jwks_url",
                "auth.mode accepts JWTs: set auth.jwt.jwks_url, auth.jwt.hs256_secret, or both",
            );
        }
        if !jwt.hs256_secret.is_empty() && jwt.hs256_secret.len() < 32 {
            return invalid("hs256_secret", "must be at least 32 bytes");
        }
        if !jwt.jwks_url.is_empty()
            && let Err(err) = crate::http::HttpUrl::parse(&jwt.jwks_url)
        {
            return invalid("jwks_url", &err.to_string());
        }
        if jwt.issuer.is_empty() {
            return invalid("issuer", "must be set: a token's iss is always checked");
        }
        if jwt.audience.is_empty() {
            return invalid("audience", "must be set: a token's aud is always checked");
        }
        let namespace_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-');
        if !(1..=16).contains(&jwt.namespace.len()) || !jwt.namespace.chars().all(namespace_char) {
            return invalid("namespace", "must be 1-16 characters of a-z, 0-9, '_', '-'");
        }
        if jwt.jwks_timeout.is_zero() || jwt.jwks_refresh_interval.is_zero() {
            return invalid(
                "jwks_timeout",
                "auth.jwt.jwks_timeout and jwks_refresh_interval must not be zero",
            );
        }
        Ok(())
    }
}

fn parse_toml(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|err| ConfigError::Syntax {
        path: path.to_owned(),
        message: err.message().to_owned(),
    })
}

/// Deep-merges `overlay` into `base`: tables merge key by key, other values replace.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge(base_table, overlay_table);
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `CONFAB_SECTION__KEY=value` (or `CONFAB_SECTION__TABLE__KEY`) if it names a key of the defaults (every
/// key has a default); returns whether it did. The value is read as a TOML value
/// when it parses as one (numbers, booleans, lists), otherwise as a string.
fn apply_env(table: &mut toml::Table, key: &str, value: &str) -> bool {
    let path: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
    let Some((field, sections)) = path.split_last() else {
        return false;
    };
    if sections.is_empty() {
        return false;
    }
    let mut section_table = table;
    for section in sections {
        match section_table.get_mut(section) {
            Some(toml::Value::Table(inner)) => section_table = inner,
            _ => return false,
        }
    }
    if !section_table.contains_key(field) || matches!(section_table.get(field), Some(toml::Value::Table(_))) {
        return false;
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    section_table.insert(field.clone(), parsed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_load() {
        let config = Config::defaults().unwrap();
        assert_eq!(config.protocol.max_frame_bytes, 256 * 1024);
        assert_eq!(config.server.handshake_timeout, Duration::from_secs(10));
        assert_eq!(config.store.durability, Durability::Sync);
        assert_eq!(config.chat.max_body_chars, 100_000);
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confab.toml");
        std::fs::write(&path, "[server]\nshards = 3\n[store]\ndurability = \"buffered\"\n").unwrap();
        let config = Config::load_from(
            Some(&path),
            env(&[
                ("CONFAB_SERVER__SHARDS", "2"),
                ("CONFAB_LOG__LEVEL", "debug"),
                ("HOME", "/x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.shards, 2);
        assert_eq!(config.store.durability, Durability::Buffered);
        assert_eq!(config.log.level, "debug");
        assert_eq!(config.server.listen.port(), 7300, "untouched keys keep defaults");
    }

    #[test]
    fn another_tools_confab_variables_are_set_aside_not_fatal() {
        let config = Config::load_from(
            None,
            env(&[
                ("CONFAB_HOME", "/opt/other"),
                ("CONFAB_NOSECTION__KEY", "1"),
                ("CONFAB_SERVER__SHARDZ", "3"),
                ("CONFAB_SERVER__SHARDS", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.shards, 3);
        assert_eq!(
            config.ignored_env,
            ["CONFAB_HOME", "CONFAB_NOSECTION__KEY", "CONFAB_SERVER__SHARDZ"]
        );
    }

    #[test]
    fn jwt_mode_needs_keys_issuer_and_audience_and_takes_nested_env() {
        let jwt = |pairs: &[(&str, &str)]| {
            let mut all = vec![("CONFAB_AUTH__MODE", "jwt")];
            all.extend_from_slice(pairs);
            Config::load_from(None, env(&all)).map_err(|err| err.to_string())
        };
        let complete = [
            (
                "CONFAB_AUTH__JWT__JWKS_URL",
                "https://auth.example/.well-known/jwks.json",
            ),
            ("CONFAB_AUTH__JWT__ISSUER", "https://auth.example"),
            ("CONFAB_AUTH__JWT__AUDIENCE", "chat"),
        ];
        let config = jwt(&complete).unwrap();
        assert_eq!(config.auth.mode, AuthMode::Jwt);
        assert_eq!(config.auth.jwt.audience, "chat");
        for (missing, key) in [(0, "jwks_url"), (1, "issuer"), (2, "audience")] {
            let mut pairs = complete.to_vec();
            pairs.remove(missing);
            let err = jwt(&pairs).unwrap_err();
            assert!(err.contains(&format!("auth.jwt.{key}")), "{err}");
        }
        let mut plain_http = complete.to_vec();
        plain_http[0].1 = "http://auth.example/jwks";
        assert!(jwt(&plain_http).unwrap_err().contains("loopback"));
        let mut short_secret = complete.to_vec();
        short_secret.push(("CONFAB_AUTH__JWT__HS256_SECRET", "short"));
        assert!(jwt(&short_secret).unwrap_err().contains("auth.jwt.hs256_secret"));
        let mut bad_namespace = complete.to_vec();
        bad_namespace.push(("CONFAB_AUTH__JWT__NAMESPACE", "Has:Colon"));
        assert!(jwt(&bad_namespace).unwrap_err().contains("auth.jwt.namespace"));
        // In local mode the section is not checked.
        assert!(Config::defaults().unwrap().auth.mode == AuthMode::Local);
    }

    #[test]
    fn cluster_mode_needs_cassandra_a_redis_url_and_a_lease_of_two_heartbeats() {
        let cluster = |pairs: &[(&str, &str)]| {
            let mut all = vec![
                ("CONFAB_CLUSTER__REDIS", "redis://127.0.0.1:6379"),
                ("CONFAB_STORE__BACKEND", "cassandra"),
            ];
            all.extend_from_slice(pairs);
            Config::load_from(None, env(&all)).map_err(|err| err.to_string())
        };
        let config = cluster(&[]).unwrap();
        assert!(config.cluster.enabled());
        assert!(
            !Config::defaults().unwrap().cluster.enabled(),
            "a single node by default"
        );
        for (pairs, key) in [
            (&[("CONFAB_STORE__BACKEND", "embedded")][..], "cluster.redis"),
            (&[("CONFAB_CLUSTER__REDIS", "127.0.0.1:6379")], "cluster.redis"),
            (&[("CONFAB_CLUSTER__PREFIX", "a b")], "cluster.prefix"),
            (&[("CONFAB_CLUSTER__PREFIX", "")], "cluster.prefix"),
            (&[("CONFAB_CLUSTER__HEARTBEAT", "10ms")], "cluster.heartbeat"),
            (&[("CONFAB_CLUSTER__LEASE", "1500ms")], "cluster.lease"),
            (&[("CONFAB_CASSANDRA__CONSISTENCY", "one")], "cassandra.consistency"),
        ] {
            let err = cluster(pairs).unwrap_err();
            assert!(err.contains(key), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn the_api_needs_long_keys_when_it_listens() {
        let api = |keys: &str| {
            Config::load_from(
                None,
                env(&[("CONFAB_API__LISTEN", "127.0.0.1:0"), ("CONFAB_API__KEYS", keys)]),
            )
            .map_err(|err| err.to_string())
        };
        assert!(api("[]").unwrap_err().contains("api.keys"));
        assert!(api(r#"["short"]"#).unwrap_err().contains("at least 32"));
        let config = api(r#"["a key of the app's backend, 32 chars or more"]"#).unwrap();
        assert_eq!(config.api.keys.len(), 1);
        // Off by default, and then no key is needed.
        assert!(Config::defaults().unwrap().api.listen.is_none());
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = Config::load_from(None, env(&[("CONFAB_STORE__DURABILITY", "sometimes")])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("store.durability"), "{text}");
    }

    #[test]
    fn every_zero_limit_names_its_own_key() {
        for key in [
            "AUTH__REFRESH_TOKEN_TTL",
            "CHAT__MAX_CACHED_CONVERSATIONS",
            "CHAT__MAX_PRESENCE_SUBSCRIPTIONS",
        ] {
            let value = if key.ends_with("TTL") { "0s" } else { "0" };
            let text = Config::load_from(None, env(&[(&format!("CONFAB_{key}"), value)]))
                .unwrap_err()
                .to_string();
            assert!(
                text.contains(&key.to_ascii_lowercase().replace("__", ".")),
                "{key}: {text}"
            );
        }
    }

    #[test]
    fn the_shipped_config_files_load() {
        for file in ["config/cluster.toml", "config/bench.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            Config::load_from(Some(&path), env(&[])).unwrap_or_else(|err| panic!("{file}: {err}"));
        }
    }

    #[test]
    fn unknown_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confab.toml");
        std::fs::write(&path, "[server]\nshardz = 3\n").unwrap();
        let text = Config::load_from(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(text.contains("shardz"), "{text}");
    }

    #[test]
    fn out_of_range_value_names_the_key() {
        let text = Config::load_from(None, env(&[("CONFAB_PROTOCOL__MAX_FRAME_BYTES", "10")]))
            .unwrap_err()
            .to_string();
        assert!(text.contains("protocol.max_frame_bytes"), "{text}");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, "[server\n").unwrap();
        let text = Config::load_from(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(text.contains("broken.toml"), "{text}");
    }
}
