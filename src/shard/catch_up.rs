//! Catching a device up: Sync, ListConversations, receipt watermarks, and the
//! replay that precedes live pushes when a device resumes. Also the sender side of
//! typing, which shares the membership check with receipts.
//!
//! The planning is sans-IO ([`crate::chat::plan`]); this module reads the store and
//! assembles replies within the frame limit.

use super::{Shard, ShardMsg};
use crate::chat::{ChatError, Signal, message_proto, plan};
use crate::store::ConversationHead;
use confab_proto::ProstMessage as _;
use confab_proto::v1;
use confab_protocol::encode_page_token;
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};
use confab_protocol::{Cursors, HistoryRange, Marks};

/// Conversations reported by one Sync at most; more make `has_more`.
const MAX_SYNC_CONVERSATIONS: usize = 500;
/// Room kept in a reply frame for everything but the conversations.
const REPLY_OVERHEAD_BYTES: usize = 4096;
/// A repeated field's tag and length in front of each state or message.
const FIELD_OVERHEAD_BYTES: usize = 8;
/// Most bytes one conversation's cursor adds to a sync token.
const TOKEN_BYTES_PER_CONVERSATION: usize = 32;
/// Characters of the last message's body a conversation state carries.
const PREVIEW_CHARS: usize = 200;

/// What a device missed, ready to send.
#[derive(Debug)]
pub(super) struct CatchUp {
    pub conversations: Vec<v1::ConversationState>,
    /// The device's cursors once it has everything in `conversations`.
    pub cursors: Cursors,
    pub has_more: bool,
}

/// Everything `user`'s device at `cursors` has not seen, up to `limit` messages and
/// `max_bytes` of encoded conversations.
pub(super) async fn catch_up(
    shard: &Shard,
    user: UserId,
    mut cursors: Cursors,
    limit: usize,
    max_bytes: usize,
) -> Result<CatchUp, ChatError> {
    let heads = shard.store.conversations(user).await?;
    let plan = plan(heads, &cursors, MAX_SYNC_CONVERSATIONS, limit);
    let mut has_more = plan.has_more;
    let mut used = 0;
    let mut conversations = Vec::with_capacity(plan.conversations.len());
    for planned in plan.conversations {
        let head = &planned.head;
        let mut state = conversation_state(shard, head).await?;
        let header = state.encoded_len() + FIELD_OVERHEAD_BYTES;
        if used + header > max_bytes && !conversations.is_empty() {
            has_more = true;
            break;
        }
        used += header;
        let mut full = false;
        if planned.take > 0 {
            let page = shard
                .store
                .history(head.conversation, HistoryRange::After(planned.after), planned.take)
                .await?;
            for record in page.messages.iter().filter(|record| record.seq <= head.last_seq) {
                let message = message_proto(record);
                let size = message.encoded_len() + FIELD_OVERHEAD_BYTES;
                // The first message of a reply always goes (any accepted message fits
                // a frame), so paging makes progress whatever the sizes.
                let first = conversations.is_empty() && state.messages.is_empty();
                if used + size > max_bytes && !first {
                    full = true;
                    break;
                }
                used += size;
                cursors.advance(head.conversation, record.seq);
                state.messages.push(message);
            }
        }
        // Pushed even when cut short: its cursor already says what it carries.
        conversations.push(state);
        if full {
            has_more = true;
            break;
        }
    }
    Ok(CatchUp {
        conversations,
        cursors,
        has_more,
    })
}

/// Answers Sync.
pub(super) async fn sync(
    shard: &Shard,
    user: UserId,
    cursors: Cursors,
    limit: usize,
) -> Result<v1::SyncResult, ChatError> {
    // The reply also carries the new token: at most the old one plus a cursor per
    // conversation reported.
    let token_bytes = cursors.to_token().len() + TOKEN_BYTES_PER_CONVERSATION * MAX_SYNC_CONVERSATIONS;
    let max_bytes = shard
        .limits
        .max_frame_bytes
        .saturating_sub(REPLY_OVERHEAD_BYTES + token_bytes);
    let caught_up = catch_up(shard, user, cursors, limit, max_bytes).await?;
    Ok(v1::SyncResult {
        conversations: caught_up.conversations,
        sync_token: caught_up.cursors.to_token(),
        has_more: caught_up.has_more,
    })
}

