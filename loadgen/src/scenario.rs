//! The message scenarios: who talks to whom. Traffic, checking and timing are the
//! shared [`crate::traffic`] runner's.

use crate::check::{Device, MessageId};
use crate::echo;
use crate::payload;
use crate::relay;
use crate::server;
use crate::setup::{self, Member};
use crate::stats::{self, RelayReport, Report};
use crate::traffic::{self, Flow, Load, Outcome};
use anyhow::Context as _;
use confab_client::Endpoint;
use confab_client::proto::conversation_ref::Target;
use std::net::SocketAddr;

/// Bytes a Send frame adds to its body (prefix, ids, field tags), for the echo
/// baseline's frame size.
pub const FRAME_OVERHEAD_BYTES: usize = 32;

/// Pairs of users, each sending to the other; with several servers, the two
/// users of a pair are on different ones.
pub async fn direct(
    servers: Vec<Endpoint>,
    pairs: usize,
    load: Load,
    mode: Mode,
    measure: Measure,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let connector = setup::Connector::spread(servers)?;
    let members = setup::members(&connector, pairs * 2).await?;
    let flows = members
        .chunks(2)
        .flat_map(|pair| {
            [(0, 1), (1, 0)].map(|(from, to)| Flow {
                sender: pair[from].device as usize,
                target: Target::DirectUserId(pair[to].user_id.get()),
                recipients: vec![pair[to].device],
            })
        })
        .collect();
    drive("direct", &members, flows, load, mode, measure, parameters).await
}

#[derive(Debug, Clone, Copy)]
pub struct GroupShape {
    pub groups: usize,
    pub members: usize,
    pub senders: usize,
}

/// Groups whose first members send to everyone else.
pub async fn group(
    servers: Vec<Endpoint>,
    shape: GroupShape,
    load: Load,
    mode: Mode,
    measure: Measure,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let connector = setup::Connector::spread(servers)?;
    let members = setup::members(&connector, shape.groups * shape.members).await?;
    let mut flows = Vec::new();
    for (index, group) in members.chunks(shape.members).enumerate() {
        let others: Vec<confab_client::UserId> = group[1..].iter().map(|member| member.user_id).collect();
        let created = group[0]
            .client()
            .create_group(&format!("loadgen-{index}"), &format!("loadgen {index}"), &others)
            .await
            .context("creating a group")?;
        for sender in &group[..shape.senders] {
            flows.push(Flow {
                sender: sender.device as usize,
                target: Target::ConversationId(created.conversation_id.clone()),
                recipients: everyone_but(group, sender.device),
            });
        }
    }
    drive("group", &members, flows, load, mode, measure, parameters).await
}

/// Run once at the given rate, or ramp to find the highest rate that holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Once,
    /// Find the highest rate whose delivery p99 stays within the bound, with every
    /// message delivered and no errors.
    Ramp {
        p99_bound: std::time::Duration,
    },
}

/// Most ramp steps; the search also stops once it has narrowed to 10 %.
const MAX_RAMP_STEPS: u32 = 8;

/// What else a run measures besides its own traffic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measure {
    /// The raw echo baseline, with the run's connections and frame size.
    pub echo_baseline: bool,
    /// The relay baseline with this many pairs (the 1:1 pattern only).
    pub relay_pairs: Option<usize>,
    /// The server's pid: its CPU time per delivery, from /proc.
    pub server_pid: Option<u32>,
    /// The server's metrics endpoint: a scrape at the end of the run.
    pub metrics: Option<SocketAddr>,
}

