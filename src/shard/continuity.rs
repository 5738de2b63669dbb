//! Cluster mode: a conversation's pushes leave this node in seq order, with no
//! gap and no repeat, whichever node committed them.
//!
//! A conversation's messages reach a node from whichever node held it when they
//! were committed: this node's own owner shard, or relays from the others. A
//! holder that dies between committing and relaying, a relay dropped because
//! the link to Redis was full or down, or a paused holder's relay that arrives
//! after its successor's, would leave a gap or a repeat in the pushes. So on
//! every node the conversation's owner shard sees all of them pass, and keeps
//! per conversation the last seq handed to the node's sessions: a repeat is
//! dropped; a message past a gap is held back ([`HOLD_BACK`]) for the missing
//! ones to arrive, then the gap is filled from the store, which has every
//! acknowledged message. A gap the store cannot fill closes the recipients'
//! sessions on this node (they resume from their cursors): a push is never
//! skipped silently.
//!
//! [`Continuity`] is the bookkeeping (no I/O, tested alone); the functions
//! below run it on the owner shard: what is ready goes out through the
//! committer, the one task that hands this shard's conversations to the
//! shards, so a conversation's pushes leave in the order they were released.

use super::mesh::{Delivery, ShardMsg};
use super::{Shard, ShardId};
use crate::chat::message_frame;
use confab_protocol::HistoryRange;
use confab_protocol::ids::{ConversationId, Seq, UserId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// How long a message past a gap waits for the missing ones before they are
/// read from the store. Out-of-order arrival needs a change of holder (a
/// paused holder's late relay), so it is rare and this only delays those.
const HOLD_BACK: Duration = Duration::from_millis(100);

/// A gap wider than this is not read from the store: the recipients' sessions
/// are closed and resume instead (a resume replays up to
/// `protocol.max_replay_messages`, then syncs).
const MAX_FILL: u64 = 1_000;

/// Conversations whose last seq is remembered, per generation (about 40 bytes
/// each). A conversation idle for two generations is forgotten; its next
/// message is taken as it comes.
const MAX_TRACKED: usize = 65_536;

/// Conversations with a gap open at once, and messages held per gap; past
/// either, the gap is given up (the recipients here resume).
const MAX_GAPS: usize = 4_096;
const MAX_HELD: usize = 4_096;

/// Deliveries released and waiting for the committer, at most. Relays come
/// in through the mailbox, which never waits; while the shards they go to are
/// backed up, more are shed and their recipients here resume instead (before
/// relays went to the owner shard, a backed-up mailbox held up the inbox
/// reader; now nothing would bound this queue).
const MAX_READY: usize = 65_536;

/// What [`Continuity::offer`] did with a delivery.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Offered {
    /// Ready to go out (with any held ones it let through).
    InTurn,
    /// At or below what already went out: dropped.
    Repeat,
    /// Held behind a gap it opened: fill the gap after [`HOLD_BACK`].
    Opened,
    /// Held behind a gap already open.
    Held,
    /// A gap was given up: these users' sessions here must resume.
    Resync(Arc<[UserId]>),
}

/// The seqs a fill reads: after `after`, before `before`, for `users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Gap {
    pub after: Seq,
    pub before: Seq,
    /// The recipients of the first held message, taken as the missing
    /// messages' recipients.
    pub users: Arc<[UserId]>,
}

/// Per conversation, the last seq handed to this node's sessions, the messages
/// held behind a gap, and what is ready to go out, in order.
#[derive(Debug, Default)]
pub(super) struct Continuity {
    recent: HashMap<ConversationId, Seq>,
    older: HashMap<ConversationId, Seq>,
    held: HashMap<ConversationId, BTreeMap<Seq, Delivery>>,
    ready: Vec<Delivery>,
}

impl Continuity {
    /// Takes one delivery (ephemeral ones, seq 0, are always in turn).
    pub(super) fn offer(&mut self, delivery: Delivery) -> Offered {
        let (conversation, seq) = (delivery.conversation, delivery.seq);
        let last = match self.last(conversation) {
            Some(last) if seq != 0 => last,
            _ => {
                if seq != 0 {
                    self.set_last(conversation, seq);
                }
                self.ready.push(delivery);
                return Offered::InTurn;
            }
        };
        if seq <= last {
            return Offered::Repeat;
        }
        if seq == last + 1 {
            self.set_last(conversation, seq);
            self.ready.push(delivery);
            self.release(conversation);
            return Offered::InTurn;
        }
        let opened = !self.held.contains_key(&conversation);
        let held = self.held.get(&conversation).map_or(0, BTreeMap::len);
        if (opened && self.held.len() >= MAX_GAPS) || held >= MAX_HELD {
            let users = delivery.users.clone();
            self.held.entry(conversation).or_default().insert(seq, delivery);
            return Offered::Resync(self.skip(conversation).unwrap_or(users));
        }
        self.held.entry(conversation).or_default().insert(seq, delivery);
        match opened {
            true => Offered::Opened,
            false => Offered::Held,
        }
    }

