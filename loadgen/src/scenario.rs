//! The message scenarios: who talks to whom. Traffic, checking and timing are the
//! shared [`crate::traffic`] runner's.

use crate::check::Device;
use crate::echo;
use crate::setup::{self, Member};
use crate::stats::{self, Report};
use crate::traffic::{self, Flow, Load, Outcome};
use anyhow::Context as _;
use confab_client::proto::conversation_ref::Target;
use std::net::SocketAddr;

/// Bytes a Send frame adds to its body (prefix, ids, field tags), for the echo
/// baseline's frame size.
pub const FRAME_OVERHEAD_BYTES: usize = 32;

/// Pairs of users, each sending to the other.
pub async fn direct(
    server: SocketAddr,
    pairs: usize,
    load: Load,
    echo_baseline: bool,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let members = setup::members(server, pairs * 2).await?;
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
    let outcome = traffic::run(&members, flows, load).await;
    finish(
        "direct",
        parameters,
        outcome,
        baseline(echo_baseline, members.len(), load).await?,
    )
}

#[derive(Debug, Clone, Copy)]
pub struct GroupShape {
    pub groups: usize,
    pub members: usize,
    pub senders: usize,
}

/// Groups whose first members send to everyone else.
pub async fn group(
    server: SocketAddr,
    shape: GroupShape,
    load: Load,
    echo_baseline: bool,
    parameters: serde_json::Value,
) -> anyhow::Result<Report> {
    let members = setup::members(server, shape.groups * shape.members).await?;
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
    let outcome = traffic::run(&members, flows, load).await;
    finish(
        "group",
        parameters,
        outcome,
        baseline(echo_baseline, members.len(), load).await?,
    )
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
        echo_baseline_per_second: echo,
        violations: stats::describe(&outcome.checker.finish()),
    })
}
