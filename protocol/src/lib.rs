//! confab's protocol core, sans-IO: it turns decoded client frames into typed
//! commands and replies, tracks one connection's handshake, authentication, rate
//! and heartbeat state, and never touches a socket or reads a clock (time is
//! passed in). Transports feed it frames; the server executes its commands.
//!
//! Like `quinn-proto`, it depends on neither an async runtime nor the store, so
//! it is tested by driving a [`Session`] with frames and instants alone. The
//! values commands carry (ids, usernames, appends, history ranges, marks,
//! cursors) live here and are shared by the server, the store and the client.

#![warn(missing_docs, unreachable_pub)]

pub mod ids;

mod command;
mod content;
mod credentials;
mod cursors;
mod history;
mod rate;
mod reply;
mod session;

pub use command::{Command, Request};
pub use content::{Append, Content, GroupCommand, Role, SendKey};
pub use credentials::{
    Identity, InvalidPassword, InvalidPushToken, InvalidSubject, InvalidUsername, Password, PushToken,
    TooLongDeviceName, Username, device_label, device_name, display_name,
};
pub use cursors::{Cursors, MalformedToken};
pub use history::{HistoryRange, Marks};
pub use rate::{Rate, TokenBucket};
pub use reply::{ErrorKind, error_frame, push_frame};
pub use session::{Rejection, Session, SessionLimits, Step, encode_page_token};

pub use confab_proto::v1::ErrorCode;
