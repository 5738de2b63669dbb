//! The owner's store reads before it sequences: the idempotency lookup (is
//! this append a retry of one already stored?) and what a conversation's first
//! use needs. The sequencer says what to read ([`Check`]); this reads it.
//! Beside it, [`load_sent`] lists a device's stored ids for the owner to
//! remember.

use super::ChatError;
use super::sent::MAX_PER_SET;
use super::sequencer::{Check, CheckResult};
use crate::store::{Store, StoreError};
use confab_protocol::ids::{ConversationId, DeviceId};

/// Reads what the sequencer's `check` asks for: the sends already stored under
/// the queued appends' keys since `since_ms` (the deduplication window), the
/// messages edits and deletes target, and, on a conversation's first use, where
/// its seqs continue, its group, and that a direct conversation's users exist.
/// On first use the conversation is taken before the sends are looked up;
/// otherwise the reads are independent and run at once: every append of the
/// conversation waits for the slowest, not for their sum.
pub async fn lookup(store: &dyn Store, check: Check, since_ms: u64) -> Result<CheckResult, ChatError> {
    let conversation = check.conversation;
    let first_use = async {
        if !check.first_use {
            return Ok((None, None));
        }
        let group = async {
            match conversation {
                ConversationId::Direct { .. } => {
                    let missing = store.missing_users(conversation.direct_members().collect()).await?;
                    match missing.is_empty() {
                        true => Ok(None),
                        false => Err(ChatError::UnknownUser),
                    }
                }
                ConversationId::Group(id) => Ok(store.group(id).await?),
            }
        };
        let last_seq = async { Ok::<_, ChatError>(store.take_conversation(conversation).await?) };
        let (group, last_seq) = futures::try_join!(group, last_seq)?;
        Ok::<_, ChatError>((Some(last_seq), group))
    };
    let stored = async {
        match check.keys.is_empty() {
            true => Ok(Default::default()),
            false => Ok::<_, ChatError>(store.find_sends(conversation, check.keys, since_ms).await?),
        }
    };
    let targets = async {
        match check.targets.is_empty() {
            true => Ok(Default::default()),
            false => Ok::<_, ChatError>(store.messages_at(conversation, check.targets).await?),
        }
    };
    // Taking the conversation first: in cluster mode it makes readable what
    // the previous holder stored and did not acknowledge (it died first), and
    // a retry of one of those must find it, not get a second seq.
    let (last_seq, group) = first_use.await?;
    let (stored, targets) = futures::try_join!(stored, targets)?;
    Ok(CheckResult {
        last_seq,
        group,
        stored,
        targets,
    })
}

/// The ids `device` stored sends under in `conversation`, for the owner to
/// remember ([`Check::load`]); `None` when there are too many to keep or the
/// store cannot list them all.
pub async fn load_sent(
    store: &dyn Store,
    conversation: ConversationId,
    device: DeviceId,
) -> Result<Option<Vec<String>>, StoreError> {
    store.sent_ids(conversation, device, MAX_PER_SET).await
}
