//! What cluster mode's seq arbitration would cost (docs/CLUSTER.md): appends of
//! `rows` messages to one conversation's partition, written as today's unlogged
//! batch, against the same rows as a conditional batch (`INSERT ... IF NOT
//! EXISTS`: a Paxos round per batch), `conversations` appending at once, each
//! one batch after another as an owner does.
//!
//! ```sh
//! cargo run --release --example cassandra_batches -- 127.0.0.1:9042 [batches] [rows] [conversations]
//! ```
//!
//! It creates a keyspace of its own and drops it at the end.
#![allow(clippy::print_stdout)]

use anyhow::Context as _;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let node = args
        .first()
        .context("usage: cassandra_batches HOST:PORT [batches] [rows] [conversations]")?;
    let number = |index: usize, default: usize| -> anyhow::Result<usize> {
        args.get(index).map_or(Ok(default), |text| {
            text.parse().with_context(|| format!("argument {index}: {text}"))
        })
    };
    let (batches, rows, conversations) = (number(1, 500)?, number(2, 8)?, number(3, 16)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(run(node, batches, rows, conversations))
}

async fn run(node: &str, batches: usize, rows: usize, conversations: usize) -> anyhow::Result<()> {
    let session = Arc::new(SessionBuilder::new().known_node(node).build().await?);
    let keyspace = format!("confab_batches_{:08x}", rand::random::<u32>());
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
            ),
            (),
        )
        .await?;
    let result = measure_both(&session, &keyspace, batches, rows, conversations).await;
    session.query_unpaged(format!("DROP KEYSPACE {keyspace}"), ()).await?;
    result
}

async fn measure_both(
    session: &Arc<Session>,
    keyspace: &str,
    batches: usize,
    rows: usize,
    conversations: usize,
) -> anyhow::Result<()> {
    for (table, condition) in [("plain", ""), ("conditional", " IF NOT EXISTS")] {
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE {keyspace}.{table} (conversation text, bucket bigint, seq bigint, body blob, \
                     PRIMARY KEY ((conversation, bucket), seq))"
                ),
                (),
            )
            .await?;
        let insert = session
            .prepare(format!(
                "INSERT INTO {keyspace}.{table} (conversation, bucket, seq, body) VALUES (?, ?, ?, ?){condition}"
            ))
            .await?;
        let batch_type = match condition.is_empty() {
            true => BatchType::Unlogged,
            false => BatchType::Logged,
        };
        let started = Instant::now();
        let appenders = (0..conversations).map(|conversation| {
            let (session, insert) = (session.clone(), insert.clone());
            tokio::spawn(async move { append(&session, &insert, batch_type, conversation, batches, rows).await })
        });
        let mut latencies = Vec::new();
        for appender in futures::future::join_all(appenders).await {
            latencies.extend(appender??);
        }
        let elapsed = started.elapsed();
        latencies.sort_unstable();
        let at = |quantile: f64| latencies[((latencies.len() - 1) as f64 * quantile) as usize];
        println!(
            "{table:>11}: {} batches of {rows} rows, {conversations} conversations at once: {:.0} rows/s, \
             batch p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            (latencies.len() * rows) as f64 / elapsed.as_secs_f64(),
            millis(at(0.5)),
            millis(at(0.99)),
            millis(at(1.0)),
        );
    }
    Ok(())
}

/// One conversation's appends, a batch at a time; each batch's latency.
async fn append(
    session: &Session,
    insert: &PreparedStatement,
    batch_type: BatchType,
    conversation: usize,
    batches: usize,
    rows: usize,
) -> anyhow::Result<Vec<Duration>> {
    let conversation = format!("d:{conversation}");
    let body = vec![b'x'; 100];
    let mut latencies = Vec::with_capacity(batches);
    for index in 0..batches {
        let mut batch = Batch::new(batch_type);
        batch.set_consistency(Consistency::LocalQuorum);
        batch.set_serial_consistency(Some(SerialConsistency::LocalSerial));
        // One partition per batch, as a conditional batch must be: the
        // bucket of its first seq (an owner would split at a bucket's end).
        let first = i64::try_from(index * rows + 1)?;
        let mut values = Vec::with_capacity(rows);
        for seq in (first..).take(rows) {
            batch.append_statement(insert.clone());
            values.push((conversation.as_str(), first / 1000, seq, body.as_slice()));
        }
        let started = Instant::now();
        session.batch(&batch, values).await?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
