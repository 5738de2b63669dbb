//! The presence home role of a shard: for the users that hash to it, turns
//! directory changes (a user gained its first / lost its last session anywhere)
//! into presence, with the grace period and rate limit of
//! [`crate::chat::PresenceTracker`], and pushes updates to subscribers' shards.
//!
//! In cluster mode "anywhere" spans the nodes: each home tells the other nodes
//! of its users' sessions on this node coming and going, and its whole set
//! now and then ([`run_snapshots`]); what they tell it is kept in
//! [`Elsewhere`], and a user is online while it has a session here or there.

use super::elsewhere::{Elsewhere, Flip};
use super::mesh::{Arrivals, Delivery, ShardMsg};
use super::{Shard, ShardId};
use crate::chat::{ChatError, Presence, PresenceTracker, Update};
use crate::clock::unix_ms;
use crate::cluster::Incarnation;
use crate::cluster::envelope::Sessions;
use confab_proto::v1::{self, server_frame::Kind};
use confab_protocol::ids::{ConversationId, GroupId, Seq, UserId};
use confab_protocol::push_frame;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};

/// A subscriber: a user, on the shard that holds its sessions.
pub(super) type Subscriber = (ShardId, UserId);

/// A shard's presence-home role: the presence of the users whose home it is,
/// and who subscribed to it.
#[derive(Debug)]
pub(super) struct Home {
    tracker: RefCell<PresenceTracker<Subscriber>>,
    /// Wakes the timer when a deadline may have moved.
    changed: Notify,
    /// Cluster mode: which of its users have sessions on other nodes.
    elsewhere: RefCell<Elsewhere>,
}

impl Home {
    pub(super) fn new(tracker: PresenceTracker<Subscriber>) -> Self {
        Self {
            tracker: RefCell::new(tracker),
            changed: Notify::new(),
            elsewhere: RefCell::default(),
        }
    }

    /// Whether `user` has a session on another node (cluster mode).
    pub(super) fn is_elsewhere(&self, user: UserId) -> bool {
        self.elsewhere.borrow().has(user)
    }
}

/// How often a home tells the other nodes its whole set, correcting a change
/// lost on the way; also at once when a node joins.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);

/// `user`'s sessions on this node went from none to some (`online`) or back:
/// other nodes are told, and presence changes unless the user has sessions on
/// another node.
pub(super) fn directory_changed(shard: &Rc<Shard>, user: UserId, online: bool) {
    if let Some(peers) = &shard.peers {
        let (online, offline) = match online {
            true => (vec![user], Vec::new()),
            false => (Vec::new(), vec![user]),
        };
        peers.tell_presence(Sessions {
            node: peers.me(),
            home: home_index(shard),
            snapshot: false,
            online,
            offline,
        });
    }
    if !shard.presence.is_elsewhere(user) {
        became(shard, user, online);
    }
}

/// Another node told which of this home's users have sessions there.
pub(super) fn told(shard: &Rc<Shard>, sessions: Sessions) {
    let flips = shard.presence.elsewhere.borrow_mut().apply(sessions);
    flipped(shard, flips);
}

/// Users whose sessions on other nodes came or went: presence changes for
/// those with none here.
fn flipped(shard: &Rc<Shard>, flips: Vec<Flip>) {
    for (user, elsewhere) in flips {
        if shard.directory.shards_of(user) != 0 {
            continue;
        }
        if elsewhere && let Some(pusher) = &shard.pusher {
            // Its notification window on this node is moot too.
            pusher.online(user);
        }
        became(shard, user, elsewhere);
    }
}

/// Cluster mode: notifies those of `users` (homed here) with no session on
/// any node of a message (conversation, seq, sender).
pub(super) fn notify_if_away(shard: &Shard, users: Vec<UserId>, message: (ConversationId, Seq, UserId), body: &str) {
    let Some(pusher) = &shard.pusher else { return };
    let (conversation, seq, sender) = message;
    let away = users
        .into_iter()
        .filter(|user| shard.directory.shards_of(*user) == 0 && !shard.presence.is_elsewhere(*user));
    for user in away {
        pusher.message(user, conversation, seq, sender, body);
    }
}

fn home_index(shard: &Shard) -> u32 {
    u32::try_from(shard.id.0).unwrap_or(u32::MAX)
}

/// Cluster mode: every heartbeat, forgets what nodes that left had told (their
/// users' sessions went with them), and tells the other nodes this home's
/// whole set when a node joined or [`SNAPSHOT_EVERY`] passed.
pub(super) async fn run_snapshots(shard: Rc<Shard>) {
    let Some(peers) = shard.peers.clone() else { return };
    let mut ticker = tokio::time::interval(shard.config.cluster.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: Vec<Incarnation> = Vec::new();
    let mut told_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shard.stop.cancelled() => return,
        }
        let live = peers.live_nodes();
        let flips = shard
            .presence
            .elsewhere
            .borrow_mut()
            .forget_nodes(|node| live.contains(&node));
        flipped(&shard, flips);
        let joined = live.iter().any(|node| !known.contains(node));
        if joined || told_at.is_none_or(|at| at.elapsed() >= SNAPSHOT_EVERY) {
            let online = shard.directory.users(|user| shard.mesh.home_of(user) == shard.id);
            peers.tell_presence(Sessions {
                node: peers.me(),
                home: home_index(&shard),
                snapshot: true,
                online,
                offline: Vec::new(),
            });
            told_at = Some(Instant::now());
        }
        known = live;
    }
}

