//! The owner role of a shard: sequencing, storing and fanning out the messages of
//! the conversations it owns.
//!
//! Appends arrive on the mesh. The [`Sequencer`] assigns seqs; one committer task
//! per shard writes assigned messages in assignment order, in batches (whatever
//! queued while the previous batch was being made durable), and only after the
//! store confirms does it fan out and acknowledge. Fan-out encodes each message
//! once and sends it once per destination shard.

use super::continuity::Continuity;
use super::mesh::{AppendReply, Arrivals, Delivery, ShardMsg};
use super::{Shard, ShardId};
use crate::chat::{
    Admission, Assigned, ChatError, Check, CheckResult, Outcome, ReceiptCoalescer, SendAck, Sequencer, SequencerLimits,
    Signal, load_sent, lookup, message_frame,
};
use crate::clock::unix_ms;
use crate::cluster::envelope::Relayed;
use crate::cluster::{Incarnation, Peers};
use crate::store::{GroupEvent, StoreError, StoredSend};
use bytes::Bytes;
use confab_proto::v1::{self, server_frame::Kind};
use confab_protocol::Append;
use confab_protocol::ids::UserId;
use confab_protocol::ids::{ConversationId, DeviceId};
use confab_protocol::push_frame;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

/// Send records an owner shard keeps in memory (about 100 bytes each) when the
/// store's lookup is a round trip, so most idempotency checks need no read.
pub(super) const MAX_SENT_RECORDS: usize = 250_000;

/// A shard's conversation-owner role: the sequencer of the conversations it
/// owns, the messages assigned and waiting for the committer, and the receipts
/// it coalesces before telling members.
#[derive(Debug)]
pub(super) struct Owner {
    sequencer: RefCell<Sequencer<AppendReply>>,
    commit_queue: RefCell<VecDeque<Assigned<AppendReply>>>,
    commit_ready: Notify,
    receipts: RefCell<ReceiptCoalescer>,
    /// Cluster mode: conversations another node holds, and which, learned when
    /// taking them was refused; forgotten when that node leaves.
    held_elsewhere: RefCell<HashMap<ConversationId, Incarnation>>,
    /// Cluster mode: keeps this node's pushes of the conversations this shard
    /// owns in seq order whichever node committed them.
    continuity: Option<RefCell<Continuity>>,
}

/// Conversations held elsewhere an owner shard remembers at most (about 40
/// bytes each); past that it forgets them all and asks the store again.
const MAX_HELD_ELSEWHERE: usize = 100_000;

impl Owner {
    /// An owner; `clustered` when other nodes may commit this shard's
    /// conversations too.
    pub(super) fn new(limits: SequencerLimits, clustered: bool) -> Self {
        Self {
            sequencer: RefCell::new(Sequencer::new(limits)),
            commit_queue: RefCell::default(),
            commit_ready: Notify::new(),
            receipts: RefCell::default(),
            held_elsewhere: RefCell::default(),
            continuity: clustered.then(RefCell::default),
        }
    }

    pub(super) fn continuity(&self) -> Option<&RefCell<Continuity>> {
        self.continuity.as_ref()
    }

    /// Has the committer hand out what is ready (and take what is queued).
    pub(super) fn wake_committer(&self) {
        self.commit_ready.notify_one();
    }

    /// The live node that holds `conversation`, if another one does as far as
    /// this shard knows.
    fn holder(&self, conversation: ConversationId, peers: &Peers) -> Option<Incarnation> {
        let mut held = self.held_elsewhere.borrow_mut();
        let holder = *held.get(&conversation)?;
        if peers.is_live(holder) {
            return Some(holder);
        }
        held.remove(&conversation);
        None
    }

    fn forget_holder(&self, conversation: ConversationId, holder: Incarnation) {
        let mut held = self.held_elsewhere.borrow_mut();
        if held.get(&conversation) == Some(&holder) {
            held.remove(&conversation);
        }
    }

    fn held_by(&self, conversation: ConversationId, holder: Incarnation) {
        let mut held = self.held_elsewhere.borrow_mut();
        if held.len() >= MAX_HELD_ELSEWHERE {
            held.clear();
        }
        held.insert(conversation, holder);
    }

    /// Messages assigned and waiting for the committer.
    pub(super) fn queued_commits(&self) -> usize {
        self.commit_queue.borrow().len()
    }

