//! `confab-loadgen`: the command line of the load generator (see the library).
//! Its reports go to stdout.
#![allow(clippy::print_stdout)]

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use confab_client::{Endpoint, Transport, parse_fingerprint};
use confab_loadgen::{connect, echo, scenario, traffic};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "confab-loadgen",
    version,
    about = "Load generator and correctness checker for confab"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// P pairs of users exchanging 1:1 messages at a target total rate (open loop).
    Direct {
        #[command(flatten)]
        common: Common,
        /// Pairs of users.
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Also run the relay baseline (a storage-free forwarder) with the same
        /// pairs, frame size and schedule; with --ramp, ramp it too.
        #[arg(long)]
        relay_baseline: bool,
    },
    /// G groups of M members, S senders per group, at a target total rate.
    Group {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2)]
        groups: usize,
        #[arg(long, default_value_t = 100)]
        members: usize,
        #[arg(long, default_value_t = 2)]
        senders: usize,
    },
    /// Devices go offline, messages pile up, devices reconnect (resume + Sync) and
    /// catch up; reports catch-up time per device and messages/s.
    Sync {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 50)]
        devices: usize,
        /// Messages waiting for each device.
        #[arg(long, default_value_t = 2000)]
        backlog: usize,
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Opens N authenticated connections at a rate and holds them idle; reports
    /// connects/s, handshake latency and (with --server-pid) server memory per connection.
    Connect {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Connects started per second.
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        hold: Duration,
        /// The server's pid, to read its resident memory from /proc.
        #[arg(long)]
        server_pid: Option<u32>,
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// One account sending as fast as the server allows (run beside `direct` to
    /// see what one flooding user costs the others).
    Flood {
        #[command(flatten)]
        target: Target,
        /// Sends outstanding at once.
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        duration: Duration,
    },
    /// Real users log in at --rate from 127.0.0.2 while --attackers tasks guess
    /// passwords from 127.0.0.3; reports the real log-ins' latency and refusals.
    Logins {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 20)]
        users: usize,
        /// Real log-ins per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        #[arg(long, default_value_t = 300)]
        attackers: usize,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
        duration: Duration,
    },
    /// Only the raw loopback echo baseline.
    EchoBaseline {
        #[arg(long, default_value_t = 100)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
    },
}

/// Where the server is and how to reach it.
#[derive(Debug, Args)]
struct Target {
    /// The server's listener for --transport, on loopback (127.0.0.0/8 or [::1]):
    /// the TCP port for tcp/tls, the WebSocket port for ws/wss, the UDP port for quic.
    /// Several, comma-separated (the nodes of a cluster): `direct` and `group`
    /// spread their users over them in turn (the two users of a pair on
    /// different nodes); other scenarios use the first.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7300")]
    server: Vec<SocketAddr>,
    #[arg(long, value_parser = parse_transport, default_value = "tcp")]
    transport: Transport,
    /// SHA-256 of the server certificate (printed by `confab serve`), for tls, wss and quic.
    #[arg(long, value_name = "HEX")]
    cert_sha256: Option<String>,
}

impl Target {
    /// The first endpoint.
    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let first = self.endpoints()?.into_iter().next();
        first.context("--server names no address")
    }

    /// Every endpoint, refusing anything but loopback.
    fn endpoints(&self) -> anyhow::Result<Vec<Endpoint>> {
        self.server.iter().map(|addr| self.endpoint_at(*addr)).collect()
    }

    fn endpoint_at(&self, addr: SocketAddr) -> anyhow::Result<Endpoint> {
        if !addr.ip().is_loopback() {
            bail!("--server must be a loopback address (127.0.0.0/8 or [::1]); got {addr}");
        }
        let pinned_certificate = match &self.cert_sha256 {
            Some(hex) => {
                Some(parse_fingerprint(hex).with_context(|| format!("--cert-sha256 {hex:?} is not 64 hex digits"))?)
            }
            None if self.transport.uses_tls() => bail!("--transport {} needs --cert-sha256", self.transport.name()),
            None => None,
        };
        Ok(Endpoint {
            addr,
            transport: self.transport,
            pinned_certificate,
        })
    }
}

fn parse_transport(name: &str) -> Result<Transport, String> {
    name.parse()
}

#[derive(Debug, Args)]
struct Common {
    #[command(flatten)]
    target: Target,
    /// Messages per second, all senders together.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Longest wait for outstanding deliveries after the last send.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    drain: Duration,
    /// Also measure the raw echo baseline with the same connections and frame size.
    #[arg(long)]
    echo_baseline: bool,
    /// Write every figure and the parameters as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The server's pid (same machine): report its CPU time per delivery.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The server's metrics endpoint (`metrics.listen`, loopback): keep a scrape
    /// taken at the end of the run and print its stage timings.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Find the highest rate (starting at --rate) whose send→deliver p99 stays
    /// within --p99-bound; each step lasts --duration.
    #[arg(long)]
    ramp: bool,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10ms")]
    p99_bound: Duration,
}

