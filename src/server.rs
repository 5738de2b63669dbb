//! Assembles a node from typed config: store, accounts, mesh, listeners, shards.
//! Also the node's lifecycle: [`Server::start`] and the two-phase
//! [`Server::shutdown`].

use crate::auth::{Accounts, HashError, KeyError, PasswordHasher, TokenSigner};
use crate::config::{Config, StoreBackend};
use crate::shard::{self, Mesh, NodeContext, ShardId, ShardStart};
use crate::store::embedded::EmbeddedStore;
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    #[error("loading the token signing key: {0}")]
    Key(#[from] KeyError),
    #[error("setting up password hashing: {0}")]
    Hash(#[from] HashError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// Threads a shard may use for blocking work (store reads, password hashing).
/// Bounded so a burst of requests queues instead of spawning hundreds of threads.
const BLOCKING_THREADS_PER_SHARD: usize = 32;

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// A running node.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    drain: CancellationToken,
    stop: CancellationToken,
    drained: Vec<oneshot::Receiver<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    store: Arc<dyn Store>,
}

impl Server {
    /// Opens the store, binds every shard's listener and starts the shards.
    pub fn start(config: Config) -> Result<Self, StartError> {
        let shards = config.shard_count();
        let store: Arc<dyn Store> = match config.store.backend {
            StoreBackend::Embedded => Arc::new(EmbeddedStore::open(&config.store)?),
        };
        let signer =
            TokenSigner::from_config_or_file(&config.auth.token_key, &config.store.data_dir.join("token.key"))?;
        let max_hashes = match config.auth.max_concurrent_hashes {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let hasher = PasswordHasher::new(config.auth.argon2_memory_kib, config.auth.argon2_iterations, max_hashes)?;
        let accounts = Accounts::new(&config.auth, store.clone(), hasher, signer);
        let (mesh, mailboxes) = Mesh::new(shards, config.server.mesh_channel_capacity);

        // The first bind resolves port 0; the other shards join the same port.
        let first = crate::transport::tcp::bind_reuseport(config.server.listen)
            .map_err(io_error(format!("binding {}", config.server.listen)))?;
        let local_addr = first.local_addr().map_err(io_error("reading the bound address"))?;
        let mut listeners = vec![first];
        for _ in 1..shards {
            listeners.push(
                crate::transport::tcp::bind_reuseport(local_addr).map_err(io_error(format!("binding {local_addr}")))?,
            );
        }

        let cores = if config.server.pin_threads {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let context = NodeContext {
            config: Arc::new(config),
            store: store.clone(),
            accounts,
            mesh,
            connection_permits: Arc::new(Semaphore::new(0)),
            drain: CancellationToken::new(),
            stop: CancellationToken::new(),
        };
        context
            .connection_permits
            .add_permits(context.config.server.max_connections);

        let mut server = Self {
            local_addr,
            drain: context.drain.clone(),
            stop: context.stop.clone(),
            drained: Vec::new(),
            threads: Vec::new(),
            store,
        };
        for (index, (listener, mailbox)) in listeners.into_iter().zip(mailboxes).enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS_PER_SHARD)
                .thread_name(format!("confab-shard-{index}-blocking"))
                .build()
                .map_err(io_error("building a shard runtime"))?;
            let listener = {
                let _entered = runtime.enter();
                tokio::net::TcpListener::from_std(listener).map_err(io_error("registering a listener"))?
            };
            let (drained, drained_rx) = oneshot::channel();
            let start = ShardStart {
                id: ShardId(index),
                context: context.clone(),
                runtime,
                listener,
                mailbox,
                core: (!cores.is_empty()).then(|| cores[index % cores.len()]),
                drained,
            };
            server.drained.push(drained_rx);
            server
                .threads
                .push(shard::spawn(start).map_err(io_error("spawning a shard thread"))?);
        }
        tracing::info!(addr = %local_addr, shards, "confab listening");
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Graceful stop: stop accepting, let in-flight requests finish and tell clients
    /// to reconnect (bounded by `server.shutdown_grace`), stop the shards, then make
    /// the store durable and close it.
    pub async fn shutdown(mut self) -> Result<(), StoreError> {
        self.drain.cancel();
        for drained in self.drained.drain(..) {
            // An error means the shard thread already ended.
            let _ = drained.await;
        }
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || threads.into_iter().all(|thread| thread.join().is_ok())).await;
        if !matches!(joined, Ok(true)) {
            tracing::error!("a shard thread panicked");
        }
        let result = self.store.close().await;
        tracing::info!("confab stopped");
        result
    }
}

impl Drop for Server {
    /// Dropping without `shutdown` stops the shards without waiting for them.
    fn drop(&mut self) {
        self.drain.cancel();
        self.stop.cancel();
    }
}