    /// The gap open in `conversation`, if any.
    pub(super) fn gap(&self, conversation: ConversationId) -> Option<Gap> {
        let (&before, first) = self.held.get(&conversation)?.first_key_value()?;
        let after = self.last(conversation)?;
        Some(Gap {
            after,
            before,
            users: first.users.clone(),
        })
    }

    /// Takes the missing messages read from the store (ascending); returns
    /// whether `gap` is closed now.
    pub(super) fn filled(&mut self, conversation: ConversationId, gap: &Gap, messages: Vec<Delivery>) -> bool {
        for message in messages {
            let Some(last) = self.last(conversation) else { break };
            if message.seq == last + 1 && message.seq < gap.before {
                self.set_last(conversation, message.seq);
                self.ready.push(message);
            }
        }
        self.release(conversation);
        self.last(conversation).is_some_and(|last| last + 1 >= gap.before)
    }

    /// Gives up on `conversation`'s gap: what is held goes out as far as the
    /// next gap. Returns whose sessions missed messages, if a gap was open.
    pub(super) fn skip(&mut self, conversation: ConversationId) -> Option<Arc<[UserId]>> {
        let gap = self.gap(conversation)?;
        self.set_last(conversation, gap.before - 1);
        self.release(conversation);
        Some(gap.users)
    }

    /// Whether what is released already waits at its bound.
    pub(super) fn is_backed_up(&self) -> bool {
        self.ready.len() >= MAX_READY
    }

    /// What may go out now, in order.
    pub(super) fn take_ready(&mut self) -> Vec<Delivery> {
        std::mem::take(&mut self.ready)
    }

    fn last(&self, conversation: ConversationId) -> Option<Seq> {
        self.recent
            .get(&conversation)
            .or_else(|| self.older.get(&conversation))
            .copied()
    }

    fn set_last(&mut self, conversation: ConversationId, seq: Seq) {
        if self.recent.len() >= MAX_TRACKED && !self.recent.contains_key(&conversation) {
            // A conversation with a gap open keeps its place.
            let kept: Vec<(ConversationId, Seq)> = self
                .held
                .keys()
                .filter_map(|held| Some((*held, self.last(*held)?)))
                .collect();
            self.older = std::mem::take(&mut self.recent);
            self.recent.extend(kept);
        }
        self.recent.insert(conversation, seq);
    }

    /// Lets through the held messages that follow on from the last seq.
    fn release(&mut self, conversation: ConversationId) {
        let mut last = self.last(conversation).unwrap_or(0);
        let Some(held) = self.held.get_mut(&conversation) else {
            return;
        };
        while let Some(entry) = held.first_entry() {
            if *entry.key() > last + 1 {
                break;
            }
            let delivery = entry.remove();
            if delivery.seq == last + 1 {
                last = delivery.seq;
                self.ready.push(delivery);
            }
        }
        if held.is_empty() {
            self.held.remove(&conversation);
        }
        self.set_last(conversation, last);
    }
}

/// Relayed deliveries from other nodes, at their conversations' owner shard.
pub(super) fn relayed(shard: &Rc<Shard>, deliveries: Vec<Delivery>) {
    let backed_up = shard
        .owner
        .continuity()
        .is_some_and(|continuity| continuity.borrow().is_backed_up());
    if backed_up {
        let users: HashSet<UserId> = deliveries
            .iter()
            .flat_map(|delivery| delivery.users.iter().copied())
            .collect();
        tracing::warn!(
            deliveries = deliveries.len(),
            "shards backed up: relayed messages shed, their recipients here resume"
        );
        metrics::counter!("confab_cluster_relays_shed_total").increment(deliveries.len() as u64);
        shard.spawn_core(resync(shard.clone(), users.into_iter().collect()));
        return;
    }
    for delivery in deliveries {
        offer(shard, delivery);
    }
    shard.owner.wake_committer();
}

