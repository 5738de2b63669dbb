//! The authenticated sessions a shard owns, by user, and delivery to them.
//!
//! Delivery never waits: a frame goes into the session's bounded outbound queue or,
//! when that is full, the session is kicked as a slow consumer (it reconnects and
//! catches up from history) so one stalled phone cannot hold up a shard.
//!
//! A session that resumes has a [`Replay`] gate in front of its queue: live pushes
//! wait behind the replay, and afterwards a push the replay already carried is
//! dropped, however late it arrives.

use super::mesh::Delivery;
#[cfg(test)]
use crate::transport::outbound::Bounds;
use crate::transport::outbound::Outbound;
use bytes::Bytes;
use confab_proto::v1::ServerFrame;
use confab_protocol::Cursors;
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};
use confab_protocol::{ErrorCode, error_frame};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use tokio::sync::Notify;

/// Tells a connection to close, with the frame to say why.
#[derive(Debug, Default)]
pub(super) struct Kick {
    reason: RefCell<Option<ServerFrame>>,
    kicked: Cell<bool>,
    notify: Notify,
}

impl Kick {
    /// Tells the connection to close; returns false if it was told before (the
    /// first reason stands).
    pub(super) fn kick(&self, reason: ServerFrame) -> bool {
        if self.kicked.replace(true) {
            return false;
        }
        *self.reason.borrow_mut() = Some(reason);
        self.notify.notify_one();
        true
    }

    /// Waits for a kick and returns its reason.
    pub(super) async fn kicked(&self) -> ServerFrame {
        loop {
            if let Some(reason) = self.reason.borrow_mut().take() {
                return reason;
            }
            self.notify.notified().await;
        }
    }
}

/// Where a resuming session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The replay is being read and sent: live pushes are held.
    Replaying,
    /// `Authenticated` is out; the held pushes are being sent, in order, and new
    /// ones still queue behind them.
    Draining,
    /// Live pushes go straight to the queue (minus those the replay carried).
    Live,
}

/// The gate between live pushes and a resuming session's queue.
///
/// A message committed before the replay read the store may be fanned out after
/// it, even after the held pushes were sent (its delivery sat in a busy mesh
/// channel). Without a floor it would arrive twice: once replayed, once live.
#[derive(Debug)]
pub(super) struct Replay {
    phase: Phase,
    held: VecDeque<(ConversationId, Seq, Bytes)>,
    max_held: usize,
    /// More live pushes arrived during the replay than could be held: they were
    /// dropped, and the reply must say `recovered = false` (the device syncs).
    overflowed: bool,
    /// Per conversation, the last seq the device has once the replay is out: a
    /// push at or below it is a duplicate. A conversation's entry goes once a push
    /// passes it (a conversation's pushes arrive in seq order).
    floor: HashMap<ConversationId, Seq>,
}

/// What happened to a push offered to a [`Replay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Offered {
    /// Queued, held, or dropped as already replayed.
    Taken,
    /// The session's queue (or hold, once `Authenticated` is out) is full.
    Full,
}

impl Replay {
    /// A gate holding at most `max_held` live pushes during the replay.
    pub(super) fn new(max_held: usize) -> Self {
        Self {
            phase: Phase::Replaying,
            held: VecDeque::new(),
            max_held,
            overflowed: false,
            floor: HashMap::new(),
        }
    }

