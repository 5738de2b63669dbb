//! The send records of this node's owners, kept per (conversation, device), so
//! the idempotency check of a new send needs no read on the send path.
//!
//! Every send of a conversation is stored through its owner shard, so once a
//! device's records in a conversation are loaded (one read of that slice of the
//! `sends` partition), every record stored after that goes through
//! [`SendCache::record`] and the set stays complete. A check then answers from
//! memory; only a device's first send in a conversation since the node started
//! (or since the set was dropped) reads the store.
//!
//! A load races with flushes: the set is created (loading) before the read, the
//! writer adds to it meanwhile, and the read's rows are merged in — a record
//! lands in the read, or in the set, or both. A failed flush drops the sets of
//! its conversations (they reload), and a load finishing after that is ignored.
//!
//! Bounded: a device with more than [`MAX_PER_SET`] records in a conversation is
//! not cached (its checks read the store), and past [`MAX_ENTRIES`] records in all
//! every set is dropped; forgetting only costs reloads.

use crate::store::{MessageRecord, StoredSend};
use confab_protocol::ids::{ConversationId, DeviceId, Seq};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Records of one device in one conversation worth caching; beyond it, reads.
pub(super) const MAX_PER_SET: usize = 2_000;
/// Records cached across all sets.
const MAX_ENTRIES: usize = 500_000;

type SetKey = (ConversationId, DeviceId);

#[derive(Debug, Default)]
pub(super) struct SendCache {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    sets: HashMap<SetKey, Set>,
    entries: usize,
    next_load: u64,
}

#[derive(Debug)]
struct Set {
    /// Which load created it; `None` once loaded.
    loading: Option<u64>,
    sends: HashMap<String, StoredSend>,
}

impl SendCache {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Which of `client_msg_ids` of `device` are stored, if its set is loaded.
    pub(super) fn cached(
        &self,
        conversation: ConversationId,
        device: DeviceId,
        client_msg_ids: &[String],
    ) -> Option<HashMap<String, StoredSend>> {
        let state = self.state();
        let set = state.sets.get(&(conversation, device))?;
        if set.loading.is_some() {
            return None;
        }
        Some(
            client_msg_ids
                .iter()
                .filter_map(|id| set.sends.get(id).map(|send| (id.clone(), *send)))
                .collect(),
        )
    }

    /// Starts loading `device`'s set: the ticket for [`SendCache::finish_load`],
    /// or `None` if the set exists (loaded, or another lookup is loading it).
    pub(super) fn start_load(&self, conversation: ConversationId, device: DeviceId) -> Option<u64> {
        let mut state = self.state();
        if state.sets.contains_key(&(conversation, device)) {
            return None;
        }
        state.next_load += 1;
        let ticket = state.next_load;
        state.sets.insert(
            (conversation, device),
            Set {
                loading: Some(ticket),
                sends: HashMap::new(),
            },
        );
        Some(ticket)
    }

    /// Merges what the load with `ticket` read; `None` (too many to cache, or the
    /// read failed) drops the set. Ignored if the set was dropped meanwhile.
    pub(super) fn finish_load(
        &self,
        conversation: ConversationId,
        device: DeviceId,
        ticket: u64,
        read: Option<Vec<(String, StoredSend)>>,
    ) {
        let mut state = self.state();
        let key = (conversation, device);
        if state.sets.get(&key).and_then(|set| set.loading) != Some(ticket) {
            return;
        }
        let Some(read) = read else {
            state.drop_set(&key);
            return;
        };
        let added = read.len();
        if let Some(set) = state.sets.get_mut(&key) {
            set.sends.extend(read);
            set.loading = None;
        }
        state.grew(added);
    }

    /// A flush stored these messages: their records join the sets that exist.
    pub(super) fn record(&self, messages: &[&MessageRecord]) {
        let mut state = self.state();
        let mut added = 0;
        for message in messages {
            if let Some(set) = state.sets.get_mut(&(message.conversation, message.sender_device)) {
                let send = StoredSend {
                    seq: message.seq,
                    server_time_ms: message.server_time_ms,
                };
                if set.sends.insert(message.client_msg_id.clone(), send).is_none() {
                    added += 1;
                }
            }
        }
        state.grew(added);
    }

