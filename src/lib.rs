//! confab: a real-time chat server.
//!
//! Thread-per-core shards own their connections; one protocol (length-prefixed
//! protobuf frames) is shared by every transport; messages are durable before they
//! are acknowledged. See `docs/PROTOCOL.md` for the wire contract.

/// Accounts: argon2id passwords, HMAC access tokens, refresh tokens, devices.
pub mod auth;
/// Conversations, gap-free sequencing and message frames: the chat domain.
pub mod chat;
/// Wall-clock helpers in protocol units.
pub mod clock;
/// Typed configuration, layered from defaults, a file and the environment.
pub mod config;
/// The data dir's private files (0700 dir, 0600 secrets).
pub mod files;
/// Stage timings, queue depths and store health, served for Prometheus.
pub mod metrics;
/// Node assembly and lifecycle.
pub mod server;
/// Pinned single-threaded runtimes, the cross-shard mesh, connection driving.
pub mod shard;
/// Durable storage: the `Store` trait and the embedded backend.
pub mod store;
/// Transports: TCP today; bytes in, frames out.
pub mod transport;

pub use config::Config;
pub use server::{Server, StartError};
