//! QUIC (quinn, TLS 1.3, ALPN `confab/1`), for mobile networks.
//!
//! **One endpoint per node, handing sessions to shards.** Several SO_REUSEPORT UDP
//! sockets would let the kernel route by the 4-tuple, so a client whose address
//! changes (Wi-Fi → cellular) would land on a socket that does not know its
//! connection and migration would break. Instead a single endpoint (one socket)
//! runs on a small runtime of its own (one worker per shard: connection drivers,
//! which do packet processing and handshake crypto, spread over them); it accepts
//! each connection's session stream and hands the stream pair to a shard (round
//! robin), where the shared connection driver runs exactly as for TCP. Quinn's
//! streams are thread-safe handles onto the connection state, so the shard reads
//! and writes them directly; only packets are handled off the shard. This is the
//! one place connection work leaves its shard: the price of migration.
//!
//! **One bidirectional stream per session** (the first one the client opens),
//! carrying length-prefixed frames like TCP. Per-conversation streams would spare
//! one conversation a burst in another, but pushes are small, the outbound queue
//! already bounds a connection, and one ordered stream keeps the protocol's order
//! guarantees (replies after the pushes they follow) without a second copy of the
//! session logic. The client may open no other stream.
//!
//! **0-RTT**: the server accepts early data (session tickets). Early frames may be
//! replayed by an attacker, so frames read before the handshake completes are
//! marked [`Inbound::Early`], and the session accepts only idempotent ones
//! (`confab_protocol::Session::screen_early`); anything else closes the connection.
//! A session starts on the early data, before the handshake completes, so a
//! connection whose handshake has not completed within `server.handshake_timeout`
//! is closed: a replay never completes it.
//!
//! Application close codes are listed in [`close_code`] and PROTOCOL.md.

use super::admission::{Admission, Permit};
use super::connection::{Closed, Context, FrameSource, Handler, Inbound, ReadError, run_connection};
use super::outbound::Outbound;
use super::stream::{ByteSource, StreamFrames, write_frames};
use super::tls::Identity;
use bytes::BytesMut;
use futures::FutureExt as _;
use futures::future::Shared;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, EndpointConfig, RecvStream, SendStream, VarInt, ZeroRttAccepted};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// UDP socket buffers asked for (the kernel caps them at `net.core.rmem_max` /
/// `wmem_max`): a burst of handshakes must not overflow the ~200 KB default, or
/// packets drop and every handshake waits for retransmission timers.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Sessions waiting to be picked up by one shard.
pub const HANDOFF_QUEUE: usize = 1024;
/// Bytes of one connection's pushes in flight, as a TCP socket buffer would hold.
const SEND_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// How long the endpoint may take to tell peers it is closing.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection's session stream, handed from the endpoint to a shard.
pub struct Handoff {
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
    /// Resolves when the handshake completes; `None` if it already had.
    handshake_done: Option<ZeroRttAccepted>,
    permit: Permit,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("peer", &self.connection.remote_address())
            .finish_non_exhaustive()
    }
}

/// The QUIC side of a node: a bound endpoint, not yet serving.
#[derive(Debug)]
pub struct QuicListener {
    endpoint: Endpoint,
    runtime: tokio::runtime::Runtime,
}

impl QuicListener {
    /// Binds the UDP socket with the node's identity, on a runtime of its own with
    /// `threads` workers: the socket is one, but the connections' drivers (packet
    /// processing, handshake crypto) spread over the workers.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        idle_timeout: Duration,
        threads: usize,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .enable_all()
            .thread_name("confab-quic")
            .build()?;
        let endpoint = {
            let _entered = runtime.enter();
            server_config(identity, idle_timeout).and_then(|config| {
                let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no tokio runtime"))?;
                Endpoint::new(EndpointConfig::default(), Some(config), udp_socket(addr)?, runtime)
            })
        };
        match endpoint {
            Ok(endpoint) => Ok(Self { endpoint, runtime }),
            Err(err) => {
                // Dropping a runtime blocks; the caller may be async.
                runtime.shutdown_background();
                Err(err)
            }
        }
    }

    /// The endpoint's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Runs the endpoint on its own thread: accepts until `drain`, keeps the
    /// connections' packets flowing until `stop`, then closes.
    pub fn spawn(
        self,
        shards: Vec<mpsc::Sender<Handoff>>,
        admission: Admission,
        handshake_timeout: Duration,
        drain: CancellationToken,
        stop: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let Self { endpoint, runtime } = self;
        std::thread::Builder::new().name("confab-quic".into()).spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = accept(&endpoint, &shards, &admission, handshake_timeout) => {}
                    () = drain.cancelled() => {}
                }
                endpoint.set_server_config(None);
                stop.cancelled().await;
                endpoint.close(close_code(Closed::ShuttingDown), b"server shutting down");
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
            });
        })
    }
}

