//! The chat domain: conversations, sequencing and the frames a message becomes.
//!
//! Nothing here knows about sockets or threads. The owner shard of a conversation
//! drives a [`Sequencer`] (gap-free sequence numbers, admission limits) and turns
//! each committed message into one encoded frame with [`message_frame`], which is
//! then fanned out as shared `Bytes`.

mod access;
mod group;
mod lookup;
mod presence;
mod reading;
mod sent;
mod sequencer;
mod signals;
mod sync;

pub use access::{Access, NOT_A_MEMBER, access};
pub use group::GroupState;
pub use lookup::{load_sent, lookup};
pub use presence::{Presence, PresenceTracker, Update};
pub use reading::{CatchUp, catch_up, history, list_conversations, members, raise_marks, sync};
pub use sequencer::{Admission, Assigned, Check, CheckResult, Outcome, Sequencer, SequencerLimits};
pub use signals::{ReceiptCoalescer, Signal};
pub use sync::{Plan, Planned, plan};

use crate::store::{Amendment, MessageRecord, StoreError};
use bytes::Bytes;
use confab_proto::v1::{self, server_frame};
use confab_protocol::{ErrorCode, ErrorKind, push_frame};

/// Why a chat request failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// No such user in this conversation.
    #[error("no such user in this conversation")]
    UnknownUser,
    /// ….
    #[error("{0}")]
    Forbidden(&'static str),
    /// ….
    #[error("{0}")]
    BadRequest(&'static str),
    /// A group has at most … members.
    #[error("a group has at most {max} members")]
    TooManyMembers {
        /// The most a group may have.
        max: usize,
    },
    /// The group already exists.
    #[error("the group already exists")]
    AlreadyExists,
    /// No such message.
    #[error("no such message")]
    UnknownMessage,
    /// The server is overloaded; retry later.
    #[error("the server is overloaded; retry later")]
    Overloaded,
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Refused by the node that sequences the conversation (cluster mode),
    /// or that node could not be reached.
    #[error("{message}")]
    Elsewhere {
        /// The code the client sees.
        code: ErrorCode,
        /// The text the client sees.
        message: String,
    },
    /// A `StoreError`, passed on.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ErrorKind for ChatError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownUser => ErrorCode::NotFound,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::TooManyMembers { .. } => ErrorCode::TooLarge,
            Self::AlreadyExists => ErrorCode::AlreadyExists,
            Self::UnknownMessage => ErrorCode::NotFound,
            Self::Overloaded | Self::ShuttingDown => ErrorCode::Unavailable,
            Self::Elsewhere { code, .. } => *code,
            Self::Store(err) => err.code(),
        }
    }
}

impl ErrorKind for StoreError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Unavailable { .. } | Self::HeldElsewhere { .. } => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }
}

/// What the sender hears back once its message is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendAck {
    /// The conversation.
    pub conversation: confab_protocol::ids::ConversationId,
    /// The message's seq.
    pub seq: confab_protocol::ids::Seq,
    /// When the owner sequenced it (Unix ms).
    pub server_time_ms: u64,
    /// The sender's idempotency key.
    pub client_msg_id: String,
}

impl SendAck {
    /// The ack of a stored message.
    pub fn of(record: &MessageRecord) -> Self {
        Self {
            conversation: record.conversation,
            seq: record.seq,
            server_time_ms: record.server_time_ms,
            client_msg_id: record.client_msg_id.clone(),
        }
    }

    /// Its protocol form.
    pub fn into_proto(self) -> v1::SendAck {
        v1::SendAck {
            conversation_id: self.conversation.to_string(),
            seq: self.seq,
            server_time_ms: self.server_time_ms,
            client_msg_id: self.client_msg_id,
        }
    }
}

/// The protocol form of a stored message.
pub fn message_proto(record: &MessageRecord) -> v1::Message {
    v1::Message {
        conversation_id: record.conversation.to_string(),
        seq: record.seq,
        sender_user_id: record.sender.get(),
        sender_device_id: record.sender_device.get(),
        client_msg_id: record.client_msg_id.clone(),
        body: record.body.clone(),
        server_time_ms: record.server_time_ms,
        event: record.event.as_ref().map(v1::GroupEvent::from),
        edits_seq: match record.amends {
            Some(Amendment::Edit(target)) => target,
            _ => 0,
        },
        deletes_seq: match record.amends {
            Some(Amendment::Delete(target)) => target,
            _ => 0,
        },
        deleted: record.deleted,
        edited_by_seq: record.edited_by.unwrap_or(0),
    }
}

/// The push frame of a message, encoded once for every recipient.
pub fn message_frame(record: &MessageRecord) -> Bytes {
    confab_proto::encode_frame(&push_frame(server_frame::Kind::Message(message_proto(record))))
}
