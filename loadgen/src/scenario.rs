//! The message scenarios: who talks to whom. Traffic, checking and timing are the
//! shared [`crate::traffic`] runner's.

use crate::check::{Device, MessageId};
use crate::echo;
use crate::payload;
use crate::setup::{self, Member};
use crate::stats::{self, Report};
use crate::traffic::{self, Flow, Load, Outcome};
use anyhow::Context as _;
use confab_client::Endpoint;
use confab_client::proto::conversation_ref::Target;

/// Bytes a Send frame adds to its body (prefix, ids, field tags), for the echo
/// baseline's frame size.
pub const FRAME_OVERHEAD_BYTES: usize = 32;

/// Pairs of users, each sending to the other.
pub async fn direct(
    server: Endpoint,
    pairs: usize,
    load: Load,
    mode: Mode,
    echo_baseline: bool,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let connector = setup::Connector::new(server)?;
    let members = setup::members(&connector, pairs * 2).await?;
    let flows = members
        .chunks(2)
        .flat_map(|pair| {
            [(0, 1), (1, 0)].map(|(from, to)| Flow {
                sender: pair[from].device as usize,
                target: Target::DirectUserId(pair[to].user_id),
                recipients: vec![pair[to].device],
            })
        })
        .collect();
    drive("direct", &members, flows, load, mode, echo_baseline, parameters).await
}

#[derive(Debug, Clone, Copy)]
pub struct GroupShape {
    pub groups: usize,
    pub members: usize,
    pub senders: usize,
}

/// Groups whose first members send to everyone else.
pub async fn group(
    server: Endpoint,
    shape: GroupShape,
    load: Load,
    mode: Mode,
    echo_baseline: bool,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let connector = setup::Connector::new(server)?;
    let members = setup::members(&connector, shape.groups * shape.members).await?;
    let mut flows = Vec::new();
    for (index, group) in members.chunks(shape.members).enumerate() {
        let others: Vec<u64> = group[1..].iter().map(|member| member.user_id).collect();
        let created = group[0]
            .client
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
    drive("group", &members, flows, load, mode, echo_baseline, parameters).await
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

async fn drive(
    scenario: &str,
    members: &[Member],
    flows: Vec<Flow>,
    load: Load,
    mode: Mode,
    echo_baseline: bool,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let echo = baseline(echo_baseline, members.len(), load).await?;
    let Mode::Ramp { p99_bound } = mode else {
        let outcome = traffic::run(members, flows, load).await;
        return finish(scenario, parameters, outcome, echo, "send → deliver");
    };
    let bound_ms = p99_bound.as_secs_f64() * 1000.0;
    let (mut good, mut bad): (Option<(f64, Report)>, Option<f64>) = (None, None);
    let mut steps = Vec::new();
    let mut rate = load.rate;
    for round in 0..MAX_RAMP_STEPS {
        let step = Load { rate, round, ..load };
        let outcome = traffic::run(members, flows.clone(), step).await;
        let report = finish(scenario, parameters.clone(), outcome, echo, "send → deliver")?;
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
        if held {
            good = Some((rate, report));
        } else {
            bad = Some(rate);
        }
        rate = match (&good, bad) {
            (_, None) => rate * 2.0,
            (Some((low, _)), Some(high)) if (high - low) / high < 0.1 => break,
            (Some((low, _)), Some(high)) => (low + high) / 2.0,
            (None, Some(high)) => high / 2.0,
        };
    }
    let Some((_, mut best)) = good else {
        anyhow::bail!("no rate held a p99 within {bound_ms} ms (lowest tried: {rate:.0}/s)");
    };
    best.parameters["ramp_p99_bound_ms"] = bound_ms.into();
    best.parameters["ramp_steps"] = steps.into();
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
        tokens.push(receiver.client.sync("", &[], 0).await?.sync_token);
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
                let client = sender.client.clone();
                async move {
                    (
                        id,
                        client
                            .send(
                                Target::DirectUserId(recipient_id),
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
                            .acked(id, &ack.conversation_id, ack.seq, vec![*receiver]);
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