/// The user's presence went from offline to online (`online`) or back.
fn became(shard: &Rc<Shard>, user: UserId, online: bool) {
    let update = {
        let mut tracker = shard.presence.tracker.borrow_mut();
        if online {
            tracker.connected(user, Instant::now(), unix_ms())
        } else {
            tracker.disconnected(user, Instant::now(), unix_ms());
            None
        }
    };
    shard.presence.changed.notify_one();
    if let Some(update) = update {
        shard.spawn_core(push(shard.clone(), vec![update]));
    }
}

pub(super) fn subscribe(shard: &Shard, user: UserId, subscriber: Subscriber, reply: oneshot::Sender<Presence>) {
    let presence = shard.presence.tracker.borrow_mut().subscribe(user, subscriber);
    shard.presence.changed.notify_one();
    let _ = reply.send(presence);
}

pub(super) fn unsubscribe(shard: &Shard, user: UserId, subscriber: Subscriber) {
    shard.presence.tracker.borrow_mut().unsubscribe(user, &subscriber);
}

/// Ends grace periods and sends rate-limited updates when they fall due.
pub(super) async fn run_timer(shard: Rc<Shard>) {
    loop {
        let deadline = shard.presence.tracker.borrow().next_deadline();
        let wake = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wake => {
                let updates = shard.presence.tracker.borrow_mut().tick(Instant::now());
                if !updates.is_empty() {
                    push(shard.clone(), updates).await;
                }
            }
            () = shard.presence.changed.notified() => {}
            () = shard.stop.cancelled() => return,
        }
    }
}

