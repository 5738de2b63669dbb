//! Thread-per-core shards.
//!
//! Each shard is one OS thread (pinned to a core where the OS allows) running a
//! `current_thread` tokio runtime. It accepts connections on its own SO_REUSEPORT
//! listeners (TCP, WebSocket), takes the QUIC sessions the node's endpoint hands
//! it, and owns them and their state outright: nothing of a connection is
//! shared with another thread. Shards talk only through the [`mesh`]: bounded
//! channels carrying appends to a conversation's owner shard, encoded deliveries,
//! and presence updates for the [`directory`].
//!
//! Each shard runs four kinds of task: the accept loops, one task per connection,
//! the mailbox loop (never blocks: it applies mesh messages to local state), and the
//! owner's committer (see [`owner`]).
//!
//! Shutdown has two phases so no in-flight message is dropped: `drain` stops the
//! accept loops and ends every connection (after its in-flight requests finish);
//! once every shard has drained, `stop` ends the mailbox loops and committers.

mod connection;
mod continuity;
mod directory;
mod elsewhere;
mod gauges;
mod link;
mod mesh;
mod owner;
mod presence;
mod quotas;
mod sessions;
mod signals;
mod store_watch;

pub use link::NodeLink;
pub use mesh::Mesh;
pub(crate) use mesh::ShardMsg;

use crate::auth::Accounts;
use crate::chat::{PresenceTracker, SequencerLimits};
use crate::config::Config;
use crate::store::Store;
use crate::transport;
use crate::transport::admission::Admission;
use confab_protocol::SessionLimits;
use confab_protocol::ids::{GroupIds, UserId};
use directory::SessionDirectory;
use mesh::Arrivals;
use sessions::LocalSessions;
use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Directory entries are one bit per shard in a `u64`.
pub const MAX_SHARDS: usize = 64;

/// A shard's index, 0 up to the node's shard count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardId(pub usize);

/// What every shard of a node shares: thread-safe handles only.
#[derive(Debug, Clone)]
pub struct NodeContext {
    /// The node's configuration.
    pub config: Arc<Config>,
    /// The node's store.
    pub store: Arc<dyn Store>,
    /// The node's accounts.
    pub accounts: Accounts,
    /// The channels between shards.
    pub mesh: Mesh,
    /// Connection slots, node-wide and per source address.
    pub admission: Admission,
    /// Names the groups clients create.
    pub group_ids: GroupIds,
    /// Notifications for users with no connection, when `push.webhook_url` is set.
    pub pusher: Option<crate::push::Pusher>,
    /// The other nodes, in cluster mode.
    pub peers: Option<crate::cluster::Peers>,
    /// TLS for the TCP and WebSocket listeners, when `[tls]` is on.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Phase one of shutdown: stop accepting, close connections.
    pub drain: CancellationToken,
    /// Phase two: stop the mailbox loops and committers.
    pub stop: CancellationToken,
}

/// The state of one shard, shared by its tasks on its thread: handles on the
/// node (config, store, accounts, mesh, shutdown signals) and the shard's four
/// roles, each a type of its own with private state: the local sessions
/// (`sessions.rs`), the session directory (`directory.rs`), the conversation
/// owner (`owner.rs`) and the presence home (`presence.rs`).
#[derive(Debug)]
pub struct Shard {
    id: ShardId,
    config: Arc<Config>,
    limits: Arc<SessionLimits>,
    store: Arc<dyn Store>,
    accounts: Accounts,
    mesh: Mesh,
    drain: CancellationToken,
    stop: CancellationToken,
    admission: Admission,
    group_ids: Arc<GroupIds>,
    pusher: Option<crate::push::Pusher>,
    peers: Option<crate::cluster::Peers>,
    /// The sessions this shard holds.
    sessions: RefCell<LocalSessions>,
    /// Which shards hold sessions of which users.
    directory: SessionDirectory,
    /// The conversations this shard owns.
    owner: owner::Owner,
    /// What each user may still send through this shard.
    quotas: RefCell<quotas::UserQuotas>,
    /// Timings of the stages of a send (no-ops unless metrics are on).
    stages: crate::metrics::SendStages,
    /// Presence of the users whose home this shard is.
    presence: presence::Home,
    connections: TaskTracker,
}

