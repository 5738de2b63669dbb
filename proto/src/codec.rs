//! Length-prefixed frame codec: a 4-byte big-endian payload length, then the payload
//! (one protobuf message).
//!
//! Sans-IO: the decoder works on a caller-owned buffer. It checks the claimed length
//! against the limit *before* reserving room for it, so a peer cannot make us
//! allocate what it merely claims.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Size of the length prefix in front of every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix claims more than the negotiated maximum.
    #[error("frame of {claimed} bytes exceeds the limit of {max} bytes")]
    TooLarge { claimed: usize, max: usize },
    /// The payload is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// Splits whole frames off the front of a read buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame_bytes: usize,
}

impl FrameDecoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// Returns the payload of the first frame if it is wholly buffered, removing it
    /// (and its prefix) from `buf`. Returns `Ok(None)` when more bytes are needed.
    /// It never reserves room for the rest of a frame: a peer that claims a large
    /// frame and sends a few bytes of it costs only those bytes, and the reader
    /// grows the buffer in steps as the rest arrives.
    pub fn split_payload(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) else {
            return Ok(None);
        };
        let claimed = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if claimed > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                claimed,
                max: self.max_frame_bytes,
            });
        }
        if buf.len() < LENGTH_PREFIX_BYTES + claimed {
            return Ok(None);
        }
        buf.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(buf.split_to(claimed).freeze()))
    }

    /// Decodes the first whole frame in `buf` as `M`.
    pub fn decode<M: Message + Default>(&self, buf: &mut BytesMut) -> Result<Option<M>, FrameError> {
        match self.split_payload(buf)? {
            Some(payload) => Ok(Some(M::decode(payload)?)),
            None => Ok(None),
        }
    }
}

/// Encodes `message` as one frame (prefix + payload) into a fresh buffer.
///
/// The result is immutable and cheap to clone, so a frame fanned out to many
/// sessions is encoded once.
pub fn encode_frame<M: Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX_BYTES + len);
    encode_frame_into(message, &mut buf);
    buf.freeze()
}

/// Appends `message` as one frame to `buf`.
pub fn encode_frame_into<M: Message>(message: &M, buf: &mut BytesMut) {
    let len = message.encoded_len();
    // Frames are bounded far below 4 GiB by every configured limit.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    buf.reserve(len);
    message.encode_raw(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ClientFrame, Ping, client_frame};
    use proptest::prelude::*;

    fn ping(request_id: u64, nonce: u64) -> ClientFrame {
        ClientFrame {
            request_id,
            kind: Some(client_frame::Kind::Ping(Ping { nonce })),
        }
    }

    #[test]
    fn round_trip() {
        let decoder = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&encode_frame(&ping(7, 42))[..]);
        let frame: ClientFrame = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame, ping(7, 42));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let decoder = FrameDecoder::new(1024);
        let bytes = encode_frame(&ping(1, 2));
        let mut buf = BytesMut::new();
        for (i, byte) in bytes.iter().enumerate() {
            assert_eq!(decoder.decode::<ClientFrame>(&mut buf).unwrap(), None, "byte {i}");
            buf.put_u8(*byte);
        }
        assert_eq!(decoder.decode::<ClientFrame>(&mut buf).unwrap(), Some(ping(1, 2)));
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating() {
        let decoder = FrameDecoder::new(256 * 1024);
        let mut buf = BytesMut::with_capacity(8);
        buf.put_u32(u32::MAX);
        let capacity_before = buf.capacity();
        let err = decoder.split_payload(&mut buf).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                claimed: u32::MAX as usize,
                max: 256 * 1024
            }
        );
        assert_eq!(buf.capacity(), capacity_before, "must not reserve the claimed length");
    }

    #[test]
    fn a_claimed_length_reserves_nothing_before_the_bytes_arrive() {
        let decoder = FrameDecoder::new(256 * 1024);
        let mut buf = BytesMut::with_capacity(8);
        buf.put_u32(200 * 1024);
        buf.put_u8(0);
        let capacity_before = buf.capacity();
        assert_eq!(decoder.split_payload(&mut buf), Ok(None));
        assert_eq!(
            buf.capacity(),
            capacity_before,
            "room grows with what arrives, not with the claim"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let decoder = FrameDecoder::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decoder.decode::<ClientFrame>(&mut buf),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn back_to_back_frames_split_in_order() {
        let decoder = FrameDecoder::new(1024);
        let mut buf = BytesMut::new();
        for i in 0..5 {
            encode_frame_into(&ping(i, i * 10), &mut buf);
        }
        for i in 0..5 {
            assert_eq!(decoder.decode::<ClientFrame>(&mut buf).unwrap(), Some(ping(i, i * 10)));
        }
        assert_eq!(decoder.decode::<ClientFrame>(&mut buf).unwrap(), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let decoder = FrameDecoder::new(128);
            let mut buf = BytesMut::new();
            for chunk in chunks {
                buf.put_slice(&chunk);
                while let Ok(Some(_)) = decoder.decode::<ClientFrame>(&mut buf) {}
            }
        }

        #[test]
        fn any_split_point_round_trips(request_id: u64, nonce: u64, split in 0usize..64) {
            let decoder = FrameDecoder::new(1024);
            let bytes = encode_frame(&ping(request_id, nonce));
            let split = split.min(bytes.len());
            let mut buf = BytesMut::from(&bytes[..split]);
            if split < bytes.len() {
                prop_assert_eq!(decoder.decode::<ClientFrame>(&mut buf).unwrap(), None);
                buf.put_slice(&bytes[split..]);
            }
            prop_assert_eq!(decoder.decode::<ClientFrame>(&mut buf).unwrap(), Some(ping(request_id, nonce)));
        }
    }
}
