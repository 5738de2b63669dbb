//! The sender side of receipts and typing: checked against the conversation's
//! membership here, then handed to the conversation's owner, which coalesces
//! receipts and fans both out to the other members.

use super::{Shard, ShardMsg};
use crate::chat::{ChatError, Signal, access, raise_marks};
use confab_proto::v1;
use confab_protocol::Marks;
use confab_protocol::ids::{ConversationId, DeviceId, UserId};

/// Raises a device's receipt watermarks; when the user's rose, tells the other
/// members.
pub(super) async fn mark(
    shard: &Shard,
    conversation: ConversationId,
    user: UserId,
    device: DeviceId,
    marks: Marks,
) -> Result<v1::Receipt, ChatError> {
    let (marks, raised) = raise_marks(shard.store.as_ref(), conversation, user, device, marks).await?;
    if raised {
        let signal = ShardMsg::Signal {
            conversation,
            user,
            signal: Signal::Receipt(marks),
        };
        // The owner is gone only during shutdown; receipts are best effort then.
        let _ = shard.mesh.send(shard.mesh.owner_of(conversation), signal).await;
    }
    Ok(v1::Receipt {
        conversation_id: conversation.to_string(),
        user_id: user.get(),
        delivered_seq: marks.delivered_seq,
        read_seq: marks.read_seq,
    })
}

/// Sends a typing signal to the other members; a former member types no more.
pub(super) async fn typing(
    shard: &Shard,
    conversation: ConversationId,
    user: UserId,
    typing: bool,
) -> Result<(), ChatError> {
    access(shard.store.as_ref(), conversation, user).await?.current()?;
    let signal = ShardMsg::Signal {
        conversation,
        user,
        signal: Signal::Typing(typing),
    };
    shard
        .mesh
        .send(shard.mesh.owner_of(conversation), signal)
        .await
        .map_err(|_| ChatError::ShuttingDown)
}