/// Offers one delivery to the shard's continuity, starting a fill or a resync
/// when that is what it needs. Without continuity (one node), it is in turn.
pub(super) fn offer(shard: &Rc<Shard>, delivery: Delivery) {
    let conversation = delivery.conversation;
    let Some(continuity) = shard.owner.continuity() else {
        return;
    };
    let offered = continuity.borrow_mut().offer(delivery);
    match offered {
        Offered::InTurn | Offered::Held => {}
        Offered::Repeat => metrics::counter!("confab_cluster_repeats_dropped_total").increment(1),
        Offered::Opened => shard.spawn_core(fill(shard.clone(), conversation)),
        Offered::Resync(users) => {
            tracing::warn!(%conversation, "too many messages held behind gaps: recipients here resume");
            metrics::counter!("confab_cluster_gaps_total", "outcome" => "resynced").increment(1);
            shard.spawn_core(resync(shard.clone(), users));
        }
    }
}

/// Waits for a gap to close by itself, then fills it from the store; gives it
/// up (the recipients here resume) if the store cannot. Repeats while gaps
/// stay open in the conversation.
async fn fill(shard: Rc<Shard>, conversation: ConversationId) {
    let Some(continuity) = shard.owner.continuity() else {
        return;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(HOLD_BACK) => {}
            () = shard.stop.cancelled() => return,
        }
        let Some(gap) = continuity.borrow().gap(conversation) else {
            return;
        };
        let missing = gap.before - gap.after - 1;
        let read = match missing <= MAX_FILL {
            true => shard
                .store
                .history(
                    conversation,
                    HistoryRange::After(gap.after),
                    usize::try_from(missing).unwrap_or(usize::MAX),
                )
                .await
                .map_err(|err| err.to_string()),
            false => Err(format!("{missing} messages missing, more than {MAX_FILL}")),
        };
        let closed = match read {
            Ok(page) => {
                let messages = page
                    .messages
                    .iter()
                    .map(|record| Delivery {
                        conversation,
                        seq: record.seq,
                        frame: message_frame(record),
                        committed_at: None,
                        users: gap.users.clone(),
                        skip_device: Some((record.sender, record.sender_device)),
                    })
                    .collect();
                continuity.borrow_mut().filled(conversation, &gap, messages)
            }
            Err(err) => {
                tracing::warn!(%conversation, error = %err, "could not fill a gap in relayed messages");
                false
            }
        };
        if closed {
            tracing::debug!(%conversation, after = gap.after, before = gap.before, "gap filled from the store");
            metrics::counter!("confab_cluster_gaps_total", "outcome" => "filled").increment(1);
        } else if let Some(users) = continuity.borrow_mut().skip(conversation) {
            tracing::warn!(%conversation, after = gap.after, before = gap.before, "gap not filled: recipients here resume");
            metrics::counter!("confab_cluster_gaps_total", "outcome" => "resynced").increment(1);
            shard.spawn_core(resync(shard.clone(), users));
        }
        shard.owner.wake_committer();
        if continuity.borrow().gap(conversation).is_none() {
            return;
        }
    }
}

