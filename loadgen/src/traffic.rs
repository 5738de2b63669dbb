//! The open-loop traffic runner shared by the message scenarios.
//!
//! Each flow sends at its share of the target rate on a fixed schedule, whatever
//! the server does (open loop): a send is started at its intended time even if
//! earlier ones are still unanswered, and latency counts from the intended time,
//! so a stall shows up in the percentiles instead of silently slowing the load
//! (no coordinated omission). The flows' schedules are staggered evenly over one
//! interval, so together they send at a steady total rate rather than in bursts
//! of one message per flow. Every delivery goes through the checker.

use crate::check::{Checker, Device, MessageId};
use crate::payload;
use crate::setup::Member;
use crate::stats::Latency;
use confab_client::Event;
use confab_client::proto::Message;
use confab_client::proto::conversation_ref::Target;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One sender and where it sends.
#[derive(Debug, Clone)]
pub struct Flow {
    pub sender: usize,
    pub target: Target,
    /// Devices that must receive every message of this flow.
    pub recipients: Vec<Device>,
}

#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Messages per second, over all flows.
    pub rate: f64,
    pub duration: Duration,
    pub body_bytes: usize,
    /// How long to wait for outstanding deliveries after the last send.
    pub drain: Duration,
    /// Distinguishes the message ids of successive runs on the same connections
    /// (a repeated id would be an idempotent retry, not a new message).
    pub round: u32,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub checker: Checker,
    pub ack_latency: Latency,
    pub delivery_latency: Latency,
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    /// Deliveries the acknowledged messages owe (recipients summed).
    pub expected_deliveries: u64,
    /// From the first intended send to the last delivery (or the drain timeout).
    pub elapsed: Duration,
}

type Shared = Arc<Mutex<Outcome>>;

/// Deliveries per chunk of a receiver's log: chunks are never copied, and their
/// pages are touched as they fill, not all at the start of a run. Receivers of
/// one group get the same messages in lockstep, so each starts with a first
/// chunk of its own size: their chunks fill at different moments, and fresh
/// memory (slow to fault in on a VM) is taken a little at a time, not by every
/// receiver in the same millisecond (which stalled the load generator for
/// ~100 ms every 1.6 s with 4096-entry chunks).
const LOG_CHUNK: usize = 1024;
/// Pushed events a receiver takes from its connection at once.
const EVENT_BATCH: usize = 256;

/// What one receiver saw, kept locally (no lock per delivery) and handed to the
/// checker at the end, in arrival order. Compact, because it grows by every
/// delivery of the run (millions): conversation ids are kept once each and the
/// log names them by index, in chunks of [`LOG_CHUNK`] (a per-delivery `String`
/// in one growing `Vec` made the load generator, not the server, the limit of
/// `group` runs).
#[derive(Debug, Default)]
struct Received {
    device: Device,
    latency: Latency,
    conversations: Vec<String>,
    log: Vec<Vec<(u32, u64, MessageId)>>,
}

impl Received {
    fn record(&mut self, conversation: String, seq: u64, id: MessageId) {
        let index = match self.conversations.iter().position(|known| *known == conversation) {
            Some(index) => index,
            None => {
                self.conversations.push(conversation);
                self.conversations.len() - 1
            }
        };
        if self.log.last().is_none_or(|chunk| chunk.len() == chunk.capacity()) {
            let size = if self.log.is_empty() {
                1 + (self.device as usize).wrapping_mul(7919) % LOG_CHUNK
            } else {
                LOG_CHUNK
            };
            self.log.push(Vec::with_capacity(size));
        }
        if let Some(chunk) = self.log.last_mut() {
            // A receiver is in a handful of conversations, far below u32::MAX.
            chunk.push((index as u32, seq, id));
        }
    }

    /// Every delivery, in arrival order.
    fn deliveries(&self) -> impl Iterator<Item = (&str, u64, MessageId)> {
        self.log
            .iter()
            .flatten()
            .map(|&(conversation, seq, id)| (self.conversations[conversation as usize].as_str(), seq, id))
    }
}

