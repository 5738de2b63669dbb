//! The relay baseline: the physical limit of this machine for the 1:1 pattern.
//!
//! A minimal tokio server (one task per connection, no storage, no protocol
//! beyond the length prefix) forwards each frame from a connection to its
//! partner's and returns a small ack. Clients pair up like `direct`'s and send
//! on the same open-loop schedule (a steady total rate, flows staggered, latency
//! counted from the intended send time) with frames of the same size. A chat
//! figure stated against it says how much of what loopback and tokio can do
//! confab keeps.

use crate::stats::Latency;
use crate::traffic::{Load, Schedule};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use confab_proto::FrameDecoder;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A frame's kind byte: a message to forward, or the relay's ack of one.
const MESSAGE: u8 = 0;
const ACK: u8 = 1;
/// Kind and intended send time (ns since the run's start).
const HEADER_BYTES: usize = 1 + 8;
/// Frames one connection may have waiting for its writer.
const FORWARD_QUEUE: usize = 4096;

/// What one relay run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ack_latency: Latency,
    pub delivery_latency: Latency,
    pub delivered: u64,
    pub elapsed: Duration,
}

/// `pairs` pairs of connections exchanging frames of `frame_bytes` at `load`'s
/// total rate, through a relay started for the run.
pub async fn run(pairs: usize, frame_bytes: usize, load: Load) -> anyhow::Result<Outcome> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let relay = tokio::spawn(serve(listener, frame_bytes));
    // Connections are accepted in the order they connect: 2k and 2k+1 are partners.
    let mut streams = Vec::with_capacity(pairs * 2);
    for _ in 0..pairs * 2 {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    let flows = (pairs * 2).max(1);
    let per_flow = load.rate / flows as f64;
    let count = (per_flow * load.duration.as_secs_f64()).round() as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + load.duration + load.drain;
    let clients = streams.into_iter().enumerate().map(|(index, stream)| {
        let schedule = Schedule {
            start,
            first: start + Duration::from_secs_f64(index as f64 / (per_flow * flows as f64)),
            per_second: per_flow,
            count,
        };
        tokio::spawn(client(stream, schedule, frame_bytes, deadline))
    });
    let mut outcome = Outcome::default();
    for client in futures::future::join_all(clients).await {
        let (acks, deliveries, delivered) = client??;
        outcome.ack_latency.merge(&acks);
        outcome.delivery_latency.merge(&deliveries);
        outcome.delivered += delivered;
    }
    outcome.elapsed = start.elapsed();
    relay.abort();
    Ok(outcome)
}

async fn serve(listener: TcpListener, frame_bytes: usize) {
    loop {
        let (Ok((first, _)), Ok((second, _))) = (listener.accept().await, listener.accept().await) else {
            return;
        };
        let (to_first, for_first) = mpsc::channel(FORWARD_QUEUE);
        let (to_second, for_second) = mpsc::channel(FORWARD_QUEUE);
        tokio::spawn(relay_connection(first, to_second, for_first, frame_bytes));
        tokio::spawn(relay_connection(second, to_first, for_second, frame_bytes));
    }
}

/// One connection: frames read are forwarded to the partner and acked; frames
/// from the partner are written out.
async fn relay_connection(
    stream: TcpStream,
    partner: mpsc::Sender<Bytes>,
    mut incoming: mpsc::Receiver<Bytes>,
    frame_bytes: usize,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut read, mut write) = stream.into_split();
    let decoder = FrameDecoder::new(frame_bytes.max(HEADER_BYTES));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            read = read.read_buf(&mut buf) => {
                if read? == 0 {
                    return Ok(());
                }
                while let Ok(Some(payload)) = decoder.split_payload(&mut buf) {
                    let Some(intended) = payload.get(1..HEADER_BYTES) else { continue };
                    out.put_u32(HEADER_BYTES as u32);
                    out.put_u8(ACK);
                    out.put_slice(intended);
                    let mut forwarded = BytesMut::with_capacity(4 + payload.len());
                    forwarded.put_u32(payload.len() as u32);
                    forwarded.put_slice(&payload);
                    if partner.send(forwarded.freeze()).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Some(frame) = incoming.recv() => {
                out.put_slice(&frame);
                while let Ok(frame) = incoming.try_recv() {
                    out.put_slice(&frame);
                }
            }
        }
        if !out.is_empty() {
            write.write_all(&out).await?;
            out.clear();
        }
    }
}

/// Sends on schedule and times the acks and the partner's frames, until it has
/// them all or the deadline passes.
async fn client(
    stream: TcpStream,
    schedule: Schedule,
    frame_bytes: usize,
    deadline: Instant,
) -> anyhow::Result<(Latency, Latency, u64)> {
    let (mut read, mut write) = stream.into_split();
    let sender = tokio::spawn(async move {
        let padding = frame_bytes.saturating_sub(4 + HEADER_BYTES);
        let mut frame = BytesMut::with_capacity(4 + HEADER_BYTES + padding);
        for counter in 0..schedule.count {
            let (_, intended_ns) = schedule.wait_for(counter).await;
            frame.put_u32((HEADER_BYTES + padding) as u32);
            frame.put_u8(MESSAGE);
            frame.put_u64(intended_ns);
            frame.put_bytes(b'.', padding);
            write.write_all(&frame).await?;
            frame.clear();
        }
        anyhow::Ok(write)
    });
    let decoder = FrameDecoder::new(frame_bytes.max(HEADER_BYTES));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (mut acks, mut deliveries) = (Latency::default(), Latency::default());
    let (mut acked, mut delivered) = (0, 0);
    while acked < schedule.count || delivered < schedule.count {
        let Ok(read) = tokio::time::timeout_at(deadline.into(), read.read_buf(&mut buf)).await else {
            break;
        };
        if read? == 0 {
            break;
        }
        while let Ok(Some(mut payload)) = decoder.split_payload(&mut buf) {
            if payload.len() < HEADER_BYTES {
                continue;
            }
            let kind = payload.get_u8();
            let intended = schedule.start + Duration::from_nanos(payload.get_u64());
            let latency = intended.elapsed();
            if kind == ACK {
                acks.record(latency);
                acked += 1;
            } else {
                deliveries.record(latency);
                delivered += 1;
            }
        }
    }
    // Keep the write half (and so the connection) open until reading is done.
    let _write = sender.await??;
    Ok((acks, deliveries, delivered))
}