/// Everything a shard thread needs to start.
#[derive(Debug)]
pub struct ShardStart {
    /// This shard's index.
    pub id: ShardId,
    /// What every shard shares.
    pub context: NodeContext,
    /// The shard's single-threaded runtime.
    pub runtime: tokio::runtime::Runtime,
    /// Its share of the listeners.
    pub listeners: Listeners,
    /// Messages from other shards.
    pub mailbox: mpsc::Receiver<ShardMsg>,
    /// The core to pin the thread to, if pinning.
    pub core: Option<core_affinity::CoreId>,
    /// Answered once this shard's connections have all ended.
    pub drained: oneshot::Sender<()>,
}

/// A shard's share of the node's listeners, registered with its runtime.
#[derive(Debug)]
pub struct Listeners {
    /// TCP, always.
    pub tcp: tokio::net::TcpListener,
    /// WebSocket, when on.
    pub websocket: Option<tokio::net::TcpListener>,
    /// QUIC sessions the node's endpoint hands to this shard.
    pub quic: Option<mpsc::Receiver<crate::transport::quic::Handoff>>,
}

/// Starts a shard on its own thread.
pub fn spawn(start: ShardStart) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("confab-shard-{}", start.id.0))
        .spawn(move || {
            if let Some(core) = start.core
                && !core_affinity::set_for_current(core)
            {
                tracing::warn!(shard = start.id.0, "could not pin shard thread to its core");
            }
            let ShardStart {
                id,
                context,
                runtime,
                listeners,
                mailbox,
                drained,
                ..
            } = start;
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, run(id, context, listeners, mailbox, drained));
        })
}

async fn run(
    id: ShardId,
    context: NodeContext,
    listeners: Listeners,
    mailbox: mpsc::Receiver<ShardMsg>,
    drained: oneshot::Sender<()>,
) {
    let (directory, directory_updates) = SessionDirectory::new();
    let presence_tracker = PresenceTracker::new(
        context.config.chat.presence_grace,
        context.config.chat.presence_min_interval,
    );
    let config = context.config.clone();
    let shard = Rc::new(Shard {
        id,
        limits: Arc::new(config.session_limits()),
        owner: owner::Owner::new(
            SequencerLimits {
                max_pending: config.chat.max_pending_appends,
                max_cached: config.chat.max_cached_conversations,
                max_group_members: config.chat.max_group_members,
                // The embedded store answers a send check in microseconds: memory
                // would save nothing (measured: BENCHMARKS.md, "The owner's
                // send-record memory").
                max_sent_records: match context.store.finds_sends_cheaply() {
                    true => 0,
                    false => owner::MAX_SENT_RECORDS,
                },
                dedup_window_ms: u64::try_from(config.chat.dedup_window.as_millis()).unwrap_or(u64::MAX),
            },
            context.peers.is_some(),
        ),
        config,
        store: context.store,
        accounts: context.accounts.clone(),
        mesh: context.mesh,
        drain: context.drain.clone(),
        stop: context.stop,
        admission: context.admission.clone(),
        group_ids: Arc::new(context.group_ids),
        pusher: context.pusher,
        peers: context.peers,
        sessions: RefCell::default(),
        directory,
        quotas: RefCell::new(quotas::UserQuotas::new(&context.config.limits)),
        stages: crate::metrics::SendStages::new(),
        presence: presence::Home::new(presence_tracker),
        connections: TaskTracker::new(),
    });
    let core = TaskTracker::new();
    core.spawn_local(mailbox_loop(shard.clone(), mailbox));
    core.spawn_local(owner::run_committer(shard.clone()));
    core.spawn_local(directory::run_announcer(shard.clone(), directory_updates));
    core.spawn_local(presence::run_timer(shard.clone()));
    core.spawn_local(presence::run_snapshots(shard.clone()));
    if shard.config.metrics.listen.is_some() {
        core.spawn_local(gauges::run(shard.clone()));
    }
    if id == ShardId(0) {
        core.spawn_local(owner::sweep_sends(shard.clone()));
        core.spawn_local(store_watch::run(shard.clone()));
    }

    let transports = Rc::new(transport::Context::new(
        shard.clone(),
        &shard.config,
        transport::Parts {
            tls: context.tls,
            admission: context.admission,
            accounts: context.accounts,
            drain: context.drain,
            connections: shard.connections.clone(),
        },
    ));
    let Listeners { tcp, websocket, quic } = listeners;
    let websocket = async {
        if let Some(listener) = websocket {
            transport::accept_loop(
                transports.clone(),
                listener,
                transport::ws::serve,
                transport::ws::refuse,
            )
            .await;
        }
    };
    let quic = async {
        if let Some(handoffs) = quic {
            transport::quic::serve_handoffs(transports.clone(), handoffs).await;
        }
    };
    futures::join!(
        transport::accept_loop(transports.clone(), tcp, transport::tcp::serve, transport::tcp::refuse),
        websocket,
        quic
    );

    shard.connections.close();
    shard.connections.wait().await;
    tracing::debug!(shard = id.0, "connections drained");
    let _ = drained.send(());

    shard.stop.cancelled().await;
    core.close();
    core.wait().await;
}

