//! Talking to the other nodes through the [`bus`](super::bus): forwarding an
//! append to the node that sequences its conversation and waiting for its
//! answer, relaying committed messages, pushes and presence to every other
//! live node, and serving what other nodes send here (docs/CLUSTER.md, "Forwarding and
//! fan-out").
//!
//! Shards hold a [`Peers`] handle; everything that touches Redis runs on the
//! `confab-cluster` thread: one task sends (whatever queued while the last
//! pipeline was in flight goes in the next, so entries per round trip grow
//! with load), one reads this node's inbox. What arrives is handed to the
//! node through [`Local`], which the shards implement.

use super::bus::{Inbox, Outbox};
use super::envelope::{Answer, Envelope, Refusal, Relayed, Sessions};
use super::membership::LiveNodes;
use super::{Incarnation, with_causes};
use async_trait::async_trait;
use confab_protocol::Append;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Entries queued for the sending task at most; past that, forwards are
/// refused as overloaded and relays dropped.
const OUTGOING_QUEUE: usize = 8_192;
/// Entries one pipeline carries at most.
const MAX_PER_ROUND_TRIP: usize = 1_024;
/// Entries one inbox read takes at most.
const MAX_PER_READ: u64 = 512;
/// How long an inbox read blocks when there is nothing to read.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Entries an inbox keeps at most (about: `MAXLEN ~`): a node that stops
/// reading loses the oldest, which the store still has.
const INBOX_LENGTH: u64 = 100_000;
/// An inbox its node stopped renewing (it died) expires after this many
/// leases, and at least [`MIN_INBOX_TTL`].
const INBOX_TTL_LEASES: u32 = 10;
const MIN_INBOX_TTL: Duration = Duration::from_secs(30);
/// How long a forward waits for its answer at most (less when the lease is
/// shorter): a client waits no longer than that for an ack.
const MAX_PATIENCE: Duration = Duration::from_secs(5);
/// Forwards waiting for their answers at most.
const MAX_WAITING: usize = 65_536;
/// Forwards from one node being sequenced here at once at most: more are
/// refused at once (UNAVAILABLE, the client retries), so one node's burst
/// cannot hold every slot of this node's owner shards while the forwards of
/// the others wait behind it in the inbox.
const MAX_FORWARDS_PER_NODE: usize = 16_384;

/// An answer still to come.
pub type PendingAnswer = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// What this node does with what other nodes send it.
#[async_trait]
pub trait Local: Send + Sync + 'static {
    /// Hands a forwarded append to its conversation's sequencer here, in the
    /// order forwards arrive; the answer comes once it is stored or refused.
    async fn submit(&self, append: Append) -> PendingAnswer;

    /// Delivers frames to the sessions of their users on this node.
    async fn deliver(&self, relayed: Vec<Relayed>);

    /// Takes what another node tells of who has sessions there.
    async fn presence(&self, sessions: Sessions);
}

/// An entry for the sending task.
#[derive(Debug)]
enum Outgoing {
    /// To one node.
    To(Incarnation, Envelope),
    /// To every live node but this one.
    Everyone(Envelope),
}

/// Forwards waiting for answers, by token.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// Forwards from each node being sequenced here, counted so that no node has
/// more than its share at once.
#[derive(Debug, Clone)]
struct Sequencing {
    by_node: Arc<Mutex<HashMap<Incarnation, usize>>>,
    per_node: usize,
}

/// One forward being sequenced here; its node's count drops with it.
#[derive(Debug)]
struct Slot {
    sequencing: Sequencing,
    node: Incarnation,
}

impl Sequencing {
    fn new(per_node: usize) -> Self {
        Self {
            by_node: Arc::default(),
            per_node,
        }
    }

    /// A slot for one more forward from `node`, unless it has its share.
    fn start(&self, node: Incarnation) -> Option<Slot> {
        let mut by_node = self.by_node.lock().unwrap_or_else(PoisonError::into_inner);
        let count = by_node.entry(node).or_default();
        if *count >= self.per_node {
            return None;
        }
        *count += 1;
        Some(Slot {
            sequencing: self.clone(),
            node,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_node = self.sequencing.by_node.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = by_node.get_mut(&self.node) {
            *count -= 1;
            if *count == 0 {
                by_node.remove(&self.node);
            }
        }
    }
}

/// A shard's handle on the other nodes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Peers {
    me: Incarnation,
    live: Arc<RwLock<LiveNodes>>,
    outgoing: mpsc::Sender<Outgoing>,
    waiting: Waiting,
    tokens: Arc<AtomicU64>,
    /// How long a forward waits for its answer.
    patience: Duration,
}

impl Peers {
    /// This node.
    pub fn me(&self) -> Incarnation {
        self.me
    }