/// Sends each update, encoded once, to the shards of its subscribers.
async fn push(shard: Rc<Shard>, updates: Vec<Update<Subscriber>>) {
    for update in updates {
        let frame = confab_proto::encode_frame(&push_frame(Kind::PresenceUpdate(presence_proto(
            update.user,
            update.presence,
        ))));
        let mut by_shard: HashMap<ShardId, Vec<UserId>> = HashMap::new();
        for (to, subscriber) in update.subscribers {
            // A subscriber with no session left on its shard is dropped here.
            if shard.directory.shards_of(subscriber) & (1 << to.0) == 0 {
                shard
                    .presence
                    .tracker
                    .borrow_mut()
                    .unsubscribe(update.user, &(to, subscriber));
                continue;
            }
            by_shard.entry(to).or_default().push(subscriber);
        }
        for (to, users) in by_shard {
            let delivery = Delivery {
                // A pseudo-conversation: presence is about a user, not a conversation;
                // seq 0 keeps it out of resume replays.
                conversation: ConversationId::direct(update.user, update.user),
                seq: 0,
                frame: frame.clone(),
                committed_at: None,
                users: users.into(),
                skip_device: None,
            };
            if shard
                .mesh
                .send(to, ShardMsg::Deliver(Arrivals::push(delivery)))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

pub(super) fn presence_proto(user: UserId, presence: Presence) -> v1::PresenceUpdate {
    v1::PresenceUpdate {
        user_id: user.get(),
        online: presence.online,
        last_seen_ms: presence.last_seen_ms,
    }
}

/// Point reads one SubscribePresence may make to decide who its subscriber may
/// see; a user still undecided past it is listed as hidden.
const MAX_VISIBILITY_READS: usize = 4096;
/// How long a connection remembers that its user may not see someone.
const HIDDEN_TTL: Duration = Duration::from_secs(10);

/// Whom a connection's user was lately found not to share a conversation with
/// (the costly answer: every group checked), so subscribing to them again costs
/// no reads. A visible user is checked each time (the first shared group or
/// direct conversation ends the check), so a membership that ended shows at once.
#[derive(Debug, Default)]
pub(super) struct Visibility {
    hidden: HashMap<UserId, Instant>,
}

impl Visibility {
    fn is_hidden(&self, user: UserId, now: Instant) -> bool {
        self.hidden
            .get(&user)
            .is_some_and(|at| now.duration_since(*at) < HIDDEN_TTL)
    }

    fn hide(&mut self, user: UserId, now: Instant, max: usize) {
        if self.hidden.len() >= max {
            self.hidden.retain(|_, at| now.duration_since(*at) < HIDDEN_TTL);
        }
        if self.hidden.len() < max {
            self.hidden.insert(user, now);
        }
    }
}

/// Subscribes `subscriber` to the presence of `users` it may see (those sharing a
/// conversation with it); the others are listed as hidden. Decided from the
/// subscriber's side only — its own conversations, and point reads of its
/// groups' membership — so the cost follows the subscriber's data, never the
/// targets'.
pub(super) async fn subscribe_users(
    shard: &Shard,
    subscriber: UserId,
    users: Vec<UserId>,
    visibility: &RefCell<Visibility>,
) -> Result<v1::PresenceList, ChatError> {
    let now = Instant::now();
    let max_cached = shard.limits.max_presence_subscriptions * 4;
    let mut contacts = None;
    let mut budget = MAX_VISIBILITY_READS;
    let mut list = v1::PresenceList::default();
    for user in users {
        let mut visible = false;
        if !visibility.borrow().is_hidden(user, now) {
            if contacts.is_none() {
                contacts = Some(Contacts::of(shard, subscriber).await?);
            }
            if let Some(contacts) = &contacts {
                visible = contacts.see(shard, subscriber, user, &mut budget).await?;
            }
            if !visible {
                visibility.borrow_mut().hide(user, now, max_cached);
            }
        }
        if !visible {
            list.hidden.push(user.get());
            continue;
        }
        let (reply, presence) = oneshot::channel();
        let subscribe = ShardMsg::Subscribe {
            user,
            subscriber: (shard.id, subscriber),
            reply,
        };
        shard
            .mesh
            .send(shard.mesh.home_of(user), subscribe)
            .await
            .map_err(|_| ChatError::ShuttingDown)?;
        let presence = presence.await.map_err(|_| ChatError::ShuttingDown)?;
        list.users.push(presence_proto(user, presence));
    }
    Ok(list)
}

pub(super) async fn unsubscribe_users(shard: &Shard, subscriber: UserId, users: Vec<UserId>) {
    for user in users {
        let unsubscribe = ShardMsg::Unsubscribe {
            user,
            subscriber: (shard.id, subscriber),
        };
        // A stopped home shard has no subscriptions left.
        let _ = shard.mesh.send(shard.mesh.home_of(user), unsubscribe).await;
    }
}

/// `left` is no longer in a group with `others`: where they now share no
/// conversation at all, their presence subscriptions to each other end (on
/// every shard, both ways).
pub(super) async fn membership_ended(shard: Rc<Shard>, left: UserId, others: Vec<UserId>) {
    let contacts = match Contacts::of(&shard, left).await {
        Ok(contacts) => contacts,
        Err(err) => return tracing::warn!(user = %left, error = %err, "presence subscriptions not rechecked"),
    };
    let mut budget = usize::MAX;
    for other in others.into_iter().filter(|other| *other != left) {
        match contacts.see(&shard, left, other, &mut budget).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(user = %left, error = %err, "presence subscriptions not rechecked");
                continue;
            }
        }
        for (user, subscriber) in [(other, left), (left, other)] {
            let forget = ShardMsg::Forget { user, subscriber };
            // A stopped home shard has no subscriptions left.
            let _ = shard.mesh.send(shard.mesh.home_of(user), forget).await;
        }
    }
}

/// Ends every subscription of `subscriber` (from any shard) to `user`.
pub(super) fn forget(shard: &Shard, user: UserId, subscriber: UserId) {
    shard
        .presence
        .tracker
        .borrow_mut()
        .unsubscribe_where(user, |(_, candidate)| *candidate == subscriber);
}

/// Whom a user shares conversations with: its direct peers, and its current groups.
struct Contacts {
    direct: HashSet<UserId>,
    groups: Vec<GroupId>,
}

impl Contacts {
    /// From the user's own conversation index.
    async fn of(shard: &Shard, user: UserId) -> Result<Self, ChatError> {
        let mut contacts = Self {
            direct: HashSet::new(),
            groups: Vec::new(),
        };
        for head in shard.store.conversations(user).await? {
            match head.conversation {
                ConversationId::Direct { .. } => {
                    contacts
                        .direct
                        .extend(head.conversation.direct_members().filter(|member| *member != user));
                }
                ConversationId::Group(group) if head.left_seq.is_none() => contacts.groups.push(group),
                ConversationId::Group(_) => {}
            }
        }
        Ok(contacts)
    }

    /// Whether `me` may see `other`: itself, a direct peer, or a current member
    /// of one of `me`'s groups (point reads, at most `budget` of them; past it,
    /// no).
    async fn see(&self, shard: &Shard, me: UserId, other: UserId, budget: &mut usize) -> Result<bool, ChatError> {
        if other == me || self.direct.contains(&other) {
            return Ok(true);
        }
        for group in &self.groups {
            if *budget == 0 {
                return Ok(false);
            }
            *budget -= 1;
            if shard
                .store
                .member(*group, other)
                .await?
                .is_some_and(|member| member.left_seq.is_none())
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
