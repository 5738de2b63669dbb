//! What a client asks to add to a conversation: messages, edits, deletes and
//! group changes, with the sender they come from.

use crate::ids::{ConversationId, DeviceId, Seq, UserId};
use confab_proto::v1;

/// Identifies one send of one device: what makes a retry a retry.
pub type SendKey = (DeviceId, String);

/// A message to append, as the sender's shard hands it to the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// Where it goes.
    pub conversation: ConversationId,
    /// Who sends it: the session's user.
    pub sender: UserId,
    /// From which of its devices.
    pub sender_device: DeviceId,
    /// The sender's idempotency key: a retry with the same key gets the same ack.
    pub client_msg_id: String,
    /// What it adds.
    pub content: Content,
}

/// What an append adds to its conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A message with this body.
    Text(String),
    /// A change to a group, sequenced as a system message.
    Group(GroupCommand),
    /// New body for an earlier message of the same sender.
    Edit {
        /// The message edited.
        target: Seq,
        /// Its new body.
        body: String,
    },
    /// Deletes an earlier message of the same sender.
    Delete {
        /// The message deleted.
        target: Seq,
    },
}

impl Content {
    /// Bytes of text it stores (what per-user storage limits count).
    pub fn text_bytes(&self) -> usize {
        match self {
            Self::Text(body) | Self::Edit { body, .. } => body.len(),
            Self::Group(_) | Self::Delete { .. } => 0,
        }
    }

    /// The earlier message this content changes.
    pub fn target(&self) -> Option<Seq> {
        match self {
            Self::Edit { target, .. } | Self::Delete { target } => Some(*target),
            Self::Text(_) | Self::Group(_) => None,
        }
    }
}

impl Append {
    /// What makes a retry of this append a retry.
    pub fn key(&self) -> SendKey {
        (self.sender_device, self.client_msg_id.clone())
    }
}

/// A change a member asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupCommand {
    /// A new group, owned by its creator.
    Create {
        /// Its title, trimmed.
        title: String,
        /// Its first members besides the creator.
        members: Vec<UserId>,
    },
    /// Adds these users.
    Add(Vec<UserId>),
    /// Removes this member.
    Remove(UserId),
    /// The sender leaves.
    Leave,
    /// A new title.
    Rename(String),
    /// Makes a member an admin, or an admin a plain member again.
    SetRole(UserId, Role),
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Sends, leaves, lists members.
    Member,
    /// Also adds members, renames, removes plain members.
    Admin,
    /// Also removes admins and sets roles; one per group.
    Owner,
}

impl From<Role> for v1::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::Member => Self::Member,
            Role::Admin => Self::Admin,
            Role::Owner => Self::Owner,
        }
    }
}

impl Role {
    /// The role a wire value names; `None` for unspecified or unknown values.
    pub fn from_proto(role: i32) -> Option<Self> {
        match v1::Role::try_from(role).ok()? {
            v1::Role::Member => Some(Self::Member),
            v1::Role::Admin => Some(Self::Admin),
            v1::Role::Owner => Some(Self::Owner),
            v1::Role::Unspecified => None,
        }
    }
}
