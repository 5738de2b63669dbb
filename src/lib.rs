//! confab: a real-time chat server.
//!
//! Thread-per-core shards own their connections; one protocol (length-prefixed
//! protobuf frames) is shared by every transport; messages are durable before they
//! are acknowledged. See `docs/PROTOCOL.md` for the wire contract and
//! `docs/ARCHITECTURE.md` for the parts and which may depend on which.
//!
//! The parts, from the wire inwards:
//! - [`transport`]: TCP (optionally TLS), WebSocket and QUIC; bytes in, frames
//!   out. Hands each framed connection to its shard; never imports it.
//! - `confab-protocol` (a crate of its own): the sans-IO session state machine
//!   that turns frames into typed commands, and the values they carry.
//! - [`shard`]: pinned single-threaded runtimes, each driving its connections'
//!   sessions and executing their commands; the cross-shard mesh; the roles a
//!   shard plays (conversation owner, session directory, presence home).
//! - [`chat`]: the chat rules (sequencing, membership, history, sync, groups,
//!   presence) as types and functions over the store, clock passed in.
//! - [`auth`]: accounts, passwords, tokens, devices.
//! - [`store`]: durable state behind one trait, embedded (fjall) or Cassandra.
//! - [`cluster`]: cluster mode's membership over Redis (docs/CLUSTER.md).
//! - [`server`] assembles a node from [`config`]; [`metrics`] serves its stage
//!   timings; [`clock`] and [`files`] are small helpers.

#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod chat;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod files;
pub mod http;
pub mod metrics;
pub mod push;
pub mod server;
pub mod shard;
pub mod store;
pub mod transport;

pub use config::Config;
pub use server::{Server, StartError};
