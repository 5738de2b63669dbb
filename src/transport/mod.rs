//! Transports: bytes in, frames out. Nothing here knows about chat; each transport
//! adapts its sockets to [`crate::shard::FrameSource`] plus an outbound queue of
//! encoded frames, and hands both to the shard's shared connection driver.

pub mod tcp;
