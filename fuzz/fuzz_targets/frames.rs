//! The length-prefix frame splitter and `ClientFrame` decoding, on input that
//! arrives in arbitrary pieces: never a panic, never a frame above the limit,
//! never more buffered than arrived.
#![no_main]

use bytes::{BufMut as _, BytesMut};
use confab_proto::FrameDecoder;
use confab_proto::v1::ClientFrame;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

const MAX_FRAME_BYTES: usize = 4096;

fuzz_target!(|input: &[u8]| {
    // The first byte picks the size of the pieces the rest arrives in.
    let Some((&piece, rest)) = input.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let decoder = FrameDecoder::new(MAX_FRAME_BYTES);
    let mut buf = BytesMut::new();
    let mut arrived = 0;
    for chunk in rest.chunks(piece) {
        buf.put_slice(chunk);
        arrived += chunk.len();
        loop {
            match decoder.split_payload(&mut buf) {
                Ok(Some(payload)) => {
                    assert!(payload.len() <= MAX_FRAME_BYTES);
                    let _ = ClientFrame::decode(payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.len() <= arrived);
    }
});