async fn drive(
    scenario: &str,
    members: &[Member],
    flows: Vec<Flow>,
    load: Load,
    mode: Mode,
    measure: Measure,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let echo = baseline(measure.echo_baseline, members.len(), load).await?;
    let Mode::Ramp { p99_bound } = mode else {
        let mut report = measured_run(scenario, members, flows, load, measure, echo, parameters).await?;
        if let Some(pairs) = measure.relay_pairs {
            report.relay_baseline = Some(relay_at(pairs, load).await?);
        }
        return Ok(report);
    };
    let bound_ms = p99_bound.as_secs_f64() * 1000.0;
    let mut search = RampSearch::new(load.rate);
    let mut steps = Vec::new();
    for round in 0..MAX_RAMP_STEPS {
        let rate = search.rate;
        let step = Load { rate, round, ..load };
        let report = measured_run(
            scenario,
            members,
            flows.clone(),
            step,
            measure,
            echo,
            parameters.clone(),
        )
        .await?;
        if !report.violations.is_empty() {
            return Ok(report);
        }
        let held =
            report.errors == 0 && report.delivery_latency.p99_ms <= bound_ms && report.acked_per_second >= 0.95 * rate;
        eprintln!(
            "ramp step {round}: {rate:.0}/s → {:.0} delivered/s, p99 {:.3} ms: {}",
            report.deliveries_per_second,
            report.delivery_latency.p99_ms,
            if held { "holds" } else { "does not hold" }
        );
        steps.push(serde_json::json!({ "rate": rate, "deliveries_per_second": report.deliveries_per_second, "p99_ms": report.delivery_latency.p99_ms, "holds": held }));
        if !search.record(held, report) {
            break;
        }
    }
    let Some((_, mut best)) = search.best else {
        anyhow::bail!(
            "no rate held a p99 within {bound_ms} ms (lowest tried: {:.0}/s)",
            search.rate
        );
    };
    best.parameters["ramp_p99_bound_ms"] = bound_ms.into();
    best.parameters["ramp_steps"] = steps.into();
    if let Some(pairs) = measure.relay_pairs {
        best.relay_baseline = Some(relay_ramp(pairs, load, bound_ms).await?);
    }
    Ok(best)
}

/// A ramp's search for the highest rate that holds: doubling until a rate does
/// not, then halving the interval until it is within 10 %.
struct RampSearch<T> {
    /// The rate to try next.
    rate: f64,
    /// The highest rate that held, and what it gave.
    best: Option<(f64, T)>,
    /// The lowest rate that did not hold.
    failed: Option<f64>,
}

impl<T> RampSearch<T> {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            best: None,
            failed: None,
        }
    }

    /// Records whether the current rate held; false once the search is done.
    fn record(&mut self, held: bool, outcome: T) -> bool {
        if held {
            self.best = Some((self.rate, outcome));
        } else {
            self.failed = Some(self.rate);
        }
        let next = match (self.best.as_ref().map(|(rate, _)| *rate), self.failed) {
            (_, None) => self.rate * 2.0,
            (Some(low), Some(high)) if (high - low) / high < 0.1 => return false,
            (Some(low), Some(high)) => (low + high) / 2.0,
            (None, Some(high)) => high / 2.0,
        };
        self.rate = next;
        true
    }
}

/// One traffic run, with the server's CPU and metrics around it when asked.
async fn measured_run(
    scenario: &str,
    members: &[Member],
    flows: Vec<Flow>,
    load: Load,
    measure: Measure,
    echo: Option<f64>,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let cpu_before = measure.server_pid.map(server::cpu_seconds).transpose()?;
    let threads_before = measure.server_pid.map(server::cpu_seconds_by_thread).transpose()?;
    let machine_before = server::MachineTicks::now().ok();
    let outcome = traffic::run(members, flows, load).await;
    let machine_after = server::MachineTicks::now().ok();
    let cpu_after = measure.server_pid.map(server::cpu_seconds).transpose()?;
    let threads_after = measure.server_pid.map(server::cpu_seconds_by_thread).transpose()?;
    let mut report = finish(scenario, parameters, outcome, echo, "send → deliver")?;
    if let (Some(before), Some(after)) = (machine_before, machine_after) {
        let (busy, steal) = before.shares_until(after);
        report.machine_busy_percent = Some(busy);
        report.machine_steal_percent = Some(steal);
    }
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        report.server_cpu_us_per_delivery = Some((after - before) * 1e6 / report.deliveries.max(1) as f64);
    }
    if let (Some(before), Some(after)) = (threads_before, threads_after) {
        let deliveries = report.deliveries.max(1) as f64;
        let per_thread = after
            .into_iter()
            .map(|(name, seconds)| {
                let used = seconds - before.get(&name).copied().unwrap_or(0.0);
                (name, used * 1e6 / deliveries)
            })
            .filter(|(_, us)| *us > 0.0)
            .collect();
        report.server_cpu_us_per_delivery_by_thread = Some(per_thread);
    }
    if let Some(addr) = measure.metrics {
        // The stage timings are extra figures: a scrape that fails (a busy
        // server answering late) costs them, not the run's own results.
        match server::scrape(addr).await {
            Ok(metrics) => report.server_metrics = Some(metrics),
            Err(err) => eprintln!("warning: no server metrics for this run: {err:#}"),
        }
    }
    Ok(report)
}

