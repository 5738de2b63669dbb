//! One account that sends as fast as the server lets it: many sends in flight,
//! a new one as soon as one is answered, for a fixed time. Run it beside a
//! `direct` run to see what one flooding user costs everyone else; it reports
//! how many sends were stored and how many the server refused (RATE_LIMITED).

use crate::setup::{Connector, members};
use confab_client::Endpoint;
use confab_client::proto::ErrorCode;
use futures::stream::{FuturesUnordered, StreamExt as _};
use std::time::{Duration, Instant};

/// What a flood achieved.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Flood {
    pub seconds: f64,
    pub stored: u64,
    pub refused: u64,
}

impl Flood {
    pub fn print(&self) -> String {
        format!(
            "flood: {} stored ({:.0}/s), {} refused as rate-limited ({:.0}/s) in {:.1} s",
            self.stored,
            self.stored as f64 / self.seconds,
            self.refused,
            self.refused as f64 / self.seconds,
            self.seconds
        )
    }
}

/// Floods for `duration` with `in_flight` sends outstanding, `body_bytes` each.
pub async fn run(server: Endpoint, in_flight: usize, body_bytes: usize, duration: Duration) -> anyhow::Result<Flood> {
    let connector = Connector::new(server)?;
    let users = members(&connector, 2).await?;
    let (flooder, target) = (&users[0], users[1].user_id);
    let body = "f".repeat(body_bytes);
    let started = Instant::now();
    let mut next = 0u64;
    let mut outstanding = FuturesUnordered::new();
    let (mut stored, mut refused) = (0, 0);
    let send = |index: u64| {
        let client = flooder.client();
        let body = body.clone();
        async move { client.send_direct(target, &format!("flood-{index}"), &body).await }
    };
    while started.elapsed() < duration || !outstanding.is_empty() {
        while outstanding.len() < in_flight && started.elapsed() < duration {
            outstanding.push(send(next));
            next += 1;
        }
        match outstanding.next().await {
            Some(Ok(_)) => stored += 1,
            Some(Err(err)) if err.code() == Some(ErrorCode::RateLimited) => refused += 1,
            Some(Err(err)) => return Err(err.into()),
            None => break,
        }
    }
    Ok(Flood {
        seconds: started.elapsed().as_secs_f64(),
        stored,
        refused,
    })
}