/// Answers ListConversations: by last activity, newest first, after the page token.
pub(super) async fn list_conversations(
    shard: &Shard,
    user: UserId,
    after: Option<(u64, ConversationId)>,
    limit: usize,
) -> Result<v1::ConversationList, ChatError> {
    let (heads, more) = shard.store.recent_conversations(user, after, limit).await?;
    let max_bytes = shard.limits.max_frame_bytes.saturating_sub(REPLY_OVERHEAD_BYTES);
    let mut used = 0;
    let mut conversations = Vec::with_capacity(heads.len());
    for head in &heads {
        let state = conversation_state(shard, head).await?;
        used += state.encoded_len() + FIELD_OVERHEAD_BYTES;
        if used > max_bytes && !conversations.is_empty() {
            break;
        }
        conversations.push(state);
    }
    let next_page_token = match conversations.len().checked_sub(1).and_then(|last| heads.get(last)) {
        Some(last) if more || conversations.len() < heads.len() => {
            encode_page_token(last.last_time_ms, last.conversation)
        }
        _ => String::new(),
    };
    Ok(v1::ConversationList {
        conversations,
        next_page_token,
    })
}

/// Raises a device's receipt watermarks, bounded by what the user may see; when
/// the user's watermarks rose, tells the other members (through the owner, which
/// coalesces).
pub(super) async fn mark(
    shard: &Shard,
    conversation: ConversationId,
    user: UserId,
    device: DeviceId,
    marks: Marks,
) -> Result<v1::Receipt, ChatError> {
    let mut visible = shard.store.last_seq(conversation).await?;
    if let Some(left_seq) = membership(shard, conversation, user).await? {
        visible = left_seq.min(visible);
    }
    let bounded = Marks {
        delivered_seq: marks.delivered_seq.min(visible),
        read_seq: marks.read_seq.min(visible),
    };
    let (marks, raised) = shard.store.mark(conversation, user, device, bounded).await?;
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

/// A conversation as Sync and ListConversations show it, with a preview of its
/// last message (its body cut to PREVIEW_CHARS, so a state's size is bounded).
async fn conversation_state(shard: &Shard, head: &ConversationHead) -> Result<v1::ConversationState, ChatError> {
    let last = shard.store.messages_at(head.conversation, vec![head.last_seq]).await?;
    let preview = last.get(&head.last_seq).map(|record| {
        let mut message = message_proto(record);
        if let Some((cut, _)) = message.body.char_indices().nth(PREVIEW_CHARS) {
            message.body.truncate(cut);
        }
        message
    });
    Ok(v1::ConversationState {
        conversation_id: head.conversation.to_string(),
        title: head.title.clone().unwrap_or_default(),
        last_seq: head.last_seq,
        last_activity_ms: head.last_time_ms,
        read_seq: head.read_seq,
        unread_count: head.last_seq.saturating_sub(head.read_seq),
        left: head.left_seq.is_some(),
        messages: Vec::new(),
        last_message: preview,
    })
}

/// Sends a typing signal to the other members, through the conversation's owner.
pub(super) async fn typing(
    shard: &Shard,
    conversation: ConversationId,
    user: UserId,
    typing: bool,
) -> Result<(), ChatError> {
    if membership(shard, conversation, user).await?.is_some() {
        return Err(ChatError::Forbidden("not a member of this conversation"));
    }
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

/// Checks `user` may see `conversation`: `Ok(None)` for a member, `Ok(Some(seq))`
/// for a former group member (who sees up to `seq`). Direct conversations were
/// checked against their id already.
async fn membership(shard: &Shard, conversation: ConversationId, user: UserId) -> Result<Option<Seq>, ChatError> {
    let ConversationId::Group(group) = conversation else {
        return Ok(None);
    };
    let member = shard.store.member(group, user).await?;
    Ok(member
        .ok_or(ChatError::Forbidden("not a member of this conversation"))?
        .left_seq)
}