/// The endpoint's UDP socket, with large buffers where the kernel allows.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    if let Err(err) = socket
        .set_recv_buffer_size(UDP_BUFFER_BYTES)
        .and_then(|()| socket.set_send_buffer_size(UDP_BUFFER_BYTES))
    {
        tracing::warn!(error = %err, "could not enlarge the QUIC socket buffers");
    }
    if let Ok(size) = socket.recv_buffer_size()
        && size < UDP_BUFFER_BYTES
    {
        tracing::info!(
            bytes = size,
            "QUIC receive buffer capped by the kernel; raise net.core.rmem_max for large bursts"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn server_config(identity: &Identity, idle_timeout: Duration) -> std::io::Result<quinn::ServerConfig> {
    let tls = identity.quic_config().map_err(std::io::Error::other)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(std::io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let transport = Arc::get_mut(&mut config.transport).ok_or_else(|| std::io::Error::other("shared config"))?;
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(idle_timeout.try_into().map_err(std::io::Error::other)?))
        .send_window(SEND_WINDOW_BYTES);
    Ok(config)
}

async fn accept(
    endpoint: &Endpoint,
    shards: &[mpsc::Sender<Handoff>],
    admission: &Admission,
    handshake_timeout: Duration,
) {
    let mut next_shard = 0;
    while let Some(incoming) = endpoint.accept().await {
        let permit = match admission.admit(incoming.remote_address().ip(), std::time::Instant::now()) {
            Ok(permit) => permit,
            Err(refused) => {
                tracing::debug!(peer = %incoming.remote_address(), reason = refused.reason(), "refusing a QUIC connection");
                incoming.refuse();
                continue;
            }
        };
        let Some(shard) = shards.get(next_shard % shards.len().max(1)).cloned() else {
            return;
        };
        next_shard = next_shard.wrapping_add(1);
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            match tokio::time::timeout(handshake_timeout, open_session(incoming, permit)).await {
                Ok(Ok(handoff)) => {
                    if shard.send(handoff).await.is_err() {
                        tracing::debug!(%peer, "shard gone; dropping QUIC connection");
                    }
                }
                Ok(Err(err)) => tracing::info!(%peer, error = %err, "QUIC connection failed before its session stream"),
                Err(_) => tracing::info!(%peer, "QUIC handshake or session stream timed out"),
            }
        });
    }
}

/// Accepts the connection (with 0.5-RTT, so early data is read at once) and its
/// session stream.
async fn open_session(incoming: quinn::Incoming, permit: Permit) -> Result<Handoff, quinn::ConnectionError> {
    let connecting = incoming.accept()?;
    let (connection, handshake_done) = match connecting.into_0rtt() {
        Ok((connection, handshake_done)) => (connection, Some(handshake_done)),
        Err(connecting) => (connecting.await?, None),
    };
    let (send, recv) = connection.accept_bi().await?;
    Ok(Handoff {
        connection,
        send,
        recv,
        handshake_done,
        permit,
    })
}

/// Runs a shard's share of QUIC sessions until the shard drains.
pub async fn serve_handoffs<H: Handler>(context: Rc<Context<H>>, mut handoffs: mpsc::Receiver<Handoff>) {
    loop {
        let handoff = tokio::select! {
            handoff = handoffs.recv() => match handoff {
                Some(handoff) => handoff,
                None => return,
            },
            () = context.drain.cancelled() => return,
        };
        context.spawn_connection(serve(context.clone(), handoff));
    }
}

