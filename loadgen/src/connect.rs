//! The connect scenario: a storm of authenticated connections at a given rate,
//! held idle, with handshake latency and the server's memory per connection.

use crate::server::{MachineTicks, cpu_seconds, rss_bytes};
use crate::setup;
use crate::stats::{Latency, Percentiles};
use anyhow::Context as _;
use confab_client::Endpoint;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Connections per source address. Loopback has about 28 000 ephemeral ports,
/// but Linux gives `connect()` the even half first: past ~14 000 connections
/// from one address each connect searched the port space (the loadgen's CPU
/// per connect went from ~45 to ~460 µs at 19 000 connections, and the storm
/// from ~18 000 to ~4 300/s).
const PER_SOURCE_ADDRESS: usize = 10_000;
/// Accounts whose tokens the connections share.
const USERS: usize = 50;
/// Wait before reading the server's memory, so transient allocations of a burst
/// are returned (the allocator releases freed memory after a delay).
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy)]
pub struct Storm {
    pub connections: usize,
    /// Connects started per second.
    pub rate: f64,
    /// How long the connections are held idle once all are up.
    pub hold: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    pub parameters: serde_json::Value,
    pub connected: usize,
    pub failures: usize,
    pub seconds: f64,
    pub connects_per_second: f64,
    /// Connect start → Authenticated.
    pub handshake: Percentiles,
    /// Server resident memory before and while holding (bytes), when its pid is known.
    pub server_rss_before: Option<u64>,
    pub server_rss_holding: Option<u64>,
    pub server_bytes_per_connection: Option<f64>,
    /// CPU time per connection over the measured three quarters of the storm:
    /// the server's (when its pid is known) and the load generator's own (which
    /// is also charged the kernel's work for both ends of each TCP handshake).
    pub server_cpu_us_per_connect: Option<f64>,
    pub loadgen_cpu_us_per_connect: f64,
    pub machine_busy_percent: Option<f64>,
    pub machine_steal_percent: Option<f64>,
    pub first_error: Option<String>,
}

impl ConnectReport {
    pub fn print(&self) -> String {
        let p = &self.handshake;
        let mut text = format!(
            "connect: {} of {} authenticated in {:.2} s ({:.0}/s), failures {}\n  handshake        p50 {:>8.3} ms  p90 {:>8.3}  p99 {:>8.3}  p99.9 {:>8.3}  max {:>8.3}\n",
            self.connected,
            self.connected + self.failures,
            self.seconds,
            self.connects_per_second,
            self.failures,
            p.p50_ms,
            p.p90_ms,
            p.p99_ms,
            p.p999_ms,
            p.max_ms
        );
        if let Some(per) = self.server_bytes_per_connection {
            text += &format!("  server memory: {per:.0} bytes per idle authenticated connection\n");
        }
        if let Some(server) = self.server_cpu_us_per_connect {
            text += &format!(
                "  CPU per connect: server {server:.0} µs, load generator {:.0} µs\n",
                self.loadgen_cpu_us_per_connect
            );
        }
        if let (Some(busy), Some(steal)) = (self.machine_busy_percent, self.machine_steal_percent) {
            text += &format!("  machine CPU {busy:.0}% busy, {steal:.1}% taken by the host (steal)\n");
        }
        if let Some(error) = &self.first_error {
            text += &format!("  first error: {error}\n");
        }
        text
    }
}

