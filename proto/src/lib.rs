//! The confab wire protocol, version 1: the protobuf messages generated from
//! `proto/confab/v1/*.proto` and the length-prefixed frame codec shared by the server,
//! the Rust client and the load generator.
//!
//! This crate knows nothing about sockets or chat semantics.

pub mod codec;

/// Generated protobuf types of `confab.v1`.
#[allow(missing_debug_implementations, unreachable_pub, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/confab.v1.rs"));
}

/// Generated protobuf types of `confab.cluster.v1`: what the nodes of a
/// cluster send each other (never clients).
#[allow(missing_debug_implementations, unreachable_pub, clippy::all)]
pub mod cluster {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/confab.cluster.v1.rs"));
    }
}

pub use codec::{FrameDecoder, FrameError, LENGTH_PREFIX_BYTES, encode_frame};
pub use prost::Message as ProstMessage;