/// Transports hand their connections to the connection driver.
impl transport::Handler for Shard {
    fn run(
        self: Rc<Self>,
        source: impl transport::FrameSource,
        outbound: transport::Outbound,
        peer: std::net::SocketAddr,
    ) -> impl Future<Output = transport::Closed> {
        connection::run(self, source, outbound, peer)
    }
}

impl Shard {
    /// Runs a core (non-connection) task of this shard.
    fn spawn_core(&self, task: impl Future<Output = ()> + 'static) {
        tokio::task::spawn_local(task);
    }

    /// Closes the sessions of a logged-out device on every shard that has the user.
    async fn revoke(&self, user: UserId, device: confab_protocol::ids::DeviceId) {
        let shards = self.directory.shards_of(user);
        for index in (0..self.mesh.shard_count()).filter(|index| shards & (1 << index) != 0) {
            // A stopped shard has no sessions left to close.
            let _ = self.mesh.send(ShardId(index), ShardMsg::Revoke { user, device }).await;
        }
    }
}

/// Applies mesh messages to this shard's state. Never waits on another shard.
async fn mailbox_loop(shard: Rc<Shard>, mut mailbox: mpsc::Receiver<ShardMsg>) {
    loop {
        let msg = tokio::select! {
            msg = mailbox.recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
            () = shard.stop.cancelled() => return,
        };
        match msg {
            ShardMsg::Append(append, reply) => owner::submit(&shard, append, reply),
            ShardMsg::Deliver(Arrivals { answers, deliveries }) => {
                for (reply, ack) in answers {
                    let _ = reply.send(Ok(ack));
                }
                let sessions = shard.sessions.borrow();
                for delivery in &deliveries {
                    sessions.deliver(delivery);
                    if let Some(committed_at) = delivery.committed_at {
                        crate::metrics::record_since(&shard.stages.delivered, committed_at);
                    }
                }
            }
            ShardMsg::Revoke { user, device } => shard.sessions.borrow().revoke(user, device),
            ShardMsg::Relayed(deliveries) => continuity::relayed(&shard, deliveries),
            ShardMsg::Resync(users) => shard.sessions.borrow().resync(&users),
            ShardMsg::Elsewhere(sessions) => presence::told(&shard, sessions),
            ShardMsg::NotifyIfAway {
                users,
                conversation,
                seq,
                sender,
                body,
            } => presence::notify_if_away(&shard, users, (conversation, seq, sender), &body),
            ShardMsg::Subscribe {
                user,
                subscriber,
                reply,
            } => presence::subscribe(&shard, user, subscriber, reply),
            ShardMsg::Unsubscribe { user, subscriber } => presence::unsubscribe(&shard, user, subscriber),
            ShardMsg::Forget { user, subscriber } => presence::forget(&shard, user, subscriber),
            ShardMsg::Signal {
                conversation,
                user,
                signal,
            } => owner::signal(&shard, conversation, user, signal),
            ShardMsg::Directory {
                user,
                from,
                online,
                ack,
            } => {
                if let Some(is_anywhere) = shard.directory.apply(user, from, online)
                    && shard.mesh.home_of(user) == shard.id
                {
                    presence::directory_changed(&shard, user, is_anywhere);
                }
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
        }
    }
}