async fn serve<H: Handler>(context: Rc<Context<H>>, handoff: Handoff) {
    let Handoff {
        connection,
        mut send,
        recv,
        handshake_done,
        permit: _permit,
    } = handoff;
    let peer = connection.remote_address();
    let handshake_done = handshake_done.map(|done| done.shared());
    if let Some(done) = handshake_done.clone() {
        tokio::spawn(close_unless_handshaken(
            connection.clone(),
            done,
            context.handshake_timeout,
        ));
    }
    let source = QuicFrames {
        frames: StreamFrames::new(Chunks(recv), context.max_frame_bytes),
        early: match handshake_done {
            Some(done) => Early::Until(done),
            None => Early::Over,
        },
        connection: connection.clone(),
    };
    let closed = run_connection(context, source, peer, |queued: Outbound| async move {
        if write_frames(&mut send, &queued).await.is_ok() && send.finish().is_ok() {
            // Wait until the peer has everything before the connection closes.
            let _ = send.stopped().await;
        }
    })
    .await;
    connection.close(close_code(closed), b"");
}

/// Closes a connection taken with 0-RTT whose handshake has not completed by
/// `limit`. Its session started on the early data alone, and a replay of
/// someone's captured first flight never completes the handshake: without
/// this, each replayed datagram would hold a session (and an admission permit)
/// until the idle timeout.
async fn close_unless_handshaken(connection: Connection, done: Shared<ZeroRttAccepted>, limit: Duration) {
    if tokio::time::timeout(limit, done).await.is_err() {
        tracing::info!(peer = %connection.remote_address(), "QUIC handshake not completed in time; closing");
        connection.close(close_code(Closed::Timeout), b"handshake timeout");
    }
}

/// Frames from the session stream, screening 0-RTT frames.
struct QuicFrames {
    frames: StreamFrames<Chunks>,
    early: Early,
    connection: quinn::Connection,
}

/// The session stream, read in the chunks quinn already holds: an idle
/// connection waits with no read buffer of ours, and a chunk is copied once,
/// straight into the frame buffer.
struct Chunks(RecvStream);

impl ByteSource for Chunks {
    async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        loop {
            match self.0.read_chunk(usize::MAX, true).await? {
                None => return Ok(0),
                Some(chunk) if chunk.bytes.is_empty() => continue,
                Some(chunk) => {
                    buf.extend_from_slice(&chunk.bytes);
                    return Ok(chunk.bytes.len());
                }
            }
        }
    }
}

/// Whether a frame read now may be 0-RTT data, which an attacker can replay.
enum Early {
    /// Until the handshake completes.
    Until(Shared<ZeroRttAccepted>),
    /// The handshake completed: the peer holds the keys, so what it sent, early
    /// or not, is its own and not a replay (a replay never completes one).
    Over,
    /// The connection ended before its handshake completed (as a replay's
    /// does): everything still buffered stays early.
    ForGood,
}

impl Early {
    /// Once the handshake future has resolved, on a connection that has (not)
    /// ended.
    fn settled(connection_ended: bool) -> Self {
        match connection_ended {
            true => Self::ForGood,
            false => Self::Over,
        }
    }
}

impl FrameSource for QuicFrames {
    async fn next(&mut self) -> Result<Option<Inbound>, ReadError> {
        let inbound = self.frames.next().await?;
        if let Early::Until(handshake_done) = &mut self.early {
            // It also resolves when the connection is lost before the handshake.
            if handshake_done.now_or_never().is_some() {
                self.early = Early::settled(self.connection.close_reason().is_some());
            }
        }
        Ok(match inbound {
            Some(Inbound::Frame(payload)) if !matches!(self.early, Early::Over) => Some(Inbound::Early(payload)),
            inbound => inbound,
        })
    }
}

/// The QUIC application close code for why a session ended.
pub fn close_code(closed: Closed) -> VarInt {
    VarInt::from_u32(match closed {
        Closed::PeerClosed => 0,
        Closed::ShuttingDown => 1,
        Closed::Violation => 2,
        Closed::UnsupportedData => 3,
        Closed::TooLarge => 4,
        Closed::Timeout | Closed::Kicked | Closed::SlowConsumer => 5,
        Closed::TransportError => 6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that ended before its handshake completed (a replay of
    /// someone's 0-RTT data does) keeps screening what it still has buffered.
    #[test]
    fn early_data_of_a_connection_that_never_completed_stays_early() {
        assert!(matches!(Early::settled(true), Early::ForGood));
        assert!(matches!(Early::settled(false), Early::Over));
    }
}