    /// Whether `node` was live at the last heartbeat.
    pub fn is_live(&self, node: Incarnation) -> bool {
        let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
        live.as_slice().binary_search(&node).is_ok()
    }

    /// The nodes live at the last heartbeat, this one included.
    pub fn live_nodes(&self) -> Vec<Incarnation> {
        let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
        live.as_slice().to_vec()
    }

    /// Whether any other node was live at the last heartbeat.
    pub fn others_live(&self) -> bool {
        let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
        live.as_slice().iter().any(|node| *node != self.me)
    }

    /// Sends `append` to `node`, which sequences its conversation, and waits
    /// for its answer. Queued before this returns, so forwards leave in the
    /// order they were made; refused at once when too many wait, and answered
    /// UNAVAILABLE when no answer comes within the lease.
    pub fn forward(&self, node: Incarnation, append: Append) -> PendingAnswer {
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            if waiting.len() >= MAX_WAITING {
                waiting.retain(|_, waiter| !waiter.is_closed());
            }
            if waiting.len() >= MAX_WAITING {
                return Box::pin(std::future::ready(Err(Refusal::unavailable(
                    "too many sends wait for other nodes; retry later",
                ))));
            }
            waiting.insert(token, answer);
        }
        let envelope = Envelope::Forward {
            token,
            reply_to: self.me,
            append,
        };
        if self.outgoing.try_send(Outgoing::To(node, envelope)).is_err() {
            self.forget(token);
            return Box::pin(std::future::ready(Err(Refusal::unavailable(
                "the link to other nodes is overloaded; retry later",
            ))));
        }
        let (waiting, patience) = (self.waiting.clone(), self.patience);
        Box::pin(async move {
            let answer = tokio::time::timeout(patience, answered).await;
            waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&token);
            match answer {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(Refusal::unavailable("the link to other nodes closed; retry")),
                Err(_) => Err(Refusal::unavailable(format!(
                    "node {node}, which sequences this conversation, did not answer; retry"
                ))),
            }
        })
    }

    fn forget(&self, token: u64) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&token);
    }

    /// Sends frames to every other live node, for the sessions of their users
    /// there. Never waits: when the sending task is full (Redis slow or
    /// down), the relay is dropped and counted (`confab_cluster_relays_dropped_total`)
    /// rather than stall the shard's commits, which must go on for local
    /// users; the messages are stored, and the other nodes fill the gap from
    /// the store (`shard::continuity`).
    pub fn relay(&self, relayed: Vec<Relayed>) {
        if relayed.is_empty() {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) =
            self.outgoing.try_send(Outgoing::Everyone(Envelope::Relay(relayed)))
        {
            metrics::counter!("confab_cluster_relays_dropped_total").increment(1);
            tracing::debug!("the link to other nodes is full: a relay was dropped");
        }
    }

    /// Tells every other live node who has sessions here. Never waits: when
    /// the link is full, it is dropped and counted
    /// (`confab_cluster_presence_dropped_total`); the next snapshot (see
    /// `shard::presence`) corrects what the others believe.
    pub fn tell_presence(&self, sessions: Sessions) {
        if let Err(mpsc::error::TrySendError::Full(_)) =
            self.outgoing.try_send(Outgoing::Everyone(Envelope::Presence(sessions)))
        {
            metrics::counter!("confab_cluster_presence_dropped_total").increment(1);
        }
    }
}

/// Opens this node's inbox and returns the handle shards use and the two tasks
/// to run on the cluster thread until `leave`.
pub(super) async fn start(
    config: &crate::config::ClusterConfig,
    me: Incarnation,
    live: Arc<RwLock<LiveNodes>>,
    local: Arc<dyn Local>,
    leave: CancellationToken,
) -> Result<(Peers, impl Future<Output = ()> + use<>), super::ClusterError> {
    let reads = super::connect_waiting(config, READ_BLOCK + config.heartbeat).await?;
    let writes = super::connect(config).await?;
    let inbox = Arc::new(Inbox::open(reads, writes.clone(), &config.prefix, me).await?);
    let outbox = Outbox::new(writes, &config.prefix, INBOX_LENGTH);
    let (outgoing, queued) = mpsc::channel(OUTGOING_QUEUE);
    let peers = Peers {
        me,
        live: live.clone(),
        outgoing: outgoing.clone(),
        waiting: Waiting::default(),
        tokens: Arc::new(AtomicU64::new(1)),
        patience: config.lease.min(MAX_PATIENCE),
    };
    let waiting = peers.waiting.clone();
    let inbox_ttl = (config.lease * INBOX_TTL_LEASES).max(MIN_INBOX_TTL);
    inbox.keep(inbox_ttl).await?;
    let tasks = async move {
        let sending = tokio::spawn(send(outbox, queued, me, live, waiting.clone()));
        receive(&inbox, inbox_ttl, local, waiting, outgoing, &leave).await;
        sending.abort();
        if let Err(err) = inbox.close().await {
            tracing::warn!(error = %with_causes(&err), "deleting this node's inbox failed");
        }
    };
    Ok((peers, tasks))
}

