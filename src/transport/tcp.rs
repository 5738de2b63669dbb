//! TCP: one SO_REUSEPORT listener per shard on the same address, so the kernel
//! spreads connections across shards; length-prefixed frames on the stream.
//!
//! The accept loop only accepts: it takes a connection-limit permit, accepts with
//! exponential backoff on errors, and spawns the connection task. Handshake and
//! authentication happen in that task, under the session's deadlines.

use crate::shard::{Ending, FrameSource, Outbound, ReadError, Shard};
use bytes::{Bytes, BytesMut};
use confab_proto::FrameDecoder;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Bytes written to the socket in one call when frames are queued back to back.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Room a read buffer gets when bytes arrive.
const READ_CHUNK_BYTES: usize = 4096;
/// How long a closing connection may take to flush what it has queued.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
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

/// Accepts until the shard drains.
pub async fn accept_loop(shard: Rc<Shard>, listener: tokio::net::TcpListener) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            permit = shard.connection_permit() => match permit {
                Some(permit) => permit,
                None => return,
            },
            () = shard.drain.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shard.drain.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %err, "could not set TCP_NODELAY");
                }
                shard.spawn_connection(serve(shard.clone(), stream, peer, permit));
            }
            Err(err) => {
                // Usually EMFILE/ENFILE: wait for connections to close.
                tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, _permit: tokio::sync::OwnedSemaphorePermit) {
    let (read, write) = stream.into_split();
    let outbound = Outbound::new(shard.config.protocol.outbound_queue_frames);
    let writer = tokio::task::spawn_local(write_frames(write, outbound.clone()));
    let source = TcpFrames {
        read,
        buf: BytesMut::new(),
        decoder: FrameDecoder::new(shard.limits.max_frame_bytes),
    };
    let ending = crate::shard::run_connection(shard, source, outbound.clone(), peer).await;
    // The writer flushes what is queued and exits, unless the peer stopped reading.
    outbound.close();
    let abort = writer.abort_handle();
    if ending == Ending::Discard {
        abort.abort();
    } else if tokio::time::timeout(FLUSH_TIMEOUT, writer).await.is_err() {
        tracing::debug!(%peer, "peer did not read its last frames; dropping them");
        abort.abort();
    }
}

/// Splits length-prefixed frames off a TCP read half.
struct TcpFrames {
    read: OwnedReadHalf,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl FrameSource for TcpFrames {
    /// An idle connection holds no read buffer: it waits for readiness, and a
    /// buffer exists only while bytes of a frame are pending. Cancel-safe: bytes
    /// read stay in `buf`.
    async fn next_frame(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some(payload) = self.decoder.split_payload(&mut self.buf)? {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                return Ok(Some(payload));
            }
            if self.buf.is_empty() {
                self.read.readable().await?;
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK_BYTES / 4 {
                self.buf.reserve(READ_CHUNK_BYTES);
            }
            match self.read.try_read_buf(&mut self.buf) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
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

/// Writes queued frames, coalescing back-to-back frames into one write, until the
/// queue closes; then shuts the write side down. A failed write closes the queue,
/// which ends the connection. Between writes it holds no buffer.
async fn write_frames(mut write: OwnedWriteHalf, queued: Outbound) {
    while let Some(frame) = queued.recv().await {
        let result = match queued.try_recv() {
            None => write.write_all(&frame).await,
            Some(next) => {
                let mut batch = BytesMut::with_capacity(WRITE_BATCH_BYTES);
                batch.extend_from_slice(&frame);
                batch.extend_from_slice(&next);
                while batch.len() < WRITE_BATCH_BYTES {
                    match queued.try_recv() {
                        Some(more) => batch.extend_from_slice(&more),
                        None => break,
                    }
                }
                write.write_all(&batch).await
            }
        };
        if result.is_err() {
            queued.close();
            return;
        }
    }
    let _ = write.shutdown().await;
}
