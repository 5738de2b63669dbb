//! TCP: one SO_REUSEPORT listener per shard on the same address, so the kernel
//! spreads connections across shards; length-prefixed frames on the stream,
//! inside TLS when `[tls]` is on.
//!
//! Plain TCP has its own reader: an idle connection waits for readiness with no
//! read buffer at all, which keeps an idle connection near 1.5 KB. Under TLS,
//! rustls keeps its own buffers and the generic [`StreamFrames`] reader is used.

use super::admission::{Permit, Refused};
use super::connection::{Context, FrameSource, Handler, Inbound, ReadError, run_connection};
use super::stream::{READ_CHUNK_BYTES, StreamFrames, write_then_shutdown};
use bytes::BytesMut;
use confab_proto::FrameDecoder;
use std::net::SocketAddr;
use std::rc::Rc;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

/// Serves one accepted TCP connection, after a TLS handshake if TLS is on.
pub async fn serve<H: Handler>(context: Rc<Context<H>>, stream: TcpStream, peer: SocketAddr, _permit: Permit) {
    let max_frame_bytes = context.max_frame_bytes;
    let Some(tls) = context.tls.clone() else {
        let (read, write) = stream.into_split();
        let source = TcpFrames {
            read,
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(max_frame_bytes),
        };
        run_connection(context, source, peer, |queued| write_then_shutdown(write, queued)).await;
        return;
    };
    // Boxed: the TLS handshake's and stream's state would otherwise size every
    // plain connection's task too, for as long as it lives.
    Box::pin(serve_tls(context, tls, stream, peer)).await;
}

async fn serve_tls<H: Handler>(
    context: Rc<Context<H>>,
    tls: std::sync::Arc<rustls::ServerConfig>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let Some(stream) = super::tls::accept(&tls, stream, peer, context.handshake_timeout).await else {
        return;
    };
    let (read, write) = tokio::io::split(stream);
    let source = StreamFrames::new(read, context.max_frame_bytes);
    run_connection(context, source, peer, |queued| write_then_shutdown(write, queued)).await;
}

/// Tells a refused connection why in an `Error` frame (best effort, never
/// waiting); under TLS there is no handshake yet to say it in, so it is just closed.
pub fn refuse<H>(context: &Context<H>, stream: &TcpStream, refused: Refused) {
    if context.tls.is_none() {
        let _ = stream.try_write(&confab_proto::encode_frame(&refusal_frame(refused)));
    }
}

/// The `Error` a refused connection gets: RATE_LIMITED when its address holds too
/// many, UNAVAILABLE when the node does.
pub fn refusal_frame(refused: Refused) -> confab_proto::v1::ServerFrame {
    let code = match refused {
        refused if refused.is_address() => confab_protocol::ErrorCode::RateLimited,
        _ => confab_protocol::ErrorCode::Unavailable,
    };
    confab_protocol::error_frame(0, code, refused.reason())
}

/// Splits length-prefixed frames off a plain TCP read half.
struct TcpFrames {
    read: OwnedReadHalf,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl TcpFrames {
    /// A read that did not fill the buffer emptied the socket: forget its
    /// readiness now (as tokio's own `poll_read` does on epoll) instead of
    /// learning it from one more read that only says `WouldBlock` — which was
    /// every other `recvfrom` of a busy connection. Bytes arriving after that
    /// read raise a new edge-triggered event.
    fn drained(&self) {
        let _ = self.read.as_ref().try_io(Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
    }
}

impl FrameSource for TcpFrames {
    /// An idle connection holds no read buffer: it waits for readiness, and a
    /// buffer exists only while bytes of a frame are pending. Cancel-safe: bytes
    /// read stay in `buf`.
    async fn next(&mut self) -> Result<Option<Inbound>, ReadError> {
        loop {
            if let Some(payload) = self.decoder.split_payload(&mut self.buf)? {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                return Ok(Some(Inbound::Frame(payload)));
            }
            if self.buf.is_empty() {
                self.read.readable().await?;
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK_BYTES / 4 {
                self.buf.reserve(READ_CHUNK_BYTES);
            }
            let spare = self.buf.capacity() - self.buf.len();
            match self.read.try_read_buf(&mut self.buf) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(read) if read < spare => self.drained(),
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    self.read.readable().await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
}
