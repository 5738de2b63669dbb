//! The protocol core, sans-IO: it turns decoded client frames into typed commands
//! and replies, tracks the handshake/authentication state and heartbeat deadlines of
//! one connection, and never touches a socket or reads a clock (time is passed in).
//! Transports feed it frames; the shard's connection driver executes its commands.

mod command;
mod rate;
mod reply;
mod session;

pub use command::{Command, Request};
pub use rate::{Rate, TokenBucket};
pub use reply::{ErrorKind, error_frame, push_frame};
pub use session::{Session, SessionLimits, Step, encode_page_token};

pub use confab_proto::v1::ErrorCode;