async fn relay_at(pairs: usize, load: Load) -> anyhow::Result<RelayReport> {
    let outcome = relay::run(pairs, load.body_bytes + FRAME_OVERHEAD_BYTES, load).await?;
    Ok(RelayReport {
        rate: load.rate,
        deliveries_per_second: outcome.delivered as f64 / outcome.elapsed.as_secs_f64(),
        ack_latency: outcome.ack_latency.summary(),
        delivery_latency: outcome.delivery_latency.summary(),
        highest_rate_within_bound: None,
    })
}

/// The relay's own ramp, from the run's starting rate: the best rate that held.
async fn relay_ramp(pairs: usize, load: Load, bound_ms: f64) -> anyhow::Result<RelayReport> {
    let mut search = RampSearch::new(load.rate);
    for _ in 0..MAX_RAMP_STEPS {
        let rate = search.rate;
        let report = relay_at(pairs, Load { rate, ..load }).await?;
        let held = report.delivery_latency.p99_ms <= bound_ms && report.deliveries_per_second >= 0.95 * rate;
        eprintln!(
            "relay ramp: {rate:.0}/s, p99 {:.3} ms: {}",
            report.delivery_latency.p99_ms,
            if held { "holds" } else { "does not hold" }
        );
        if !search.record(held, report) {
            break;
        }
    }
    let Some((highest, mut best)) = search.best else {
        anyhow::bail!("the relay held no rate within {bound_ms} ms");
    };
    best.highest_rate_within_bound = Some(highest);
    Ok(best)
}

fn everyone_but(group: &[Member], sender: Device) -> Vec<Device> {
    group
        .iter()
        .map(|member| member.device)
        .filter(|device| *device != sender)
        .collect()
}

async fn baseline(wanted: bool, connections: usize, load: Load) -> anyhow::Result<Option<f64>> {
    if !wanted {
        return Ok(None);
    }
    let frame_bytes = load.body_bytes + FRAME_OVERHEAD_BYTES;
    Ok(Some(echo::baseline(connections, frame_bytes, load.duration).await?))
}

fn finish(
    scenario: &str,
    parameters: serde_json::Value,
    outcome: Outcome,
    echo: Option<f64>,
    delivery_label: &str,
) -> anyhow::Result<Report> {
    let seconds = outcome.elapsed.as_secs_f64();
    let deliveries = outcome.checker.deliveries();
    Ok(Report {
        scenario: scenario.to_owned(),
        parameters,
        seconds,
        sent: outcome.sent,
        acked: outcome.acked,
        errors: outcome.errors,
        deliveries,
        acked_per_second: outcome.acked as f64 / seconds,
        deliveries_per_second: deliveries as f64 / seconds,
        ack_latency: outcome.ack_latency.summary(),
        delivery_latency: outcome.delivery_latency.summary(),
        delivery_label: delivery_label.to_owned(),
        echo_baseline_per_second: echo,
        relay_baseline: None,
        server_cpu_us_per_delivery: None,
        server_cpu_us_per_delivery_by_thread: None,
        machine_busy_percent: None,
        machine_steal_percent: None,
        server_metrics: None,
        violations: stats::describe(&outcome.checker.finish()),
    })
}

