//! Gap-free, idempotent sequencing of the conversations one shard owns.
//!
//! Every append passes a *check* before it gets a seq: the caller looks its
//! `(sender device, client_msg_id)` up in the store (and, on a conversation's first
//! use, reads the stored maximum seq and checks the members exist), then reports
//! back with [`Sequencer::checked`]. An append found in the store is answered with
//! its original seq instead of a new one. Appends arriving while a check is under
//! way queue behind it, so a conversation's appends are assigned in arrival order,
//! and one check covers everything queued at its start.
//!
//! Keys of appends assigned but not yet committed are kept in memory: a retry that
//! arrives meanwhile joins the original and gets the same ack. Once committed, the
//! key is in the store (written in the same batch as the message), and in the
//! conversation's [`Sent`] sets: once a device's stored ids are loaded, its new
//! keys are answered from memory, and a check that has nothing left to read
//! needs no store at all ([`Check::needs_store`]).
//!
//! Limits: at most `max_pending` appends waiting for a check or a commit (beyond it
//! callers are told to back off), at most `max_cached` conversations kept (an
//! idle one is forgotten first, which is safe because its next seq can be read
//! back from the store), and at most `max_sent_records` send records in memory
//! (beyond, the loaded sets are dropped and reload on use).
//!
//! Generic over the reply handle `R`, so it is tested without channels.

use super::ChatError;
use super::access::NOT_A_MEMBER;
use super::group::GroupState;
use super::sent::{Answer, Sent};
use crate::store::{Amendment, GroupEvent, GroupRecord, MessageRecord, StoredSend};
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};
use confab_protocol::{Append, Content, GroupCommand, SendKey};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// An append with its seq assigned, ready to commit.
#[derive(Debug)]
pub struct Assigned<R> {
    /// The message, with its seq.
    pub record: MessageRecord,
    /// Who receives it: the conversation's members as of this message (a removed
    /// or leaving member still receives its own removal).
    pub recipients: Arc<[UserId]>,
    /// Whom to answer.
    pub reply: R,
}

/// What happened to a submitted append.
#[derive(Debug)]
pub enum Admission<R> {
    /// Queued: the caller must run this check and report with `checked`.
    Check(Check),
    /// Queued behind a check under way, or joined an identical append in flight.
    Queued,
    /// Too much pending: refuse it.
    Overloaded(Append, R),
}

/// A lookup the caller performs for the sequencer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The conversation to look up.
    pub conversation: ConversationId,
    /// The send keys memory cannot answer for: look them up.
    pub keys: Vec<SendKey>,
    /// Devices whose stored ids to read ([`crate::store::MessageStore::sent_ids`])
    /// beside the check, not as part of it, so their next keys are answered
    /// from memory: report each with [`Sequencer::loaded`] and its ticket.
    pub load: Vec<(DeviceId, u64)>,
    /// Messages that edits and deletes among the appends target: read them.
    pub targets: Vec<Seq>,
    /// The conversation is not loaded: also read its last seq, check a direct
    /// conversation's members exist, and load a group.
    pub first_use: bool,
}

impl Check {
    /// Whether the check reads anything; if not, report an empty result.
    pub fn needs_store(&self) -> bool {
        self.first_use || !self.keys.is_empty() || !self.targets.is_empty()
    }
}

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Set when the check was a first use.
    pub last_seq: Option<Seq>,
    /// On a group's first use: the group, if it exists.
    pub group: Option<GroupRecord>,
    /// Keys already stored, with what they were stored as.
    pub stored: HashMap<SendKey, StoredSend>,
    /// The stored messages among `Check::targets`.
    pub targets: HashMap<Seq, MessageRecord>,
}

/// An append resolved by a check.
#[derive(Debug)]
pub enum Outcome<R> {
    /// Got a new seq: commit it.
    Assigned(Assigned<R>),
    /// Already stored: answer with the original seq.
    Duplicate {
        /// The conversation.
        conversation: ConversationId,
        /// The sender's idempotency key.
        client_msg_id: String,
        /// What the original was stored as.
        stored: StoredSend,
        /// Whom to answer.
        reply: R,
    },
    /// Not allowed: answer with the error.
    Refused {
        /// Why.
        error: ChatError,
        /// Whom to tell.
        reply: R,
    },
}

/// What a sequencer admits and keeps.
#[derive(Debug, Clone, Copy)]
pub struct SequencerLimits {
    /// Appends waiting for a check or a commit, at most; beyond, `Overloaded`.
    pub max_pending: usize,
    /// Conversations kept in memory, at most; idle ones are forgotten first.
    pub max_cached: usize,
    /// Members a group may have.
    pub max_group_members: usize,
    /// Send records kept in memory across conversations, at most; 0: none,
    /// every possible retry is checked in the store.
    pub max_sent_records: usize,
    /// How long a send key stays taken (the dedup window).
    pub dedup_window_ms: u64,
}

#[derive(Debug)]
struct Conversation<R> {
    /// `None` until the first check read it from the store.
    next_seq: Option<Seq>,
    /// Appends waiting for a check, in arrival order.
    queue: Vec<(Append, R)>,
    /// How many queued appends the check under way covers (0: none under way).
    checking: usize,
    /// Assigned, not yet committed: retries that joined them.
    in_flight: HashMap<SendKey, Vec<R>>,
    /// A group's members, once loaded (or created).
    group: Option<GroupState>,
    /// Messages deleted since the conversation was loaded (the store may not have
    /// committed the delete when a later check reads it).
    deleted: HashSet<Seq>,
    /// What its devices have sent, as far as memory knows.
    sent: Sent,
}

