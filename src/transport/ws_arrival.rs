//! Hands WebSocket input to tungstenite one whole frame at a time.
//!
//! tungstenite reserves a frame's full claimed length as soon as it has parsed the
//! frame's header. A peer that sends 14 header bytes claiming 256 KiB and nothing
//! more would cost 256 KiB of memory per connection. [`ArrivedFrames`] sits
//! between the socket and tungstenite: it passes the HTTP upgrade request through
//! as it comes, then holds each frame back (header included) until its whole
//! payload has arrived, growing its own buffer in steps with the bytes that
//! actually arrive. A frame larger than `max_frame_bytes` is passed on at once:
//! tungstenite refuses it from its header (close 1009) before reserving anything.
//!
//! Its buffer is released whenever it empties, so an idle connection holds none.

use bytes::{Buf as _, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Room added to the buffer when it runs low while a frame arrives.
const GROWTH_BYTES: usize = 4096;
/// Bytes read onto the stack when nothing is pending.
const FIRST_READ_BYTES: usize = 2048;
/// The end of an HTTP request's header.
const END_OF_REQUEST: &[u8] = b"\r\n\r\n";

/// A stream that releases WebSocket frames to its reader only once they arrived whole.
#[derive(Debug)]
pub(super) struct ArrivedFrames<S> {
    inner: S,
    /// Bytes read from `inner` and not yet handed on.
    pending: BytesMut,
    state: State,
    max_frame_bytes: u64,
    /// `inner` reached its end.
    eof: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Still in the HTTP upgrade request: `matched` bytes of its end seen.
    Request { matched: usize },
    /// At a frame boundary.
    Header,
    /// This many bytes of a released frame are still to hand on.
    Frame { remaining: u64 },
}

impl<S> ArrivedFrames<S> {
    pub(super) fn new(inner: S, max_frame_bytes: usize) -> Self {
        Self {
            inner,
            pending: BytesMut::new(),
            state: State::Request { matched: 0 },
            max_frame_bytes: max_frame_bytes as u64,
            eof: false,
        }
    }
}

/// The total size (header and payload) of the frame at the front of `bytes`, or
/// `None` while its header is incomplete.
fn frame_size(bytes: &[u8]) -> Option<(u64, u64)> {
    let (&first_two, rest) = bytes.split_first_chunk::<2>()?;
    let masked = first_two[1] & 0x80 != 0;
    let (payload, length_bytes) = match first_two[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes(*rest.first_chunk::<2>()?)), 2),
        127 => (u64::from_be_bytes(*rest.first_chunk::<8>()?), 8),
        short => (u64::from(short), 0),
    };
    let header = 2 + length_bytes + if masked { 4 } else { 0 };
    (bytes.len() >= header).then_some((header as u64, payload))
}