    /// Takes a live push for the session behind `outbound`.
    pub(super) fn offer(
        &mut self,
        conversation: ConversationId,
        seq: Seq,
        frame: &Bytes,
        outbound: &Outbound,
    ) -> Offered {
        // Ephemeral pushes (seq 0) are not in any replay: never duplicates.
        if seq != 0
            && let Some(&floor) = self.floor.get(&conversation)
        {
            if seq <= floor {
                return Offered::Taken;
            }
            // While pushes are held, some of this conversation's may still be
            // at or below the floor, behind another conversation's: the floor
            // goes only once nothing is held.
            if self.phase == Phase::Live {
                self.floor.remove(&conversation);
            }
        }
        let room = self.held.len() < self.max_held;
        match self.phase {
            Phase::Replaying if self.overflowed => Offered::Taken,
            Phase::Replaying if !room => {
                // The device will sync from the replay's cursors: nothing is lost.
                self.overflowed = true;
                self.held = VecDeque::new();
                Offered::Taken
            }
            Phase::Replaying | Phase::Draining if room => {
                self.held.push_back((conversation, seq, frame.clone()));
                Offered::Taken
            }
            Phase::Replaying | Phase::Draining => Offered::Full,
            Phase::Live => match outbound.try_send(frame.clone()) {
                Ok(()) => Offered::Taken,
                Err(_) => Offered::Full,
            },
        }
    }

    /// The replay is out and the device is at `cursors`: returns whether every
    /// live push was held (else the device must sync), and starts sending them.
    pub(super) fn replayed(&mut self, cursors: &Cursors) -> bool {
        self.floor = cursors.iter().collect();
        self.phase = Phase::Draining;
        !self.overflowed
    }

    /// The next held push the device does not have yet; `None` while the hold
    /// is empty (pushes still arrive into it until [`Replay::go_live`]).
    pub(super) fn next_held(&mut self) -> Option<Bytes> {
        while let Some((conversation, seq, frame)) = self.held.pop_front() {
            let floor = self.floor.get(&conversation).copied().unwrap_or(0);
            if seq > floor {
                self.floor.remove(&conversation);
                return Some(frame);
            }
        }
        None
    }

    /// Once the hold is empty, pushes go straight to the queue from now on;
    /// returns false (and stays draining) while pushes are held.
    pub(super) fn go_live(&mut self) -> bool {
        if !self.held.is_empty() {
            return false;
        }
        self.held = VecDeque::new();
        self.phase = Phase::Live;
        true
    }
}

#[derive(Debug, Clone)]
pub(super) struct SessionHandle {
    pub session_id: u64,
    pub device: DeviceId,
    pub outbound: Outbound,
    pub kick: Rc<Kick>,
    /// For a session that resumed: the gate its live pushes pass.
    pub replay: Option<Rc<RefCell<Replay>>>,
}

/// How full a shard's outbound queues are, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct QueueDepths {
    pub sessions: usize,
    pub frames: usize,
    pub longest: usize,
    /// Bytes queued for them all, and in the fullest queue.
    pub bytes: usize,
    pub fullest: usize,
}

#[derive(Debug, Default)]
pub(super) struct LocalSessions {
    by_user: HashMap<UserId, Vec<SessionHandle>>,
}

impl LocalSessions {
    pub(super) fn add(&mut self, user: UserId, handle: SessionHandle) {
        self.by_user.entry(user).or_default().push(handle);
    }

    /// Removes a session; returns true when it was the user's last one here.
    pub(super) fn remove(&mut self, user: UserId, session_id: u64) -> bool {
        let Some(handles) = self.by_user.get_mut(&user) else {
            return false;
        };
        handles.retain(|handle| handle.session_id != session_id);
        if handles.is_empty() {
            self.by_user.remove(&user);
            true
        } else {
            false
        }
    }

    /// Closes every session of `device` (it logged out elsewhere).
    pub(super) fn revoke(&self, user: UserId, device: DeviceId) {
        for handle in self.by_user.get(&user).into_iter().flatten() {
            if handle.device == device {
                handle
                    .kick
                    .kick(error_frame(0, ErrorCode::Unauthenticated, "the device was logged out"));
            }
        }
    }

    /// Closes every session of `users` here: they missed live messages that
    /// could not be delivered in order, and get them by resuming.
    pub(super) fn resync(&self, users: &[UserId]) {
        for handle in users.iter().filter_map(|user| self.by_user.get(user)).flatten() {
            handle.kick.kick(error_frame(
                0,
                ErrorCode::SlowConsumer,
                "missed live messages: reconnect and resume",
            ));
        }
    }

