//! The owner's store reads before it sequences: the idempotency lookup (is
//! this append a retry of one already stored?) and what a conversation's first
//! use needs. The sequencer says what to read ([`Check`]); this reads it.

use super::ChatError;
use super::sequencer::{Check, CheckResult};
use crate::store::Store;
use confab_protocol::ids::ConversationId;

/// Reads what the sequencer's `check` asks for: the sends already stored under
/// the queued appends' keys since `since_ms` (the deduplication window), the
/// messages edits and deletes target, and, on a conversation's first use, where
/// its seqs continue, its group, and that a direct conversation's users exist.
pub async fn lookup(store: &dyn Store, check: Check, since_ms: u64) -> Result<CheckResult, ChatError> {
    let mut last_seq = None;
    let mut group = None;
    if check.first_use {
        match check.conversation {
            ConversationId::Direct { .. } => {
                for member in check.conversation.direct_members() {
                    if store.user_by_id(member).await?.is_none() {
                        return Err(ChatError::UnknownUser);
                    }
                }
            }
            ConversationId::Group(id) => group = store.group(id).await?,
        }
        last_seq = Some(store.last_seq(check.conversation).await?);
    }
    let stored = store.find_sends(check.conversation, check.keys, since_ms).await?;
    let targets = match check.targets.is_empty() {
        true => Default::default(),
        false => store.messages_at(check.conversation, check.targets).await?,
    };
    Ok(CheckResult {
        last_seq,
        group,
        stored,
        targets,
    })
}
