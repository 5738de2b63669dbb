//! The operations endpoint, on a thread and runtime of its own (never a
//! shard's): `GET /healthz` (the process is up: 200), `GET /readyz` (200 while
//! the store takes writes and the node is not draining, else 503 and why), and
//! the metrics in the Prometheus text format on any other path. Deliberately
//! tiny: one request per connection, a bounded read of the request head, a
//! deadline, and a limit on connections at once.
//!
//! The same thread drains recorded samples into the summaries every
//! [`UPKEEP_INTERVAL`] (the exporter leaves this to whoever builds the recorder).
//! Without it every sample waits in the recorder until the next scrape: memory
//! that grows with the send rate between scrapes (hundreds of MB over a
//! 5-minute fill at 20 000 msgs/s), a first scrape that takes seconds, and
//! "last minute" summaries that cover everything since the previous scrape.

use crate::store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Scrapes answered at once; more wait for a slot.
const MAX_SCRAPES: usize = 16;
/// Longest request head read.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A scrape must be done within this.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(10);
/// How often recorded samples are drained into the summaries.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How long a store probe's answer stands for `/readyz`: anyone who reaches
/// the endpoint may ask as fast as they like, and each probe is a turn of the
/// store writer, which the sends need.
const PROBE_VALID_FOR: Duration = Duration::from_secs(1);

/// What `/readyz` looks at; clones share the last probe.
#[derive(Debug, Clone)]
pub struct Readiness {
    store: Arc<dyn Store>,
    drain: CancellationToken,
    /// The last probe and when; one probe at a time.
    last: Arc<tokio::sync::Mutex<Option<Probe>>>,
}

/// A store probe: when, and its answer.
type Probe = (Instant, Result<(), String>);

impl Readiness {
    /// Readiness of a node whose `store` is probed for writes, and that
    /// drains when `drain` is cancelled.
    pub fn new(store: Arc<dyn Store>, drain: CancellationToken) -> Self {
        Self {
            store,
            drain,
            last: Arc::default(),
        }
    }

    /// Whether the node is ready for traffic, or why not. The store is probed
    /// at most once per [`PROBE_VALID_FOR`].
    pub async fn check(&self) -> Result<(), String> {
        if self.drain.is_cancelled() {
            return Err("draining".into());
        }
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = &*last
            && at.elapsed() < PROBE_VALID_FOR
        {
            return answer.clone();
        }
        let answer = self
            .store
            .probe_writes()
            .await
            .map_err(|err| format!("the store refuses writes: {err}"));
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

/// A running scrape endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The thread serving it.
    pub thread: std::thread::JoinHandle<()>,
}

impl Endpoint {
    /// Binds `addr` and serves `handle` and `readiness` until `stop` is cancelled.
    pub fn start(
        addr: SocketAddr,
        handle: PrometheusHandle,
        readiness: Readiness,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        let (runtime, listener) = crate::transport::listener_with_runtime(addr)?;
        let addr = listener.local_addr()?;
        let thread = std::thread::Builder::new()
            .name("confab-metrics".into())
            .spawn(move || runtime.block_on(serve(listener, handle, readiness, stop)))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        Ok(Self { addr, thread })
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    readiness: Readiness,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = upkeep.tick() => {
                handle.run_upkeep();
                continue;
            }
            () = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (handle, readiness) = (handle.clone(), readiness.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SCRAPE_DEADLINE, answer(stream, &handle, &readiness)).await;
            drop(slot);
        });
    }
}

/// Reads the request head, answers by its path.
async fn answer(
    mut stream: tokio::net::TcpStream,
    handle: &PrometheusHandle,
    readiness: &Readiness,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    // "GET /readyz HTTP/1.1": the second word.
    let path = head.split(|byte| *byte == b' ').nth(1).unwrap_or_default();
    let (status, content_type, body) = match path {
        b"/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
        b"/readyz" => match readiness.check().await {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(reason) => ("503 Service Unavailable", "text/plain", format!("{reason}\n")),
        },
        _ => ("200 OK", "text/plain; version=0.0.4", handle.render()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