    fn enqueue(&self, mut assigned: Assigned<AppendReply>, stages: &crate::metrics::SendStages) {
        assigned.reply.stage(&stages.sequenced);
        self.commit_queue.borrow_mut().push_back(assigned);
        self.commit_ready.notify_one();
    }
}

/// Takes an append from the mesh. Never waits: a check the sequencer can answer
/// from memory is resolved here, one that reads the store runs as a task.
pub(super) fn submit(shard: &Rc<Shard>, append: Append, mut reply: AppendReply) {
    reply.stage(&shard.stages.to_owner);
    if let Some(peers) = &shard.peers
        && !reply.forwarded
        && let Some(holder) = shard.owner.holder(append.conversation, peers)
    {
        return forward(shard, peers, holder, append, reply);
    }
    let admission = shard.owner.sequencer.borrow_mut().submit(append, reply);
    match admission {
        Admission::Queued => {}
        Admission::Check(check) => {
            // Loads (of the devices among the keys) start in `run_check`; a
            // check that needs no store has no keys, so nothing to load.
            if check.needs_store() {
                shard.spawn_core(run_check(shard.clone(), check));
            } else if let Some(next) = resolve(shard, check.conversation, Ok(CheckResult::default())) {
                shard.spawn_core(run_check(shard.clone(), next));
            }
        }
        Admission::Overloaded(append, reply) => {
            tracing::warn!(conversation = %append.conversation, "owner shard overloaded: refusing append");
            let _ = reply.send(Err(ChatError::Overloaded));
        }
    }
}

/// Looks the queued sends up in the store (and, on first use, reads where the
/// conversation's seqs continue and checks its members exist), then assigns seqs.
async fn run_check(shard: Rc<Shard>, check: Check) {
    let mut check = Some(check);
    while let Some(mut current) = check.take() {
        // In a cluster a device's sends can be listed only once this node
        // holds the conversation: on first use, after taking it.
        let after_take = shard.peers.is_some() && current.first_use;
        let loads = match after_take {
            true => std::mem::take(&mut current.load),
            false => Vec::new(),
        };
        start_loads(&shard, &mut current);
        let conversation = current.conversation;
        let result = match current.needs_store() {
            true => {
                let started = Instant::now();
                let window_ms = u64::try_from(shard.config.chat.dedup_window.as_millis()).unwrap_or(u64::MAX);
                let since_ms = unix_ms().saturating_sub(window_ms);
                let result = lookup(shard.store.as_ref(), current, since_ms).await;
                crate::metrics::record_since(&shard.stages.store_check, started);
                result
            }
            false => Ok(CheckResult::default()),
        };
        load_devices(&shard, conversation, loads);
        check = resolve(&shard, conversation, result);
    }
}

/// Starts the loads of device ids `check` asks for, beside it: the check does
/// not wait for them.
fn start_loads(shard: &Rc<Shard>, check: &mut Check) {
    let loads = std::mem::take(&mut check.load);
    load_devices(shard, check.conversation, loads);
}

/// Starts loads of the listed devices' ids in `conversation`.
fn load_devices(shard: &Rc<Shard>, conversation: ConversationId, loads: Vec<(DeviceId, u64)>) {
    for (device, ticket) in loads {
        let shard_for_load = shard.clone();
        shard.spawn_core(async move {
            let shard = shard_for_load;
            let ids = load_sent(shard.store.as_ref(), conversation, device).await;
            let mut sequencer = shard.owner.sequencer.borrow_mut();
            match ids {
                Ok(ids) => sequencer.loaded(conversation, device, ticket, ids),
                Err(err) => {
                    tracing::warn!(%conversation, error = %err, "listing a device's sends failed");
                    sequencer.load_failed(conversation, device, ticket);
                }
            }
        });
    }
}