/// Runs are bounded: at most this many messages in one run.
const MAX_MESSAGES: f64 = 50_000_000.0;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // As in the server (see its `disable_transparent_huge_pages`): a huge page
    // zeroed on first touch stalls a receiver for milliseconds, and the
    // loadgen's stalls are part of every latency it reports.
    if let Err(err) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("warning: could not opt out of transparent huge pages: {err}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: building the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.scenario)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a scenario; `Ok(false)` when the correctness check failed.
async fn run(scenario: Scenario) -> anyhow::Result<bool> {
    raise_open_files_limit();
    let (report, json) = match scenario {
        Scenario::EchoBaseline {
            connections,
            body_bytes,
            duration,
        } => {
            let rate = echo::baseline(connections, body_bytes + scenario::FRAME_OVERHEAD_BYTES, duration).await?;
            println!("echo baseline: {rate:.0} frames/s over {connections} connections");
            return Ok(true);
        }
        Scenario::Flood {
            target,
            in_flight,
            body_bytes,
            duration,
        } => {
            if duration > Duration::from_secs(600) {
                bail!("--duration must be at most 10 minutes");
            }
            let flood = confab_loadgen::flood::run(target.endpoint()?, in_flight, body_bytes, duration).await?;
            println!("{}", flood.print());
            return Ok(true);
        }
        Scenario::Logins {
            target,
            users,
            rate,
            attackers,
            duration,
        } => {
            if duration > Duration::from_secs(600) || attackers > 5000 {
                bail!("--duration must be at most 10 minutes and --attackers at most 5000");
            }
            let report = confab_loadgen::logins::run(target.endpoint()?, users, rate, attackers, duration).await?;
            println!("{}", report.print());
            return Ok(true);
        }
        Scenario::Connect {
            target,
            connections,
            rate,
            hold,
            server_pid,
            json,
        } => {
            let server = target.endpoint()?;
            let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
            if connections as u64 + 100 > limit {
                bail!("{connections} connections need more open files than this process may have ({limit})");
            }
            let parameters = serde_json::json!({ "connections": connections, "rate": rate, "hold_s": hold.as_secs_f64(), "server_pid": server_pid });
            let storm = connect::Storm {
                connections,
                rate,
                hold,
            };
            let report = connect::run(server, storm, server_pid, parameters).await?;
            println!("{}", report.print());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            return Ok(report.failures == 0);
        }
        Scenario::Sync {
            target,
            devices,
            backlog,
            json,
        } => {
            let server = target.endpoint()?;
            if (devices * backlog) as f64 > MAX_MESSAGES {
                bail!("--devices × --backlog must be at most {MAX_MESSAGES} messages");
            }
            let parameters = serde_json::json!({ "devices": devices, "backlog": backlog });
            (scenario::sync(server, devices, backlog, parameters).await?, json)
        }
        Scenario::Direct {
            common,
            pairs,
            relay_baseline,
        } => {
            let server = check_common(&common)?;
            let parameters = serde_json::json!({ "pairs": pairs, "rate": common.rate, "duration_s": common.duration.as_secs_f64(), "body_bytes": common.body_bytes });
            let report = scenario::direct(
                server,
                pairs,
                load(&common),
                mode(&common),
                scenario::Measure {
                    relay_pairs: relay_baseline.then_some(pairs),
                    ..measure(&common)
                },
                parameters,
            )
            .await?;
            (report, common.json)
        }
        Scenario::Group {
            common,
            groups,
            members,
            senders,
        } => {
            let server = check_common(&common)?;
            if senders > members || members < 2 {
                bail!("--senders must be at most --members, and a group needs 2 members");
            }
            let parameters = serde_json::json!({ "groups": groups, "members": members, "senders": senders, "rate": common.rate, "duration_s": common.duration.as_secs_f64(), "body_bytes": common.body_bytes });
            let shape = scenario::GroupShape {
                groups,
                members,
                senders,
            };
            let report = scenario::group(
                server,
                shape,
                load(&common),
                mode(&common),
                measure(&common),
                parameters,
            )
            .await?;
            (report, common.json)
        }
    };
    print!("{}", report.print());
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.violations.is_empty())
}

fn load(common: &Common) -> traffic::Load {
    traffic::Load {
        rate: common.rate,
        duration: common.duration,
        body_bytes: common.body_bytes,
        drain: common.drain,
        round: 0,
    }
}

fn measure(common: &Common) -> scenario::Measure {
    scenario::Measure {
        echo_baseline: common.echo_baseline,
        relay_pairs: None,
        server_pid: common.server_pid,
        metrics: common.metrics,
    }
}

fn mode(common: &Common) -> scenario::Mode {
    match common.ramp {
        true => scenario::Mode::Ramp {
            p99_bound: common.p99_bound,
        },
        false => scenario::Mode::Once,
    }
}

fn check_common(common: &Common) -> anyhow::Result<Vec<Endpoint>> {
    let servers = common.target.endpoints()?;
    if let Some(metrics) = common.metrics
        && !metrics.ip().is_loopback()
    {
        bail!("--metrics must be a loopback address; got {metrics}");
    }
    let messages = common.rate * common.duration.as_secs_f64();
    if !(1.0..=MAX_MESSAGES).contains(&messages) {
        bail!("--rate × --duration must be between 1 and {MAX_MESSAGES} messages");
    }
    Ok(servers)
}

/// Many connections need many descriptors: use the hard limit.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => eprintln!("open files limit: {limit}"),
        Err(err) => eprintln!("could not raise the open files limit: {err}"),
    }
}
