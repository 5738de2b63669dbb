//! Reading what a user may see: a conversation's history, a group's members,
//! and catching a device up (Sync, ListConversations, the replay before live
//! pushes when a device resumes), each within the frame limit; and raising a
//! device's receipt watermarks, bounded by what it may see.
//!
//! Functions over the [`Store`]; the planning of a sync is sans-IO
//! ([`super::plan`]). Every read goes through the one membership check
//! ([`access`]).

use super::access::access;
use super::{ChatError, message_proto, plan};
use crate::store::{ConversationHead, HistoryPage, Store};
use confab_proto::ProstMessage as _;
use confab_proto::v1;
use confab_protocol::encode_page_token;
use confab_protocol::ids::{ConversationId, DeviceId, GroupId, UserId};
use confab_protocol::{Cursors, HistoryRange, Marks};

/// Room kept in a History page for everything but the messages.
const PAGE_OVERHEAD_BYTES: usize = 1024;
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
pub struct CatchUp {
    /// The conversations, most recently active first.
    pub conversations: Vec<v1::ConversationState>,
    /// The device's cursors once it has everything in `conversations`.
    pub cursors: Cursors,
    /// More remain: the device should ask again.
    pub has_more: bool,
}

/// Everything `user`'s device at `cursors` has not seen, up to `limit` messages and
/// `max_bytes` of encoded conversations.
pub async fn catch_up(
    store: &dyn Store,
    user: UserId,
    mut cursors: Cursors,
    limit: usize,
    max_bytes: usize,
) -> Result<CatchUp, ChatError> {
    let heads = store.conversations(user).await?;
    let plan = plan(heads, &cursors, MAX_SYNC_CONVERSATIONS, limit);
    let mut has_more = plan.has_more;
    let mut used = 0;
    let mut conversations = Vec::with_capacity(plan.conversations.len());
    for planned in plan.conversations {
        let head = &planned.head;
        let mut state = conversation_state(store, head).await?;
        let header = state.encoded_len() + FIELD_OVERHEAD_BYTES;
        if used + header > max_bytes && !conversations.is_empty() {
            has_more = true;
            break;
        }
        used += header;
        let mut full = false;
        if planned.take > 0 {
            let page = store
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
pub async fn sync(
    store: &dyn Store,
    user: UserId,
    cursors: Cursors,
    limit: usize,
    max_frame_bytes: usize,
) -> Result<v1::SyncResult, ChatError> {
    // The reply also carries the new token: at most the old one plus a cursor per
    // conversation reported.
    let token_bytes = cursors.to_token().len() + TOKEN_BYTES_PER_CONVERSATION * MAX_SYNC_CONVERSATIONS;
    let max_bytes = max_frame_bytes.saturating_sub(REPLY_OVERHEAD_BYTES + token_bytes);
    let caught_up = catch_up(store, user, cursors, limit, max_bytes).await?;
    Ok(v1::SyncResult {
        conversations: caught_up.conversations,
        sync_token: caught_up.cursors.to_token(),
        has_more: caught_up.has_more,
    })
}

/// Answers ListConversations: by last activity, newest first, after the page token.
pub async fn list_conversations(
    store: &dyn Store,
    user: UserId,
    after: Option<(u64, ConversationId)>,
    limit: usize,
    max_frame_bytes: usize,
) -> Result<v1::ConversationList, ChatError> {
    let (heads, more) = store.recent_conversations(user, after, limit).await?;
    let max_bytes = max_frame_bytes.saturating_sub(REPLY_OVERHEAD_BYTES);
    let mut used = 0;
    let mut conversations = Vec::with_capacity(heads.len());
    for head in &heads {
        let state = conversation_state(store, head).await?;
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

/// Raises a device's receipt watermarks in `conversation`, bounded by what the
/// user may see. Returns the user's watermarks after, and whether they rose
/// (then the other members are to be told).
pub async fn raise_marks(
    store: &dyn Store,
    conversation: ConversationId,
    user: UserId,
    device: DeviceId,
    marks: Marks,
) -> Result<(Marks, bool), ChatError> {
    let last_seq = store.last_seq(conversation).await?;
    let visible = access(store, conversation, user).await?.visible(last_seq);
    let bounded = Marks {
        delivered_seq: marks.delivered_seq.min(visible),
        read_seq: marks.read_seq.min(visible),
    };
    Ok(store.mark(conversation, user, device, bounded).await?)
}

/// A conversation as Sync and ListConversations show it, with a preview of its
/// last message (its body cut to PREVIEW_CHARS, so a state's size is bounded).
async fn conversation_state(store: &dyn Store, head: &ConversationHead) -> Result<v1::ConversationState, ChatError> {
    let last = store.messages_at(head.conversation, vec![head.last_seq]).await?;
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

/// The page of `conversation` that `reader` may see, as a reply within
/// `max_frame_bytes`: a group's history is for its members, and a former member
/// reads only up to the message that removed it.
pub async fn history(
    store: &dyn Store,
    conversation: ConversationId,
    reader: UserId,
    range: HistoryRange,
    limit: usize,
    max_frame_bytes: usize,
) -> Result<v1::HistoryPage, ChatError> {
    let page = readable_page(store, conversation, reader, range, limit).await?;
    let max_bytes = max_frame_bytes.saturating_sub(PAGE_OVERHEAD_BYTES);
    Ok(history_page(conversation, range, page, max_bytes))
}

async fn readable_page(
    store: &dyn Store,
    conversation: ConversationId,
    reader: UserId,
    range: HistoryRange,
    limit: usize,
) -> Result<HistoryPage, ChatError> {
    let super::Access::Former { left_seq: last } = access(store, conversation, reader).await? else {
        return Ok(store.history(conversation, range, limit).await?);
    };
    let clamped = match range {
        HistoryRange::Latest => HistoryRange::Before(last + 1),
        HistoryRange::Before(bound) => HistoryRange::Before(bound.min(last + 1)),
        HistoryRange::After(bound) => HistoryRange::After(bound),
    };
    let mut page = store.history(conversation, clamped, limit).await?;
    page.messages.retain(|message| message.seq <= last);
    if matches!(range, HistoryRange::After(_)) && page.messages.last().is_none_or(|message| message.seq >= last) {
        page.has_more = false;
    }
    Ok(page)
}

/// A page of a group's current members, for a current member.
pub async fn members(
    store: &dyn Store,
    group: GroupId,
    reader: UserId,
    after: Option<UserId>,
    limit: usize,
) -> Result<v1::MemberList, ChatError> {
    access(store, ConversationId::Group(group), reader).await?.current()?;
    let title = store.group(group).await?.map(|group| group.title).unwrap_or_default();
    let (members, has_more) = store.members_page(group, after, limit).await?;
    Ok(v1::MemberList {
        conversation_id: ConversationId::Group(group).to_string(),
        title,
        members: members
            .into_iter()
            .map(|(user, role)| v1::Member {
                user_id: user.get(),
                role: v1::Role::from(role) as i32,
            })
            .collect(),
        has_more,
    })
}

/// A History reply that fits in `max_bytes`: when the stored page is larger, the
/// messages farthest from the requested bound are left out and `has_more` is set.
fn history_page(
    conversation: ConversationId,
    range: HistoryRange,
    page: HistoryPage,
    max_bytes: usize,
) -> v1::HistoryPage {
    let mut messages: Vec<v1::Message> = page.messages.iter().map(message_proto).collect();
    let mut has_more = page.has_more;
    // Closest to the bound first: the newest for Latest/Before, the oldest for After.
    let newest_first = !matches!(range, HistoryRange::After(_));
    if newest_first {
        messages.reverse();
    }
    let mut used = 0;
    let keep = messages
        .iter()
        .take_while(|message| {
            let len = message.encoded_len() + 8;
            used += len;
            used <= max_bytes
        })
        .count();
    if keep < messages.len() {
        messages.truncate(keep);
        has_more = true;
    }
    if newest_first {
        messages.reverse();
    }
    v1::HistoryPage {
        conversation_id: conversation.to_string(),
        messages,
        has_more,
    }
}