/// Hands a check's result to the sequencer and answers what it resolved: the
/// next check of the conversation, if more queued meanwhile.
fn resolve(shard: &Rc<Shard>, conversation: ConversationId, result: Result<CheckResult, ChatError>) -> Option<Check> {
    if let Err(ChatError::Store(StoreError::HeldElsewhere { holder, .. })) = &result
        && let Some(peers) = &shard.peers
    {
        return forward_held(shard, peers, conversation, *holder);
    }
    let mut sequencer = shard.owner.sequencer.borrow_mut();
    match result {
        Ok(result) => {
            let (outcomes, next) = sequencer.checked(conversation, result, unix_ms());
            drop(sequencer);
            for outcome in outcomes {
                match outcome {
                    Outcome::Assigned(assigned) => shard.owner.enqueue(assigned, &shard.stages),
                    Outcome::Refused { error, reply } => {
                        let _ = reply.send(Err(error));
                    }
                    Outcome::Duplicate {
                        conversation,
                        client_msg_id,
                        stored,
                        reply,
                    } => {
                        let _ = reply.send(Ok(SendAck {
                            conversation,
                            seq: stored.seq,
                            server_time_ms: stored.server_time_ms,
                            client_msg_id,
                        }));
                    }
                }
            }
            next
        }
        Err(err) => {
            match &err {
                ChatError::UnknownUser => {}
                // The database did not answer, or (cluster mode) another node
                // holds the conversation: the sender is told to retry.
                ChatError::Store(StoreError::Unavailable { .. }) => {
                    tracing::warn!(%conversation, error = %err, "checking appends failed");
                }
                _ => tracing::error!(%conversation, error = %err, "checking appends failed"),
            }
            let (refused, next) = sequencer.check_failed(conversation);
            drop(sequencer);
            for (_, reply) in refused {
                let _ = reply.send(Err(err.clone()));
            }
            next
        }
    }
}

/// Another live node holds `conversation`: the appends its check covered go
/// there, and so will the next ones.
fn forward_held(shard: &Rc<Shard>, peers: &Peers, conversation: ConversationId, holder: Incarnation) -> Option<Check> {
    shard.owner.held_by(conversation, holder);
    let (covered, next) = shard.owner.sequencer.borrow_mut().check_failed(conversation);
    for (append, reply) in covered {
        match reply.forwarded {
            // Each node takes the other for the holder: the client retries
            // once their views agree again.
            true => {
                let _ = reply.send(Err(ChatError::Store(StoreError::HeldElsewhere {
                    conversation,
                    holder,
                })));
            }
            false => forward(shard, peers, holder, append, reply),
        }
    }
    next
}

/// Sends `append` to the node that holds its conversation and passes its
/// answer on. An UNAVAILABLE answer (that node is leaving, or did not answer)
/// makes this shard ask the store again next time.
fn forward(shard: &Rc<Shard>, peers: &Peers, holder: Incarnation, append: Append, reply: AppendReply) {
    let conversation = append.conversation;
    let client_msg_id = append.client_msg_id.clone();
    let started = Instant::now();
    let answer = peers.forward(holder, append);
    let owner = shard.clone();
    shard.spawn_core(async move {
        let answer = answer.await;
        crate::metrics::record_since(&owner.stages.forwarded, started);
        let answer = answer.map(|acked| SendAck {
            conversation,
            seq: acked.seq,
            server_time_ms: acked.server_time_ms,
            client_msg_id,
        });
        let answer = answer.map_err(|refusal| {
            if refusal.code == confab_protocol::ErrorCode::Unavailable {
                owner.owner.forget_holder(conversation, holder);
            }
            ChatError::Elsewhere {
                code: refusal.code,
                message: refusal.message,
            }
        });
        let _ = reply.send(answer);
    });
}

/// Batches a shard's committer keeps in the store at once.
const MAX_COMMITS_IN_FLIGHT: usize = 4;

/// The committer: batches assigned messages into the store, then fans out and
/// acks. Up to [`MAX_COMMITS_IN_FLIGHT`] batches are in the store at once, but a
/// conversation is in at most one of them: its next messages wait for the batch
/// before to be answered, so its seqs are stored, acknowledged and fanned out in
/// order, and a failed batch can refuse what follows it (see [`fail_commits`]).
pub(super) async fn run_committer(shard: Rc<Shard>) {
    let mut in_flight = FuturesUnordered::new();
    let mut busy: HashSet<ConversationId> = HashSet::new();
    loop {
        hand_out_ready(&shard).await;
        while in_flight.len() < MAX_COMMITS_IN_FLIGHT {
            let batch = {
                let mut queue = shard.owner.commit_queue.borrow_mut();
                take_batch(&mut queue, shard.config.store.max_batch, |assigned| {
                    busy.contains(&assigned.record.conversation)
                })
            };
            if batch.is_empty() {
                break;
            }
            let (conversations, committing, records) = prepare_commit(batch, shard.pusher.is_some());
            busy.extend(conversations.iter().copied());
            let store = shard.store.clone();
            let stages = shard.stages.clone();
            in_flight.push(async move {
                stages.store_commit_messages.record(records.len() as f64);
                let started = Instant::now();
                let result = store.append_messages(records).await;
                crate::metrics::record_since(&stages.store_commit, started);
                (conversations, committing, result)
            });
        }
        tokio::select! {
            Some((conversations, committing, result)) = in_flight.next() => {
                for conversation in &conversations {
                    busy.remove(conversation);
                }
                match result {
                    Ok(()) => fan_out(&shard, committing).await,
                    Err(err) => {
                        tracing::error!(error = %err, messages = committing.len(), "committing messages failed");
                        let failed: Vec<_> = committing
                            .into_iter()
                            .map(|message| {
                                (message.ack.conversation, message.sender.1, message.ack.client_msg_id, message.reply)
                            })
                            .collect();
                        fail_commits(&shard, failed, &ChatError::Store(err));
                    }
                }
            }
            () = shard.owner.commit_ready.notified() => {}
            () = shard.stop.cancelled(), if in_flight.is_empty() => return,
        }
    }
}