    /// A flush of these conversations failed: what it stored is unknown, so
    /// their sets go (every device's).
    pub(super) fn forget(&self, conversations: &HashMap<ConversationId, Seq>) {
        let mut state = self.state();
        let dropped: Vec<SetKey> = state
            .sets
            .keys()
            .filter(|(conversation, _)| conversations.contains_key(conversation))
            .copied()
            .collect();
        for key in dropped {
            state.drop_set(&key);
        }
    }
}

impl State {
    fn drop_set(&mut self, key: &SetKey) {
        if let Some(set) = self.sets.remove(key) {
            self.entries = self.entries.saturating_sub(set.sends.len());
        }
    }

    fn grew(&mut self, added: usize) {
        self.entries += added;
        if self.entries > MAX_ENTRIES {
            tracing::info!(entries = self.entries, "send record cache full: dropping it");
            self.sets.clear();
            self.entries = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_protocol::ids::UserId;

    fn conversation() -> ConversationId {
        ConversationId::direct(UserId::new(1).unwrap(), UserId::new(2).unwrap())
    }

    fn device() -> DeviceId {
        DeviceId::new(7).unwrap()
    }

    fn message(seq: u64, client_msg_id: &str) -> MessageRecord {
        MessageRecord {
            conversation: conversation(),
            seq,
            sender: UserId::new(1).unwrap(),
            sender_device: device(),
            client_msg_id: client_msg_id.to_owned(),
            body: String::new(),
            server_time_ms: seq,
            event: None,
            amends: None,
            deleted: false,
            edited_by: None,
        }
    }

    fn send(seq: u64) -> StoredSend {
        StoredSend {
            seq,
            server_time_ms: seq,
        }
    }

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    #[test]
    fn a_flush_during_a_load_is_kept_with_what_the_load_read() {
        let cache = SendCache::default();
        assert_eq!(cache.cached(conversation(), device(), &ids(&["a"])), None);
        let ticket = cache.start_load(conversation(), device()).unwrap();
        assert_eq!(cache.start_load(conversation(), device()), None, "one load at a time");
        assert_eq!(
            cache.cached(conversation(), device(), &ids(&["a"])),
            None,
            "not loaded yet"
        );
        // "b" is stored while the read (which saw only "a") is under way.
        cache.record(&[&message(2, "b")]);
        cache.finish_load(conversation(), device(), ticket, Some(vec![("a".to_owned(), send(1))]));
        let found = cache.cached(conversation(), device(), &ids(&["a", "b", "c"])).unwrap();
        assert_eq!(
            found,
            HashMap::from([("a".to_owned(), send(1)), ("b".to_owned(), send(2))])
        );
    }

    #[test]
    fn a_failed_flush_drops_the_set_and_a_late_load_does_not_bring_it_back() {
        let cache = SendCache::default();
        let ticket = cache.start_load(conversation(), device()).unwrap();
        cache.forget(&HashMap::from([(conversation(), 1)]));
        cache.finish_load(conversation(), device(), ticket, Some(Vec::new()));
        assert_eq!(cache.cached(conversation(), device(), &ids(&["a"])), None);
        assert!(cache.start_load(conversation(), device()).is_some(), "it reloads");
    }

    #[test]
    fn a_set_too_large_to_cache_is_dropped() {
        let cache = SendCache::default();
        let ticket = cache.start_load(conversation(), device()).unwrap();
        cache.finish_load(conversation(), device(), ticket, None);
        assert_eq!(cache.cached(conversation(), device(), &ids(&["a"])), None);
        assert!(cache.start_load(conversation(), device()).is_some());
    }

    #[test]
    fn records_of_devices_not_loaded_are_not_kept() {
        let cache = SendCache::default();
        cache.record(&[&message(1, "a")]);
        assert_eq!(cache.state().entries, 0);
        assert_eq!(cache.cached(conversation(), device(), &ids(&["a"])), None);
    }
}
