//! The server HTTP API (docs/API.md, docs/openapi.yaml): what the app's backend
//! does with confab, next to its clients: publish a message as a user (same
//! seq, idempotency, durability and fan-out as a client's `Send`), create users
//! and groups, change membership, log a user's devices out, look up presence,
//! read history; plus `/healthz`, `/readyz` and `/metrics`.
//!
//! JSON over HTTP/1.1 (axum's router, served by hyper, which the JWKS fetch
//! already uses), on `api.listen`, on a thread and runtime of its own (never a
//! shard's). Every `/v1` request carries `Authorization: Bearer <key>` with one
//! of `api.keys`, compared in constant time. Errors are the wire protocol's
//! codes as `{"code", "message"}` with a matching HTTP status.
//!
//! Descriptors are the node's (clients need them): at most
//! `api.max_connections` at once, each sending a request head within
//! [`HEAD_TIMEOUT`] and living at most [`MAX_CONNECTION_LIFETIME`], so idle or
//! slow connections cannot pile up.

mod error;
mod messages;
mod users;

pub use error::ApiError;

use crate::auth::Accounts;
use crate::config::ApiConfig;
use crate::metrics::Readiness;
use crate::shard::Mesh;
use crate::store::Store;
use crate::transport::admission::Admission;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use confab_proto::v1::ErrorCode;
use confab_protocol::SessionLimits;
use confab_protocol::ids::GroupIds;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest as _, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What the handlers work with; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// The node's store.
    pub store: Arc<dyn Store>,
    /// Users and devices.
    pub accounts: Accounts,
    /// Into the shards: appends to owners, device revocations.
    pub mesh: Mesh,
    /// Connection counts.
    pub admission: Admission,
    /// Group ids, derived as for a client's `CreateGroup`.
    pub group_ids: GroupIds,
    /// The limits a client's requests are checked against.
    pub limits: SessionLimits,
    /// What `/readyz` looks at.
    pub readiness: Readiness,
    /// The metrics, when `metrics.listen` installed a recorder.
    pub metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// A running API listener.
#[derive(Debug)]
pub struct Api {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The thread serving it.
    pub thread: std::thread::JoinHandle<()>,
}

impl Api {
    /// Binds `config.listen` and serves `state` until `stop` is cancelled.
    pub fn start(config: &ApiConfig, state: ApiState, stop: CancellationToken) -> std::io::Result<Self> {
        let Some(addr) = config.listen else {
            return Err(std::io::Error::other("api.listen is not set"));
        };
        let (runtime, listener) = crate::transport::listener_with_runtime(addr)?;
        let addr = listener.local_addr()?;
        let router = router(state, config);
        let max_connections = config.max_connections;
        let thread = std::thread::Builder::new()
            .name("confab-api".into())
            .spawn(move || runtime.block_on(serve(listener, router, max_connections, stop)))?;
        tracing::info!(%addr, "server API on http://{addr}/v1");
        Ok(Self { addr, thread })
    }
}

/// Longest wait for a request's head (the first, and each next one on a kept
/// connection).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed (after its request in flight) this long after it opened.
const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// On stop: longest wait for requests in flight.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Accepts within `max_connections` and serves each connection with `router`.
async fn serve(listener: TcpListener, router: Router, max_connections: usize, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = stop.cancelled() => return,
        };
        let Ok(slot) = slot else { return };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of descriptors, say: wait for some to come back.
                    tracing::warn!(error = %err, "the API could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_GRACE, connection.as_mut()).await;
                }
                () = tokio::time::sleep(MAX_CONNECTION_LIFETIME) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_GRACE, connection.as_mut()).await;
                }
            }
            drop(slot);
        });
    }
}

fn router(state: ApiState, config: &ApiConfig) -> Router {
    let keys: Arc<[[u8; 32]]> = config.keys.iter().map(|key| digest(key)).collect();
    let v1 = Router::new()
        .route("/users", post(users::create))
        .route("/users/by-name/{username}", get(users::by_name))
        .route("/users/{user_id}", patch(users::update).delete(users::delete))
        .route("/users/{user_id}/presence", get(users::presence))
        .route(
            "/users/{user_id}/devices",
            post(users::issue_device).delete(users::revoke_devices),
        )
        .route("/messages", post(messages::publish))
        .route("/conversations/{conversation_id}/messages", get(messages::history))
        .route("/groups", post(messages::create_group))
        .route("/groups/{conversation_id}", patch(messages::rename_group))
        .route("/groups/{conversation_id}/members", post(messages::add_members))
        .route(
            "/groups/{conversation_id}/members/{user_id}/role",
            put(messages::set_role),
        )
        .route(
            "/groups/{conversation_id}/members/{user_id}",
            delete(messages::remove_member),
        )
        .route("/stats", get(users::stats))
        .layer(middleware::from_fn_with_state(keys, require_key));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(tower::limit::ConcurrencyLimitLayer::new(config.max_concurrent_requests))
        .with_state(state)
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Lets a request on with a bearer key of `api.keys`: every key is compared,
/// digest against digest, in constant time.
async fn require_key(State(keys): State<Arc<[[u8; 32]]>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|key| digest(key.trim()));
    let known = presented.is_some_and(|presented| {
        keys.iter()
            .fold(0u8, |found, key| found | key.ct_eq(&presented).unwrap_u8())
            == 1
    });
    if !known {
        let refusal = ApiError::new(
            ErrorCode::Unauthenticated,
            "a valid API key is required (Authorization: Bearer <key>)",
        );
        return ([(header::WWW_AUTHENTICATE, "Bearer")], refusal).into_response();
    }
    next.run(request).await
}

async fn ready(State(state): State<ApiState>) -> Response {
    match state.readiness.check().await {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    match state.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => ApiError::new(ErrorCode::NotFound, "metrics are off (metrics.listen)").into_response(),
    }
}
