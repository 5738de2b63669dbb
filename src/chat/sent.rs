//! What the devices of one conversation have already sent: the owner's memory
//! of send records, so the idempotency check of a new send needs no store read.
//!
//! The owner is the only writer of its conversations, so once a device's ids
//! are loaded (one read of that slice of the store's records), every send
//! committed after that passes through [`Sent::record`] and the set stays
//! complete: a key it does not hold was never stored, and one committed here
//! is answered with what it was stored as. Ids that came from the load are
//! only known to exist; whether their message was stored too (a failed write
//! may leave a record without its message) and when, the store answers.
//!
//! A load runs beside the checks (they ask the store meanwhile) and races with
//! commits: the set exists (loading) before the read, commits add to it
//! meanwhile, and the read's ids are merged in without overwriting them. A
//! failed commit drops every set of its conversation ([`Sent::clear`]); a load
//! finishing after that, or after its set was replaced, is ignored (each load
//! has a ticket).
//!
//! Bounded: a device with more than [`MAX_PER_SET`] records in a conversation
//! is not cached (its checks read the store until the conversation is
//! forgotten); the sequencer bounds the sum over conversations.

use crate::store::StoredSend;
use confab_protocol::SendKey;
use confab_protocol::ids::DeviceId;
use std::collections::HashMap;

/// Records of one device in one conversation worth caching; beyond it, reads.
pub(super) const MAX_PER_SET: usize = 2_000;

/// What memory says of one send key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Never stored.
    New,
    /// Committed by this owner, as this.
    Stored(StoredSend),
    /// Only the store can say.
    AskStore,
}

#[derive(Debug)]
enum Known {
    /// The load with this ticket is under way; commits meanwhile are kept.
    Loading(u64, HashMap<String, Option<StoredSend>>),
    /// Every id stored: `Some` for sends committed here, `None` for loaded ones.
    Loaded(HashMap<String, Option<StoredSend>>),
    /// More than [`MAX_PER_SET`]: not cached.
    TooMany,
}

impl Known {
    fn len(&self) -> usize {
        match self {
            Self::Loading(_, ids) | Self::Loaded(ids) => ids.len(),
            Self::TooMany => 0,
        }
    }
}

/// The send records of one conversation's devices that memory holds.
#[derive(Debug, Default)]
pub(super) struct Sent {
    devices: HashMap<DeviceId, Known>,
    entries: usize,
}

impl Sent {
    /// Records held.
    pub(super) fn entries(&self) -> usize {
        self.entries
    }

    pub(super) fn answer(&self, (device, client_msg_id): &SendKey) -> Answer {
        match self.devices.get(device) {
            Some(Known::Loaded(ids)) => match ids.get(client_msg_id) {
                None => Answer::New,
                Some(Some(stored)) => Answer::Stored(*stored),
                Some(None) => Answer::AskStore,
            },
            Some(Known::Loading(..) | Known::TooMany) | None => Answer::AskStore,
        }
    }