/// The sending task: each round takes whatever queued and sends it in one
/// pipeline. When Redis does not take it, the forwards in it are answered
/// UNAVAILABLE and the relays are dropped (their messages are stored; clients
/// on other nodes get them when they next catch up).
async fn send(
    outbox: Outbox,
    mut queued: mpsc::Receiver<Outgoing>,
    me: Incarnation,
    live: Arc<RwLock<LiveNodes>>,
    waiting: Waiting,
) {
    let per_round_trip = metrics::histogram!("confab_cluster_entries_per_round_trip");
    let mut batch = Vec::with_capacity(MAX_PER_ROUND_TRIP);
    let mut reachable = true;
    while queued.recv_many(&mut batch, MAX_PER_ROUND_TRIP).await > 0 {
        let others: Vec<Incarnation> = {
            let live = live.read().unwrap_or_else(PoisonError::into_inner);
            live.as_slice().iter().copied().filter(|node| *node != me).collect()
        };
        let mut entries = Vec::with_capacity(batch.len());
        let mut forwards = Vec::new();
        for outgoing in batch.drain(..) {
            match outgoing {
                Outgoing::To(node, envelope) => {
                    if let Envelope::Forward { token, .. } = &envelope {
                        forwards.push(*token);
                    }
                    entries.push((node, envelope.encode()));
                }
                Outgoing::Everyone(envelope) => {
                    let payload = envelope.encode();
                    entries.extend(others.iter().map(|node| (*node, payload.clone())));
                }
            }
        }
        per_round_trip.record(entries.len() as f64);
        match outbox.send(&entries).await {
            Ok(()) if !reachable => {
                tracing::info!("Redis takes this node's entries again");
                reachable = true;
            }
            Ok(()) => {}
            Err(err) => {
                if reachable {
                    tracing::warn!(error = %with_causes(&err), "sending to other nodes failed: forwards refused, relays dropped");
                    reachable = false;
                }
                let mut waiting = waiting.lock().unwrap_or_else(PoisonError::into_inner);
                for token in forwards {
                    if let Some(waiter) = waiting.remove(&token) {
                        let _ = waiter.send(Err(Refusal::unavailable(
                            "other nodes cannot be reached (Redis); retry later",
                        )));
                    }
                }
            }
        }
    }
}