impl<R> Conversation<R> {
    fn new() -> Self {
        Self {
            next_seq: None,
            queue: Vec::new(),
            checking: 0,
            in_flight: HashMap::new(),
            group: None,
            deleted: HashSet::new(),
            sent: Sent::default(),
        }
    }

    /// Whether `sender` may edit or delete `target`, given what the store holds.
    fn check_amendment(
        &mut self,
        sender: UserId,
        content: &Content,
        targets: &HashMap<Seq, MessageRecord>,
    ) -> Result<(), ChatError> {
        let Some(target) = content.target() else {
            return Ok(());
        };
        let message = targets.get(&target).ok_or(ChatError::UnknownMessage)?;
        if message.sender != sender {
            return Err(ChatError::Forbidden("only the author edits or deletes a message"));
        }
        if message.event.is_some() || message.amends.is_some() {
            return Err(ChatError::BadRequest(
                "system messages, edits and deletes cannot be changed",
            ));
        }
        if message.deleted || self.deleted.contains(&target) {
            return Err(ChatError::UnknownMessage);
        }
        if let Content::Delete { target } = content {
            self.deleted.insert(*target);
        }
        Ok(())
    }

    /// The event (for a group change) and the recipients of `append`, applying a
    /// group change at once so later appends see it.
    fn resolve(
        &mut self,
        id: ConversationId,
        append: &Append,
        targets: &HashMap<Seq, MessageRecord>,
        max_members: usize,
    ) -> Result<(Option<GroupEvent>, Arc<[UserId]>), ChatError> {
        let sender = append.sender;
        let not_member = NOT_A_MEMBER;
        let is_member = match (id, &self.group) {
            (ConversationId::Direct { .. }, _) => true,
            (ConversationId::Group(_), Some(group)) => group.role(sender).is_some(),
            (ConversationId::Group(_), None) => false,
        };
        if matches!(append.content, Content::Edit { .. } | Content::Delete { .. }) {
            if !is_member {
                return Err(not_member);
            }
            self.check_amendment(sender, &append.content, targets)?;
        }
        if let ConversationId::Direct { .. } = id {
            return match append.content {
                Content::Group(_) => Err(ChatError::BadRequest("a direct conversation is not a group")),
                _ => Ok((None, id.direct_members().collect())),
            };
        }
        match (&append.content, self.group.as_mut()) {
            (Content::Text(_) | Content::Edit { .. } | Content::Delete { .. }, Some(group)) if is_member => {
                Ok((None, group.recipients()))
            }
            (Content::Text(_) | Content::Edit { .. } | Content::Delete { .. }, _) => Err(not_member),
            (Content::Group(GroupCommand::Create { title, members }), None) => {
                let event = GroupState::create(sender, title.clone(), members.clone(), max_members)?;
                let group = GroupState::created(sender, &event);
                let recipients = group.recipients();
                self.group = Some(group);
                Ok((Some(event), recipients))
            }
            (Content::Group(GroupCommand::Create { .. }), Some(_)) => Err(ChatError::AlreadyExists),
            (Content::Group(_), None) => Err(not_member),
            (Content::Group(command), Some(group)) => {
                let event = group.authorize(sender, command.clone(), max_members)?;
                let before = group.recipients();
                group.apply(sender, &event);
                let recipients = match event {
                    GroupEvent::MemberRemoved(_) | GroupEvent::MemberLeft { .. } => before,
                    _ => group.recipients(),
                };
                Ok((Some(event), recipients))
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.next_seq.is_some() && self.queue.is_empty() && self.checking == 0 && self.in_flight.is_empty()
    }

    /// Starts a check of everything queued, if none is under way; with
    /// `remember`, it also loads the sets of devices memory knows nothing of.
    fn start_check(&mut self, conversation: ConversationId, tickets: &mut u64, remember: bool) -> Option<Check> {
        if self.checking > 0 || self.queue.is_empty() {
            return None;
        }
        self.checking = self.queue.len();
        let keys: Vec<SendKey> = self
            .queue
            .iter()
            .map(|(append, _)| append.key())
            .filter(|key| self.sent.answer(key) == Answer::AskStore)
            .collect();
        Some(Check {
            conversation,
            load: match remember {
                true => self.sent.start_loads(&keys, tickets),
                false => Vec::new(),
            },
            keys,
            targets: self
                .queue
                .iter()
                .filter_map(|(append, _)| append.content.target())
                .collect(),
            first_use: self.next_seq.is_none(),
        })
    }
}

/// Gap-free, idempotent sequencing of the conversations one shard owns.
#[derive(Debug)]
pub struct Sequencer<R> {
    conversations: HashMap<ConversationId, Conversation<R>>,
    pending: usize,
    /// Send records held by all conversations' [`Sent`] sets.
    sent_records: usize,
    /// The last ticket given to a load of a device's ids.
    load_tickets: u64,
    limits: SequencerLimits,
}

impl<R> Sequencer<R> {
    /// An empty sequencer.
    pub fn new(limits: SequencerLimits) -> Self {
        Self {
            conversations: HashMap::new(),
            pending: 0,
            sent_records: 0,
            load_tickets: 0,
            limits,
        }
    }

    /// A loaded group's current members.
    pub fn group_recipients(&self, id: ConversationId) -> Option<Arc<[UserId]>> {
        self.conversations.get(&id)?.group.as_ref().map(GroupState::recipients)
    }

    /// Takes an append: queued, to be checked first, or refused as overload.
    pub fn submit(&mut self, append: Append, reply: R) -> Admission<R> {
        if self.pending >= self.limits.max_pending {
            return Admission::Overloaded(append, reply);
        }
        self.pending += 1;
        let id = append.conversation;
        let conversation = self.conversations.entry(id).or_insert_with(Conversation::new);
        if let Some(waiters) = conversation.in_flight.get_mut(&append.key()) {
            waiters.push(reply);
            return Admission::Queued;
        }
        conversation.queue.push((append, reply));
        match conversation.start_check(id, &mut self.load_tickets, self.limits.max_sent_records > 0) {
            Some(check) => Admission::Check(check),
            None => Admission::Queued,
        }
    }

    /// A check finished: resolves the appends it covered, in order, and returns the
    /// next check to run if more queued meanwhile. Messages assigned now get
    /// `now_ms` as their server time.
    pub fn checked(
        &mut self,
        id: ConversationId,
        result: CheckResult,
        now_ms: u64,
    ) -> (Vec<Outcome<R>>, Option<Check>) {
        let Some(conversation) = self.conversations.get_mut(&id) else {
            return (Vec::new(), None);
        };
        if conversation.next_seq.is_none() {
            let Some(last_seq) = result.last_seq else {
                // A failed commit forgot the conversation while this check ran: its
                // result says nothing of where seqs continue. Check again, reading it.
                conversation.checking = 0;
                return (
                    Vec::new(),
                    conversation.start_check(id, &mut self.load_tickets, self.limits.max_sent_records > 0),
                );
            };
            conversation.next_seq = Some(last_seq + 1);
            conversation.group = result.group.map(GroupState::from_record);
        }
        let covered = conversation.checking.min(conversation.queue.len());
        conversation.checking = 0;
        let mut outcomes = Vec::with_capacity(covered);
        let queued: Vec<_> = conversation.queue.drain(..covered).collect();
        let since_ms = now_ms.saturating_sub(self.limits.dedup_window_ms);
        for (append, reply) in queued {
            let key = append.key();
            let remembered = match conversation.sent.answer(&key) {
                Answer::Stored(stored) if stored.server_time_ms >= since_ms => Some(stored),
                Answer::Stored(_) | Answer::New | Answer::AskStore => None,
            };
            if let Some(stored) = result.stored.get(&key).copied().or(remembered) {
                self.pending -= 1;
                outcomes.push(Outcome::Duplicate {
                    conversation: id,
                    client_msg_id: append.client_msg_id,
                    stored,
                    reply,
                });
            } else if let Some(waiters) = conversation.in_flight.get_mut(&key) {
                waiters.push(reply);
            } else {
                match conversation.resolve(id, &append, &result.targets, self.limits.max_group_members) {
                    Ok((event, recipients)) => {
                        let next_seq = conversation.next_seq.get_or_insert(1);
                        conversation.in_flight.insert(key, Vec::new());
                        outcomes.push(Outcome::Assigned(assign(
                            next_seq, now_ms, append, event, recipients, reply,
                        )));
                    }
                    Err(error) => {
                        self.pending -= 1;
                        outcomes.push(Outcome::Refused { error, reply });
                    }
                }
            }
        }
        let next = conversation.start_check(id, &mut self.load_tickets, self.limits.max_sent_records > 0);
        self.evict_idle();
        (outcomes, next)
    }

    /// A check failed: hands back everything it covered, to be refused. Queued
    /// appends it did not cover get a check of their own.
    pub fn check_failed(&mut self, id: ConversationId) -> (Vec<(Append, R)>, Option<Check>) {
        let Some(conversation) = self.conversations.get_mut(&id) else {
            return (Vec::new(), None);
        };
        let covered = conversation.checking.min(conversation.queue.len());
        conversation.checking = 0;
        let refused: Vec<_> = conversation.queue.drain(..covered).collect();
        self.pending -= refused.len();
        let next = conversation.start_check(id, &mut self.load_tickets, self.limits.max_sent_records > 0);
        if next.is_none() && conversation.next_seq.is_none() && conversation.in_flight.is_empty() {
            self.forget(id);
        }
        (refused, next)
    }

    /// The load of `device`'s ids in `id` with `ticket` read `ids` (`None`: the
    /// store cannot list them all).
    pub fn loaded(&mut self, id: ConversationId, device: DeviceId, ticket: u64, ids: Option<Vec<String>>) {
        self.change_sent(id, |sent| sent.loaded(device, ticket, ids));
    }

    /// The load of `device`'s ids in `id` with `ticket` failed.
    pub fn load_failed(&mut self, id: ConversationId, device: DeviceId, ticket: u64) {
        self.change_sent(id, |sent| sent.load_failed(device, ticket));
    }

    /// The append `key` of `id` is durable, `stored` so: returns the retries that
    /// joined it, to be answered with the same ack.
    pub fn committed(&mut self, id: ConversationId, key: &SendKey, stored: StoredSend) -> Vec<R> {
        self.change_sent(id, |sent| sent.record(key, stored));
        let joined = self.finish(id, key);
        self.evict_idle();
        joined
    }

    /// The append `key` of `id` failed to commit: returns the retries that joined
    /// it, to be refused too. Its seq may or may not be stored, so the conversation
    /// is forgotten once nothing else of it is in flight, and re-read on next use.
    /// The caller fails every later append of `id` already assigned too: stored
    /// after a missing one, it would leave a gap.
    pub fn commit_failed(&mut self, id: ConversationId, key: &SendKey) -> Vec<R> {
        let joined = self.finish(id, key);
        self.change_sent(id, Sent::clear);
        if let Some(conversation) = self.conversations.get_mut(&id) {
            conversation.next_seq = None;
            conversation.group = None;
            conversation.deleted.clear();
            if conversation.in_flight.is_empty() && conversation.queue.is_empty() {
                self.forget(id);
            }
        }
        joined
    }

    /// Applies `change` to the send records of `id`, keeping their count across
    /// conversations within `max_sent_records`.
    fn change_sent(&mut self, id: ConversationId, change: impl FnOnce(&mut Sent)) {
        let Some(conversation) = self.conversations.get_mut(&id) else {
            return;
        };
        let before = conversation.sent.entries();
        change(&mut conversation.sent);
        self.sent_records = self.sent_records - before + conversation.sent.entries();
        if self.sent_records > self.limits.max_sent_records {
            tracing::info!(
                records = self.sent_records,
                "send records in memory past their limit: dropping the loaded sets"
            );
            for conversation in self.conversations.values_mut() {
                conversation.sent.shed();
            }
            self.sent_records = self.conversations.values().map(|c| c.sent.entries()).sum();
        }
    }

    fn forget(&mut self, id: ConversationId) {
        if let Some(conversation) = self.conversations.remove(&id) {
            self.sent_records -= conversation.sent.entries();
        }
    }

    fn finish(&mut self, id: ConversationId, key: &SendKey) -> Vec<R> {
        let joined = self
            .conversations
            .get_mut(&id)
            .and_then(|conversation| conversation.in_flight.remove(key))
            .unwrap_or_default();
        self.pending = self.pending.saturating_sub(1 + joined.len());
        joined
    }

    fn evict_idle(&mut self) {
        if self.conversations.len() <= self.limits.max_cached {
            return;
        }
        let excess = self.conversations.len() - self.limits.max_cached;
        let idle: Vec<ConversationId> = self
            .conversations
            .iter()
            .filter(|(_, conversation)| conversation.is_idle())
            .map(|(id, _)| *id)
            .take(excess)
            .collect();
        for id in idle {
            self.forget(id);
        }
    }
}

fn assign<R>(
    next_seq: &mut Seq,
    now_ms: u64,
    append: Append,
    event: Option<GroupEvent>,
    recipients: Arc<[UserId]>,
    reply: R,
) -> Assigned<R> {
    let seq = *next_seq;
    *next_seq += 1;
    let (body, amends) = match append.content {
        Content::Text(body) => (body, None),
        Content::Group(_) => (String::new(), None),
        Content::Edit { target, body } => (body, Some(Amendment::Edit(target))),
        Content::Delete { target } => (String::new(), Some(Amendment::Delete(target))),
    };
    Assigned {
        record: MessageRecord {
            conversation: append.conversation,
            seq,
            sender: append.sender,
            sender_device: append.sender_device,
            client_msg_id: append.client_msg_id,
            body,
            server_time_ms: now_ms,
            event,
            amends,
            deleted: false,
            edited_by: None,
        },
        recipients,
        reply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_protocol::ids::DeviceId;

    /// The clock the tests pass in.
    const NOW_MS: u64 = 1_700_000_000_000;

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    fn device() -> DeviceId {
        DeviceId::new(1).unwrap()
    }

    fn conversation(other: u64) -> ConversationId {
        ConversationId::direct(user(1), user(other))
    }

    fn append(other: u64, id: &str) -> Append {
        Append {
            conversation: conversation(other),
            sender: user(1),
            sender_device: device(),
            client_msg_id: id.into(),
            content: Content::Text("hi".into()),
        }
    }

    fn sequencer(max_pending: usize, max_cached: usize) -> Sequencer<u32> {
        Sequencer::new(SequencerLimits {
            max_pending,
            max_cached,
            max_group_members: 10,
            max_sent_records: 1_000,
            dedup_window_ms: u64::MAX,
        })
    }

    /// What a commit at `NOW_MS` stored.
    fn stored(seq: Seq) -> StoredSend {
        StoredSend {
            seq,
            server_time_ms: NOW_MS,
        }
    }

    fn key(id: &str) -> SendKey {
        (device(), id.to_owned())
    }

    fn loaded(last_seq: Seq) -> CheckResult {
        CheckResult {
            last_seq: Some(last_seq),
            ..CheckResult::default()
        }
    }

    /// The assigned outcomes.
    fn assignments(outcomes: &[Outcome<u32>]) -> impl Iterator<Item = &Assigned<u32>> {
        outcomes.iter().filter_map(|outcome| match outcome {
            Outcome::Assigned(a) => Some(a),
            Outcome::Duplicate { .. } | Outcome::Refused { .. } => None,
        })
    }

    /// Seqs and replies of the assigned outcomes.
    fn assigned(outcomes: &[Outcome<u32>]) -> Vec<(Seq, u32)> {
        assignments(outcomes).map(|a| (a.record.seq, a.reply)).collect()
    }

    #[test]
    fn first_use_checks_then_seqs_continue_from_the_store() {
        let mut seq = sequencer(100, 100);
        let Admission::Check(check) = seq.submit(append(2, "a"), 1) else {
            panic!("expected a check");
        };
        assert!(check.first_use);
        assert!(matches!(seq.submit(append(2, "b"), 2), Admission::Queued));
        let (outcomes, next) = seq.checked(conversation(2), loaded(41), NOW_MS);
        assert_eq!(assigned(&outcomes), vec![(42, 1)]);
        // "b" queued during the first check gets a check of its own.
        let next = next.unwrap();
        assert!(!next.first_use);
        assert_eq!(next.keys, vec![(device(), "b".to_owned())]);
        let (outcomes, next) = seq.checked(conversation(2), CheckResult::default(), NOW_MS);
        assert_eq!(assigned(&outcomes), vec![(43, 2)]);
        assert!(next.is_none());
        assert_eq!(seq.pending, 2);
    }

    #[test]
    fn an_assigned_message_carries_the_clock_passed_in() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        let (outcomes, _) = seq.checked(conversation(2), loaded(0), NOW_MS);
        let times: Vec<u64> = assignments(&outcomes).map(|a| a.record.server_time_ms).collect();
        assert_eq!(times, vec![NOW_MS]);
    }

    #[test]
    fn conversations_are_sequenced_independently() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        seq.submit(append(3, "a"), 2);
        assert_eq!(
            assigned(&seq.checked(conversation(2), loaded(0), NOW_MS).0),
            vec![(1, 1)]
        );
        assert_eq!(
            assigned(&seq.checked(conversation(3), loaded(7), NOW_MS).0),
            vec![(8, 2)]
        );
    }

    #[test]
    fn a_stored_send_is_answered_with_its_original_seq() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        let mut result = loaded(10);
        let original = StoredSend {
            seq: 7,
            server_time_ms: 123,
        };
        result.stored.insert((device(), "a".to_owned()), original);
        let (outcomes, _) = seq.checked(conversation(2), result, NOW_MS);
        let [Outcome::Duplicate { stored, reply: 1, .. }] = outcomes.as_slice() else {
            panic!("expected a duplicate, got {outcomes:?}");
        };
        assert_eq!(*stored, original);
        assert_eq!(seq.pending, 0);
        // The next new message still continues from the stored maximum.
        seq.submit(append(2, "b"), 2);
        assert_eq!(
            assigned(&seq.checked(conversation(2), CheckResult::default(), NOW_MS).0),
            vec![(11, 2)]
        );
    }

