//! Cluster mode (`[cluster]`): several confab nodes over one Redis and one
//! Cassandra keyspace. The design, and which parts of it are built:
//! docs/CLUSTER.md.
//!
//! Built so far: each node joins under a fresh [`Incarnation`] and keeps a
//! view of the live incarnations ([`membership`]), and every node can compute
//! where a conversation should be owned from that view ([`rendezvous`]).
//!
//! Redis is reached through `fred` on a runtime of its own (one thread,
//! `confab-cluster`), never on a shard.

pub mod bus;
pub mod membership;
pub mod rendezvous;

use crate::config::ClusterConfig;
pub use crate::store::ownership::Incarnation;
use membership::{LiveNodes, Membership};
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
    /// The cluster thread or its runtime could not be started.
    #[error("starting the cluster thread")]
    Thread(#[source] std::io::Error),
}

/// A Redis client for `cluster.redis`, connected; fails if Redis does not
/// answer at once. Later losses of the connection are retried in the
/// background, and a command waits at most one heartbeat interval.
pub async fn connect(config: &ClusterConfig) -> Result<fred::clients::Client, ClusterError> {
    use fred::interfaces::ClientLike as _;
    use fred::types::config::{Config, ReconnectPolicy};
    let redis = Config::from_url(&config.redis).map_err(ClusterError::BadUrl)?;
    let client = fred::types::Builder::from_config(redis)
        .with_connection_config(|connection| connection.connection_timeout = config.heartbeat)
        .with_performance_config(|performance| performance.default_command_timeout = config.heartbeat)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
        .map_err(ClusterError::BadUrl)?;
    client.init().await.map_err(|source| ClusterError::Redis {
        what: "connecting",
        source,
    })?;
    Ok(client)
}

/// Joins the cluster: connects to Redis, announces this node with a first
/// heartbeat (so a wrong address or a Redis that is down is an error at
/// start), then keeps beating on the `confab-cluster` thread until `drain`,
/// when it leaves the live set at once instead of letting its lease lapse.
pub fn join(config: &ClusterConfig, drain: CancellationToken) -> Result<std::thread::JoinHandle<()>, ClusterError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClusterError::Thread)?;
    let me = Incarnation::random();
    let (membership, first) = runtime.block_on(async {
        let membership = Membership::new(connect(config).await?, config, me);
        let first = membership.beat().await?;
        Ok::<_, ClusterError>((membership, first))
    })?;
    tracing::info!(incarnation = %me, live = %first.live, "joined the cluster");
    let heartbeat = config.heartbeat;
    std::thread::Builder::new()
        .name("confab-cluster".into())
        .spawn(move || runtime.block_on(keep_beating(membership, first.live, heartbeat, drain)))
        .map_err(ClusterError::Thread)
}

/// Beats every `heartbeat` and logs changes of the live set. A failed beat
/// keeps the last view: without Redis nobody learns that a node died, and the
/// store's fences keep writes safe meanwhile (docs/CLUSTER.md).
async fn keep_beating(membership: Membership, mut live: LiveNodes, heartbeat: Duration, drain: CancellationToken) {
    let gauge = metrics::gauge!("confab_cluster_live_nodes");
    gauge.set(live.len() as f64);
    let mut ticks = tokio::time::interval(heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = drain.cancelled() => break,
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
                    live = beat.live;
                }
            }
            Err(err) if reachable => {
                tracing::warn!(error = %err, "heartbeat failed; keeping the last view of the live nodes");
                reachable = false;
            }
            Err(_) => {}
        }
    }
    match membership.leave().await {
        Ok(()) => tracing::info!(incarnation = %membership.me(), "left the cluster"),
        Err(err) => tracing::warn!(error = %err, "leaving the cluster failed; the lease will lapse"),
    }
}
