//! Cluster mode (`[cluster]`): several confab nodes over one Redis and one
//! Cassandra keyspace. The design, and which parts of it are built:
//! docs/CLUSTER.md.
//!
//! Built so far: each node joins under a fresh [`Incarnation`] and keeps a
//! view of the live incarnations ([`membership`]); its store writes as that
//! incarnation and takes a conversation from a node only once that node is no
//! longer in the view (fencing it first); a conversation stays with the
//! first node that uses it (docs/CLUSTER.md, "Placement"); the [`bus`]
//! carries [`envelope`]s between nodes' inboxes, through which [`peers`]
//! forwards appends to the node that holds their conversation and relays
//! committed messages, pushes and who has sessions where to the other nodes.
//!
//! Redis is reached through `fred` on a runtime of its own (one thread,
//! `confab-cluster`), never on a shard.

pub mod bus;
pub mod envelope;
pub mod membership;
pub mod peers;

use crate::config::ClusterConfig;
use crate::store::Store;
pub use crate::store::ownership::Incarnation;
use crate::store::ownership::Liveness;
use membership::{LiveNodes, Membership};
pub use peers::{Local, Peers};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why the cluster could not be joined or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `cluster.redis` is not a Redis URL the client takes.
    #[error("cluster.redis is not a Redis URL the client takes")]
    BadUrl(#[source] fred::error::Error),
    /// A Redis command failed or timed out.
    #[error("Redis: {what}")]
    Redis {
        /// What the node was doing.
        what: &'static str,
        /// The client's error.
        #[source]
        source: fred::error::Error,
    },
    /// The store could not join the cluster.
    #[error("the store could not join the cluster")]
    Store(#[from] crate::store::StoreError),
    /// The cluster thread or its runtime could not be started.
    #[error("starting the cluster thread")]
    Thread(#[source] std::io::Error),
}

/// A Redis client for `cluster.redis`, connected; fails if Redis does not
/// answer at once. Later losses of the connection are retried in the
/// background, and a command waits at most one heartbeat interval.
pub async fn connect(config: &ClusterConfig) -> Result<fred::clients::Client, ClusterError> {
    connect_waiting(config, config.heartbeat).await
}

/// [`connect`] for a client whose commands may wait up to `timeout` (blocking
/// reads).
pub async fn connect_waiting(config: &ClusterConfig, timeout: Duration) -> Result<fred::clients::Client, ClusterError> {
    use fred::interfaces::ClientLike as _;
    use fred::types::config::{Config, ReconnectPolicy, TcpConfig};
    let redis = Config::from_url(&config.redis).map_err(ClusterError::BadUrl)?;
    let client = fred::types::Builder::from_config(redis)
        .with_connection_config(|connection| {
            connection.connection_timeout = config.heartbeat;
            // Entries are small and latency counts: no Nagle delay behind an
            // unacknowledged write (it cost ~15 ms per forwarded send).
            connection.tcp = TcpConfig {
                nodelay: Some(true),
                ..TcpConfig::default()
            };
        })
        .with_performance_config(|performance| performance.default_command_timeout = timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
        .map_err(ClusterError::BadUrl)?;
    client.init().await.map_err(|source| ClusterError::Redis {
        what: "connecting",
        source,
    })?;
    Ok(client)
}

/// Joins the cluster: connects to Redis, opens this node's inbox (handing
/// what arrives to `local`), announces this node with a first heartbeat (so a
/// wrong address or a Redis that is down is an error at start), makes `store`
/// write as this node, waits two heartbeats (until every live node relays to
/// it, before it takes clients), then keeps beating and serving the inbox on the
/// `confab-cluster` thread until `leave` (once the node has stopped and its
/// store handed its conversations over), when it leaves the live set at once
/// instead of letting its lease lapse. Returns the thread and the handle
/// shards reach the other nodes through.
pub fn join(
    config: &ClusterConfig,
    store: &Arc<dyn Store>,
    local: Arc<dyn Local>,
    leave: CancellationToken,
) -> Result<(std::thread::JoinHandle<()>, Peers), ClusterError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClusterError::Thread)?;
    let me = Incarnation::random();
    let view = Arc::new(RwLock::new(LiveNodes::default()));
    let (membership, peers, serving) = runtime.block_on(async {
        let client = connect(config).await?;
        let membership = Membership::new(client, config, me);
        // The inbox exists before any node can see this one.
        let (peers, serving) = peers::start(config, me, view.clone(), local, leave.clone()).await?;
        let first = membership.beat().await?;
        tracing::info!(incarnation = %me, live = %first.live, "joined the cluster");
        *view.write().unwrap_or_else(PoisonError::into_inner) = first.live;
        let seen = view.clone();
        let is_live: Liveness = Arc::new(move |node| {
            let live = seen.read().unwrap_or_else(PoisonError::into_inner);
            live.as_slice().binary_search(&node).is_ok()
        });
        store.join_cluster(me, is_live).await?;
        // Every live node reads the live set at its next beat: after two
        // heartbeats all of them relay to this node, so a client it accepts
        // from now on misses no message committed elsewhere.
        for _ in 0..2 {
            tokio::time::sleep(config.heartbeat).await;
            let beat = membership.beat().await?;
            *view.write().unwrap_or_else(PoisonError::into_inner) = beat.live;
        }
        Ok::<_, ClusterError>((membership, peers, serving))
    })?;
    let heartbeat = config.heartbeat;
    let thread = std::thread::Builder::new()
        .name("confab-cluster".into())
        .spawn(move || {
            runtime.block_on(async move {
                let serving = tokio::spawn(serving);
                keep_beating(membership, view, heartbeat, leave).await;
                // The inbox is closed once `leave` ends its reads.
                let _ = serving.await;
            });
        })
        .map_err(ClusterError::Thread)?;
    Ok((thread, peers))
}

/// Beats every `heartbeat` and logs changes of the live set. A failed
/// beat keeps the last view: without Redis nobody learns that a node died, and
/// the store's fences keep writes safe meanwhile (docs/CLUSTER.md).
async fn keep_beating(
    membership: Membership,
    view: Arc<RwLock<LiveNodes>>,
    heartbeat: Duration,
    leave: CancellationToken,
) {
    let gauge = metrics::gauge!("confab_cluster_live_nodes");
    let mut live = view.read().unwrap_or_else(PoisonError::into_inner).clone();
    gauge.set(live.len() as f64);
    let mut ticks = tokio::time::interval(heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = leave.cancelled() => break,
            _ = ticks.tick() => {}
        }
        match membership.beat().await {
            Ok(beat) => {
                if !reachable {
                    tracing::info!("Redis reachable again");
                    reachable = true;
                }
                if beat.rejoined {
                    tracing::warn!(
                        incarnation = %membership.me(),
                        "this node's lease had lapsed: other nodes may have taken its conversations"
                    );
                }
                if beat.live != live {
                    tracing::info!(live = %beat.live, was = %live, "live nodes changed");
                    gauge.set(beat.live.len() as f64);
                    view.write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone_from(&beat.live);
                    live = beat.live;
                }
            }
            Err(err) if reachable => {
                tracing::warn!(error = %with_causes(&err), "heartbeat failed; keeping the last view of the live nodes");
                reachable = false;
            }
            Err(_) => {}
        }
    }
    match membership.leave().await {
        Ok(()) => tracing::info!(incarnation = %membership.me(), "left the cluster"),
        Err(err) => tracing::warn!(error = %with_causes(&err), "leaving the cluster failed; the lease will lapse"),
    }
}

/// `err` and every error under it, for a log line.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}
