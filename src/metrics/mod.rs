//! Operational metrics, in the Prometheus text format: how long each stage of a
//! send takes, how deep the queues between the stages are, and whether the store
//! takes writes. Off unless `metrics.listen` is set; then [`endpoint`] serves
//! them on a thread of its own, beside the health checks `/healthz` and `/readyz`.
//!
//! Recording goes through the `metrics` facade: with no recorder installed (the
//! default) every handle is a no-op, so the hot path pays nothing for being
//! instrumented. Handles are looked up once (per shard) and kept, not per event.
//!
//! The metrics and what each measures are listed in README.md ("Metrics").
//!
//! Summaries carry the quantiles 0.5, 0.9, 0.99, 0.999 and 1 (over the last
//! minute, in sliding windows), plus `_sum` and `_count`.

mod endpoint;

pub use endpoint::{Endpoint, Readiness};

use metrics::{Histogram, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The quantiles every summary reports.
const QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];
/// How far back a summary looks, in buckets rotated over that time.
const WINDOW: Duration = Duration::from_secs(60);
const WINDOW_BUCKETS: u32 = 6;

/// Installs the process's recorder (once; later calls share it) and returns
/// the handle that renders what was recorded.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_quantiles(&QUANTILES)
                .map_err(|err| err.to_string())?
                .set_bucket_duration(WINDOW / WINDOW_BUCKETS)
                .map_err(|err| err.to_string())?
                .set_bucket_count(std::num::NonZeroU32::new(WINDOW_BUCKETS).ok_or("zero window buckets")?)
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|err| err.to_string())?;
            Ok(handle)
        })
        .clone()
}

/// The timings of the stages of a send, as handles kept by one shard.
#[derive(Debug, Clone)]
pub struct SendStages {
    /// From frame decoded to at the owner.
    pub to_owner: Histogram,
    /// From at the owner to sequenced.
    pub sequenced: Histogram,
    /// From sequenced to committed.
    pub committed: Histogram,
    /// From committed to written to a recipient's queue.
    pub delivered: Histogram,
    /// From frame decoded to acked.
    pub acked: Histogram,
    /// Cluster mode: from handed to another node (the conversation's holder)
    /// to its answer: the Redis hops both ways and the holder's own stages.
    pub forwarded: Histogram,
    /// How long a store commit takes.
    pub store_commit: Histogram,
    /// Messages per store commit.
    pub store_commit_messages: Histogram,
    /// The owner's look-up before sequencing: earlier sends with the same ids
    /// (and, on first use, where the conversation's seqs continue). It runs on
    /// the shard thread, so a slow one holds up everything else on the shard.
    pub store_check: Histogram,
}

impl SendStages {
    /// The stage histograms, registered with the recorder (no-ops without one).
    pub fn new() -> Self {
        let stage = |name: &'static str| histogram!("confab_send_stage_seconds", "stage" => name);
        Self {
            to_owner: stage("to_owner"),
            sequenced: stage("sequenced"),
            committed: stage("committed"),
            delivered: stage("delivered"),
            acked: stage("acked"),
            forwarded: stage("forwarded"),
            store_commit: histogram!("confab_store_commit_seconds"),
            store_commit_messages: histogram!("confab_store_commit_messages"),
            store_check: histogram!("confab_store_check_seconds"),
        }
    }
}

impl Default for SendStages {
    fn default() -> Self {
        Self::new()
    }
}

/// Records the time since `since` in `histogram`, in seconds.
pub fn record_since(histogram: &Histogram, since: Instant) {
    histogram.record(since.elapsed().as_secs_f64());
}
