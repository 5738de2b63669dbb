//! What the byte-stream transports share: length-prefixed framing on a byte
//! stream (TLS, QUIC; plain TCP has a leaner reader of its own) and a coalescing
//! frame writer.
//!
//! A stream read through `AsyncRead` (TLS) must be given room before bytes
//! arrive: while idle it waits with a small array inside the reading future, and
//! gets a heap chunk only once a frame is under way. One that hands out its own
//! buffers (a QUIC stream's chunks) implements [`ByteSource`] itself and holds
//! none.

use super::connection::{FrameSource, Inbound, ReadError};
use super::outbound::Outbound;
use bytes::BytesMut;
use confab_proto::FrameDecoder;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Bytes written to the socket in one call when frames are queued back to back.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Room a read buffer gets when bytes arrive.
pub const READ_CHUNK_BYTES: usize = 4096;

/// Where [`StreamFrames`] reads bytes from.
pub trait ByteSource {
    /// Appends the next bytes that arrive to `buf`; `Ok(0)` once the stream has
    /// ended. Must be cancel-safe: dropping the future loses no bytes.
    fn read_into(&mut self, buf: &mut BytesMut) -> impl Future<Output = std::io::Result<usize>>;
}

/// Room an `AsyncRead` stream waits for a frame's first bytes with: an array in
/// the reading future, not a heap chunk held for as long as the peer is quiet.
const FIRST_READ_BYTES: usize = 256;

impl<R: AsyncRead + Unpin> ByteSource for R {
    async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        if buf.is_empty() {
            let mut first = [0u8; FIRST_READ_BYTES];
            let read = self.read(&mut first).await?;
            buf.extend_from_slice(&first[..read]);
            return Ok(read);
        }
        if buf.capacity() - buf.len() < READ_CHUNK_BYTES / 4 {
            buf.reserve(READ_CHUNK_BYTES);
        }
        self.read_buf(buf).await
    }
}

/// Splits length-prefixed frames off any byte stream.
#[derive(Debug)]
pub struct StreamFrames<R> {
    read: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl<R> StreamFrames<R> {
    /// Frames read from `read`, each at most `max_frame_bytes`.
    pub fn new(read: R, max_frame_bytes: usize) -> Self {
        Self {
            read,
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(max_frame_bytes),
        }
    }
}

impl<R: ByteSource> FrameSource for StreamFrames<R> {
    /// Cancel-safe: bytes read stay in `buf`. The buffer is released whenever it
    /// empties, so between frames only the source may hold one.
    async fn next(&mut self) -> Result<Option<Inbound>, ReadError> {
        loop {
            if let Some(payload) = self.decoder.split_payload(&mut self.buf)? {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                return Ok(Some(Inbound::Frame(payload)));
            }
            match self.read.read_into(&mut self.buf).await? {
                0 if self.buf.is_empty() => return Ok(None),
                0 => return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                _ => {}
            }
        }
    }
}

/// Writes queued frames, coalescing back-to-back frames into one write, until the
/// queue closes and is empty. A failed write closes the queue, which ends the
/// connection. Between writes it holds no buffer.
pub async fn write_frames<W: AsyncWrite + Unpin>(write: &mut W, queued: &Outbound) -> std::io::Result<()> {
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
        if let Err(err) = result.and(write.flush().await) {
            queued.close();
            return Err(err);
        }
    }
    Ok(())
}

/// Writes queued frames until the queue closes, then shuts the write side down.
pub async fn write_then_shutdown<W: AsyncWrite + Unpin>(mut write: W, queued: Outbound) {
    if write_frames(&mut write, &queued).await.is_ok() {
        let _ = write.shutdown().await;
    }
}
