//! Transports: bytes in, frames out. Nothing here knows about chat or imports the
//! shard; each transport adapts its sockets to a [`FrameSource`] plus an
//! [`Outbound`] queue of encoded frames, and hands both to its shard through
//! [`Handler::run`] (see [`connection`]).
//!
//! - [`connection`]: the hand-off, the narrow [`Context`] a transport gets, why a
//!   connection ended ([`Closed`]).
//! - [`outbound`]: a connection's bounded queue of frames to write.
//! - [`tcp`]: length-prefixed frames on TCP, optionally inside TLS.
//! - [`ws`]: one frame per binary WebSocket message (browsers), optionally WSS;
//!   [`ws_arrival`] holds its input back until each frame has arrived.
//! - [`quic`]: length-prefixed frames on one bidirectional QUIC stream.
//! - [`stream`]: framing shared by every byte-stream transport.
//! - [`tls`]: certificates and rustls configs.

pub mod admission;
pub mod connection;
pub mod outbound;
pub mod quic;
pub mod stream;
pub mod tcp;
pub mod tls;
pub mod ws;
mod ws_arrival;

pub use connection::{Closed, Context, FrameSource, Handler, Inbound, Parts, ReadError};
pub use outbound::{AddressShare, Bounds, Outbound};

use admission::{Permit, Refused};
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::net::TcpStream;

const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking listener with SO_REUSEPORT set, so every shard can bind `addr`.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A runtime of its own and a listener on `addr` registered with it, for the
/// side listeners that run on a thread apart from the shards (metrics, API).
pub fn listener_with_runtime(addr: SocketAddr) -> std::io::Result<(tokio::runtime::Runtime, tokio::net::TcpListener)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let listener = {
        let _entered = runtime.enter();
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)?
    };
    Ok((runtime, listener))
}

/// How often at most a shard logs refused connections (a flood would flood the log).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How a transport tells a connection it was refused, without waiting: a
/// best-effort write of a few bytes, or nothing.
pub type Refuse<H> = fn(&Context<H>, &TcpStream, Refused);

/// Accepts until the shard drains, handing each connection to `serve` as a task of
/// the shard. The loop only accepts: it accepts (with exponential backoff on
/// errors), takes a connection slot or refuses the connection at once (see
/// [`admission`]), and spawns; handshakes (TLS, WebSocket, protocol) happen in
/// the connection's task under its deadlines.
pub async fn accept_loop<H, F, Fut>(
    context: Rc<Context<H>>,
    listener: tokio::net::TcpListener,
    serve: F,
    refuse: Refuse<H>,
) where
    H: Handler,
    F: Fn(Rc<Context<H>>, TcpStream, SocketAddr, Permit) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let mut backoff = Duration::from_millis(5);
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = context.drain.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let permit = match context.admission.admit(peer.ip(), std::time::Instant::now()) {
                    Ok(permit) => permit,
                    Err(refused) => {
                        refuse(&context, &stream, refused);
                        refusals.record(peer, refused);
                        continue;
                    }
                };
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %err, "could not set TCP_NODELAY");
                }
                context.spawn_connection(serve(context.clone(), stream, peer, permit));
            }
            Err(err) => {
                // EMFILE/ENFILE despite the reserve (another part of the process
                // holds many files): wait for descriptors to come back.
                tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Logs refused connections at most once per [`REFUSAL_LOG_INTERVAL`], with how
/// many there were.
#[derive(Debug, Default)]
struct RefusalLog {
    since: Option<std::time::Instant>,
    count: u64,
}

impl RefusalLog {
    fn record(&mut self, peer: SocketAddr, refused: Refused) {
        self.count += 1;
        let now = std::time::Instant::now();
        if self
            .since
            .is_none_or(|since| now.duration_since(since) >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(%peer, refused = self.count, reason = refused.reason(), "refusing connections");
            self.since = Some(now);
            self.count = 0;
        }
    }
}
