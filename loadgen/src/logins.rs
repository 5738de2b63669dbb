//! Legitimate log-ins during a password-guessing attack: `attackers` tasks log
//! in with wrong passwords as fast as the server answers (from one address,
//! 127.0.0.3, a new connection whenever one is closed), while real users log in
//! with their passwords at a steady rate from another (127.0.0.2). Reports the
//! real users' log-in latency and what was refused, so the cost of an attack on
//! everyone else can be measured (and the throttling that contains it).

use crate::setup::{Connector, members};
use crate::stats::{Latency, Percentiles};
use confab_client::proto::ErrorCode;
use confab_client::{Client, ClientOptions, Endpoint};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const USERS_FROM: [u8; 4] = [127, 0, 0, 2];
const ATTACKERS_FROM: [u8; 4] = [127, 0, 0, 3];

/// What the run saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Logins {
    pub seconds: f64,
    /// Real users' successful log-ins.
    pub latency: Percentiles,
    /// Real users' failed log-ins, by error code.
    pub refused: BTreeMap<String, u64>,
    /// Wrong-password attempts the server answered, and how many of those it
    /// refused before hashing (RATE_LIMITED).
    pub guesses: u64,
    pub guesses_throttled: u64,
}

impl Logins {
    pub fn print(&self) -> String {
        let p = &self.latency;
        format!(
            "logins: {} ok, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms; refused {:?}\n\
             guesses: {} answered ({:.0}/s), {} of them refused before hashing",
            p.count,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            p.max_ms,
            self.refused,
            self.guesses,
            self.guesses as f64 / self.seconds,
            self.guesses_throttled
        )
    }
}

async fn connect_from(server: Endpoint, ip: [u8; 4]) -> Result<Client, confab_client::ClientError> {
    let options = ClientOptions {
        local_ip: Some(IpAddr::from(ip)),
        heartbeat: false,
        ..ClientOptions::default()
    };
    Client::connect_with(server, options).await
}

/// Runs the attack and the real log-ins for `duration`.
pub async fn run(
    server: Endpoint,
    users: usize,
    rate: f64,
    attackers: usize,
    duration: Duration,
) -> anyhow::Result<Logins> {
    let connector = Connector::new(server)?;
    let accounts = members(&connector, users.max(1)).await?;
    let names: Vec<String> = accounts.iter().map(|member| member.name.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let guesses = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let attack: Vec<_> = (0..attackers)
        .map(|index| {
            let (stop, guesses, throttled) = (stop.clone(), guesses.clone(), throttled.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(client) = connect_from(server, ATTACKERS_FROM).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    // Until the server closes the connection (too many failures).
                    for attempt in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let name = format!("guess{index}x{attempt}");
                        match client.log_in(&name, "not the password", "guess").await {
                            Err(err) if err.code() == Some(ErrorCode::RateLimited) => {
                                guesses.fetch_add(1, Ordering::Relaxed);
                                throttled.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(err) if err.code().is_some() => {
                                guesses.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => break,
                        }
                    }
                }
            })
        })
        .collect();

    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut ticker = tokio::time::interval(interval);
    let mut pending = Vec::new();
    let mut next = 0;
    while started.elapsed() < duration {
        ticker.tick().await;
        let name = names[next % names.len()].clone();
        next += 1;
        pending.push(tokio::spawn(async move {
            let client = connect_from(server, USERS_FROM).await?;
            let begun = Instant::now();
            let result = client.log_in(&name, crate::setup::PASSWORD, "loadgen").await;
            anyhow::Ok((begun.elapsed(), result.err().and_then(|err| err.code())))
        }));
    }
    let mut latency = Latency::default();
    let mut refused = BTreeMap::new();
    for login in pending {
        match login.await?? {
            (took, None) => latency.record(took),
            (_, Some(code)) => *refused.entry(format!("{code:?}")).or_default() += 1,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in attack {
        task.abort();
    }
    Ok(Logins {
        seconds,
        latency: latency.summary(),
        refused,
        guesses: guesses.load(Ordering::Relaxed),
        guesses_throttled: throttled.load(Ordering::Relaxed),
    })
}
