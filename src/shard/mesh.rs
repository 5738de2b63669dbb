//! The mesh: one bounded channel into every shard, and what travels on it.
//!
//! Receivers never block on the mesh themselves (they only update local state and
//! answer through one-shot channels), so a full channel is back-pressure on the
//! sender, never a cycle of shards waiting on each other.

use super::ShardId;
use crate::chat::{ChatError, Presence, SendAck, Signal};
use crate::cluster::envelope::Sessions;
use bytes::Bytes;
use confab_protocol::Append;
use confab_protocol::ids::{ConversationId, DeviceId, Seq, UserId};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// The owner's answer to an append, and when the append passed each stage so
/// far (for the stage timings of [`crate::metrics`]).
#[derive(Debug)]
pub struct AppendReply {
    answer: oneshot::Sender<Result<SendAck, ChatError>>,
    /// The shard whose session made the append: a committed append's answer
    /// goes back there with that shard's deliveries ([`ShardMsg::Deliver`]).
    pub origin: ShardId,
    /// When it was handed to the mesh, then taken by the owner, then given a seq.
    pub stage_at: Instant,
    /// It came from another node (cluster mode): this node must sequence it
    /// or refuse it, never forward it again.
    pub forwarded: bool,
}

impl AppendReply {
    /// A reply for an append made on shard `origin` and handed to the mesh
    /// now, and where its answer arrives.
    pub fn new(origin: ShardId) -> (Self, oneshot::Receiver<Result<SendAck, ChatError>>) {
        let (answer, answered) = oneshot::channel();
        let reply = Self {
            answer,
            origin,
            stage_at: Instant::now(),
            forwarded: false,
        };
        (reply, answered)
    }

    /// A reply for an append another node forwarded, handed to the mesh now.
    pub fn forwarded(owner: ShardId) -> (Self, oneshot::Receiver<Result<SendAck, ChatError>>) {
        let (mut reply, answered) = Self::new(owner);
        reply.forwarded = true;
        (reply, answered)
    }

    /// Records the time since the last stage in `stage`, and starts the next.
    pub fn stage(&mut self, stage: &metrics::Histogram) {
        let now = Instant::now();
        stage.record(now.duration_since(self.stage_at).as_secs_f64());
        self.stage_at = now;
    }

    /// Answers; fails only if the asker went away.
    pub fn send(self, result: Result<SendAck, ChatError>) -> Result<(), Result<SendAck, ChatError>> {
        self.answer.send(result)
    }
}

#[derive(Debug)]
pub enum ShardMsg {
    /// To a conversation's owner: sequence, store and fan out this message.
    Append(Append, AppendReply),
    /// Frames for sessions on the receiving shard, and the answers to appends
    /// its sessions made that were committed with them.
    Deliver(Arrivals),
    /// `user` gained (`online`) or lost its last session on shard `from`. An ack,
    /// when present, is answered once the update is applied.
    Directory {
        user: UserId,
        from: ShardId,
        online: bool,
        ack: Option<oneshot::Sender<()>>,
    },
    /// The device logged out: close its sessions on the receiving shard.
    Revoke { user: UserId, device: DeviceId },
    /// Cluster mode, to a conversation's owner shard: messages and pushes
    /// another node committed, for this node's sessions, each with all its
    /// recipients (see [`super::continuity`]).
    Relayed(Vec<Delivery>),
    /// Cluster mode: these users' sessions missed messages that could not be
    /// filled in: close them so they resume.
    Resync(Arc<[UserId]>),
    /// Cluster mode, to their presence home: which of its users have sessions
    /// on another node.
    Elsewhere(Sessions),
    /// Cluster mode, to their presence home: notify these users of a message
    /// unless they have a session on another node (none here).
    NotifyIfAway {
        users: Vec<UserId>,
        conversation: ConversationId,
        seq: Seq,
        sender: UserId,
        body: String,
    },
    /// To `user`'s presence home: `subscriber` (on shard `from`) follows it; the
    /// reply is its current presence.
    Subscribe {
        user: UserId,
        subscriber: (ShardId, UserId),
        reply: oneshot::Sender<Presence>,
    },
    Unsubscribe {
        user: UserId,
        subscriber: (ShardId, UserId),
    },
    /// To `user`'s presence home: `subscriber` (on any shard) no longer shares
    /// a conversation with it.
    Forget { user: UserId, subscriber: UserId },
    /// To a conversation's owner: an ephemeral signal from `user` for the members.
    Signal {
        conversation: ConversationId,
        user: UserId,
        signal: Signal,
    },
}

