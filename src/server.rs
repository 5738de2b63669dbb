//! Assembles a node from typed config: store, accounts, mesh, listeners, shards.
//! Also the node's lifecycle: [`Server::start`] and the two-phase
//! [`Server::shutdown`].

use crate::api::{Api, ApiState};
use crate::auth::jwt::Jwks;
use crate::auth::{Accounts, HashError, JwtVerifier, KeyError, PasswordHasher, Throttle, TokenSigner};
use crate::config::Config;
use crate::http::HttpUrl;
use crate::shard::{self, Listeners, Mesh, NodeContext, ShardId, ShardStart};
use crate::store::{Store, StoreError};
use crate::transport::admission::Admission;
use crate::transport::bind_reuseport;
use crate::transport::quic::QuicListener;
use crate::transport::tls::{Identity, TlsError};
use confab_protocol::ids::GroupIds;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Opening the store.
    #[error("opening the store")]
    Store(#[from] StoreError),
    /// Loading the token signing key.
    #[error("loading the token signing key")]
    Key(#[from] KeyError),
    /// Setting up password hashing.
    #[error("setting up password hashing")]
    Hash(#[from] HashError),
    /// Setting up TLS.
    #[error("setting up TLS")]
    Tls(#[from] TlsError),
    /// Joining the cluster (`[cluster]`).
    #[error("joining the cluster")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The operating system refused something the node needs.
    #[error("{what}")]
    Io {
        /// What the node was doing.
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
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
    websocket_addr: Option<SocketAddr>,
    quic_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    api_addr: Option<SocketAddr>,
    /// SHA-256 of the TCP/WebSocket certificate, when TLS is on.
    tls_fingerprint: Option<String>,
    quic_fingerprint: Option<String>,
    drain: CancellationToken,
    stop: CancellationToken,
    drained: Vec<oneshot::Receiver<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    store: Arc<dyn Store>,
    /// In cluster mode: the thread that keeps this node in the live set, and
    /// what tells it to leave.
    cluster: Option<(std::thread::JoinHandle<()>, CancellationToken)>,
}

impl Server {
    /// Opens the store, binds every shard's listener and starts the shards.
    pub fn start(config: Config) -> Result<Self, StartError> {
        let shards = config.shard_count();
        warn_about_risky_settings(&config);
        // Whatever the backend, it holds the token key and certificate.
        crate::files::create_private_dir(&config.store.data_dir)
            .map_err(io_error(format!("creating {}", config.store.data_dir.display())))?;
        // Installed before the store opens and the shards start, so their handles record.
        let metrics = match config.metrics.listen {
            Some(addr) => Some((
                addr,
                crate::metrics::install().map_err(|err| StartError::Io {
                    what: "installing the metrics recorder".into(),
                    source: std::io::Error::other(err),
                })?,
            )),
            None => None,
        };
        let store = crate::store::open(&config)?;
        let signer =
            TokenSigner::from_config_or_file(&config.auth.token_key, &config.store.data_dir.join("token.key"))?;
        let max_hashes = match config.auth.max_concurrent_hashes {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let hasher = PasswordHasher::new(config.auth.argon2_memory_kib, config.auth.argon2_iterations, max_hashes)?;
        let throttle = Throttle::new(&config.limits, max_hashes);
        let group_ids = GroupIds::new(&signer.derive_secret("group ids"));
        let stop = CancellationToken::new();
        let (jwt, jwks_thread) = jwt_verifier(&config, &stop)?;
        let accounts = Accounts::new(&config.auth, store.clone(), hasher, throttle, signer, jwt);
        let (mesh, mailboxes) = Mesh::new(shards, config.server.mesh_channel_capacity);

        let tcp = bind_each_shard(config.server.listen, shards)?;
        let local_addr = tcp[0].local_addr().map_err(io_error("reading the bound address"))?;
        let websocket = match config.websocket.enabled {
            true => Some(bind_each_shard(config.websocket.listen, shards)?),
            false => None,
        };
        let websocket_addr = match &websocket {
            Some(listeners) => Some(
                listeners[0]
                    .local_addr()
                    .map_err(io_error("reading the bound address"))?,
            ),
            None => None,
        };
        let identity = Identity::from_config(&config.tls, &config.store.data_dir)?;
        let tls = identity.as_ref().map(Identity::stream_config).transpose()?;
        let tls_fingerprint = identity.as_ref().map(|identity| identity.fingerprint().to_owned());
        let quic = match config.quic.enabled {
            true => {
                let identity = match identity {
                    Some(identity) => identity,
                    None => Identity::self_signed_in(&config.store.data_dir)?,
                };
                let idle = config.protocol.heartbeat_interval * 4;
                let listener = QuicListener::bind(config.quic.listen, &identity, idle, shards)
                    .map_err(io_error(format!("binding QUIC to {}", config.quic.listen)))?;
                Some((listener, identity.fingerprint().to_owned()))
            }
            false => None,
        };
        let quic_addr = match &quic {
            Some((listener, _)) => Some(listener.local_addr().map_err(io_error("reading the QUIC address"))?),
            None => None,
        };

        let max_connections = connection_limit(&config);
        let cores = if config.server.pin_threads {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let admission = Admission::new(max_connections, &config.limits);
        let (pusher, push_thread) = match config.push.webhook_url.as_str() {
            "" => (None, None),
            _ => {
                let (pusher, thread) = crate::push::start(&config.push, store.clone(), admission.clone(), stop.clone())
                    .map_err(io_error("starting the push worker"))?;
                (Some(pusher), Some(thread))
            }
        };
        let drain = CancellationToken::new();
        // In a cluster the node leaves the live set only after its store has
        // handed its conversations over (`shutdown`), so no other node takes
        // one it still writes, and none waits for its lease to lapse.
        let leave = CancellationToken::new();
        let (cluster, peers) = match config.cluster.enabled() {
            true => {
                let link = Arc::new(shard::NodeLink::new(mesh.clone()));
                let (thread, peers) = crate::cluster::join(&config.cluster, &store, link, leave.clone())?;
                (Some((thread, leave)), Some(peers))
            }
            false => (None, None),
        };
        let context = NodeContext {
            store: store.clone(),
            accounts,
            mesh,
            admission,
            group_ids,
            pusher,
            peers,
            config: Arc::new(config),
            tls,
            drain,
            stop,
        };

        let mut server = Self {
            local_addr,
            websocket_addr,
            quic_addr,
            metrics_addr: None,
            api_addr: None,
            tls_fingerprint,
            quic_fingerprint: quic.as_ref().map(|(_, fingerprint)| fingerprint.clone()),
            drain: context.drain.clone(),
            stop: context.stop.clone(),
            drained: Vec::new(),
            threads: jwks_thread.into_iter().chain(push_thread).collect(),
            store,
            cluster,
        };
        let mut quic_handoffs = Vec::new();
        let mut websocket = websocket.map(Vec::into_iter);
        for (index, (tcp, mailbox)) in tcp.into_iter().zip(mailboxes).enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS_PER_SHARD)
                .thread_name(format!("confab-shard-{index}-blocking"))
                .build()
                .map_err(io_error("building a shard runtime"))?;
            let listeners = {
                let _entered = runtime.enter();
                let register =
                    |listener| tokio::net::TcpListener::from_std(listener).map_err(io_error("registering a listener"));
                Listeners {
                    tcp: register(tcp)?,
                    websocket: websocket.as_mut().and_then(Iterator::next).map(register).transpose()?,
                    quic: quic.as_ref().map(|_| {
                        let (handoff, handoffs) = tokio::sync::mpsc::channel(crate::transport::quic::HANDOFF_QUEUE);
                        quic_handoffs.push(handoff);
                        handoffs
                    }),
                }
            };
            let (drained, drained_rx) = oneshot::channel();
            let start = ShardStart {
                id: ShardId(index),
                context: context.clone(),
                runtime,
                listeners,
                mailbox,
                core: (!cores.is_empty()).then(|| cores[index % cores.len()]),
                drained,
            };
            server.drained.push(drained_rx);
            server
                .threads
                .push(shard::spawn(start).map_err(io_error("spawning a shard thread"))?);
        }
        if let Some((listener, fingerprint)) = quic {
            let thread = listener
                .spawn(
                    quic_handoffs,
                    context.admission.clone(),
                    context.config.server.handshake_timeout,
                    context.drain.clone(),
                    context.stop.clone(),
                )
                .map_err(io_error("spawning the QUIC thread"))?;
            server.threads.push(thread);
            tracing::info!(addr = ?quic_addr, certificate_sha256 = %fingerprint, "QUIC listening");
        }
        if let Some(addr) = websocket_addr {
            tracing::info!(%addr, path = %context.config.websocket.path, "WebSocket listening");
        }
        let readiness = crate::metrics::Readiness::new(server.store.clone(), context.drain.clone());
        if context.config.api.listen.is_some() {
            let state = ApiState {
                store: server.store.clone(),
                accounts: context.accounts.clone(),
                mesh: context.mesh.clone(),
                admission: context.admission.clone(),
                group_ids: context.group_ids.clone(),
                limits: context.config.session_limits(),
                readiness: readiness.clone(),
                metrics: metrics.as_ref().map(|(_, handle)| handle.clone()),
            };
            let api = Api::start(&context.config.api, state, context.stop.clone())
                .map_err(io_error(format!("binding the API to {:?}", context.config.api.listen)))?;
            server.api_addr = Some(api.addr);
            server.threads.push(api.thread);
        }
        if let Some((addr, handle)) = metrics {
            let endpoint = crate::metrics::Endpoint::start(addr, handle, readiness, context.stop.clone())
                .map_err(io_error(format!("binding the metrics endpoint to {addr}")))?;
            server.metrics_addr = Some(endpoint.addr);
            server.threads.push(endpoint.thread);
        }
        if let Some(fingerprint) = &server.tls_fingerprint {
            tracing::info!(certificate_sha256 = %fingerprint, "TLS on for TCP and WebSocket");
        }
        tracing::info!(addr = %local_addr, shards, "confab listening");
        Ok(server)
    }

    /// The TCP listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The WebSocket listener's address, when on.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.websocket_addr
    }

    /// The QUIC endpoint's address, when on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// The metrics endpoint's address, when `metrics.listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The server API's address, when `api.listen` is set.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// SHA-256 (hex) of the TCP/WebSocket certificate, when TLS is on.
    pub fn tls_fingerprint(&self) -> Option<&str> {
        self.tls_fingerprint.as_deref()
    }

    /// SHA-256 (hex) of the QUIC certificate, when QUIC is on.
    pub fn quic_fingerprint(&self) -> Option<&str> {
        self.quic_fingerprint.as_deref()
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
        if let Some((thread, leave)) = self.cluster.take() {
            leave.cancel();
            if tokio::task::spawn_blocking(move || thread.join()).await.is_err() {
                tracing::error!("the cluster thread panicked");
            }
        }
        tracing::info!("confab stopped");
        result
    }
}

impl Drop for Server {
    /// Dropping without `shutdown` stops the shards without waiting for them.
    fn drop(&mut self) {
        self.drain.cancel();
        self.stop.cancel();
        if let Some((_, leave)) = &self.cluster {
            leave.cancel();
        }
    }
}

/// The checker of the app's tokens when `auth.mode` accepts them, and the thread
/// that fetches their keys when `auth.jwt.jwks_url` is set.
fn jwt_verifier(
    config: &Config,
    stop: &CancellationToken,
) -> Result<(Option<JwtVerifier>, Option<std::thread::JoinHandle<()>>), StartError> {
    let jwt = &config.auth.jwt;
    if !config.auth.mode.jwt() {
        return Ok((None, None));
    }
    let (jwks, thread) = match jwt.jwks_url.as_str() {
        "" => (None, None),
        url => {
            // Checked when the config was loaded.
            let url = HttpUrl::parse(url).map_err(|err| StartError::Io {
                what: "auth.jwt.jwks_url".into(),
                source: std::io::Error::other(err),
            })?;
            let (jwks, thread) = Jwks::start(url, jwt, stop.clone()).map_err(io_error("starting the JWKS thread"))?;
            (Some(jwks), Some(thread))
        }
    };
    Ok((Some(JwtVerifier::new(jwt, jwks)), thread))
}

/// Settings that are fine on a laptop and dangerous on a network.
fn warn_about_risky_settings(config: &Config) {
    let exposed = |addr: SocketAddr| !addr.ip().is_loopback();
    if config.tls.mode == crate::config::TlsMode::Off {
        if exposed(config.server.listen) {
            tracing::warn!(listen = %config.server.listen, "plaintext TCP on a non-loopback address: passwords and tokens cross the network unencrypted; set [tls]");
        }
        if config.websocket.enabled && exposed(config.websocket.listen) {
            tracing::warn!(listen = %config.websocket.listen, "plaintext WebSocket on a non-loopback address: set [tls] (or terminate TLS in front)");
        }
    }
    if config.websocket.enabled && exposed(config.websocket.listen) && config.websocket.allowed_origins.is_empty() {
        tracing::warn!("websocket.allowed_origins is empty: pages from any origin may open WebSockets to this server");
    }
    if config.auth.argon2_memory_kib < OWASP_ARGON2_MEMORY_KIB
        || config.auth.argon2_iterations < OWASP_ARGON2_ITERATIONS
    {
        tracing::warn!(
            memory_kib = config.auth.argon2_memory_kib,
            iterations = config.auth.argon2_iterations,
            "argon2 below the OWASP minimum (19 MiB, 2 iterations): stolen password hashes are cheaper to crack"
        );
    }
}

/// The OWASP minimum for argon2id.
const OWASP_ARGON2_MEMORY_KIB: u32 = 19 * 1024;
const OWASP_ARGON2_ITERATIONS: u32 = 2;

/// The node-wide connection limit: `server.max_connections`, lowered to keep
/// `limits.reserved_file_descriptors` of the open-files limit for the rest.
fn connection_limit(config: &Config) -> usize {
    let configured = config.server.max_connections;
    let reserved = config.limits.reserved_file_descriptors;
    let open_files = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) => soft,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the open files limit; using server.max_connections");
            return configured;
        }
    };
    let limit = Admission::node_limit(configured, open_files, reserved);
    if limit < configured {
        tracing::info!(
            open_files,
            reserved,
            limit,
            "the open files limit caps connections below server.max_connections"
        );
    }
    limit
}

/// One SO_REUSEPORT listener per shard on `addr`; the first bind resolves port 0
/// and the others join that port.
fn bind_each_shard(addr: SocketAddr, shards: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    let first = bind_reuseport(addr).map_err(io_error(format!("binding {addr}")))?;
    let bound = first.local_addr().map_err(io_error("reading the bound address"))?;
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(bind_reuseport(bound).map_err(io_error(format!("binding {bound}")))?);
    }
    Ok(listeners)
}
