//! Frame codec and fan-out encoding micro-benchmarks.
//!
//! `cargo bench --bench codec`. Numbers go in BENCHMARKS.md with the machine.

use bytes::BytesMut;
use confab::chat::message_frame;
use confab::store::MessageRecord;
use confab_proto::v1::{ClientFrame, Send, client_frame};
use confab_proto::{FrameDecoder, encode_frame};
use confab_protocol::ids::{ConversationId, DeviceId, UserId};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn send_frame(body_len: usize) -> ClientFrame {
    ClientFrame {
        request_id: 42,
        kind: Some(client_frame::Kind::Send(Send {
            conversation: None,
            client_msg_id: "0123456789abcdef".into(),
            body: "x".repeat(body_len),
        })),
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for body_len in [100, 4096] {
        let frame = send_frame(body_len);
        let encoded = encode_frame(&frame);
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", body_len), &frame, |b, frame| {
            b.iter(|| encode_frame(black_box(frame)));
        });
        let decoder = FrameDecoder::new(256 * 1024);
        group.bench_with_input(BenchmarkId::new("decode", body_len), &encoded, |b, encoded| {
            b.iter(|| {
                let mut buf = BytesMut::from(&encoded[..]);
                decoder.decode::<ClientFrame>(black_box(&mut buf))
            });
        });
    }
    group.finish();
}

/// A message for N recipients: encoded once, then one refcount bump per recipient.
fn fan_out(c: &mut Criterion) {
    let (Some(alice), Some(bob), Some(device)) = (UserId::new(1), UserId::new(2), DeviceId::new(3)) else {
        return;
    };
    let record = MessageRecord {
        conversation: ConversationId::direct(alice, bob),
        seq: 7,
        sender: alice,
        sender_device: device,
        client_msg_id: "0123456789abcdef".into(),
        body: "x".repeat(200),
        server_time_ms: 1_700_000_000_000,
        event: None,
        amends: None,
        deleted: false,
        edited_by: None,
    };
    recipients_group(c, "fan_out_encode_once", |n| {
        let frame = message_frame(black_box(&record));
        (0..n).map(|_| frame.clone()).collect()
    });
    // Same-run baseline: what fan-out would cost encoding the push per recipient.
    recipients_group(c, "fan_out_encode_each", |n| {
        (0..n).map(|_| message_frame(black_box(&record))).collect()
    });
}

/// Benchmarks `frames_for(n)` for 100 and 10 000 recipients.
fn recipients_group(c: &mut Criterion, name: &str, frames_for: impl Fn(usize) -> Vec<bytes::Bytes>) {
    let mut group = c.benchmark_group(name);
    for recipients in [100usize, 10_000] {
        group.throughput(Throughput::Elements(recipients as u64));
        group.bench_with_input(BenchmarkId::from_parameter(recipients), &recipients, |b, &n| {
            b.iter(|| black_box(frames_for(n)));
        });
    }
    group.finish();
}

criterion_group!(benches, codec, fan_out);
criterion_main!(benches);
