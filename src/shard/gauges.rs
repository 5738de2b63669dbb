//! Samples how deep a shard's queues are, once a second, into the gauges of
//! [`crate::metrics`]. Runs only while metrics are on.

use super::Shard;
use metrics::gauge;
use std::rc::Rc;
use std::time::Duration;

const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

pub(super) async fn run(shard: Rc<Shard>) {
    let label = shard.id.0.to_string();
    let mailbox = gauge!("confab_mesh_queue", "shard" => label.clone());
    let commits = gauge!("confab_commit_queue", "shard" => label.clone());
    let frames = gauge!("confab_outbound_frames", "shard" => label.clone());
    let longest = gauge!("confab_outbound_frames_max", "shard" => label.clone());
    let bytes = gauge!("confab_outbound_bytes", "shard" => label.clone());
    let fullest = gauge!("confab_outbound_bytes_max", "shard" => label.clone());
    let connections = gauge!("confab_connections", "shard" => label);
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shard.stop.cancelled() => return,
        }
        mailbox.set(shard.mesh.queued(shard.id) as f64);
        commits.set(shard.owner.queued_commits() as f64);
        let depths = shard.sessions.borrow().depths();
        frames.set(depths.frames as f64);
        longest.set(depths.longest as f64);
        bytes.set(depths.bytes as f64);
        fullest.set(depths.fullest as f64);
        connections.set(depths.sessions as f64);
    }
}