pub async fn run(
    server: Endpoint,
    storm: Storm,
    server_pid: Option<u32>,
    parameters: serde_json::Value,
) -> anyhow::Result<ConnectReport> {
    let connector = setup::Connector::new(server)?;
    let members = setup::members(&connector, USERS).await?;
    let tokens: Vec<String> = members.iter().map(|member| member.access_token.clone()).collect();
    drop(members);
    let start = Instant::now();
    let mut clients = Vec::with_capacity(storm.connections);
    let mut handshake = Latency::default();
    let mut failures = 0;
    let mut first_error = None;
    // A first quarter warms the server up (thread pools, allocator); memory per
    // connection is measured over the other three quarters.
    let warm_up = storm.connections / 4;
    let mut rss_before = None;
    let mut cpu_before = None;
    for (from, to) in [(0, warm_up), (warm_up, storm.connections)] {
        if from > 0 && server_pid.is_some() {
            tokio::time::sleep(SETTLE).await;
            rss_before = server_pid.map(rss_bytes).transpose()?;
        }
        if from > 0 {
            cpu_before = Some(CpuMark::now(server_pid)?);
        }
        let batch_start = Instant::now();
        let tasks: Vec<_> = (from..to)
            .map(|index| {
                let token = tokens[index % tokens.len()].clone();
                let intended = batch_start + Duration::from_secs_f64((index - from) as f64 / storm.rate);
                let local_ip = match server.transport {
                    // QUIC connections share one UDP socket: no port limit.
                    confab_client::Transport::Quic => None,
                    _ => source_address(server.addr, index),
                };
                let connector = connector.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(intended.into()).await;
                    let began = Instant::now();
                    let client = connector.connect_authenticated(local_ip, &token).await?;
                    anyhow::Ok((client, began.elapsed()))
                })
            })
            .collect();
        for task in tasks {
            match task.await.context("connect task")? {
                Ok((client, latency)) => {
                    handshake.record(latency);
                    clients.push(client);
                }
                Err(err) => {
                    failures += 1;
                    first_error.get_or_insert_with(|| format!("{err:#}"));
                }
            }
        }
    }
    let cpu = match cpu_before {
        Some(before) => Some(before.until(CpuMark::now(server_pid)?, storm.connections - warm_up)),
        None => None,
    };
    let settle = if server_pid.is_some() { SETTLE } else { Duration::ZERO };
    let seconds = start.elapsed().as_secs_f64() - settle.as_secs_f64();
    tokio::time::sleep(storm.hold.max(settle)).await;
    let rss_holding = server_pid.map(rss_bytes).transpose()?;
    let measured = storm.connections - warm_up;
    let per_connection = match (rss_before, rss_holding) {
        (Some(before), Some(holding)) if measured > 0 => Some(holding.saturating_sub(before) as f64 / measured as f64),
        _ => None,
    };
    Ok(ConnectReport {
        parameters,
        connected: clients.len(),
        failures,
        seconds,
        connects_per_second: clients.len() as f64 / seconds,
        handshake: handshake.summary(),
        server_rss_before: rss_before,
        server_rss_holding: rss_holding,
        server_bytes_per_connection: per_connection,
        server_cpu_us_per_connect: cpu.and_then(|cpu| cpu.server_us),
        loadgen_cpu_us_per_connect: cpu.map_or(0.0, |cpu| cpu.loadgen_us),
        machine_busy_percent: cpu.and_then(|cpu| cpu.machine.map(|(busy, _)| busy)),
        machine_steal_percent: cpu.and_then(|cpu| cpu.machine.map(|(_, steal)| steal)),
        first_error,
    })
}

/// CPU time used so far by the server and by this process, and the machine's.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    server: Option<f64>,
    loadgen: f64,
    machine: Option<MachineTicks>,
}

/// CPU between two [`CpuMark`]s, per connection, and the machine's shares.
#[derive(Debug, Clone, Copy)]
struct CpuSpent {
    server_us: Option<f64>,
    loadgen_us: f64,
    machine: Option<(f64, f64)>,
}

impl CpuMark {
    fn now(server_pid: Option<u32>) -> anyhow::Result<Self> {
        Ok(Self {
            server: server_pid.map(cpu_seconds).transpose()?,
            loadgen: cpu_seconds(std::process::id())?,
            machine: MachineTicks::now().ok(),
        })
    }

    fn until(self, later: Self, connections: usize) -> CpuSpent {
        let per = |before: f64, after: f64| (after - before) * 1e6 / connections.max(1) as f64;
        CpuSpent {
            server_us: self.server.zip(later.server).map(|(before, after)| per(before, after)),
            loadgen_us: per(self.loadgen, later.loadgen),
            machine: self
                .machine
                .zip(later.machine)
                .map(|(before, after)| before.shares_until(after)),
        }
    }
}

/// The OS's choice for the first PER_SOURCE_ADDRESS connections (it picks ports
/// per 4-tuple, which an explicit bind cannot), then 127.0.0.2, 127.0.0.3, ... by
/// blocks, when the server is on IPv4 loopback.
fn source_address(server: SocketAddr, index: usize) -> Option<IpAddr> {
    let block = index / PER_SOURCE_ADDRESS;
    match server.ip() {
        IpAddr::V4(_) if block > 0 => {
            let host = u8::try_from(1 + block).ok()?;
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_rotate_by_block_on_ipv4() {
        let server: SocketAddr = "127.0.0.1:7300".parse().unwrap();
        assert_eq!(source_address(server, 0), None);
        assert_eq!(
            source_address(server, PER_SOURCE_ADDRESS),
            Some("127.0.0.2".parse().unwrap())
        );
        assert_eq!(source_address("[::1]:7300".parse().unwrap(), PER_SOURCE_ADDRESS), None);
    }
}
