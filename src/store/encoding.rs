//! How a message is stored as bytes, shared by the backends: a small protobuf
//! record (prost) of everything but its conversation and seq, which are the key.
//! A user's pending notifications are stored the same way.

use super::{Amendment, GroupEvent, MessageRecord, PendingConversation, PendingPush, StoreError};
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StoredMessage {
    #[prost(uint64, tag = "1")]
    pub(crate) sender: u64,
    #[prost(uint64, tag = "2")]
    pub(crate) sender_device: u64,
    #[prost(string, tag = "3")]
    pub(crate) client_msg_id: String,
    #[prost(string, tag = "4")]
    pub(crate) body: String,
    #[prost(uint64, tag = "5")]
    pub(crate) server_time_ms: u64,
    #[prost(message, optional, tag = "6")]
    pub(crate) event: Option<confab_proto::v1::GroupEvent>,
    /// Seq of the message this one edits (0: none).
    #[prost(uint64, tag = "7")]
    pub(crate) edits: u64,
    /// Seq of the message this one deletes (0: none).
    #[prost(uint64, tag = "8")]
    pub(crate) deletes: u64,
    #[prost(bool, tag = "9")]
    pub(crate) deleted: bool,
    #[prost(uint64, tag = "10")]
    pub(crate) edited_by: u64,
    /// For an edit: the edit of the same message before it (0: the first), so a
    /// delete finds every edit's text to remove.
    #[prost(uint64, tag = "11")]
    pub(crate) previous_edit: u64,
}

/// Only the time of a [`StoredMessage`]: decoding it skips the other fields
/// without copying them (for a conversation's head, where the body is not needed).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StoredTime {
    #[prost(uint64, tag = "5")]
    pub(crate) server_time_ms: u64,
}

impl StoredMessage {
    pub(crate) fn of(message: &MessageRecord) -> Self {
        let (edits, deletes) = match message.amends {
            Some(Amendment::Edit(target)) => (target, 0),
            Some(Amendment::Delete(target)) => (0, target),
            None => (0, 0),
        };
        Self {
            sender: message.sender.get(),
            sender_device: message.sender_device.get(),
            client_msg_id: message.client_msg_id.clone(),
            body: message.body.clone(),
            server_time_ms: message.server_time_ms,
            event: message.event.as_ref().map(confab_proto::v1::GroupEvent::from),
            edits,
            deletes,
            deleted: message.deleted,
            edited_by: message.edited_by.unwrap_or(0),
            previous_edit: 0,
        }
    }

    pub(crate) fn into_record(self, conversation: ConversationId, seq: Seq) -> Result<MessageRecord, StoreError> {
        Ok(MessageRecord {
            conversation,
            seq,
            sender: UserId::new(self.sender).ok_or_else(|| StoreError::corrupt("message sender is 0"))?,
            sender_device: DeviceId::new(self.sender_device)
                .ok_or_else(|| StoreError::corrupt("message sender device is 0"))?,
            client_msg_id: self.client_msg_id,
            body: self.body,
            server_time_ms: self.server_time_ms,
            event: match self.event {
                None => None,
                Some(event) => {
                    Some(GroupEvent::from_proto(event).ok_or_else(|| StoreError::corrupt("invalid group event"))?)
                }
            },
            amends: match (self.edits, self.deletes) {
                (0, 0) => None,
                (edits, 0) => Some(Amendment::Edit(edits)),
                (_, deletes) => Some(Amendment::Delete(deletes)),
            },
            deleted: self.deleted,
            edited_by: (self.edited_by != 0).then_some(self.edited_by),
        })
    }
}

/// Edits of one message a delete follows back at most (a message is edited once
/// per request, so a longer chain would be a corrupt record, not a real history).
pub(crate) const MAX_EDIT_CHAIN: usize = 100_000;

impl StoredMessage {
    /// Applies an edit or delete sent as `amendment_message` to this, its target,
    /// so history shows the current state. Returns the target's latest edit
    /// before it (0: none): an edit records it as its `previous_edit`; a delete
    /// must [`redact`](Self::redact) it and every edit before it, since an edit
    /// carries the text too.
    pub(crate) fn amend(&mut self, amendment_message: &MessageRecord, amendment: Amendment) -> Seq {
        let previous_edit = self.edited_by;
        match amendment {
            Amendment::Edit(_) => {
                self.body.clone_from(&amendment_message.body);
                self.edited_by = amendment_message.seq;
            }
            Amendment::Delete(_) => {
                self.body.clear();
                self.deleted = true;
            }
        }
        previous_edit
    }

    /// Removes an edit's text, its target having been deleted; returns the edit
    /// before it (0: none).
    pub(crate) fn redact(&mut self) -> Seq {
        self.body.clear();
        self.deleted = true;
        self.previous_edit
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredPendingPush {
    #[prost(uint64, tag = "1")]
    since_ms: u64,
    #[prost(uint64, tag = "2")]
    count: u64,
    #[prost(message, repeated, tag = "3")]
    conversations: Vec<StoredPendingConversation>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredPendingConversation {
    #[prost(string, tag = "1")]
    conversation: String,
    #[prost(uint64, tag = "2")]
    count: u64,
    #[prost(uint64, tag = "3")]
    last_seq: u64,
    #[prost(uint64, tag = "4")]
    sender: u64,
    #[prost(string, tag = "5")]
    body: String,
}

/// A pending push as stored.
pub(crate) fn encode_pending_push(pending: &PendingPush) -> Vec<u8> {
    use prost::Message as _;
    StoredPendingPush {
        since_ms: pending.since_ms,
        count: pending.count,
        conversations: pending
            .conversations
            .iter()
            .map(|conversation| StoredPendingConversation {
                conversation: conversation.conversation.to_string(),
                count: conversation.count,
                last_seq: conversation.last_seq,
                sender: conversation.sender.get(),
                body: conversation.body.clone(),
            })
            .collect(),
    }
    .encode_to_vec()
}

/// A stored pending push.
pub(crate) fn decode_pending_push(bytes: &[u8]) -> Result<PendingPush, StoreError> {
    use prost::Message as _;
    let stored = StoredPendingPush::decode(bytes)
        .map_err(|err| StoreError::corrupt_because("a pending push does not decode", err))?;
    let conversations = stored
        .conversations
        .into_iter()
        .map(|conversation| {
            Ok(PendingConversation {
                conversation: ConversationId::parse(&conversation.conversation)
                    .map_err(|_| StoreError::corrupt("a pending push's conversation"))?,
                count: conversation.count,
                last_seq: conversation.last_seq,
                sender: UserId::new(conversation.sender)
                    .ok_or_else(|| StoreError::corrupt("a pending push's sender is 0"))?,
                body: conversation.body,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(PendingPush {
        since_ms: stored.since_ms,
        count: stored.count,
        conversations,
    })
}
