//! Short smoke runs of every loadgen scenario against a real server: the traffic
//! flows and the correctness checker passes. (The checker's own tests feed it
//! doctored streams with losses, duplicates and reordering.)

use crate::common::TestServer;
use confab_loadgen::scenario::{self, GroupShape, Measure, Mode};
use confab_loadgen::traffic::Load;
use std::time::Duration;

fn load() -> Load {
    Load {
        rate: 400.0,
        duration: Duration::from_millis(500),
        body_bytes: 64,
        drain: Duration::from_secs(10),
        round: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_scenario_runs_clean_with_every_measure() {
    let mut node = TestServer::start_with(2, &[("CONFAB_METRICS__LISTEN", "127.0.0.1:0")]).await;
    let measure = Measure {
        echo_baseline: true,
        relay_pairs: Some(4),
        // The node runs in this process.
        server_pid: Some(std::process::id()),
        metrics: node.server.as_ref().unwrap().metrics_addr(),
    };
    let report = scenario::direct(vec![node.addr], 4, load(), Mode::Once, measure, serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(report.violations, Vec::<String>::new());
    assert_eq!(report.errors, 0);
    assert_eq!(report.acked, 200);
    assert_eq!(report.deliveries, 200);
    assert!(report.echo_baseline_per_second.unwrap() > 0.0);
    assert!(report.delivery_latency.count == 200);
    let relay = report.relay_baseline.unwrap();
    assert_eq!((relay.delivery_latency.count, relay.ack_latency.count), (200, 200));
    assert!(report.server_cpu_us_per_delivery.unwrap() > 0.0);
    let metrics = report.server_metrics.unwrap();
    assert!(metrics["confab_send_stage_seconds_count{stage=\"acked\"}"] >= 200.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_scenario_runs_clean() {
    let mut node = TestServer::start(2).await;
    let shape = GroupShape {
        groups: 2,
        members: 5,
        senders: 2,
    };
    let report = scenario::group(
        vec![node.addr],
        shape,
        load(),
        Mode::Once,
        Measure::default(),
        serde_json::json!({}),
    )
    .await
    .unwrap();
    assert_eq!(report.violations, Vec::<String>::new());
    assert_eq!(report.acked, 200);
    assert_eq!(
        report.deliveries,
        200 * 4,
        "each message reaches the four other members"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_scenario_catches_everyone_up() {
    let mut node = TestServer::start(2).await;
    let report = scenario::sync(node.addr, 3, 1200, serde_json::json!({})).await.unwrap();
    assert_eq!(report.violations, Vec::<String>::new());
    assert_eq!(report.deliveries, 3 * 1200, "replay (1000) plus Sync pages");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_scenario_authenticates_every_connection() {
    let mut node = TestServer::start(2).await;
    let storm = confab_loadgen::connect::Storm {
        connections: 200,
        rate: 2000.0,
        hold: Duration::ZERO,
    };
    let pid = Some(std::process::id());
    let report = confab_loadgen::connect::run(node.addr, storm, pid, serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(
        (report.connected, report.failures),
        (200, 0),
        "{:?}",
        report.first_error
    );
    assert!(report.server_bytes_per_connection.is_some());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramp_finds_a_rate_that_holds() {
    let mut node = TestServer::start(2).await;
    let mode = Mode::Ramp {
        p99_bound: Duration::from_secs(5),
    };
    let quick = Load {
        rate: 100.0,
        duration: Duration::from_millis(300),
        ..load()
    };
    let report = scenario::direct(
        vec![node.addr],
        2,
        quick,
        mode,
        Measure::default(),
        serde_json::json!({}),
    )
    .await
    .unwrap();
    assert_eq!(report.violations, Vec::<String>::new());
    let steps = report.parameters["ramp_steps"].as_array().unwrap();
    assert!(steps.len() >= 2, "{steps:?}");
    node.shutdown().await;
}