/// Takes up to `max` items from the front of `queue`, skipping the `busy` ones;
/// the rest stay queued in order. So for every key, what is taken is a prefix of
/// its items and what stays keeps its order. The queue keeps its allocation
/// (rebuilding it grew a fresh one, page by page, for every batch).
fn take_batch<T>(queue: &mut VecDeque<T>, max: usize, busy: impl Fn(&T) -> bool) -> Vec<T> {
    let mut batch = Vec::with_capacity(queue.len().min(max));
    let mut skipped = 0;
    for _ in 0..queue.len() {
        // With nothing moved behind, what is left is already in order.
        if batch.len() >= max && skipped == 0 {
            break;
        }
        let Some(item) = queue.pop_front() else { break };
        if batch.len() < max && !busy(&item) {
            batch.push(item);
        } else {
            // Rotated to the back; every item after it follows, in order.
            skipped += 1;
            queue.push_back(item);
        }
    }
    batch
}

/// Splits assigned messages into what the store takes and what fan-out needs
/// once it is durable, encoding each message's frame now so the records move to
/// the store instead of being copied. With `push`, a text message's body is
/// kept for the notifications of members with no connection.
fn prepare_commit(
    batch: Vec<Assigned<AppendReply>>,
    push: bool,
) -> (
    HashSet<ConversationId>,
    Vec<Committing>,
    Vec<crate::store::MessageRecord>,
) {
    let mut conversations = HashSet::new();
    let mut committing = Vec::with_capacity(batch.len());
    let mut records = Vec::with_capacity(batch.len());
    for Assigned {
        record,
        recipients,
        reply,
    } in batch
    {
        conversations.insert(record.conversation);
        let left_group = match &record.event {
            Some(GroupEvent::MemberRemoved(user)) => Some(*user),
            Some(GroupEvent::MemberLeft { .. }) => Some(record.sender),
            _ => None,
        };
        let plain_text = record.event.is_none() && record.amends.is_none();
        committing.push(Committing {
            push_body: (push && plain_text).then(|| record.body.clone()),
            frame: message_frame(&record),
            ack: SendAck::of(&record),
            sender: (record.sender, record.sender_device),
            recipients,
            left_group,
            reply,
        });
        records.push(record);
    }
    (conversations, committing, records)
}

