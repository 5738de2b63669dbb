//! The Prometheus endpoint (`metrics.listen`): off by default; when on, a
//! scrape after a send finds every stage of it timed, and the queue and store
//! gauges sampled; `/healthz` and `/readyz` answer beside it.

use crate::common::{TestServer, http_get, new_user, sample, scrape, within};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_send_finds_every_stage_and_the_gauges() {
    let mut node = TestServer::start_with(2, &[("CONFAB_METRICS__LISTEN", "127.0.0.1:0")]).await;
    let metrics = node.server.as_ref().unwrap().metrics_addr().unwrap();
    let (alice, _, _) = new_user(node.addr, "alice").await;
    let (bob, bob_login, _) = new_user(node.addr, "bob").await;
    alice.send_direct(bob_login.user_id, "m1", "hello").await.unwrap();
    within(WAIT, bob.next_message()).await.unwrap();

    for stage in ["to_owner", "sequenced", "committed", "delivered", "acked"] {
        let series = format!("confab_send_stage_seconds_count{{stage=\"{stage}\"}}");
        let body = scrape(metrics).await;
        let count = sample(&body, &series).unwrap_or_else(|| panic!("no {series} in:\n{body}"));
        assert!(count >= 1.0, "{series} = {count}");
        let p99 = format!("confab_send_stage_seconds{{stage=\"{stage}\",quantile=\"0.99\"}}");
        assert!(sample(&body, &p99).is_some(), "no {p99}");
    }
    let body = scrape(metrics).await;
    assert!(sample(&body, "confab_store_commit_seconds_count").unwrap() >= 1.0);
    assert!(sample(&body, "confab_store_commit_messages_sum").unwrap() >= 1.0);
    assert!(sample(&body, "confab_store_check_seconds_count").unwrap() >= 1.0);

    // Gauges are sampled once a second: both users' sessions show up.
    let mut body = String::new();
    let mut sessions = 0.0;
    for _ in 0..100 {
        body = scrape(metrics).await;
        sessions = ["0", "1"]
            .iter()
            .filter_map(|shard| sample(&body, &format!("confab_connections{{shard=\"{shard}\"}}")))
            .sum();
        if sessions >= 2.0 && sample(&body, "confab_store_writable").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sessions, 2.0, "{body}");
    assert_eq!(sample(&body, "confab_store_writable"), Some(1.0));
    for gauge in [
        "confab_mesh_queue",
        "confab_commit_queue",
        "confab_outbound_frames",
        "confab_outbound_frames_max",
    ] {
        assert!(
            sample(&body, &format!("{gauge}{{shard=\"0\"}}")).is_some(),
            "no {gauge}"
        );
    }
    // The embedded store's LSM gauges, set after the send's batch.
    if std::env::var("TEST_STORE").as_deref() != Ok("cassandra") {
        for gauge in ["confab_store_l0_tables", "confab_store_sealed_memtables"] {
            for keyspace in ["messages", "sends"] {
                let series = format!("{gauge}{{keyspace=\"{keyspace}\"}}");
                assert!(sample(&body, &series).is_some(), "no {series} in:\n{body}");
            }
        }
        let write_buffer = sample(&body, "confab_store_write_buffer_bytes");
        assert!(write_buffer.is_some_and(|bytes| bytes > 0.0), "{body}");
        let appends: f64 = ["in_place", "writer"]
            .iter()
            .filter_map(|path| sample(&body, &format!("confab_store_appends_total{{path=\"{path}\"}}")))
            .sum();
        assert!(appends >= 1.0, "the send's batch is counted:\n{body}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_off_by_default() {
    let mut node = TestServer::start(1).await;
    assert_eq!(node.server.as_ref().unwrap().metrics_addr(), None);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_up_and_ready_while_the_store_takes_writes() {
    let mut node = TestServer::start_with(1, &[("CONFAB_METRICS__LISTEN", "127.0.0.1:0")]).await;
    let ops = node.server.as_ref().unwrap().metrics_addr().unwrap();
    assert_eq!(
        http_get(ops, "/healthz").await,
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    assert_eq!(
        http_get(ops, "/readyz").await,
        ("HTTP/1.1 200 OK".into(), "ready\n".into())
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refusing_writes_is_not_ready_and_says_why() {
    // More free space asked for than any disk here has: writes are refused.
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_METRICS__LISTEN", "127.0.0.1:0"),
            ("CONFAB_STORE__MIN_FREE_MIB", "1000000000000"),
        ],
    )
    .await;
    let ops = node.server.as_ref().unwrap().metrics_addr().unwrap();
    let (status, body) = http_get(ops, "/readyz").await;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert!(body.starts_with("the store refuses writes"), "{body}");
    // Up all the same.
    assert_eq!(http_get(ops, "/healthz").await.0, "HTTP/1.1 200 OK");
    node.shutdown().await;
}