    #[test]
    fn a_retry_of_an_append_in_flight_joins_it() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        seq.checked(conversation(2), loaded(0), NOW_MS);
        // In flight: the retry needs no check and gets no seq of its own.
        assert!(matches!(seq.submit(append(2, "a"), 2), Admission::Queued));
        assert_eq!(seq.committed(conversation(2), &key("a"), stored(1)), vec![2]);
        assert_eq!(seq.pending, 0);
    }

    #[test]
    fn duplicates_within_one_check_get_one_seq() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        // Two copies of "c" queue behind the first check, so one check covers both.
        seq.submit(append(2, "c"), 2);
        seq.submit(append(2, "c"), 3);
        let (_, next) = seq.checked(conversation(2), loaded(0), NOW_MS);
        assert_eq!(next.unwrap().keys.len(), 2);
        let (outcomes, _) = seq.checked(conversation(2), CheckResult::default(), NOW_MS);
        assert_eq!(assigned(&outcomes), vec![(2, 2)]);
        assert_eq!(seq.committed(conversation(2), &key("c"), stored(2)), vec![3]);
    }

    #[test]
    fn overload_is_refused_not_queued() {
        let mut seq = sequencer(2, 100);
        seq.submit(append(2, "a"), 1);
        seq.submit(append(2, "b"), 2);
        assert!(matches!(seq.submit(append(2, "c"), 3), Admission::Overloaded(_, 3)));
        let (refused, next) = seq.check_failed(conversation(2));
        assert_eq!(refused.len(), 1);
        assert!(next.is_some(), "b was queued after the failed check started");
    }

    #[test]
    fn failed_commit_forgets_the_conversation_so_it_reloads() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        seq.checked(conversation(2), loaded(0), NOW_MS);
        seq.commit_failed(conversation(2), &(device(), "a".to_owned()));
        let Admission::Check(check) = seq.submit(append(2, "b"), 2) else {
            panic!("expected a check");
        };
        assert!(check.first_use);
    }

    #[test]
    fn a_check_overtaken_by_a_failed_commit_is_redone_as_a_first_use() {
        let mut seq = sequencer(100, 100);
        seq.submit(append(2, "a"), 1);
        seq.checked(conversation(2), loaded(41), NOW_MS);
        let Admission::Check(check) = seq.submit(append(2, "b"), 2) else {
            panic!("expected a check");
        };
        assert!(!check.first_use);
        // "a" fails to commit while the check of "b" is under way.
        seq.commit_failed(conversation(2), &(device(), "a".to_owned()));
        let (outcomes, next) = seq.checked(conversation(2), CheckResult::default(), NOW_MS);
        assert!(outcomes.is_empty(), "no seq without knowing the stored maximum");
        let next = next.unwrap();
        assert!(next.first_use);
        assert_eq!(next.keys, vec![(device(), "b".to_owned())]);
        assert_eq!(
            assigned(&seq.checked(conversation(2), loaded(41), NOW_MS).0),
            vec![(42, 2)]
        );
    }

    #[test]
    fn only_idle_conversations_are_evicted() {
        let mut seq = sequencer(100, 1);
        seq.submit(append(2, "a"), 1);
        seq.checked(conversation(2), loaded(0), NOW_MS);
        seq.submit(append(3, "a"), 2);
        seq.checked(conversation(3), loaded(0), NOW_MS);
        // Both in flight: nothing may be evicted, whatever the cap says.
        assert_eq!(seq.conversations.len(), 2);
        seq.committed(conversation(2), &key("a"), stored(1));
        // Conversation 2 is idle now and over the cap: it is forgotten.
        assert_eq!(seq.conversations.len(), 1);
        let Admission::Check(check) = seq.submit(append(2, "b"), 3) else {
            panic!("expected a check");
        };
        assert!(check.first_use);
    }

    /// Runs the loads `check` asks for against a store holding `ids`.
    fn load(seq: &mut Sequencer<u32>, check: &Check, ids: &[&str]) {
        for (device, ticket) in &check.load {
            let ids = ids.iter().map(|id| (*id).to_owned()).collect();
            seq.loaded(check.conversation, *device, *ticket, Some(ids));
        }
    }

    /// Submits an append that must start a check.
    fn check_of(seq: &mut Sequencer<u32>, sent: Append, reply: u32) -> Check {
        match seq.submit(sent, reply) {
            Admission::Check(check) => check,
            other => panic!("expected a check, got {other:?}"),
        }
    }

    #[test]
    fn once_a_device_is_loaded_its_sends_are_answered_from_memory() {
        let mut seq = sequencer(100, 100);
        let check = check_of(&mut seq, append(2, "a"), 1);
        assert_eq!(check.load, vec![(device(), 1)]);
        assert_eq!(check.keys, vec![key("a")], "asked while the device loads");
        load(&mut seq, &check, &[]);
        let (outcomes, _) = seq.checked(conversation(2), loaded(0), NOW_MS);
        assert_eq!(assigned(&outcomes), vec![(1, 1)]);
        // A new key of a loaded device: nothing to read.
        let check = check_of(&mut seq, append(2, "b"), 2);
        assert!(!check.needs_store(), "{check:?}");
        let (outcomes, _) = seq.checked(conversation(2), CheckResult::default(), NOW_MS);
        assert_eq!(assigned(&outcomes), vec![(2, 2)]);
        // A retry of a committed send: answered with the original, still without a read.
        seq.committed(conversation(2), &key("a"), stored(1));
        let check = check_of(&mut seq, append(2, "a"), 3);
        assert!(!check.needs_store());
        let (outcomes, _) = seq.checked(conversation(2), CheckResult::default(), NOW_MS);
        let [
            Outcome::Duplicate {
                stored: original,
                reply: 3,
                ..
            },
        ] = outcomes.as_slice()
        else {
            panic!("expected a duplicate, got {outcomes:?}");
        };
        assert_eq!(*original, stored(1));
    }

    #[test]
    fn a_send_past_the_dedup_window_is_new_again() {
        let mut seq = Sequencer::new(SequencerLimits {
            dedup_window_ms: 1_000,
            ..sequencer(100, 100).limits
        });
        let check = check_of(&mut seq, append(2, "a"), 1);
        load(&mut seq, &check, &[]);
        seq.checked(conversation(2), loaded(0), NOW_MS);
        seq.committed(conversation(2), &key("a"), stored(1));
        seq.submit(append(2, "a"), 2);
        let (outcomes, _) = seq.checked(conversation(2), CheckResult::default(), NOW_MS + 1_001);
        assert_eq!(assigned(&outcomes), vec![(2, 2)]);
    }

    #[test]
    fn a_failed_commit_or_load_drops_what_memory_knew() {
        let mut seq = sequencer(100, 100);
        let first = check_of(&mut seq, append(2, "a"), 1);
        load(&mut seq, &first, &[]);
        seq.checked(conversation(2), loaded(0), NOW_MS);
        seq.submit(append(2, "b"), 2);
        seq.commit_failed(conversation(2), &key("a"));
        let (outcomes, next) = seq.checked(conversation(2), CheckResult::default(), NOW_MS);
        assert!(outcomes.is_empty());
        let next = next.unwrap();
        assert_eq!(
            next.load,
            vec![(device(), 2)],
            "what the failed commit stored is unknown: reload"
        );
        assert!(next.first_use);
        assert_eq!(seq.sent_records, 0);
        // A late answer to the first load changes nothing.
        load(&mut seq, &first, &["x"]);
        assert_eq!(seq.sent_records, 0);
        // The load fails: the next check loads again.
        seq.load_failed(conversation(2), device(), 2);
        seq.checked(conversation(2), loaded(1), NOW_MS);
        let check = check_of(&mut seq, append(2, "c"), 3);
        assert_eq!(check.load, vec![(device(), 3)]);
    }

    #[test]
    fn send_records_in_memory_are_bounded() {
        let mut seq = Sequencer::new(SequencerLimits {
            max_sent_records: 3,
            ..sequencer(100, 100).limits
        });
        let check = check_of(&mut seq, append(2, "a"), 1);
        load(&mut seq, &check, &["x", "y"]);
        seq.checked(conversation(2), loaded(0), NOW_MS);
        assert_eq!(seq.sent_records, 2);
        seq.committed(conversation(2), &key("a"), stored(1));
        assert_eq!(seq.sent_records, 3);
        let check = check_of(&mut seq, append(3, "a"), 2);
        load(&mut seq, &check, &[]);
        seq.checked(conversation(3), loaded(0), NOW_MS);
        seq.committed(conversation(3), &key("a"), stored(1));
        assert_eq!(seq.sent_records, 0, "past the limit, the loaded sets go");
        let check = check_of(&mut seq, append(2, "b"), 3);
        assert_eq!(check.load, vec![(device(), 3)]);
    }

    #[test]
    fn with_no_room_for_send_records_every_key_is_checked_in_the_store() {
        let mut seq = Sequencer::new(SequencerLimits {
            max_sent_records: 0,
            ..sequencer(100, 100).limits
        });
        let check = check_of(&mut seq, append(2, "a"), 1);
        assert!(check.load.is_empty(), "nothing to load: {check:?}");
        let (outcomes, _) = seq.checked(conversation(2), loaded(0), NOW_MS);
        assert_eq!(assigned(&outcomes), vec![(1, 1)]);
        seq.committed(conversation(2), &key("a"), stored(1));
        let check = check_of(&mut seq, append(2, "b"), 2);
        assert!(check.load.is_empty());
        assert_eq!(check.keys, vec![key("b")], "a new key is asked of the store");
        assert_eq!(seq.sent_records, 0);
    }

    /// Gap-free and idempotent under every interleaving: two conversations (one
    /// cached at a time), two devices retrying from a small pool of ids, checks
    /// that read a model store when they run, and commits of a prefix of each
    /// conversation's assigned messages that succeed, or fail and may or may
    /// not have been stored (and then refuse what was assigned after them, as
    /// the owner does). Every append is answered once; an acknowledged seq is
    /// the one stored for its id; no id is stored twice; stored seqs have no gap.
    #[test]
    fn sequencing_stays_gap_free_and_idempotent_through_failed_commits() {
        use rand::{Rng as _, SeedableRng as _};
        use std::collections::{BTreeMap, VecDeque};
        #[derive(Default)]
        struct Stored {
            by_seq: BTreeMap<Seq, SendKey>,
            by_key: HashMap<SendKey, Seq>,
        }
        impl Stored {
            fn insert(&mut self, at: Seq, key: &SendKey, round: u32) {
                assert!(
                    self.by_seq.insert(at, key.clone()).is_none(),
                    "round {round}: seq {at} reused"
                );
                assert!(
                    self.by_key.insert(key.clone(), at).is_none(),
                    "round {round}: {key:?} stored twice"
                );
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..2_000 {
            let mut seq = sequencer(rng.random_range(4..64), 1);
            let mut store: HashMap<ConversationId, Stored> = HashMap::new();
            let mut checks: Vec<Check> = Vec::new();
            // Loads under way: (conversation, device, ticket, the ids read if
            // the store was read when the load started, else read when it ends).
            let mut loads: Vec<(ConversationId, DeviceId, u64, Option<Vec<String>>)> = Vec::new();
            let ids_of =
                |store: &HashMap<ConversationId, Stored>, id: ConversationId, device: DeviceId| -> Vec<String> {
                    store.get(&id).map_or_else(Vec::new, |s| {
                        s.by_key
                            .keys()
                            .filter(|(d, _)| *d == device)
                            .map(|(_, m)| m.clone())
                            .collect()
                    })
                };
            let mut assigned: HashMap<ConversationId, VecDeque<(Seq, SendKey, u32)>> = HashMap::new();
            let mut asked: HashMap<u32, (ConversationId, SendKey)> = HashMap::new();
            let mut answers: HashMap<u32, Option<Seq>> = HashMap::new();
            let answer = |answers: &mut HashMap<u32, Option<Seq>>, reply: u32, result: Option<Seq>| {
                assert!(
                    answers.insert(reply, result).is_none(),
                    "round {round}: {reply} answered twice"
                );
            };
            let run_check = |seq: &mut Sequencer<u32>,
                             store: &HashMap<ConversationId, Stored>,
                             check: Check,
                             checks: &mut Vec<Check>,
                             assigned: &mut HashMap<ConversationId, VecDeque<(Seq, SendKey, u32)>>,
                             answers: &mut HashMap<u32, Option<Seq>>| {
                let stored = store.get(&check.conversation);
                let result = CheckResult {
                    last_seq: check
                        .first_use
                        .then(|| stored.and_then(|s| s.by_seq.keys().next_back().copied()).unwrap_or(0)),
                    stored: check
                        .keys
                        .iter()
                        .filter_map(|key| {
                            let seq = *stored?.by_key.get(key)?;
                            Some((key.clone(), StoredSend { seq, server_time_ms: 0 }))
                        })
                        .collect(),
                    ..CheckResult::default()
                };
                let (outcomes, next) = seq.checked(check.conversation, result, NOW_MS);
                for outcome in outcomes {
                    match outcome {
                        Outcome::Assigned(a) => assigned.entry(check.conversation).or_default().push_back((
                            a.record.seq,
                            (a.record.sender_device, a.record.client_msg_id),
                            a.reply,
                        )),
                        Outcome::Duplicate { stored, reply, .. } => answer(answers, reply, Some(stored.seq)),
                        Outcome::Refused { reply, .. } => answer(answers, reply, None),
                    }
                }
                checks.extend(next);
            };
            for step in 0..rng.random_range(1..120) {
                for check in &mut checks {
                    for (device, ticket) in check.load.drain(..) {
                        let early = rng.random_bool(0.5).then(|| ids_of(&store, check.conversation, device));
                        loads.push((check.conversation, device, ticket, early));
                    }
                }
                match rng.random_range(0..4) {
                    0 => {
                        let reply = step;
                        let mut sent = append(rng.random_range(2..4), &format!("m{}", rng.random_range(0..6)));
                        sent.sender_device = DeviceId::new(rng.random_range(1..3)).unwrap();
                        asked.insert(reply, (sent.conversation, sent.key()));
                        match seq.submit(sent, reply) {
                            Admission::Check(check) => checks.push(check),
                            Admission::Queued => {}
                            Admission::Overloaded(_, reply) => answer(&mut answers, reply, None),
                        }
                    }
                    1 if !checks.is_empty() => {
                        let check = checks.swap_remove(rng.random_range(0..checks.len()));
                        run_check(&mut seq, &store, check, &mut checks, &mut assigned, &mut answers);
                    }
                    2 if !loads.is_empty() => {
                        let (id, device, ticket, early) = loads.swap_remove(rng.random_range(0..loads.len()));
                        match rng.random_bool(0.9) {
                            true => {
                                let ids = early.unwrap_or_else(|| ids_of(&store, id, device));
                                seq.loaded(id, device, ticket, Some(ids));
                            }
                            false => seq.load_failed(id, device, ticket),
                        }
                    }
                    _ => {
                        let Some((&id, queue)) = assigned.iter_mut().find(|(_, queue)| !queue.is_empty()) else {
                            continue;
                        };
                        let batch: Vec<_> = queue.drain(..rng.random_range(1..=queue.len())).collect();
                        let succeeded = rng.random_bool(0.7);
                        let stored = succeeded || rng.random_bool(0.5);
                        if stored {
                            let conversation = store.entry(id).or_default();
                            for (at, key, _) in &batch {
                                conversation.insert(*at, key, round);
                            }
                        }
                        let later: Vec<_> = if succeeded {
                            Vec::new()
                        } else {
                            queue.drain(..).collect()
                        };
                        for (at, key, reply) in batch.into_iter().chain(later) {
                            let (joined, result) = match succeeded {
                                true => (
                                    seq.committed(
                                        id,
                                        &key,
                                        StoredSend {
                                            seq: at,
                                            server_time_ms: 0,
                                        },
                                    ),
                                    Some(at),
                                ),
                                false => (seq.commit_failed(id, &key), None),
                            };
                            for reply in std::iter::once(reply).chain(joined) {
                                answer(&mut answers, reply, result);
                            }
                        }
                    }
                }
            }
            // Quiesce: every check runs and every commit succeeds.
            while !checks.is_empty() || assigned.values().any(|queue| !queue.is_empty()) {
                if let Some(check) = checks.pop() {
                    run_check(&mut seq, &store, check, &mut checks, &mut assigned, &mut answers);
                    continue;
                }
                for (&id, queue) in assigned.iter_mut() {
                    for (at, key, reply) in queue.drain(..) {
                        store.entry(id).or_default().insert(at, &key, round);
                        let joined = seq.committed(
                            id,
                            &key,
                            StoredSend {
                                seq: at,
                                server_time_ms: 0,
                            },
                        );
                        for reply in std::iter::once(reply).chain(joined) {
                            answer(&mut answers, reply, Some(at));
                        }
                    }
                }
            }
            assert_eq!(
                answers.len(),
                asked.len(),
                "round {round}: an append was never answered"
            );
            for (reply, result) in &answers {
                let (id, key) = &asked[reply];
                if let Some(acked) = result {
                    let stored = store.get(id).and_then(|conversation| conversation.by_key.get(key));
                    assert_eq!(stored, Some(acked), "round {round}: {key:?} acked as {acked}");
                }
            }
            for (id, conversation) in &store {
                let seqs: Vec<Seq> = conversation.by_seq.keys().copied().collect();
                assert_eq!(
                    seqs,
                    (1..=seqs.len() as Seq).collect::<Vec<_>>(),
                    "round {round}: a gap in {id}"
                );
            }
        }
    }
}