    /// The devices among `keys` nothing is known of, now loading, each with
    /// its ticket (taken from `tickets`): the caller reads their ids and
    /// reports with [`Sent::loaded`].
    pub(super) fn start_loads<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a SendKey>,
        tickets: &mut u64,
    ) -> Vec<(DeviceId, u64)> {
        let mut loads = Vec::new();
        for (device, _) in keys {
            if !self.devices.contains_key(device) {
                *tickets += 1;
                self.devices.insert(*device, Known::Loading(*tickets, HashMap::new()));
                loads.push((*device, *tickets));
            }
        }
        loads
    }

    /// The load of `device` with `ticket` read `ids` (`None`: too many, or the
    /// store cannot vouch for them). Ignored unless that load is still the one
    /// under way.
    pub(super) fn loaded(&mut self, device: DeviceId, ticket: u64, ids: Option<Vec<String>>) {
        let Some(Known::Loading(current, recorded)) = self.devices.get_mut(&device) else {
            return;
        };
        if *current != ticket {
            return;
        }
        let mut recorded = std::mem::take(recorded);
        let before = recorded.len();
        let known = match ids {
            Some(ids) if ids.len() <= MAX_PER_SET => {
                for id in ids {
                    recorded.entry(id).or_insert(None);
                }
                Known::Loaded(recorded)
            }
            _ => Known::TooMany,
        };
        self.entries = self.entries - before + known.len();
        self.devices.insert(device, known);
    }

    /// The load of `device` with `ticket` failed: the device is unknown again.
    pub(super) fn load_failed(&mut self, device: DeviceId, ticket: u64) {
        if let Some(known @ Known::Loading(current, _)) = self.devices.get(&device)
            && *current == ticket
        {
            self.entries -= known.len();
            self.devices.remove(&device);
        }
    }

    /// `key` was committed as `stored`: kept if its device's set exists.
    pub(super) fn record(&mut self, (device, client_msg_id): &SendKey, stored: StoredSend) {
        let Some(Known::Loading(_, ids) | Known::Loaded(ids)) = self.devices.get_mut(device) else {
            return;
        };
        if ids.insert(client_msg_id.clone(), Some(stored)).is_none() {
            self.entries += 1;
        }
        if ids.len() > MAX_PER_SET {
            self.entries -= ids.len();
            self.devices.insert(*device, Known::TooMany);
        }
    }

    /// What the store holds is unknown (a commit failed): everything goes.
    pub(super) fn clear(&mut self) {
        self.devices.clear();
        self.entries = 0;
    }

    /// Frees the loaded sets (they reload on next use), keeping loads under
    /// way and what is known to be too many.
    pub(super) fn shed(&mut self) {
        self.devices.retain(|_, known| !matches!(known, Known::Loaded(_)));
        self.entries = self.devices.values().map(Known::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> DeviceId {
        DeviceId::new(7).unwrap()
    }

    fn key(id: &str) -> SendKey {
        (device(), id.to_owned())
    }

    fn send(seq: u64) -> StoredSend {
        StoredSend {
            seq,
            server_time_ms: seq,
        }
    }

    #[test]
    fn only_a_loaded_set_answers_for_the_store() {
        let mut sent = Sent::default();
        assert_eq!(sent.answer(&key("a")), Answer::AskStore);
        let mut tickets = 0;
        assert_eq!(
            sent.start_loads([&key("a"), &key("b")], &mut tickets),
            vec![(device(), 1)]
        );
        assert_eq!(
            sent.start_loads([&key("c")], &mut tickets),
            Vec::new(),
            "one load at a time"
        );
        assert_eq!(sent.answer(&key("a")), Answer::AskStore, "not loaded yet");
        sent.loaded(device(), 1, Some(vec!["a".to_owned()]));
        assert_eq!(
            sent.answer(&key("a")),
            Answer::AskStore,
            "loaded ids are the store's to vouch for"
        );
        assert_eq!(sent.answer(&key("z")), Answer::New);
        sent.record(&key("z"), send(3));
        assert_eq!(sent.answer(&key("z")), Answer::Stored(send(3)));
        assert_eq!(sent.entries(), 2);
    }

    #[test]
    fn a_commit_during_a_load_is_kept_with_what_the_load_read() {
        let mut sent = Sent::default();
        sent.start_loads([&key("a")], &mut 0);
        // "b" is committed while the read (which saw it, or not) is under way.
        sent.record(&key("b"), send(2));
        sent.loaded(device(), 1, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(sent.answer(&key("b")), Answer::Stored(send(2)));
        assert_eq!(sent.answer(&key("a")), Answer::AskStore);
        assert_eq!(sent.answer(&key("c")), Answer::New);
        assert_eq!(sent.entries(), 2);
    }

    #[test]
    fn a_failed_commit_drops_the_sets_and_a_late_load_does_not_bring_them_back() {
        let mut sent = Sent::default();
        let mut tickets = 0;
        sent.start_loads([&key("a")], &mut tickets);
        sent.clear();
        sent.loaded(device(), 1, Some(Vec::new()));
        assert_eq!(sent.answer(&key("a")), Answer::AskStore);
        assert_eq!(
            sent.start_loads([&key("a")], &mut tickets),
            vec![(device(), 2)],
            "it reloads"
        );
        sent.loaded(device(), 1, Some(Vec::new()));
        assert_eq!(sent.answer(&key("a")), Answer::AskStore, "the stale load is ignored");
        sent.loaded(device(), 2, Some(Vec::new()));
        assert_eq!(sent.answer(&key("a")), Answer::New);
    }

    #[test]
    fn a_device_with_too_many_records_is_not_cached_nor_reloaded() {
        let mut sent = Sent::default();
        sent.start_loads([&key("a")], &mut 0);
        sent.loaded(device(), 1, None);
        assert_eq!(sent.answer(&key("a")), Answer::AskStore);
        assert_eq!(sent.start_loads([&key("a")], &mut 1), Vec::new());

        let mut sent = Sent::default();
        sent.start_loads([&key("a")], &mut 0);
        sent.loaded(device(), 1, Some((0..MAX_PER_SET).map(|i| i.to_string()).collect()));
        assert_eq!(sent.entries(), MAX_PER_SET);
        sent.record(&key("one more"), send(1));
        assert_eq!(sent.answer(&key("zzz")), Answer::AskStore);
        assert_eq!(sent.entries(), 0);
    }

    #[test]
    fn shedding_frees_loaded_sets_only() {
        let mut sent = Sent::default();
        let mut tickets = 0;
        sent.start_loads([&key("a")], &mut tickets);
        sent.loaded(device(), 1, Some(vec!["a".to_owned()]));
        let other = (DeviceId::new(8).unwrap(), "x".to_owned());
        sent.start_loads([&other], &mut tickets);
        sent.record(&other, send(1));
        sent.shed();
        assert_eq!(sent.answer(&key("q")), Answer::AskStore);
        assert_eq!(sent.entries(), 1, "the load under way keeps its commit");
        assert_eq!(sent.start_loads([&key("a")], &mut tickets), vec![(device(), 3)]);
    }

    #[test]
    fn a_failed_load_leaves_the_device_unknown() {
        let mut sent = Sent::default();
        sent.start_loads([&key("a")], &mut 0);
        sent.record(&key("b"), send(2));
        sent.load_failed(device(), 1);
        assert_eq!(sent.entries(), 0);
        assert_eq!(sent.start_loads([&key("a")], &mut 1), vec![(device(), 2)]);
    }
}
