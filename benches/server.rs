//! Server-side micro-benchmarks: token verification, sequencing, appending to
//! the embedded store with each durability, and conversation lists.
//!
//! `cargo bench --bench server`. Numbers go in BENCHMARKS.md with the machine.

use confab::auth::{Claims, TokenSigner};
use confab::chat::{Admission, CheckResult, Outcome, Sequencer, SequencerLimits};
use confab::config::{Durability, StoreBackend, StoreConfig};
use confab::store::embedded::EmbeddedStore;
use confab::store::{MessageRecord, MessageStore as _, StoredSend};
use confab_protocol::ids::{ConversationId, DeviceId, UserId};
use confab_protocol::{Append, Content};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn ids() -> (UserId, UserId, DeviceId) {
    match (UserId::new(1), UserId::new(2), DeviceId::new(3)) {
        (Some(a), Some(b), Some(d)) => (a, b, d),
        _ => unreachable!("non-zero constants"),
    }
}

fn message(
    conversation: ConversationId,
    sender: UserId,
    device: DeviceId,
    seq: u64,
    server_time_ms: u64,
) -> MessageRecord {
    MessageRecord {
        conversation,
        seq,
        sender,
        sender_device: device,
        client_msg_id: seq.to_string(),
        body: "x".repeat(100),
        server_time_ms,
        event: None,
        amends: None,
        deleted: false,
        edited_by: None,
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
        max_sent_records: 250_000,
        dedup_window_ms: u64::MAX,
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
                let (outcomes, _) = sequencer.checked(conversation, result, counter);
                for outcome in outcomes {
                    if let Outcome::Assigned(assigned) = outcome {
                        black_box(assigned.record.seq);
                    }
                }
            }
            let stored = StoredSend {
                seq: counter,
                server_time_ms: counter,
            };
            sequencer.committed(conversation, &key, stored);
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
            min_free_mib: 0,
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
                                message(conversation, alice, device, seq, seq)
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

/// Conversations of the user `conversation_list` lists, and the days they span.
const LISTED_CONVERSATIONS: u64 = 5_000;
const LISTED_DAYS: u64 = 100;

/// The first page (50) of a conversation list for a user with
/// LISTED_CONVERSATIONS conversations over LISTED_DAYS days: from the store's
/// ordered index, and by sorting every conversation. On the embedded store, and
/// on Cassandra too with `BENCH_CASSANDRA=<host:port>` (scripts/cassandra).
/// Caches are warm after the first iteration, as on a running node.
fn conversation_list(c: &mut Criterion) {
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let mut env = vec![("CONFAB_STORE__DATA_DIR".to_owned(), dir.path().display().to_string())];
    let mut backends = vec![("embedded", env.clone())];
    if let Ok(contact) = std::env::var("BENCH_CASSANDRA") {
        env.extend([
            ("CONFAB_STORE__BACKEND".to_owned(), "cassandra".to_owned()),
            (
                "CONFAB_CASSANDRA__CONTACT_POINTS".to_owned(),
                format!("[\"{contact}\"]"),
            ),
            (
                "CONFAB_CASSANDRA__KEYSPACE".to_owned(),
                format!("bench_list_{}", std::process::id()),
            ),
        ]);
        backends.push(("cassandra", env));
    }
    let (me, _, device) = ids();
    let mut group = c.benchmark_group("list/first_page");
    for (backend, env) in backends {
        let store = match confab::Config::load_from(None, env).map(|config| confab::store::open(&config)) {
            Ok(Ok(store)) => store,
            Ok(Err(err)) => return eprintln!("opening the {backend} store: {err}"),
            Err(err) => return eprintln!("{backend} config: {err}"),
        };
        let day_ms = 24 * 60 * 60 * 1000;
        let messages: Vec<MessageRecord> = (1..=LISTED_CONVERSATIONS)
            .filter_map(|n| UserId::new(1_000 + n))
            .enumerate()
            .map(|(i, other)| {
                let time = 20_000 * day_ms + (i as u64 % LISTED_DAYS) * day_ms + i as u64;
                message(ConversationId::direct(me, other), me, device, 1, time)
            })
            .collect();
        for chunk in messages.chunks(500) {
            if let Err(err) = runtime.block_on(store.append_messages(chunk.to_vec())) {
                return eprintln!("filling the {backend} store: {err}");
            }
        }
        group.bench_function(BenchmarkId::new("index", backend), |b| {
            b.iter(|| {
                runtime
                    .block_on(store.recent_conversations(me, None, 50))
                    .map(|(heads, _)| heads.len())
            })
        });
        group.bench_function(BenchmarkId::new("sort_all", backend), |b| {
            b.iter(|| {
                runtime
                    .block_on(store.conversations(me))
                    .map(|heads| confab::store::page_by_activity(heads, None, 50).0.len())
            })
        });
        let _ = runtime.block_on(store.close());
    }
    group.finish();
}

criterion_group!(benches, tokens, sequencing, store_append, conversation_list);
criterion_main!(benches);
