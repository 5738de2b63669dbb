//! Watches whether the store takes writes. The probe also lets a store that
//! refuses writes after a fault (a full disk, a failed commit) recover while no
//! client writes, and the log says, every half minute, that writes are refused
//! and why, until they are taken again. Runs on one shard per node.

use super::Shard;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often the store is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a store that keeps refusing writes is reported again.
const REPORT_INTERVAL: Duration = Duration::from_secs(30);

pub(super) async fn run(shard: Rc<Shard>) {
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When writes were first refused, and when that was last reported.
    let mut refusing: Option<(Instant, Instant)> = None;
    let writable = metrics::gauge!("confab_store_writable");
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shard.stop.cancelled() => return,
        }
        let probe = shard.store.probe_writes().await;
        writable.set(if probe.is_ok() { 1.0 } else { 0.0 });
        match (probe, &mut refusing) {
            (Ok(()), Some((since, _))) => {
                tracing::info!(after_s = since.elapsed().as_secs(), "the store takes writes again");
                refusing = None;
            }
            (Ok(()), None) => {}
            (Err(err), Some((since, reported))) => {
                if reported.elapsed() >= REPORT_INTERVAL {
                    tracing::warn!(error = %err, for_s = since.elapsed().as_secs(), "the store still refuses writes");
                    *reported = Instant::now();
                }
            }
            (Err(err), None) => {
                tracing::warn!(error = %err, "the store refuses writes");
                refusing = Some((Instant::now(), Instant::now()));
            }
        }
    }
}