    /// Sessions here, frames and bytes queued for them all, and the longest queue.
    pub(super) fn depths(&self) -> QueueDepths {
        let mut depths = QueueDepths::default();
        for handle in self.by_user.values().flatten() {
            let queued = handle.outbound.queued();
            depths.sessions += 1;
            depths.frames += queued;
            depths.longest = depths.longest.max(queued);
            let bytes = handle.outbound.queued_bytes();
            depths.bytes += bytes;
            depths.fullest = depths.fullest.max(bytes);
        }
        depths
    }

    pub(super) fn deliver(&self, delivery: &Delivery) {
        for user in delivery.users.iter() {
            for handle in self.by_user.get(user).into_iter().flatten() {
                if delivery.skip_device == Some((*user, handle.device)) {
                    continue;
                }
                let queued = match &handle.replay {
                    Some(replay) => {
                        let offered = replay.borrow_mut().offer(
                            delivery.conversation,
                            delivery.seq,
                            &delivery.frame,
                            &handle.outbound,
                        );
                        offered == Offered::Taken
                    }
                    None => handle.outbound.try_send(delivery.frame.clone()).is_ok(),
                };
                let kicked = !queued
                    && handle.kick.kick(error_frame(
                        0,
                        ErrorCode::SlowConsumer,
                        "outbound queue full: reconnect and fetch history",
                    ));
                if kicked {
                    tracing::warn!(user = %user, session = handle.session_id, "slow consumer: closing session");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> ConversationId {
        ConversationId::direct(UserId::new(1).unwrap(), UserId::new(2).unwrap())
    }

    fn push(seq: Seq) -> Bytes {
        Bytes::from(format!("push {seq}"))
    }

    fn drained(outbound: &Outbound) -> Vec<Bytes> {
        std::iter::from_fn(|| outbound.try_recv()).collect()
    }

    fn cursors_at(seq: Seq) -> Cursors {
        let mut cursors = Cursors::default();
        cursors.advance(conversation(), seq);
        cursors
    }

    #[test]
    fn a_push_the_replay_carried_is_dropped_even_when_it_arrives_after_the_hold() {
        let outbound = Outbound::new(Bounds::frames(16));
        let mut replay = Replay::new(16);
        // Held during the replay: 105 (in the replay too).
        assert_eq!(replay.offer(conversation(), 105, &push(105), &outbound), Offered::Taken);
        assert!(replay.replayed(&cursors_at(120)));
        assert_eq!(replay.next_held(), None);
        assert!(replay.go_live());
        // 106..=120 were committed before the replay read them, but their
        // deliveries sat in a busy mesh channel until the hold was over.
        for seq in 106..=120 {
            assert_eq!(replay.offer(conversation(), seq, &push(seq), &outbound), Offered::Taken);
        }
        assert!(
            drained(&outbound).is_empty(),
            "pushes the replay carried must not come again"
        );
        for seq in 121..=122 {
            replay.offer(conversation(), seq, &push(seq), &outbound);
        }
        assert_eq!(drained(&outbound), vec![push(121), push(122)]);
    }

    #[test]
    fn pushes_during_the_drain_queue_behind_the_held_ones() {
        let outbound = Outbound::new(Bounds::frames(16));
        let mut replay = Replay::new(16);
        replay.offer(conversation(), 11, &push(11), &outbound);
        assert!(replay.replayed(&cursors_at(10)));
        assert_eq!(replay.next_held(), Some(push(11)));
        // Arrives while the held ones are being sent: must not overtake them.
        replay.offer(conversation(), 12, &push(12), &outbound);
        assert!(drained(&outbound).is_empty());
        assert_eq!(replay.next_held(), Some(push(12)));
        assert_eq!(replay.next_held(), None);
        // Still draining (the queue had no headroom yet): one more arrives.
        replay.offer(conversation(), 13, &push(13), &outbound);
        assert!(!replay.go_live(), "a held push must go out first");
        assert_eq!(replay.next_held(), Some(push(13)));
        assert!(replay.go_live());
        replay.offer(conversation(), 14, &push(14), &outbound);
        assert_eq!(drained(&outbound), vec![push(14)]);
    }

    /// Held: A1 (replayed), B5 (new), A2 (replayed). While B5 is being sent,
    /// A3 arrives: it must not lift A's floor while A2 is still held.
    #[test]
    fn a_live_push_during_the_drain_keeps_the_floor_for_held_duplicates() {
        let a = conversation();
        let b = ConversationId::direct(UserId::new(1).unwrap(), UserId::new(3).unwrap());
        let outbound = Outbound::new(Bounds::frames(16));
        let mut replay = Replay::new(16);
        replay.offer(a, 1, &push(1), &outbound);
        replay.offer(b, 5, &push(5), &outbound);
        replay.offer(a, 2, &push(2), &outbound);
        let mut cursors = cursors_at(2);
        cursors.advance(b, 4);
        assert!(replay.replayed(&cursors));
        assert_eq!(replay.next_held(), Some(push(5)));
        replay.offer(a, 3, &push(3), &outbound);
        assert_eq!(replay.next_held(), Some(push(3)), "A2 was replayed: not again");
        assert_eq!(replay.next_held(), None);
        assert!(replay.go_live());
    }

    #[test]
    fn a_full_hold_during_the_replay_means_not_recovered_instead_of_a_close() {
        let outbound = Outbound::new(Bounds::frames(16));
        let mut replay = Replay::new(2);
        for seq in 11..=20 {
            assert_eq!(replay.offer(conversation(), seq, &push(seq), &outbound), Offered::Taken);
        }
        assert!(!replay.replayed(&cursors_at(10)), "the device must be told to sync");
        assert_eq!(replay.next_held(), None, "what overflowed is left to the sync");
        assert!(replay.go_live());
        replay.offer(conversation(), 21, &push(21), &outbound);
        assert_eq!(drained(&outbound), vec![push(21)]);
    }

    #[tokio::test]
    async fn a_full_hold_after_the_reply_closes_the_session_instead_of_skipping() {
        let user = UserId::new(1).unwrap();
        let outbound = Outbound::new(Bounds::frames(16));
        let replay = Rc::new(RefCell::new(Replay::new(1)));
        replay.borrow_mut().offer(conversation(), 1, &push(1), &outbound);
        assert!(replay.borrow_mut().replayed(&Cursors::default()));
        let kick = Rc::new(Kick::default());
        let mut sessions = LocalSessions::default();
        sessions.add(
            user,
            SessionHandle {
                session_id: 1,
                device: DeviceId::new(1).unwrap(),
                outbound: outbound.clone(),
                kick: kick.clone(),
                replay: Some(replay),
            },
        );
        sessions.deliver(&Delivery {
            conversation: conversation(),
            seq: 2,
            frame: push(2),
            committed_at: None,
            users: std::sync::Arc::new([user]),
            skip_device: None,
        });
        assert_eq!(outbound.try_recv(), None, "the live push must not jump the held one");
        let reason = kick.kicked().await;
        assert!(
            matches!(reason.kind, Some(confab_proto::v1::server_frame::Kind::Error(e)) if e.code == ErrorCode::SlowConsumer as i32)
        );
    }

    /// The seam under every interleaving: the messages of two or three
    /// conversations are committed in order and their pushes offered in order,
    /// interleaved, before, during and after a replay that reads each
    /// conversation at its own moment (cut at the replay limit or not) and a
    /// drain that tries to go live at random moments. Per conversation, what the
    /// device receives (the replay, then its queue) never repeats or goes back;
    /// when the reply says recovered, it is every message, with no gap.
    #[test]
    fn replay_and_live_pushes_never_repeat_and_recover_every_message() {
        use rand::{Rng as _, SeedableRng as _};
        struct Conversation {
            id: ConversationId,
            total: Seq,
            limit: Seq,
            offered: Seq,
            /// Where the replay read it, and how far it replayed.
            read: Option<(Seq, Seq)>,
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for round in 0..5_000 {
            let mut conversations: Vec<Conversation> = (0..rng.random_range(2..=3u64))
                .map(|other| Conversation {
                    id: ConversationId::direct(UserId::new(1).unwrap(), UserId::new(other + 2).unwrap()),
                    total: rng.random_range(1..30),
                    limit: rng.random_range(1..40),
                    offered: 0,
                    read: None,
                })
                .collect();
            let frame = |index: usize, seq: Seq| Bytes::from(format!("{index} {seq}"));
            let outbound = Outbound::new(Bounds::frames(1_000));
            let mut replay = Replay::new(rng.random_range(1..8));
            // Offers the next push of a random conversation that has one left;
            // false once the session would be closed.
            let offer_one = |replay: &mut Replay, conversations: &mut [Conversation], rng: &mut rand::rngs::StdRng| {
                let open: Vec<usize> = (0..conversations.len())
                    .filter(|&index| conversations[index].offered < conversations[index].total)
                    .collect();
                let Some(&index) = open.get(rng.random_range(0..open.len().max(1))) else {
                    return true;
                };
                let conversation = &mut conversations[index];
                conversation.offered += 1;
                let seq = conversation.offered;
                replay.offer(conversation.id, seq, &frame(index, seq), &outbound) != Offered::Full
            };
            // The replay: reads each conversation at its own moment, pushes
            // arriving in between.
            let mut received: Vec<(usize, Seq)> = Vec::new();
            while let Some(index) = (0..conversations.len()).find(|&index| conversations[index].read.is_none()) {
                if rng.random_bool(0.5) {
                    assert!(offer_one(&mut replay, &mut conversations, &mut rng));
                    continue;
                }
                let conversation = &mut conversations[index];
                let read = rng.random_range(conversation.offered..=conversation.total);
                let upto = read.min(conversation.limit);
                conversation.read = Some((read, upto));
                received.extend((1..=upto).map(|seq| (index, seq)));
            }
            let mut cursors = Cursors::default();
            let mut cut = false;
            for conversation in &conversations {
                let (read, upto) = conversation.read.unwrap();
                cursors.advance(conversation.id, upto);
                cut |= upto < read;
            }
            let recovered = replay.replayed(&cursors) && !cut;
            let seq_of = |frame: &Bytes| -> (usize, Seq) {
                let text = std::str::from_utf8(frame).unwrap();
                let (index, seq) = text.split_once(' ').unwrap();
                (index.parse().unwrap(), seq.parse().unwrap())
            };
            // The drain, then live.
            let mut closed = false;
            let mut live = false;
            while !live && !closed {
                match rng.random_range(0..3) {
                    0 => received.extend(replay.next_held().as_ref().map(seq_of)),
                    1 => closed = !offer_one(&mut replay, &mut conversations, &mut rng),
                    _ => live = replay.go_live(),
                }
            }
            while !closed && conversations.iter().any(|c| c.offered < c.total) {
                closed = !offer_one(&mut replay, &mut conversations, &mut rng);
            }
            received.extend(drained(&outbound).iter().map(seq_of));
            for (index, conversation) in conversations.iter().enumerate() {
                let seqs: Vec<Seq> = received
                    .iter()
                    .filter(|(i, _)| *i == index)
                    .map(|(_, seq)| *seq)
                    .collect();
                assert!(
                    seqs.windows(2).all(|pair| pair[0] < pair[1]),
                    "round {round}, conversation {index}: repeated or out of order: {seqs:?}"
                );
                if recovered && !closed {
                    assert_eq!(
                        seqs,
                        (1..=conversation.total).collect::<Vec<_>>(),
                        "round {round}: a gap"
                    );
                }
            }
        }
    }
}
