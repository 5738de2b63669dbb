//! Gap-free sequencing of the conversations one shard owns.
//!
//! A conversation's state is loaded lazily: the first append makes the caller read
//! the stored maximum seq (and check the members exist); appends that arrive
//! meanwhile queue behind the load. Afterwards each append gets `next_seq` at once.
//! The caller commits assigned messages in assignment order and reports back.
//!
//! Limits: at most `max_pending` appends waiting for a load or a commit (beyond it
//! callers are told to back off), and at most `max_cached` conversations kept;
//! an idle conversation (nothing in flight) is forgotten first, which is always safe
//! because its next seq can be read back from the store.
//!
//! Generic over the reply handle `R`, so it is tested without channels.

use crate::clock::unix_ms;
use crate::ids::{ConversationId, DeviceId, Seq, UserId};
use crate::store::MessageRecord;
use std::collections::HashMap;

/// A message to append, as the sender's shard hands it to the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    pub conversation: ConversationId,
    pub sender: UserId,
    pub sender_device: DeviceId,
    pub client_msg_id: String,
    pub body: String,
}

/// An append with its seq assigned, ready to commit.
#[derive(Debug)]
pub struct Assigned<R> {
    pub record: MessageRecord,
    pub reply: R,
}

/// What happened to a submitted append.
#[derive(Debug)]
pub enum Admission<R> {
    /// Seq assigned: commit it.
    Assigned(Assigned<R>),
    /// Queued until the conversation is loaded; the caller must start the load.
    Load(ConversationId),
    /// Queued behind a load already under way.
    Queued,
    /// Too much pending: refuse it.
    Overloaded(Append, R),
}

#[derive(Debug, Clone, Copy)]
pub struct SequencerLimits {
    pub max_pending: usize,
    pub max_cached: usize,
}

#[derive(Debug)]
enum Conversation<R> {
    Loading(Vec<(Append, R)>),
    Ready { next_seq: Seq, in_flight: usize },
}

#[derive(Debug)]
pub struct Sequencer<R> {
    conversations: HashMap<ConversationId, Conversation<R>>,
    pending: usize,
    limits: SequencerLimits,
}

impl<R> Sequencer<R> {
    pub fn new(limits: SequencerLimits) -> Self {
        Self {
            conversations: HashMap::new(),
            pending: 0,
            limits,
        }
    }

    pub fn submit(&mut self, append: Append, reply: R) -> Admission<R> {
        if self.pending >= self.limits.max_pending {
            return Admission::Overloaded(append, reply);
        }
        self.pending += 1;
        let conversation = append.conversation;
        match self.conversations.get_mut(&conversation) {
            None => {
                self.conversations
                    .insert(conversation, Conversation::Loading(vec![(append, reply)]));
                Admission::Load(conversation)
            }
            Some(Conversation::Loading(queue)) => {
                queue.push((append, reply));
                Admission::Queued
            }
            Some(Conversation::Ready {
                next_seq,
                in_flight,
            }) => Admission::Assigned(assign(next_seq, in_flight, append, reply)),
        }
    }

    /// The conversation's stored maximum is `last_seq`: assigns everything queued.
    pub fn loaded(&mut self, conversation: ConversationId, last_seq: Seq) -> Vec<Assigned<R>> {
        let Some(Conversation::Loading(queue)) = self.conversations.remove(&conversation) else {
            return Vec::new();
        };
        let mut next_seq = last_seq + 1;
        let mut in_flight = 0;
        let assigned = queue
            .into_iter()
            .map(|(append, reply)| assign(&mut next_seq, &mut in_flight, append, reply))
            .collect();
        self.conversations.insert(
            conversation,
            Conversation::Ready {
                next_seq,
                in_flight,
            },
        );
        self.evict_idle();
        assigned
    }

