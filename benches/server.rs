//! Server-side micro-benchmarks: token verification, sequencing, and appending
//! to the embedded store with each durability.
//!
//! `cargo bench --bench server`. Numbers go in BENCHMARKS.md with the machine.

use confab::auth::{Claims, TokenSigner};
use confab::chat::{Admission, Append, CheckResult, Content, Outcome, Sequencer, SequencerLimits};
use confab::config::{Durability, StoreBackend, StoreConfig};
use confab::ids::{ConversationId, DeviceId, UserId};
use confab::store::embedded::EmbeddedStore;
use confab::store::{MessageRecord, Store as _};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn ids() -> (UserId, UserId, DeviceId) {
    match (UserId::new(1), UserId::new(2), DeviceId::new(3)) {
        (Some(a), Some(b), Some(d)) => (a, b, d),
        _ => unreachable!("non-zero constants"),
    }
}

fn tokens(c: &mut Criterion) {
    let (user, _, device) = ids();
    let Ok(signer) = TokenSigner::new(vec![7; 32]) else {
        return;
    };
    let token = signer.sign(Claims {
        user,
        device,
        expires_at_ms: u64::MAX,
    });
    c.bench_function("token/verify", |b| b.iter(|| signer.verify(black_box(&token), 0)));
}

/// Submit, check (nothing stored) and commit one append: the owner's in-memory work.
fn sequencing(c: &mut Criterion) {
    let (alice, bob, device) = ids();
    let conversation = ConversationId::direct(alice, bob);
    let mut sequencer: Sequencer<()> = Sequencer::new(SequencerLimits {
        max_pending: 1 << 20,
        max_cached: 1024,
        max_group_members: 1000,
    });
    let mut counter = 0u64;
    c.bench_function("sequencer/append", |b| {
        b.iter(|| {
            counter += 1;
            let append = Append {
                conversation,
                sender: alice,
                sender_device: device,
                client_msg_id: counter.to_string(),
                content: Content::Text("hello".into()),
            };
            let key = (device, append.client_msg_id.clone());
            if let Admission::Check(_) = sequencer.submit(append, ()) {
                let result = CheckResult {
                    last_seq: Some(0),
                    ..CheckResult::default()
                };
                let (outcomes, _) = sequencer.checked(conversation, result);
                for outcome in outcomes {
                    if let Outcome::Assigned(assigned) = outcome {
                        black_box(assigned.record.seq);
                    }
                }
            }
            sequencer.committed(conversation, &key);
        });
    });
}

/// Appending batches of messages to the embedded store, per durability.
fn store_append(c: &mut Criterion) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    let (alice, bob, device) = ids();
    let conversation = ConversationId::direct(alice, bob);
    let mut group = c.benchmark_group("store/append");
    for durability in [Durability::Buffered, Durability::Sync] {
        let Ok(dir) = tempfile::tempdir() else { return };
        let config = StoreConfig {
            backend: StoreBackend::Embedded,
            data_dir: dir.path().to_owned(),
            durability,
            max_batch: 4096,
        };
        let Ok(store) = EmbeddedStore::open(&config) else {
            return;
        };
        let mut seq = 0u64;
        for batch in [1usize, 100] {
            group.throughput(Throughput::Elements(batch as u64));
            let id = BenchmarkId::new(format!("{durability:?}").to_lowercase(), batch);
            group.bench_function(id, |b| {
                b.iter_batched(
                    || {
                        (0..batch)
                            .map(|_| {
                                seq += 1;
                                MessageRecord {
                                    conversation,
                                    seq,
                                    sender: alice,
                                    sender_device: device,
                                    client_msg_id: seq.to_string(),
                                    body: "x".repeat(100),
                                    server_time_ms: seq,
                                    event: None,
                                    amends: None,
                                    deleted: false,
                                    edited_by: None,
                                }
                            })
                            .collect::<Vec<_>>()
                    },
                    |messages| runtime.block_on(store.append_messages(messages)),
                    BatchSize::SmallInput,
                );
            });
        }
    }
    group.finish();
}

criterion_group!(benches, tokens, sequencing, store_append);
criterion_main!(benches);