/// Closes the sessions of `users` on this node's shards, so they resume.
async fn resync(shard: Rc<Shard>, users: Arc<[UserId]>) {
    let shards = users
        .iter()
        .fold(0u64, |shards, user| shards | shard.directory.shards_of(*user));
    for index in (0..shard.mesh.shard_count()).filter(|index| shards & (1 << index) != 0) {
        // A stopped shard has no sessions left to close.
        let _ = shard.mesh.send(ShardId(index), ShardMsg::Resync(users.clone())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn conversation() -> ConversationId {
        ConversationId::direct(UserId::new(1).unwrap(), UserId::new(2).unwrap())
    }

    fn users() -> Arc<[UserId]> {
        Arc::from(vec![UserId::new(1).unwrap(), UserId::new(2).unwrap()])
    }

    fn delivery(seq: Seq) -> Delivery {
        Delivery {
            conversation: conversation(),
            seq,
            frame: Bytes::from(format!("{seq}")),
            committed_at: None,
            users: users(),
            skip_device: None,
        }
    }

    fn seqs(continuity: &mut Continuity) -> Vec<Seq> {
        continuity.take_ready().iter().map(|delivery| delivery.seq).collect()
    }

    #[test]
    fn in_order_deliveries_go_out_and_repeats_are_dropped() {
        let mut continuity = Continuity::default();
        for seq in [5, 6, 7] {
            assert_eq!(
                continuity.offer(delivery(seq)),
                Offered::InTurn,
                "the first sets the baseline"
            );
        }
        assert_eq!(continuity.offer(delivery(6)), Offered::Repeat);
        assert_eq!(continuity.offer(delivery(0)), Offered::InTurn, "ephemeral");
        assert_eq!(seqs(&mut continuity), vec![5, 6, 7, 0]);
    }

    #[test]
    fn a_gap_holds_what_follows_until_the_missing_message_arrives() {
        let mut continuity = Continuity::default();
        continuity.offer(delivery(1));
        assert_eq!(continuity.offer(delivery(3)), Offered::Opened);
        assert_eq!(continuity.offer(delivery(4)), Offered::Held);
        assert_eq!(seqs(&mut continuity), vec![1]);
        assert_eq!(
            continuity.gap(conversation()).map(|gap| (gap.after, gap.before)),
            Some((1, 3))
        );
        assert_eq!(continuity.offer(delivery(2)), Offered::InTurn);
        assert_eq!(seqs(&mut continuity), vec![2, 3, 4]);
        assert_eq!(continuity.gap(conversation()), None);
        assert_eq!(continuity.offer(delivery(3)), Offered::Repeat, "the late relay");
    }

    #[test]
    fn a_fill_from_the_store_closes_the_gap_in_order() {
        let mut continuity = Continuity::default();
        continuity.offer(delivery(10));
        continuity.offer(delivery(14));
        continuity.offer(delivery(13));
        let gap = continuity.gap(conversation()).unwrap();
        assert_eq!((gap.after, gap.before), (10, 13));
        // The store may return what arrived meanwhile, and more: only the
        // missing ones count.
        continuity.offer(delivery(11));
        assert!(continuity.filled(conversation(), &gap, vec![delivery(11), delivery(12), delivery(13)]));
        assert_eq!(seqs(&mut continuity), vec![10, 11, 12, 13, 14]);
        assert_eq!(continuity.gap(conversation()), None);
    }

    #[test]
    fn a_fill_that_misses_a_message_leaves_the_gap_to_be_given_up() {
        let mut continuity = Continuity::default();
        continuity.offer(delivery(1));
        continuity.offer(delivery(4));
        continuity.offer(delivery(6));
        let gap = continuity.gap(conversation()).unwrap();
        assert!(
            !continuity.filled(conversation(), &gap, vec![delivery(3)]),
            "2 is missing"
        );
        assert_eq!(seqs(&mut continuity), vec![1]);
        assert_eq!(continuity.skip(conversation()), Some(users()));
        assert_eq!(seqs(&mut continuity), vec![4], "up to the next gap");
        assert_eq!(
            continuity.gap(conversation()).map(|gap| (gap.after, gap.before)),
            Some((4, 6))
        );
        assert_eq!(continuity.skip(conversation()), Some(users()));
        assert_eq!(seqs(&mut continuity), vec![6]);
        assert_eq!(continuity.skip(conversation()), None);
    }

    #[test]
    fn released_deliveries_are_bounded_until_taken() {
        let mut continuity = Continuity::default();
        for _ in 0..MAX_READY {
            assert!(!continuity.is_backed_up());
            continuity.offer(delivery(0));
        }
        assert!(continuity.is_backed_up());
        assert_eq!(continuity.take_ready().len(), MAX_READY);
        assert!(!continuity.is_backed_up());
    }

    #[test]
    fn too_much_held_behind_one_gap_gives_it_up() {
        let mut continuity = Continuity::default();
        continuity.offer(delivery(1));
        for seq in 3..(3 + MAX_HELD as Seq) {
            assert!(matches!(
                continuity.offer(delivery(seq)),
                Offered::Opened | Offered::Held
            ));
        }
        assert_eq!(
            continuity.offer(delivery(3 + MAX_HELD as Seq)),
            Offered::Resync(users())
        );
        assert_eq!(seqs(&mut continuity).len(), 1 + MAX_HELD + 1);
        assert_eq!(continuity.gap(conversation()), None);
    }

    #[test]
    fn forgetting_idle_conversations_keeps_those_with_a_gap() {
        let mut continuity = Continuity::default();
        continuity.offer(delivery(1));
        continuity.offer(delivery(3));
        for raw in 0..(2 * MAX_TRACKED as u64 + 1) {
            let other = ConversationId::direct(UserId::new(1000 + raw).unwrap(), UserId::new(1).unwrap());
            continuity.offer(Delivery {
                conversation: other,
                ..delivery(1)
            });
        }
        assert_eq!(
            continuity.gap(conversation()).map(|gap| (gap.after, gap.before)),
            Some((1, 3))
        );
        continuity.offer(delivery(2));
        let ours: Vec<Seq> = continuity
            .take_ready()
            .iter()
            .filter(|delivery| delivery.conversation == conversation())
            .map(|delivery| delivery.seq)
            .collect();
        assert_eq!(ours, vec![1, 2, 3]);
    }
}
