//! What a transport hands its shard, and what it is given to work with.
//!
//! A transport turns a socket into a [`FrameSource`] (frames in) and a writer
//! task draining an [`Outbound`] queue (frames out), then hands the pair to
//! the shard through one call, [`Handler::run`]. It sees the shard only through
//! a [`Context`]: limits, TLS, the node's connection slots, the drain signal.
//! Nothing here knows about chat.

use super::admission::Admission;
use super::outbound::{AddressShares, Bounds, Outbound};
use crate::auth::Accounts;
use crate::config::Config;
use bytes::Bytes;
use confab_proto::FrameError;
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a closing connection may take to flush what it has queued.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a transport hands each accepted, framed connection: its shard.
pub trait Handler: 'static {
    /// Runs the connection's session until it ends; the transport's writer
    /// sends what `outbound` queues.
    fn run(
        self: Rc<Self>,
        source: impl FrameSource,
        outbound: Outbound,
        peer: SocketAddr,
    ) -> impl Future<Output = Closed>;
}

/// One shard's transports' view of it.
#[derive(Debug)]
pub struct Context<H> {
    /// Where accepted connections go.
    pub handler: Rc<H>,
    /// The largest frame either side may send.
    pub max_frame_bytes: usize,
    /// TLS, WebSocket upgrade and QUIC session stream, each.
    pub handshake_timeout: Duration,
    /// WebSocket upgrade path.
    pub websocket_path: String,
    /// Origins a WebSocket upgrade may come from; empty: any.
    pub allowed_origins: Vec<String>,
    /// TLS for the TCP and WebSocket listeners, when `[tls]` is on.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connection slots, node-wide and per source address.
    pub admission: Admission,
    /// Checks a WebSocket upgrade's `?token=`.
    pub accounts: Accounts,
    /// Stop accepting.
    pub drain: CancellationToken,
    /// Every connection task, for the shard to wait for at shutdown.
    connections: TaskTracker,
    outbound: Bounds,
    /// Reply bytes per source address, shared by its connections on this shard.
    address_shares: RefCell<AddressShares>,
}

/// What a [`Context`] is made of besides the node's config.
#[derive(Debug)]
pub struct Parts {
    /// TLS for TCP and WebSocket, when on.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The node's connection slots.
    pub admission: Admission,
    /// The node's accounts.
    pub accounts: Accounts,
    /// The node's drain signal.
    pub drain: CancellationToken,
    /// The shard's connection tasks.
    pub connections: TaskTracker,
}

impl<H: Handler> Context<H> {
    /// A context for `handler`'s shard from the node's config.
    pub fn new(handler: Rc<H>, config: &Config, parts: Parts) -> Self {
        let protocol = &config.protocol;
        Self {
            handler,
            max_frame_bytes: protocol.max_frame_bytes,
            handshake_timeout: config.server.handshake_timeout,
            websocket_path: config.websocket.path.clone(),
            allowed_origins: config.websocket.allowed_origins.clone(),
            tls: parts.tls,
            admission: parts.admission,
            accounts: parts.accounts,
            drain: parts.drain,
            connections: parts.connections,
            outbound: Bounds {
                frames: protocol.outbound_queue_frames,
                bytes: protocol.outbound_queue_bytes,
                reply_bytes: protocol.outbound_reply_bytes,
            },
            address_shares: RefCell::new(AddressShares::new(
                config.limits.reply_bytes_per_ip,
                config.limits.exempt_loopback,
            )),
        }
    }

    /// Runs a connection task, tracked for shutdown.
    pub fn spawn_connection(&self, task: impl Future<Output = ()> + 'static) {
        self.connections.spawn_local(task);
    }
}

/// Why a transport could not produce the next frame.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A `FrameError`, passed on.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Read failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// Transport-level input the protocol has no meaning for (a WebSocket text message).
    #[error("{0}")]
    Unsupported(&'static str),
}

/// What a transport read.
#[derive(Debug)]
pub enum Inbound {
    /// One frame's protobuf payload.
    Frame(Bytes),
    /// One frame's payload that arrived as early data (QUIC 0-RTT), which an
    /// attacker can replay: the session screens it.
    Early(Bytes),
    /// A transport-level keepalive (a WebSocket ping): the peer is alive.
    Alive,
}

/// Frames arriving on one connection, whatever the transport.
pub trait FrameSource {
    /// The next frame or keepalive, or `None` when the peer closed cleanly. Must be
    /// cancel-safe: dropping the future loses no bytes.
    fn next(&mut self) -> impl Future<Output = Result<Option<Inbound>, ReadError>>;

    /// An access token the transport took before the protocol began (a
    /// WebSocket `?token=`), to authenticate with right after `Hello`.
    fn upgrade_token(&mut self) -> Option<String> {
        None
    }
}

/// Why a connection ended; transports map it to their close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed its side.
    PeerClosed,
    /// The peer broke the protocol (undecodable frame, wrong order, too many failed
    /// logins); it was sent an `Error` first.
    Violation,
    /// The peer sent a frame above the size limit; it was sent an `Error` first.
    TooLarge,
    /// The peer sent transport-level data the protocol does not use (WebSocket text).
    UnsupportedData,
    /// Silent past the heartbeat or handshake deadline.
    Timeout,
    /// Replaced or revoked (e.g. the device logged out elsewhere).
    Kicked,
    /// The peer does not read what it is sent.
    SlowConsumer,
    /// The transport failed underneath.
    TransportError,
    /// The node is shutting down; the peer was told when to reconnect.
    ShuttingDown,
}

impl Closed {
    /// What to do with frames still queued: a slow consumer's are dropped, the
    /// rest are written before closing.
    pub fn flushes(self) -> bool {
        self != Self::SlowConsumer
    }

    /// A few words for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer closed",
            Self::Violation => "protocol violation",
            Self::TooLarge => "frame too large",
            Self::UnsupportedData => "unsupported data",
            Self::Timeout => "timeout",
            Self::Kicked => "kicked",
            Self::SlowConsumer => "slow consumer",
            Self::TransportError => "transport error",
            Self::ShuttingDown => "server shutting down",
        }
    }
}

/// Hands an accepted, framed connection to the handler (its shard) while the
/// task made by `writer` drains the outbound queue. Afterwards the writer may
/// flush what is queued (bounded by a timeout), unless the peer stopped reading.
pub async fn run_connection<H: Handler, W>(
    context: Rc<Context<H>>,
    source: impl FrameSource,
    peer: SocketAddr,
    writer: impl FnOnce(Outbound) -> W,
) -> Closed
where
    W: Future<Output = ()> + 'static,
{
    let share = context.address_shares.borrow_mut().of(peer.ip());
    let outbound = Outbound::sharing(context.outbound, share);
    let writer = tokio::task::spawn_local(writer(outbound.clone()));
    let closed = context.handler.clone().run(source, outbound.clone(), peer).await;
    outbound.end(closed);
    let abort = writer.abort_handle();
    if !closed.flushes() {
        abort.abort();
    } else if tokio::time::timeout(FLUSH_TIMEOUT, writer).await.is_err() {
        tracing::debug!(%peer, "peer did not read its last frames; dropping them");
        abort.abort();
    }
    closed
}