pub async fn run(members: &[Member], flows: Vec<Flow>, load: Load) -> Outcome {
    let shared: Shared = Arc::default();
    let delivered = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = watch::channel(false);
    // Give every task time to be scheduled before the first intended send.
    let start = Instant::now() + Duration::from_millis(50);
    let receivers: Vec<_> = members
        .iter()
        .map(|member| tokio::spawn(receive(member.clone(), start, delivered.clone(), stopped.clone())))
        .collect();

    let progress = progress_line(shared.clone(), delivered.clone(), start, load.duration);
    let per_flow = load.rate / flows.len().max(1) as f64;
    let count = (per_flow * load.duration.as_secs_f64()).round() as u64;
    if let Ok(mut outcome) = shared.lock() {
        for flow in &flows {
            outcome.checker.reserve(members[flow.sender].device, count as usize);
        }
    }
    let stagger = 1.0 / (per_flow * flows.len().max(1) as f64);
    let senders: Vec<_> = flows
        .into_iter()
        .enumerate()
        .map(|(index, flow)| {
            let member = members[flow.sender].clone();
            let schedule = Schedule {
                start,
                first: start + Duration::from_secs_f64(index as f64 * stagger),
                per_second: per_flow,
                count,
            };
            tokio::spawn(send(member, flow, schedule, load, shared.clone()))
        })
        .collect();
    for sender in senders {
        let _ = sender.await;
    }

    progress.finish_and_clear();
    let deadline = Instant::now() + load.drain;
    loop {
        let expected = shared.lock().map_or(0, |outcome| outcome.expected_deliveries);
        if delivered.load(Ordering::Relaxed) >= expected || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    let _ = stop.send(true);
    let mut outcome = std::mem::take(&mut *shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for receiver in receivers {
        let Ok(received) = receiver.await else { continue };
        outcome.delivery_latency.merge(&received.latency);
        for (conversation, seq, id) in received.deliveries() {
            outcome.checker.delivered(received.device, conversation, seq, id);
        }
    }
    outcome.elapsed = elapsed;
    outcome
}

/// When one flow sends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    /// The run's start: intended times travel in the payload relative to it.
    pub(crate) start: Instant,
    /// This flow's first intended send.
    pub(crate) first: Instant,
    pub(crate) per_second: f64,
    pub(crate) count: u64,
}

impl Schedule {
    /// Waits for the intended time of send number `counter`; returns it, and
    /// it in nanoseconds since the run's start (what a payload carries).
    pub(crate) async fn wait_for(&self, counter: u64) -> (Instant, u64) {
        let intended = self.first + Duration::from_secs_f64(counter as f64 / self.per_second);
        tokio::time::sleep_until(intended.into()).await;
        let since_start = u64::try_from((intended - self.start).as_nanos()).unwrap_or(u64::MAX);
        (intended, since_start)
    }
}

/// Sends a flow's messages on schedule, then waits for the last acks.
async fn send(member: Member, flow: Flow, schedule: Schedule, load: Load, shared: Shared) {
    // Sends in flight, each its own task; finished ones are reaped as the flow
    // goes, so their memory is reused instead of piling up until the end.
    let mut pending = tokio::task::JoinSet::new();
    let recipients: Arc<[Device]> = flow.recipients.into();
    for counter in 0..schedule.count {
        let (intended, intended_ns) = schedule.wait_for(counter).await;
        while pending.try_join_next().is_some() {}
        let id = MessageId {
            sender: member.device,
            counter,
        };
        let body = payload::encode(id, intended_ns, load.body_bytes);
        let line = member.line.clone();
        let target = flow.target.clone();
        let shared = shared.clone();
        let recipients = recipients.clone();
        pending.spawn(async move {
            let client_msg_id = format!("{}-{}-{counter}", load.round, id.sender);
            let result = line.send(target, &client_msg_id, &body).await;
            let latency = intended.elapsed();
            let Ok(mut outcome) = shared.lock() else { return };
            outcome.sent += 1;
            match result {
                Ok(ack) => {
                    outcome.acked += 1;
                    outcome.expected_deliveries += recipients.len() as u64;
                    outcome.ack_latency.record(latency);
                    outcome.checker.acked(id, &ack.conversation_id, ack.seq, recipients);
                }
                Err(_) => outcome.errors += 1,
            }
        });
    }
    while pending.join_next().await.is_some() {}
}

/// Records every loadgen message a member receives until stopped. When its
/// connection closes in a run over several servers, moves the member's line
/// to the next one (see [`crate::line`]) and goes on there.
async fn receive(
    member: Member,
    start: Instant,
    delivered: Arc<AtomicU64>,
    mut stopped: watch::Receiver<bool>,
) -> Received {
    let mut received = Received {
        device: member.device,
        ..Received::default()
    };
    let mut cursors = member.line.cursors();
    let mut events = Vec::with_capacity(EVENT_BATCH);
    let mut client = member.client();
    loop {
        let got = tokio::select! {
            got = client.next_events(&mut events, EVENT_BATCH) => got,
            _ = stopped.changed() => break,
        };
        // Every event of a batch was waiting when it was taken: one clock read
        // and one shared count for all of them.
        let now = start.elapsed();
        let mut closed = got == 0;
        let messages = events.drain(..).filter_map(|event| match event {
            Event::Message(message) => Some(message),
            Event::Closed(_) => {
                closed = true;
                None
            }
            _ => None,
        });
        let taken = take(&mut received, &mut cursors, messages, now);
        delivered.fetch_add(taken, Ordering::Relaxed);
        if !closed {
            continue;
        }
        if !member.line.moves() {
            break;
        }
        match member.line.move_on(&cursors).await {
            Ok(synced) => {
                let taken = take(&mut received, &mut cursors, synced, start.elapsed());
                delivered.fetch_add(taken, Ordering::Relaxed);
                client = member.client();
            }
            Err(err) => {
                eprintln!("device {}: no server took it back: {err}", member.device);
                break;
            }
        }
    }
    member.line.keep_cursors(&cursors);
    received
}

/// Records the loadgen messages among `messages` (but the member's own, which
/// a resume replays) and moves the cursors past every message; returns how
/// many were recorded.
fn take(
    received: &mut Received,
    cursors: &mut HashMap<String, u64>,
    messages: impl IntoIterator<Item = Message>,
    now: Duration,
) -> u64 {
    let mut taken = 0;
    for message in messages {
        match cursors.get_mut(&message.conversation_id) {
            Some(cursor) => *cursor = (*cursor).max(message.seq),
            None => {
                cursors.insert(message.conversation_id.clone(), message.seq);
            }
        }
        let Some((id, intended_ns)) = payload::decode(&message.body) else {
            continue;
        };
        if id.sender == received.device {
            continue;
        }
        received
            .latency
            .record(now.saturating_sub(Duration::from_nanos(intended_ns)));
        received.record(message.conversation_id, message.seq, id);
        taken += 1;
    }
    taken
}

/// A live line on stderr (only when it is a terminal): elapsed, ack rate, p99 of
/// acks so far, deliveries, errors.
fn progress_line(
    shared: Shared,
    delivered: Arc<AtomicU64>,
    start: Instant,
    duration: Duration,
) -> indicatif::ProgressBar {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let ticker = bar.clone();
    tokio::spawn(async move {
        while !ticker.is_finished() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Ok(outcome) = shared.lock() else { return };
            let elapsed = start.elapsed().as_secs_f64().max(0.001);
            ticker.set_message(format!(
                "{elapsed:>5.1}/{:.0} s  {:>8.0} acked/s  ack p99 {:>8.3} ms  {} delivered  errors {}",
                duration.as_secs_f64(),
                outcome.acked as f64 / elapsed,
                outcome.ack_latency.summary().p99_ms,
                delivered.load(Ordering::Relaxed),
                outcome.errors
            ));
            ticker.tick();
        }
    });
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receivers_log_keeps_every_delivery_in_order_across_chunks() {
        let mut received = Received {
            device: 3,
            ..Received::default()
        };
        let count = 3 * LOG_CHUNK as u64;
        for seq in 1..=count {
            let conversation = if seq % 2 == 0 { "g:1" } else { "d:1:2" };
            received.record(
                conversation.into(),
                seq,
                MessageId {
                    sender: 1,
                    counter: seq,
                },
            );
        }
        assert_eq!(received.conversations.len(), 2);
        assert!(received.log.len() > 3, "chunks: {}", received.log.len());
        let logged: Vec<(String, u64, u64)> = received
            .deliveries()
            .map(|(conversation, seq, id)| (conversation.to_owned(), seq, id.counter))
            .collect();
        let expected: Vec<(String, u64, u64)> = (1..=count)
            .map(|seq| (if seq % 2 == 0 { "g:1" } else { "d:1:2" }.to_owned(), seq, seq))
            .collect();
        assert_eq!(logged, expected);
    }
}