/// The receiving task: reads this node's inbox until `leave`, hands each entry
/// on in order and acknowledges what it read.
async fn receive(
    inbox: &Arc<Inbox>,
    inbox_ttl: Duration,
    local: Arc<dyn Local>,
    waiting: Waiting,
    outgoing: mpsc::Sender<Outgoing>,
    leave: &CancellationToken,
) {
    let mut reachable = true;
    let mut kept = tokio::time::Instant::now();
    let sequencing = Sequencing::new(MAX_FORWARDS_PER_NODE);
    loop {
        // Renewed a few times per expiry; reads block at most READ_BLOCK.
        if kept.elapsed() >= inbox_ttl / 4 {
            match inbox.keep(inbox_ttl).await {
                Ok(()) => kept = tokio::time::Instant::now(),
                Err(err) => tracing::debug!(error = %with_causes(&err), "renewing the inbox failed"),
            }
        }
        let entries = tokio::select! {
            () = leave.cancelled() => return,
            entries = inbox.receive(MAX_PER_READ, READ_BLOCK) => entries,
        };
        let entries = match entries {
            Ok(entries) => {
                if !reachable {
                    tracing::info!("reading this node's inbox again");
                    reachable = true;
                }
                entries
            }
            Err(err) => {
                if reachable {
                    tracing::warn!(error = %with_causes(&err), "reading this node's inbox failed; retrying");
                    reachable = false;
                }
                // Redis may have come back without the inbox (no AOF).
                if let Err(err) = inbox.keep(inbox_ttl).await {
                    tracing::debug!(error = %with_causes(&err), "recreating the inbox failed");
                }
                tokio::select! {
                    () = leave.cancelled() => return,
                    () = tokio::time::sleep(READ_BLOCK) => continue,
                }
            }
        };
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            ids.push(entry.id);
            match Envelope::decode(&entry.payload) {
                Ok(Envelope::Forward {
                    token,
                    reply_to,
                    append,
                }) => {
                    let Some(slot) = sequencing.start(reply_to) else {
                        metrics::counter!("confab_cluster_forwards_refused_total").increment(1);
                        tracing::debug!(node = %reply_to, "too many forwards from one node: refused");
                        let answer = Envelope::Answer {
                            token,
                            answer: Err(Refusal::unavailable(
                                "too many sends from your node wait on this one; retry later",
                            )),
                        };
                        // Never waits: unanswered, the forwarder gives up after its patience.
                        let _ = outgoing.try_send(Outgoing::To(reply_to, answer));
                        continue;
                    };
                    let pending = local.submit(append).await;
                    let outgoing = outgoing.clone();
                    tokio::spawn(async move {
                        let answer = Envelope::Answer {
                            token,
                            answer: pending.await,
                        };
                        drop(slot);
                        let _ = outgoing.send(Outgoing::To(reply_to, answer)).await;
                    });
                }
                Ok(Envelope::Answer { token, answer }) => {
                    let waiter = waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&token);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(answer);
                    }
                }
                Ok(Envelope::Relay(relayed)) => local.deliver(relayed).await,
                Ok(Envelope::Presence(sessions)) => local.presence(sessions).await,
                Err(err) => tracing::warn!(error = %err, "an inbox entry that does not decode; dropped"),
            }
        }
        // Off the read path: the next read need not wait for it.
        let acking = inbox.clone();
        tokio::spawn(async move {
            if let Err(err) = acking.ack(ids).await {
                tracing::warn!(error = %with_causes(&err), "acknowledging inbox entries failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle whose sending task never runs, with room for one entry.
    fn stuck(me: Incarnation) -> (Peers, mpsc::Receiver<Outgoing>) {
        let (outgoing, queued) = mpsc::channel(1);
        let peers = Peers {
            me,
            live: Arc::new(RwLock::new(LiveNodes::default())),
            outgoing,
            waiting: Waiting::default(),
            tokens: Arc::new(AtomicU64::new(1)),
            patience: Duration::from_millis(50),
        };
        (peers, queued)
    }

    fn relayed() -> Vec<Relayed> {
        let user = confab_protocol::ids::UserId::new(1).unwrap();
        vec![Relayed {
            conversation: confab_protocol::ids::ConversationId::direct(user, user),
            seq: 1,
            frame: bytes::Bytes::from_static(b"x"),
            users: vec![user],
            skip_device: None,
        }]
    }

    #[test]
    fn each_node_has_its_share_of_forwards_sequenced_here() {
        let sequencing = Sequencing::new(2);
        let (busy, quiet) = (Incarnation::new(2), Incarnation::new(3));
        let first = sequencing.start(busy).expect("a first slot");
        let second = sequencing.start(busy).expect("a second slot");
        assert!(
            sequencing.start(busy).is_none(),
            "a third forward from one node is refused"
        );
        let other = sequencing.start(quiet);
        assert!(other.is_some(), "another node still has its share");
        drop(first);
        let again = sequencing.start(busy);
        assert!(again.is_some(), "an answered forward frees its slot");
        drop((second, again, other));
        let by_node = sequencing.by_node.lock().unwrap();
        assert!(
            by_node.is_empty(),
            "nodes with nothing in flight are forgotten: {by_node:?}"
        );
    }

    #[test]
    fn a_relay_never_waits_for_a_stuck_link() {
        let (peers, _queued) = stuck(Incarnation::new(1));
        // The shard's committer calls this: with Redis down and the queue
        // full it must return at once, or local commits would stall.
        for _ in 0..10 {
            peers.relay(relayed());
        }
    }

    #[tokio::test]
    async fn a_forward_on_a_full_link_is_refused_and_one_unanswered_times_out() {
        let (peers, _queued) = stuck(Incarnation::new(1));
        let append = |id: &str| {
            let user = confab_protocol::ids::UserId::new(1).unwrap();
            Append {
                conversation: confab_protocol::ids::ConversationId::direct(user, user),
                sender: user,
                sender_device: confab_protocol::ids::DeviceId::new(1).unwrap(),
                client_msg_id: id.into(),
                content: confab_protocol::Content::Text("hi".into()),
            }
        };
        let first = peers.forward(Incarnation::new(2), append("a"));
        let refused = peers.forward(Incarnation::new(2), append("b")).await;
        assert!(refused.unwrap_err().message.contains("overloaded"));
        let unanswered = first.await.unwrap_err();
        assert_eq!(unanswered.code, confab_proto::v1::ErrorCode::Unavailable);
        assert!(peers.waiting.lock().unwrap().is_empty(), "nothing left waiting");
    }
}