    /// The load failed: hands back everything queued, to be refused.
    pub fn load_failed(&mut self, conversation: ConversationId) -> Vec<(Append, R)> {
        match self.conversations.remove(&conversation) {
            Some(Conversation::Loading(queue)) => {
                self.pending -= queue.len();
                queue
            }
            Some(ready) => {
                self.conversations.insert(conversation, ready);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// One assigned append of `conversation` is durable.
    pub fn committed(&mut self, conversation: ConversationId) {
        self.pending = self.pending.saturating_sub(1);
        if let Some(Conversation::Ready { in_flight, .. }) =
            self.conversations.get_mut(&conversation)
        {
            *in_flight = in_flight.saturating_sub(1);
        }
        self.evict_idle();
    }

    /// One assigned append of `conversation` failed to commit. Its seq may or may
    /// not be stored, so the conversation is forgotten and re-read from the store on
    /// next use (later appends already assigned fail the same way).
    pub fn commit_failed(&mut self, conversation: ConversationId) {
        self.pending = self.pending.saturating_sub(1);
        if matches!(
            self.conversations.get(&conversation),
            Some(Conversation::Ready { .. })
        ) {
            self.conversations.remove(&conversation);
        }
    }

    fn evict_idle(&mut self) {
        if self.conversations.len() <= self.limits.max_cached {
            return;
        }
        let excess = self.conversations.len() - self.limits.max_cached;
        let idle: Vec<ConversationId> = self
            .conversations
            .iter()
            .filter(|(_, state)| matches!(state, Conversation::Ready { in_flight: 0, .. }))
            .map(|(id, _)| *id)
            .take(excess)
            .collect();
        for id in idle {
            self.conversations.remove(&id);
        }
    }
}

fn assign<R>(next_seq: &mut Seq, in_flight: &mut usize, append: Append, reply: R) -> Assigned<R> {
    let seq = *next_seq;
    *next_seq += 1;
    *in_flight += 1;
    Assigned {
        record: MessageRecord {
            conversation: append.conversation,
            seq,
            sender: append.sender,
            sender_device: append.sender_device,
            client_msg_id: append.client_msg_id,
            body: append.body,
            server_time_ms: unix_ms(),
        },
        reply,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    fn conversation(other: u64) -> ConversationId {
        ConversationId::direct(user(1), user(other))
    }

    fn append(other: u64, id: &str) -> Append {
        Append {
            conversation: conversation(other),
            sender: user(1),
            sender_device: DeviceId::new(1).unwrap(),
            client_msg_id: id.into(),
            body: "hi".into(),
        }
    }

    fn sequencer(max_pending: usize, max_cached: usize) -> Sequencer<u32> {
        Sequencer::new(SequencerLimits {
            max_pending,
            max_cached,
        })
    }

    #[test]
    fn first_append_loads_then_seqs_continue_from_the_store() {
        let mut seq = sequencer(100, 100);
        assert!(
            matches!(seq.submit(append(2, "a"), 1), Admission::Load(c) if c == conversation(2))
        );
        assert!(matches!(seq.submit(append(2, "b"), 2), Admission::Queued));
        let assigned = seq.loaded(conversation(2), 41);
        let seqs: Vec<_> = assigned.iter().map(|a| (a.record.seq, a.reply)).collect();
        assert_eq!(seqs, vec![(42, 1), (43, 2)]);
        let Admission::Assigned(next) = seq.submit(append(2, "c"), 3) else {
            panic!("expected an assignment");
        };
        assert_eq!(next.record.seq, 44);
        assert_eq!(seq.pending, 3);
    }

    #[test]
    fn conversations_are_sequenced_independently() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        seq.submit(append(3, "a"), 2);
        assert_eq!(seq.loaded(conversation(2), 0)[0].record.seq, 1);
        assert_eq!(seq.loaded(conversation(3), 7)[0].record.seq, 8);
    }

    #[test]
    fn overload_is_refused_not_queued() {
        let mut seq = sequencer(2, 100);
        seq.submit(append(2, "a"), 1);
        seq.submit(append(2, "b"), 2);
        assert!(matches!(
            seq.submit(append(2, "c"), 3),
            Admission::Overloaded(_, 3)
        ));
        seq.load_failed(conversation(2));
        assert_eq!(seq.pending, 0);
    }

    #[test]
    fn failed_commit_forgets_the_conversation_so_it_reloads() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        seq.loaded(conversation(2), 0);
        seq.commit_failed(conversation(2));
        assert!(matches!(seq.submit(append(2, "b"), 2), Admission::Load(_)));
    }

    #[test]
    fn only_idle_conversations_are_evicted() {
        let mut seq = sequencer(100, 1);
        seq.submit(append(2, "a"), 1);
        seq.loaded(conversation(2), 0);
        seq.submit(append(3, "a"), 2);
        seq.loaded(conversation(3), 0);
        // Both in flight: nothing may be evicted, whatever the cap says.
        let Admission::Assigned(a) = seq.submit(append(2, "b"), 3) else {
            panic!("conversation 2 must still be cached");
        };
        assert_eq!(a.record.seq, 2);
        seq.committed(conversation(2));
        seq.committed(conversation(2));
        // Conversation 2 is idle now and over the cap: it is forgotten.
        assert!(matches!(seq.submit(append(2, "c"), 4), Admission::Load(_)));
    }
}