/// Devices go offline, `backlog` messages pile up for each, then every device
/// reconnects at once, resumes, and syncs until it has everything. Reports the
/// catch-up time per device and the catch-up rate over all of them.
pub async fn sync(
    server: Endpoint,
    devices: usize,
    backlog: usize,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let connector = setup::Connector::new(server)?;
    let members = setup::members(&connector, devices * 2).await?;
    let (senders, receivers): (Vec<_>, Vec<_>) =
        members.chunks(2).map(|pair| (pair[0].clone(), pair[1].clone())).unzip();
    let mut tokens = Vec::with_capacity(devices);
    for receiver in &receivers {
        tokens.push(receiver.client().sync("", &[], 0).await?.sync_token);
    }
    let offline: Vec<(Device, String)> = receivers.iter().map(|r| (r.device, r.access_token.clone())).collect();
    drop(receivers);

    // Pile up: every sender sends its backlog (pipelined in chunks).
    let mut outcome = Outcome::default();
    for (sender, (receiver, _)) in senders.iter().zip(&offline) {
        let recipient_id = members[*receiver as usize].user_id;
        for chunk in (0..backlog).collect::<Vec<_>>().chunks(256) {
            let sends = chunk.iter().map(|counter| {
                let id = MessageId {
                    sender: sender.device,
                    counter: *counter as u64,
                };
                let body = payload::encode(id, 0, 64);
                let client = sender.client();
                async move {
                    (
                        id,
                        client
                            .send(
                                Target::DirectUserId(recipient_id.get()),
                                &format!("{}-{}", id.sender, id.counter),
                                &body,
                            )
                            .await,
                    )
                }
            });
            for (id, result) in futures::future::join_all(sends).await {
                outcome.sent += 1;
                match result {
                    Ok(ack) => {
                        outcome.acked += 1;
                        outcome
                            .checker
                            .acked(id, &ack.conversation_id, ack.seq, [*receiver].into());
                    }
                    Err(_) => outcome.errors += 1,
                }
            }
        }
    }

    // Everyone comes back at once.
    let started = std::time::Instant::now();
    let catch_ups = offline.into_iter().zip(tokens).map(|((device, access_token), token)| {
        let connector = connector.clone();
        async move {
            let began = std::time::Instant::now();
            let client = connector.connect(None).await?;
            let resumed = client.authenticate_resume(&access_token, &token, &[]).await?;
            let mut received = Vec::new();
            for _ in 0..resumed.replayed {
                received.push(client.next_message().await?);
            }
            let mut token = resumed.sync_token;
            let mut more = !resumed.recovered;
            while more {
                let page = client.sync(&token, &[], 1000).await?;
                received.extend(page.conversations.into_iter().flat_map(|state| state.messages));
                token = page.sync_token;
                more = page.has_more;
            }
            anyhow::Ok((device, received, began.elapsed()))
        }
    });
    for result in futures::future::join_all(catch_ups).await {
        let (device, received, took) = result?;
        outcome.delivery_latency.record(took);
        for message in received {
            if let Some((id, _)) = payload::decode(&message.body) {
                outcome
                    .checker
                    .delivered(device, &message.conversation_id, message.seq, id);
            }
        }
    }
    outcome.elapsed = started.elapsed();
    finish("sync", parameters, outcome, None, "catch-up per device")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_search_doubles_then_narrows_to_within_ten_percent() {
        // Rates up to 5 000/s hold.
        let mut search = RampSearch::new(1000.0);
        let mut tried = Vec::new();
        loop {
            tried.push(search.rate);
            let rate = search.rate;
            if !search.record(rate <= 5000.0, rate) {
                break;
            }
        }
        assert_eq!(&tried[..4], &[1000.0, 2000.0, 4000.0, 8000.0]);
        let (best, outcome) = search.best.unwrap_or_default();
        assert_eq!(best, outcome);
        assert!((4500.0..=5000.0).contains(&best), "{best}");
        assert!(tried.len() <= MAX_RAMP_STEPS as usize, "{tried:?}");
    }
}