impl<S: AsyncRead + Unpin> ArrivedFrames<S> {
    /// Reads more of `inner` into `pending`, growing it in steps. With nothing
    /// pending it reads onto the stack first, so waiting holds no buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            let mut chunk = [0u8; FIRST_READ_BYTES];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
            self.eof = read.filled().is_empty();
            self.pending.extend_from_slice(read.filled());
            return Poll::Ready(Ok(()));
        }
        if self.pending.capacity() - self.pending.len() < GROWTH_BYTES / 4 {
            self.pending.reserve(GROWTH_BYTES);
        }
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.inner),
            cx,
            &mut self.pending
        ))?;
        self.eof = read == 0;
        Poll::Ready(Ok(()))
    }

    /// How many bytes (at most `limit`) at the front of `pending` may be handed on
    /// now, accounted for in the state; `None` when more must be read first.
    fn release(&mut self, limit: usize) -> Option<usize> {
        loop {
            match self.state {
                State::Request { mut matched } => {
                    let scanned = self.pending.len().min(limit);
                    for (index, byte) in self.pending[..scanned].iter().enumerate() {
                        matched = match (*byte == END_OF_REQUEST[matched], *byte == END_OF_REQUEST[0]) {
                            (true, _) => matched + 1,
                            (false, true) => 1,
                            (false, false) => 0,
                        };
                        if matched == END_OF_REQUEST.len() {
                            self.state = State::Header;
                            return Some(index + 1);
                        }
                    }
                    self.state = State::Request { matched };
                    return (scanned > 0).then_some(scanned);
                }
                State::Frame { remaining: 0 } => self.state = State::Header,
                State::Frame { remaining } => {
                    let count = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.pending.len())
                        .min(limit);
                    if count == 0 {
                        return None;
                    }
                    self.state = State::Frame {
                        remaining: remaining - count as u64,
                    };
                    return Some(count);
                }
                State::Header => {
                    let (header, payload) = frame_size(&self.pending)?;
                    let total = header.saturating_add(payload);
                    let arrived = self.pending.len() as u64 >= total;
                    if !arrived && payload <= self.max_frame_bytes {
                        return None;
                    }
                    self.state = State::Frame { remaining: total };
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ArrivedFrames<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(count) = this.release(out.remaining()) {
                out.put_slice(&this.pending[..count]);
                this.pending.advance(count);
                if this.pending.is_empty() {
                    this.pending = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // The peer ended mid-frame: hand on what there is; the reader
                // sees a truncated frame and fails.
                let count = this.pending.len().min(out.remaining());
                out.put_slice(&this.pending[..count]);
                this.pending.advance(count);
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ArrivedFrames<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const REQUEST: &[u8] = b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n";

    /// A masked binary frame with `payload`.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0x82];
        match payload.len() {
            len @ 0..=125 => bytes.push(0x80 | len as u8),
            len @ 126..=65535 => {
                bytes.push(0x80 | 126);
                bytes.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                bytes.push(0x80 | 127);
                bytes.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        bytes.extend_from_slice(payload);
        bytes
    }

    /// Everything readable now, without waiting for more.
    async fn read_now<S: AsyncRead + Unpin>(reader: &mut ArrivedFrames<S>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 1024];
        while let Ok(Ok(count)) =
            tokio::time::timeout(std::time::Duration::from_millis(20), reader.read(&mut chunk)).await
        {
            if count == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..count]);
        }
        out
    }

    #[tokio::test]
    async fn the_request_and_whole_frames_pass_through_unchanged() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = ArrivedFrames::new(server, 256 * 1024);
        let mut sent = REQUEST.to_vec();
        sent.extend(frame(b"hello"));
        sent.extend(frame(&[7u8; 300]));
        sent.extend(frame(&[9u8; 70_000]));
        client.write_all(&sent).await.unwrap();
        assert_eq!(read_now(&mut reader).await, sent);
    }

    #[tokio::test]
    async fn a_claimed_frame_is_held_and_costs_only_what_arrived() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = ArrivedFrames::new(server, 256 * 1024);
        let big = frame(&[1u8; 200_000]);
        client.write_all(REQUEST).await.unwrap();
        client.write_all(&big[..15]).await.unwrap();
        assert_eq!(read_now(&mut reader).await, REQUEST, "the header waits for its payload");
        assert!(reader.pending.capacity() < 8 * 1024, "{}", reader.pending.capacity());
        client.write_all(&big[15..]).await.unwrap();
        assert_eq!(read_now(&mut reader).await, big);
        assert_eq!(reader.pending.capacity(), 0, "an idle connection holds no buffer");
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_goes_on_at_once_to_be_refused() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = ArrivedFrames::new(server, 1024);
        let header = &frame(&[0u8; 2000])[..8];
        client.write_all(REQUEST).await.unwrap();
        client.write_all(header).await.unwrap();
        let mut expected = REQUEST.to_vec();
        expected.extend_from_slice(header);
        assert_eq!(read_now(&mut reader).await, expected);
    }

    #[test]
    fn header_sizes() {
        assert_eq!(frame_size(&[0x82]), None);
        assert_eq!(frame_size(&[0x82, 0x85, 0, 0, 0]), None, "mask incomplete");
        assert_eq!(frame_size(&[0x82, 0x85, 0, 0, 0, 0]), Some((6, 5)));
        assert_eq!(frame_size(&[0x82, 0xfe, 1, 0, 0, 0, 0, 0]), Some((8, 256)));
        let mut long = vec![0x82, 0x7f];
        long.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(frame_size(&long), Some((10, u64::MAX)), "unmasked");
    }
}