/// What one commit (or one ephemeral push) brings to one shard. A committed
/// append's answer travels with the deliveries rather than on its own, so the
/// shard that made it is woken once per commit, not once per append, and its
/// acks and pushes to one connection go out in one write.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// Answered first: a sender's ack before the pushes of the same commit.
    pub answers: Vec<(AppendReply, SendAck)>,
    pub deliveries: Vec<Delivery>,
}

impl Arrivals {
    /// One frame for some users, with no answers.
    pub fn push(delivery: Delivery) -> Self {
        Self {
            answers: Vec::new(),
            deliveries: vec![delivery],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.deliveries.is_empty()
    }
}

/// One encoded frame for the sessions of some users on one shard.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub conversation: ConversationId,
    pub seq: Seq,
    pub frame: Bytes,
    /// When its message was committed (for the `delivered` stage timing);
    /// `None` for ephemeral pushes.
    pub committed_at: Option<Instant>,
    pub users: Arc<[UserId]>,
    /// The device that sent it: it gets a SendAck instead.
    pub skip_device: Option<(UserId, DeviceId)>,
}

/// Senders into every shard's mailbox.
#[derive(Debug, Clone)]
pub struct Mesh {
    shards: Arc<[mpsc::Sender<ShardMsg>]>,
}

impl Mesh {
    /// A mesh of `shards` mailboxes, each holding `capacity` messages.
    pub fn new(shards: usize, capacity: usize) -> (Self, Vec<mpsc::Receiver<ShardMsg>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::channel(capacity)).unzip();
        (Self { shards: senders.into() }, receivers)
    }

    /// How many shards the node runs.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that sequences `conversation`.
    pub fn owner_of(&self, conversation: ConversationId) -> ShardId {
        ShardId((conversation.hash64() % self.shards.len() as u64) as usize)
    }

    /// The shard that decides `user`'s presence.
    pub fn home_of(&self, user: UserId) -> ShardId {
        let hash = ConversationId::direct(user, user).hash64();
        ShardId((hash % self.shards.len() as u64) as usize)
    }

    /// Messages waiting in `shard`'s mailbox.
    pub fn queued(&self, shard: ShardId) -> usize {
        let sender = &self.shards[shard.0];
        sender.max_capacity() - sender.capacity()
    }

    /// Has `append` sequenced by its conversation's owner from outside the
    /// shards (the server API), and waits for its ack.
    pub async fn append(&self, append: Append) -> Result<SendAck, ChatError> {
        let owner = self.owner_of(append.conversation);
        let (reply, answer) = AppendReply::new(owner);
        self.send(owner, ShardMsg::Append(append, reply))
            .await
            .map_err(|_| ChatError::ShuttingDown)?;
        answer.await.map_err(|_| ChatError::ShuttingDown)?
    }

    /// Closes the sessions of a logged-out device on every shard, from outside
    /// the shards (the server API).
    pub async fn revoke(&self, user: UserId, device: DeviceId) {
        for index in 0..self.shards.len() {
            // A stopped shard has no sessions left to close.
            let _ = self.send(ShardId(index), ShardMsg::Revoke { user, device }).await;
        }
    }

    /// Sends, waiting for room. Fails only once the receiving shard has stopped.
    pub async fn send(&self, to: ShardId, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.shards[to.0].send(msg).await.map_err(|err| err.0)
    }
}