/// Refuses appends whose commit failed, and every later append of their
/// conversations already assigned (queued for the next batch): stored after a
/// seq that may be missing, they would leave a gap. Their conversations reload
/// from the store on next use.
fn fail_commits(shard: &Shard, failed: Vec<(ConversationId, DeviceId, String, AppendReply)>, error: &ChatError) {
    let conversations: HashSet<ConversationId> = failed.iter().map(|(conversation, ..)| *conversation).collect();
    let later: VecDeque<_> = {
        let mut queue = shard.owner.commit_queue.borrow_mut();
        let (later, kept) = queue
            .drain(..)
            .partition(|assigned| conversations.contains(&assigned.record.conversation));
        *queue = kept;
        later
    };
    if !later.is_empty() {
        tracing::warn!(messages = later.len(), "refusing appends queued behind a failed commit");
    }
    let later = later.into_iter().map(|assigned| {
        let record = assigned.record;
        (
            record.conversation,
            record.sender_device,
            record.client_msg_id,
            assigned.reply,
        )
    });
    let mut sequencer = shard.owner.sequencer.borrow_mut();
    for (conversation, device, client_msg_id, reply) in failed.into_iter().chain(later) {
        let joined = sequencer.commit_failed(conversation, &(device, client_msg_id));
        for reply in std::iter::once(reply).chain(joined) {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

/// A message on its way to the store, with everything needed once it is durable.
struct Committing {
    frame: Bytes,
    ack: SendAck,
    /// The sending (user, device): it gets the ack, not the push.
    sender: (UserId, DeviceId),
    recipients: Arc<[UserId]>,
    /// The user this message takes out of its group, if any.
    left_group: Option<UserId>,
    /// A text message's body, for push notifications (when they are on).
    push_body: Option<String>,
    reply: AppendReply,
}

async fn fan_out(shard: &Rc<Shard>, committed: Vec<Committing>) {
    let committed_at = Instant::now();
    let shards = shard.mesh.shard_count();
    let mut per_shard: Vec<Arrivals> = (0..shards).map(|_| Arrivals::default()).collect();
    let mut relayed = Vec::new();
    let mut deliveries = Vec::with_capacity(committed.len());
    let mut notices = Vec::new();
    let relaying = shard.peers.as_ref().filter(|peers| peers.others_live());
    for message in committed {
        if relaying.is_some() {
            relayed.push(Relayed {
                conversation: message.ack.conversation,
                seq: message.ack.seq,
                frame: message.frame.clone(),
                users: message.recipients.to_vec(),
                skip_device: Some(message.sender),
            });
        }
        if let Some(left) = message.left_group {
            let others = message.recipients.to_vec();
            shard.spawn_core(super::presence::membership_ended(shard.clone(), left, others));
        }
        if let (Some(pusher), Some(body)) = (&shard.pusher, &message.push_body) {
            notify_away(shard, pusher, &message, body, &mut notices);
        }
        deliveries.push(Delivery {
            conversation: message.ack.conversation,
            seq: message.ack.seq,
            frame: message.frame,
            committed_at: Some(committed_at),
            users: message.recipients,
            skip_device: Some(message.sender),
        });
        let key = (message.sender.1, message.ack.client_msg_id.clone());
        let stored = StoredSend {
            seq: message.ack.seq,
            server_time_ms: message.ack.server_time_ms,
        };
        let joined = shard
            .owner
            .sequencer
            .borrow_mut()
            .committed(message.ack.conversation, &key, stored);
        for reply in joined {
            let _ = reply.send(Ok(message.ack.clone()));
        }
        let mut reply = message.reply;
        reply.stage(&shard.stages.committed);
        match per_shard.get_mut(reply.origin.0) {
            Some(arrivals) if reply.origin != shard.id => arrivals.answers.push((reply, message.ack)),
            _ => {
                let _ = reply.send(Ok(message.ack));
            }
        }
    }
    let deliveries = match shard.owner.continuity() {
        Some(continuity) => {
            for delivery in deliveries {
                super::continuity::offer(shard, delivery);
            }
            continuity.borrow_mut().take_ready()
        }
        None => deliveries,
    };
    split_deliveries(shard, deliveries, &mut per_shard);
    send_arrivals(shard, per_shard).await;
    if let Some(peers) = relaying {
        peers.relay(relayed);
    }
    for (home, notice) in notices {
        // A stopped shard notifies no one.
        let _ = shard.mesh.send(home, notice).await;
    }
}

/// Push notifications of a text message for the members with no connection
/// on this node, but the sender. In cluster mode their presence homes decide,
/// knowing who has sessions on other nodes: `notices` for them.
fn notify_away(
    shard: &Shard,
    pusher: &crate::push::Pusher,
    message: &Committing,
    body: &str,
    notices: &mut Vec<(ShardId, ShardMsg)>,
) {
    let (conversation, seq, sender) = (message.ack.conversation, message.ack.seq, message.sender.0);
    let away = message
        .recipients
        .iter()
        .copied()
        .filter(|user| *user != sender && shard.directory.shards_of(*user) == 0);
    if shard.peers.is_none() {
        for user in away {
            pusher.message(user, conversation, seq, sender, body);
        }
        return;
    }
    let mut by_home: Vec<Vec<UserId>> = vec![Vec::new(); shard.mesh.shard_count()];
    for user in away {
        by_home[shard.mesh.home_of(user).0].push(user);
    }
    for (index, users) in by_home.into_iter().enumerate() {
        if !users.is_empty() {
            let notice = ShardMsg::NotifyIfAway {
                users,
                conversation,
                seq,
                sender,
                body: body.to_owned(),
            };
            notices.push((ShardId(index), notice));
        }
    }
}

/// Hands out what continuity has let through since the last commit (relays
/// from other nodes, gaps filled): the committer is the one task sending this
/// shard's conversations to the shards, so they leave in the order released.
async fn hand_out_ready(shard: &Rc<Shard>) {
    let Some(ready) = shard
        .owner
        .continuity()
        .map(|continuity| continuity.borrow_mut().take_ready())
        .filter(|ready| !ready.is_empty())
    else {
        return;
    };
    let mut per_shard: Vec<Arrivals> = (0..shard.mesh.shard_count()).map(|_| Arrivals::default()).collect();
    split_deliveries(shard, ready, &mut per_shard);
    send_arrivals(shard, per_shard).await;
}

/// Adds each delivery to the arrivals of the shards holding its recipients,
/// with only their own users.
fn split_deliveries(shard: &Shard, deliveries: Vec<Delivery>, per_shard: &mut [Arrivals]) {
    for delivery in deliveries {
        let users = split_by_shard(shard, &delivery.users);
        for (arrivals, users) in per_shard.iter_mut().zip(users) {
            if !users.is_empty() {
                arrivals.deliveries.push(Delivery {
                    users: users.into(),
                    ..delivery.clone()
                });
            }
        }
    }
}

async fn send_arrivals(shard: &Shard, per_shard: Vec<Arrivals>) {
    for (index, arrivals) in per_shard.into_iter().enumerate() {
        if !arrivals.is_empty()
            && shard
                .mesh
                .send(ShardId(index), ShardMsg::Deliver(arrivals))
                .await
                .is_err()
        {
            tracing::warn!(to = index, "shard stopped; deliveries dropped");
        }
    }
}

/// Forgets send records older than the dedup window, every 1/24 of the window
/// (hourly by default). Runs on one shard per node.
pub(super) async fn sweep_sends(shard: Rc<Shard>) {
    let window = shard.config.chat.dedup_window;
    let mut ticker = tokio::time::interval((window / 24).max(std::time::Duration::from_secs(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shard.stop.cancelled() => return,
        }
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        match shard.store.purge_sends(unix_ms().saturating_sub(window_ms)).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "forgot send records older than the dedup window"),
            Err(err) => tracing::warn!(error = %err, "sweeping send records failed"),
        }
    }
}

/// Splits recipients by the shards holding their sessions, so each shard gets the
/// one encoded frame and only its own users.
fn split_by_shard(shard: &Shard, recipients: &[UserId]) -> Vec<Vec<UserId>> {
    let mut users: Vec<Vec<UserId>> = vec![Vec::new(); shard.mesh.shard_count()];
    for user in recipients {
        let mask = shard.directory.shards_of(*user);
        for (index, users) in users.iter_mut().enumerate() {
            if mask & (1 << index) != 0 {
                users.push(*user);
            }
        }
    }
    users
}

/// Sends one ephemeral push (not part of any sequence) to `recipients`, on
/// this node and the others.
async fn push_to(shard: &Shard, conversation: ConversationId, recipients: &[UserId], frame: Bytes) {
    if let Some(peers) = shard.peers.as_ref().filter(|peers| peers.others_live()) {
        let relayed = Relayed {
            conversation,
            seq: 0,
            frame: frame.clone(),
            users: recipients.to_vec(),
            skip_device: None,
        };
        peers.relay(vec![relayed]);
    }
    for (index, users) in split_by_shard(shard, recipients).into_iter().enumerate() {
        if users.is_empty() {
            continue;
        }
        let delivery = Delivery {
            conversation,
            // Seq 0: a resuming session drops it rather than replay it.
            seq: 0,
            frame: frame.clone(),
            committed_at: None,
            users: users.into(),
            skip_device: None,
        };
        if shard
            .mesh
            .send(ShardId(index), ShardMsg::Deliver(Arrivals::push(delivery)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Current members of a conversation, for ephemeral pushes: from the sequencer when
/// the conversation is loaded, else from the store.
async fn members(shard: &Shard, conversation: ConversationId) -> Result<Arc<[UserId]>, ChatError> {
    if let ConversationId::Direct { .. } = conversation {
        return Ok(conversation.direct_members().collect());
    }
    if let Some(recipients) = shard.owner.sequencer.borrow().group_recipients(conversation) {
        return Ok(recipients);
    }
    let ConversationId::Group(group) = conversation else {
        return Ok(Arc::new([]));
    };
    let record = shard.store.group(group).await?;
    Ok(record.map_or_else(
        || Arc::new([]) as Arc<[UserId]>,
        |record| record.members.iter().map(|(user, _)| *user).collect(),
    ))
}

/// Takes a signal from the mesh. Never waits.
pub(super) fn signal(shard: &Rc<Shard>, conversation: ConversationId, user: UserId, signal: Signal) {
    match signal {
        Signal::Receipt(marks) => {
            if shard.owner.receipts.borrow_mut().record(conversation, user, marks) {
                shard.spawn_core(flush_receipts(shard.clone()));
            }
        }
        Signal::Typing(typing) => {
            let owner = shard.clone();
            shard.spawn_core(async move {
                let shard = owner;
                let members = match members(&shard, conversation).await {
                    Ok(members) => members,
                    Err(err) => return tracing::warn!(%conversation, error = %err, "typing not sent"),
                };
                let others: Vec<UserId> = members.iter().copied().filter(|member| *member != user).collect();
                let expires_in_ms = u32::try_from(shard.config.chat.typing_expiry.as_millis()).unwrap_or(u32::MAX);
                let frame = confab_proto::encode_frame(&push_frame(Kind::TypingUpdate(v1::TypingUpdate {
                    conversation_id: conversation.to_string(),
                    user_id: user.get(),
                    typing,
                    expires_in_ms,
                })));
                push_to(&shard, conversation, &others, frame).await;
            });
        }
    }
}

/// After one flush interval, sends every coalesced receipt update to the members.
async fn flush_receipts(shard: Rc<Shard>) {
    tokio::time::sleep(shard.config.chat.receipt_flush_interval).await;
    let updates = shard.owner.receipts.borrow_mut().drain();
    for (conversation, user, marks) in updates {
        let members = match members(&shard, conversation).await {
            Ok(members) => members,
            Err(err) => {
                tracing::warn!(%conversation, error = %err, "receipt update not sent");
                continue;
            }
        };
        let frame = confab_proto::encode_frame(&push_frame(Kind::Receipt(v1::Receipt {
            conversation_id: conversation.to_string(),
            user_id: user.get(),
            delivered_seq: marks.delivered_seq,
            read_seq: marks.read_seq,
        })));
        push_to(&shard, conversation, &members, frame).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (conversation, seq) pairs; conversation 1 is busy.
    fn taken(queue: &mut VecDeque<(u8, u8)>, max: usize) -> Vec<(u8, u8)> {
        take_batch(queue, max, |(conversation, _)| *conversation == 1)
    }

    #[test]
    fn a_batch_skips_busy_conversations_and_keeps_every_order() {
        let mut queue = VecDeque::from([(1, 1), (2, 1), (1, 2), (3, 1), (2, 2), (3, 2)]);
        assert_eq!(taken(&mut queue, 3), vec![(2, 1), (3, 1), (2, 2)]);
        assert_eq!(queue, VecDeque::from([(1, 1), (1, 2), (3, 2)]));
        assert_eq!(taken(&mut queue, 10), vec![(3, 2)]);
        assert_eq!(queue, VecDeque::from([(1, 1), (1, 2)]));
        assert_eq!(taken(&mut queue, 10), vec![]);
    }

    #[test]
    fn a_full_batch_leaves_the_rest_in_order_and_the_queue_its_allocation() {
        let mut queue: VecDeque<(u8, u8)> = (0..100).map(|seq| (2, seq)).collect();
        let capacity = queue.capacity();
        assert_eq!(taken(&mut queue, 10), (0..10).map(|seq| (2, seq)).collect::<Vec<_>>());
        assert_eq!(queue, (10..100).map(|seq| (2, seq)).collect::<VecDeque<_>>());
        assert_eq!(queue.capacity(), capacity);
        let mut queue = VecDeque::from([(1, 1), (2, 1), (2, 2), (3, 1)]);
        assert_eq!(taken(&mut queue, 1), vec![(2, 1)]);
        assert_eq!(queue, VecDeque::from([(1, 1), (2, 2), (3, 1)]));
    }
}
