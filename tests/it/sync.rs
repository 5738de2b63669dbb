//! Multi-device sync and recovery: Sync pages everything a device missed across its
//! conversations; a device resuming with its sync token gets exactly what it missed,
//! then live messages, with no gap and no duplicate; receipts and unread counts.

use crate::common;
use crate::common::{RawConnection, TestServer, new_user, second_device, within};
use confab_client::proto::{Message, conversation_ref::Target};
use confab_client::{Client, Event};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn group(id: &str) -> Target {
    Target::ConversationId(id.to_owned())
}

/// Checks that `messages` continue every conversation from `from` with no gap and
/// no duplicate, up to `to`; returns how many there were.
fn assert_contiguous(messages: &[Message], from: &BTreeMap<String, u64>, to: &BTreeMap<String, u64>) -> usize {
    let mut last: HashMap<&str, u64> = from.iter().map(|(id, seq)| (id.as_str(), *seq)).collect();
    for message in messages {
        let previous = last.entry(message.conversation_id.as_str()).or_insert(0);
        assert_eq!(
            message.seq,
            *previous + 1,
            "gap or duplicate in {}",
            message.conversation_id
        );
        *previous = message.seq;
    }
    for (id, seq) in to {
        assert_eq!(last.get(id.as_str()).copied().unwrap_or(0), *seq, "{id} incomplete");
    }
    messages.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_resumes_with_exactly_what_it_missed_then_live() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, alice_name) = new_user(node.addr, "resume").await;
    let (bob, bob_login, _) = new_user(node.addr, "resume").await;
    // A 50-member group (with Alice and Bob); three of the others send.
    let addr = node.addr;
    let others = futures::future::join_all((0..48).map(|_| new_user(addr, "resume"))).await;
    let mut members: Vec<confab_client::UserId> = others.iter().map(|(_, login, _)| login.user_id).collect();
    members.push(alice_login.user_id);
    let team = bob
        .create_group("team", "team", &members)
        .await
        .unwrap()
        .conversation_id;
    let direct = bob
        .send_direct(alice_login.user_id, "d0", "hello")
        .await
        .unwrap()
        .conversation_id;

    // Alice's phone syncs, then goes offline.
    let (phone, phone_login) = second_device(node.addr, &alice_name).await;
    let first = phone.sync("", &[], 0).await.unwrap();
    assert!(!first.has_more);
    let before: BTreeMap<String, u64> = first
        .conversations
        .iter()
        .map(|state| (state.conversation_id.clone(), state.last_seq))
        .collect();
    assert_eq!(before.get(&team), Some(&1));
    assert_eq!(before.get(&direct), Some(&1));
    let token = first.sync_token;
    drop(phone);

    // 500 messages while it is away, from several senders and conversations.
    let sends = others[..3].iter().enumerate().map(|(index, (client, _, _))| {
        let team = team.clone();
        async move {
            for i in 0..150 {
                client
                    .send(group(&team), &format!("g{index}-{i}"), "while away")
                    .await
                    .unwrap();
            }
        }
    });
    futures::future::join_all(sends).await;
    for i in 0..50 {
        bob.send_direct(alice_login.user_id, &format!("d{}", i + 1), "while away")
            .await
            .unwrap();
    }

    // It comes back while traffic continues.
    let live_sender = {
        let client = Client::connect(node.addr).await.unwrap();
        client
            .authenticate(&bob_login.tokens.clone().access_token)
            .await
            .unwrap();
        let team = team.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                client.send(group(&team), &format!("live-{i}"), "live").await.unwrap();
            }
            client
        })
    };
    let phone = Client::connect(node.addr).await.unwrap();
    let resumed = phone
        .authenticate_resume(&phone_login.tokens.access_token, &token, &[])
        .await
        .unwrap();
    assert!(resumed.recovered, "500 missed messages fit the replay");
    assert!(resumed.replayed >= 500);
    let live_sender = live_sender.await.unwrap();
    let final_team = live_sender.send(group(&team), "last", "last").await.unwrap().seq;
    let final_direct = 51;

    let mut received = Vec::new();
    let expected = (final_team - 1) + (final_direct - 1);
    while (received.len() as u64) < expected {
        match within(WAIT, phone.next_event()).await {
            Some(Event::Message(message)) => received.push(message),
            other => panic!("unexpected {other:?}"),
        }
    }
    let to = BTreeMap::from([(team.clone(), final_team), (direct.clone(), final_direct)]);
    assert_contiguous(&received, &before, &to);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), phone.next_message())
            .await
            .is_err(),
        "no extras"
    );
    drop(alice);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_absence_is_reported_unrecovered_and_sync_pages_the_rest() {
    let mut node = TestServer::start_with(2, &[("CONFAB_STORE__DURABILITY", "buffered")]).await;
    let (_, alice_login, alice_name) = new_user(node.addr, "away").await;
    let (bob, _, _) = new_user(node.addr, "away").await;
    let (phone, phone_login) = second_device(node.addr, &alice_name).await;
    let token = phone.sync("", &[], 0).await.unwrap().sync_token;
    drop(phone);

    let acks = common::send_pipelined(&bob, alice_login.user_id, 1500).await;
    let conversation = acks[0].conversation_id.clone();

    let phone = Client::connect(node.addr).await.unwrap();
    let resumed = phone
        .authenticate_resume(&phone_login.tokens.access_token, &token, &[])
        .await
        .unwrap();
    assert!(!resumed.recovered, "the replay limit is explicit");
    assert_eq!(resumed.replayed, 1000);
    let mut seqs = Vec::new();
    for _ in 0..resumed.replayed {
        seqs.push(within(WAIT, phone.next_message()).await.unwrap().seq);
    }
    // Sync from the token it got continues exactly where the replay stopped.
    let mut token = resumed.sync_token;
    loop {
        let page = phone.sync(&token, &[], 200).await.unwrap();
        for state in &page.conversations {
            assert_eq!(state.conversation_id, conversation);
            seqs.extend(state.messages.iter().map(|m| m.seq));
        }
        token = page.sync_token;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seqs, (1..=1500).collect::<Vec<_>>());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_reports_unread_counts_and_lists_conversations_by_activity() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, _) = new_user(node.addr, "unread").await;
    let (bob, bob_login, _) = new_user(node.addr, "unread").await;
    let (carol, carol_login, _) = new_user(node.addr, "unread").await;
    for i in 0..5 {
        bob.send_direct(alice_login.user_id, &format!("b{i}"), "from bob")
            .await
            .unwrap();
    }
    let group = carol
        .create_group("g", "carol's", &[alice_login.user_id])
        .await
        .unwrap()
        .conversation_id;
    for i in 0..3 {
        carol
            .send(group_target(&group), &format!("c{i}"), "from carol")
            .await
            .unwrap();
    }
    let with_bob = bob
        .send_direct(alice_login.user_id, "b5", "latest")
        .await
        .unwrap()
        .conversation_id;

    // Marks are monotonic and bounded by the conversation.
    assert_eq!(alice.mark_read(&with_bob, 4).await.unwrap().read_seq, 4);
    assert_eq!(
        alice.mark_read(&with_bob, 2).await.unwrap().read_seq,
        4,
        "lower marks are ignored"
    );
    assert_eq!(
        alice.mark_delivered(&with_bob, 99).await.unwrap().delivered_seq,
        6,
        "capped at the last seq"
    );
    let receipt = alice.mark_read(&group, 3).await.unwrap();
    assert_eq!(receipt.user_id, alice_login.user_id.get());

    let sync = alice.sync("", &[], 0).await.unwrap();
    let unread: HashMap<&str, (u64, u64, &str)> = sync
        .conversations
        .iter()
        .map(|state| {
            (
                state.conversation_id.as_str(),
                (state.last_seq, state.unread_count, state.title.as_str()),
            )
        })
        .collect();
    assert_eq!(unread[with_bob.as_str()], (6, 2, ""));
    let latest = sync
        .conversations
        .iter()
        .find(|state| state.conversation_id == with_bob)
        .unwrap();
    assert_eq!(latest.last_message.as_ref().map(|m| m.body.as_str()), Some("latest"));
    assert_eq!(unread[group.as_str()], (4, 1, "carol's"));

    // ListConversations pages by last activity, newest first.
    let first = alice.list_conversations("", 1).await.unwrap();
    assert_eq!(first.conversations[0].conversation_id, with_bob);
    assert_eq!(first.conversations[0].last_message.as_ref().unwrap().seq, 6);
    let second = alice.list_conversations(&first.next_page_token, 1).await.unwrap();
    assert_eq!(second.conversations[0].conversation_id, group);
    assert!(second.next_page_token.is_empty());

    // Nobody marks or syncs someone else's conversation.
    let (low, high) = (
        bob_login.user_id.min(carol_login.user_id),
        bob_login.user_id.max(carol_login.user_id),
    );
    let theirs = format!("d:{low}:{high}");
    assert_eq!(
        common::code(alice.mark_read(&theirs, 1).await),
        confab_client::proto::ErrorCode::Forbidden
    );
    let (outsider, _, _) = new_user(node.addr, "unread").await;
    assert_eq!(
        common::code(outsider.mark_read(&group, 1).await),
        confab_client::proto::ErrorCode::Forbidden
    );
    assert!(outsider.sync("", &[], 0).await.unwrap().conversations.is_empty());
    assert_eq!(
        common::code(alice.sync("s1.garbage!", &[], 0).await),
        confab_client::proto::ErrorCode::BadRequest
    );
    node.shutdown().await;
}

fn group_target(id: &str) -> Target {
    group(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_after_a_restart_returns_everything_acknowledged() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, _) = new_user(node.addr, "restart").await;
    let (bob, _, _) = new_user(node.addr, "restart").await;
    let token = alice.sync("", &[], 0).await.unwrap().sync_token;
    let mut acked = Vec::new();
    for i in 0..40 {
        acked.push(
            bob.send_direct(alice_login.user_id, &format!("r{i}"), "before restart")
                .await
                .unwrap()
                .seq,
        );
    }
    node.shutdown().await;

    let server = common::start_server(common::config(node.dir.path(), 2, &[]));
    let alice = Client::connect(common::endpoint(&server, common::transport()))
        .await
        .unwrap();
    alice.authenticate(&alice_login.tokens.access_token).await.unwrap();
    let sync = alice.sync(&token, &[], 0).await.unwrap();
    let seqs: Vec<u64> = sync.conversations[0].messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, acked);
    server.shutdown().await.unwrap();
}

/// Large messages in several conversations: Sync pages them by frame size and
/// every message still arrives exactly once across pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pages_large_messages_without_skipping_any() {
    let mut node = TestServer::start(2).await;
    let (alice, alice_login, _) = new_user(node.addr, "big").await;
    let (bob, _, _) = new_user(node.addr, "big").await;
    let (carol, _, _) = new_user(node.addr, "big").await;
    // An older conversation with a 150 kB message, a newer one with a 10 kB one:
    // both fit one 256 KiB reply only if nothing is counted twice.
    let with_carol = carol
        .send_direct(alice_login.user_id, "c", &"é".repeat(75_000))
        .await
        .unwrap();
    let with_bob = bob
        .send_direct(alice_login.user_id, "b", &"b".repeat(10_000))
        .await
        .unwrap();
    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let page = alice.sync(&token, &[], 0).await.unwrap();
        for state in &page.conversations {
            seen.extend(state.messages.iter().map(|m| (m.conversation_id.clone(), m.seq)));
        }
        token = page.sync_token;
        if !page.has_more {
            break;
        }
    }
    seen.sort();
    let mut expected = vec![(with_bob.conversation_id, 1), (with_carol.conversation_id, 1)];
    expected.sort();
    assert_eq!(seen, expected);
    node.shutdown().await;
}

/// Sends to `to` at full speed, 16 sends in flight, until `stop` is set.
fn keep_sending(
    client: Client,
    to: confab_client::UserId,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        let mut next = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let ids: Vec<String> = (next..next + 16).map(|i| format!("live-{i}")).collect();
            let sends = ids.iter().map(|id| client.send_direct(to, id, "live"));
            for ack in futures::future::join_all(sends).await {
                ack.unwrap();
            }
            next += 16;
        }
        client
    })
}

/// The independent client's finding: a device resuming while two peers send
/// into its conversations at full speed got messages of the replay again as
/// live pushes (delivered late through a busy mesh channel, after the hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_under_live_traffic_never_repeats_or_skips_a_message() {
    // The default (sync) durability: a message is visible to the replay's read
    // while its commit waits for the fsync, so its fan-out comes late. A hold
    // and a replay large enough that every round recovers.
    let mut node = TestServer::start_with(
        2,
        &[
            ("CONFAB_PROTOCOL__OUTBOUND_QUEUE_FRAMES", "16384"),
            ("CONFAB_PROTOCOL__MAX_REPLAY_MESSAGES", "10000"),
        ],
    )
    .await;
    let (_, alice_login, alice_name) = new_user(node.addr, "seam").await;
    let (bob, _, _) = new_user(node.addr, "seam").await;
    let (carol, _, _) = new_user(node.addr, "seam").await;
    let (phone, phone_login) = second_device(node.addr, &alice_name).await;
    drop(phone);
    let access = phone_login.tokens.access_token;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = [bob, carol].map(|client| keep_sending(client, alice_login.user_id, stop.clone()));

    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for round in 0..20 {
        let phone = Client::connect(node.addr).await.unwrap();
        let cursors: Vec<(String, u64)> = last.iter().map(|(id, seq)| (id.clone(), *seq)).collect();
        let resumed = phone.authenticate_resume(&access, "", &cursors).await.unwrap();
        assert!(
            resumed.recovered,
            "round {round}: the hold and replay were sized to recover"
        );
        // The replay, then live pushes: each conversation continues where the
        // device was, one seq at a time.
        for _ in 0..resumed.replayed as usize + 300 {
            let message = within(WAIT, phone.next_message()).await.unwrap();
            let previous = last.entry(message.conversation_id.clone()).or_insert(0);
            assert_eq!(
                message.seq,
                *previous + 1,
                "round {round}: gap or duplicate in {} (replayed {})",
                message.conversation_id,
                resumed.replayed
            );
            *previous = message.seq;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap();
    }
    node.shutdown().await;
}

/// A phone that resumes and then does not read for a moment while its peer
/// keeps sending: the replay leaves its queue nearly full, and the pushes that
/// arrive before the phone reads again must wait behind the replay, not close
/// the session that has just caught up as a slow consumer (seen under load: the
/// session went live with 1 000 of its 1 024 frames queued and was closed by
/// the next commit's pushes before its writer had run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_device_that_reads_late_keeps_its_session() {
    use confab_client::proto::server_frame;
    // A replay nearly as long as the queue, of frames too large for the socket
    // buffers to take more than a few of while the phone does not read.
    let mut node = TestServer::start_with(
        1,
        &[
            ("CONFAB_STORE__DURABILITY", "buffered"),
            ("CONFAB_PROTOCOL__OUTBOUND_QUEUE_FRAMES", "20"),
            ("CONFAB_PROTOCOL__OUTBOUND_QUEUE_BYTES", "134217728"),
            ("CONFAB_PROTOCOL__OUTBOUND_REPLY_BYTES", "67108864"),
            ("CONFAB_PROTOCOL__MAX_IN_FLIGHT_REQUESTS", "4"),
            ("CONFAB_PROTOCOL__MAX_REPLAY_MESSAGES", "16"),
            ("CONFAB_PROTOCOL__MAX_FRAME_BYTES", "2097152"),
            ("CONFAB_CHAT__MAX_BODY_CHARS", "1000000"),
        ],
    )
    .await;
    let (_, alice_login, alice_name) = new_user(node.addr, "late").await;
    let (bob, _, _) = new_user(node.addr, "late").await;
    let (phone, phone_login) = second_device(node.addr, &alice_name).await;
    drop(phone);
    let large = "x".repeat(1_000_000);
    for i in 0..16 {
        bob.send_direct(alice_login.user_id, &format!("large-{i}"), &large)
            .await
            .unwrap();
    }

    let mut phone = RawConnection::resuming(node.tcp, phone_login.tokens.access_token).await;
    // The replay is queued once its first bytes arrive; the phone reads none
    // of it while twelve more messages are committed.
    phone.readable().await;
    for i in 0..12 {
        bob.send_direct(alice_login.user_id, &format!("live-{i}"), "live")
            .await
            .unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 28 {
        let frame = phone.recv().await.expect("the session must stay open");
        match frame.kind {
            Some(server_frame::Kind::Message(message)) => seqs.push(message.seq),
            Some(server_frame::Kind::Authenticated(reply)) => {
                assert_eq!((reply.replayed, reply.recovered, seqs.len()), (16, true, 16));
            }
            other => panic!("after {} messages: {other:?}", seqs.len()),
        }
    }
    assert_eq!(seqs, (1..=28).collect::<Vec<_>>());
    node.shutdown().await;
}

/// A device that missed more than the replay limit resumes while a peer keeps
/// sending: it gets an answer (`recovered = false`), never a bare close, and
/// replay, live pushes and a Sync from its token add up to every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_past_the_replay_limit_under_live_traffic_is_answered() {
    let mut node = TestServer::start_with(2, &[("CONFAB_STORE__DURABILITY", "buffered")]).await;
    let (_, alice_login, alice_name) = new_user(node.addr, "busy").await;
    let (bob, _, _) = new_user(node.addr, "busy").await;
    let (phone, phone_login) = second_device(node.addr, &alice_name).await;
    drop(phone);
    let access = phone_login.tokens.access_token;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = keep_sending(bob, alice_login.user_id, stop.clone());

    for attempt in 0..5 {
        // Far more than the default replay limit (1 000) arrives meanwhile.
        let target = (attempt + 1) * 1500;
        let probe = Client::connect(node.addr).await.unwrap();
        probe.authenticate(&access).await.unwrap();
        loop {
            let state = probe.sync("", &[], 1).await.unwrap();
            if state.conversations.first().is_some_and(|c| c.last_seq >= target) {
                break;
            }
        }
        drop(probe);
        let phone = Client::connect(node.addr).await.unwrap();
        let resumed = within(WAIT, phone.authenticate_resume(&access, "", &[]))
            .await
            .unwrap_or_else(|err| panic!("attempt {attempt}: resume not answered: {err}"));
        assert!(!resumed.recovered, "attempt {attempt}: more than the limit was missed");
        // What was pushed (replay, then live) never repeats or goes back.
        let mut pushed = Vec::new();
        for _ in 0..resumed.replayed as usize + 200 {
            pushed.push(within(WAIT, phone.next_message()).await.unwrap().seq);
        }
        assert!(
            pushed.windows(2).all(|pair| pair[0] < pair[1]),
            "attempt {attempt}: {pushed:?}"
        );
        assert_eq!(
            pushed[..resumed.replayed as usize],
            (1..=u64::from(resumed.replayed)).collect::<Vec<_>>()
        );
        // Sync from the token fills what was not pushed.
        let mut token = resumed.sync_token;
        let mut synced = Vec::new();
        loop {
            let page = phone.sync(&token, &[], 0).await.unwrap();
            synced.extend(page.conversations.iter().flat_map(|c| c.messages.iter().map(|m| m.seq)));
            token = page.sync_token;
            if !page.has_more {
                break;
            }
        }
        let mut all: Vec<u64> = pushed.iter().chain(&synced).copied().collect();
        all.sort_unstable();
        all.dedup();
        let upto = *all.last().unwrap();
        assert_eq!(
            all,
            (1..=upto).collect::<Vec<_>>(),
            "attempt {attempt}: a message is missing"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.unwrap();
    node.shutdown().await;
}

/// A resume waits for the device to read its replay. A device logged out
/// meanwhile used to get the rest of the replay and `Authenticated` anyway (the
/// resume did not look for kicks until it was done); now it is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_logged_out_while_it_resumes_gets_no_more_of_its_replay() {
    use confab_client::proto::server_frame;
    const MESSAGES: usize = 300;
    let mut node = TestServer::start_with(1, &[("CONFAB_STORE__DURABILITY", "buffered")]).await;
    let tcp = confab_client::Endpoint::tcp(node.tcp);
    let (laptop, alice_login, alice_name) = new_user(tcp, "cut").await;
    let (bob, _, _) = new_user(tcp, "cut").await;
    let (phone, phone_login) = second_device(tcp, &alice_name).await;
    drop(phone);
    // 18 MB: more than socket buffers and the outbound queue hold.
    let body = "x".repeat(60_000);
    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("c{i}")).collect();
    let sends = ids.iter().map(|id| bob.send_direct(alice_login.user_id, id, &body));
    for ack in futures::future::join_all(sends).await {
        ack.unwrap();
    }

    let mut phone = RawConnection::resuming(node.tcp, phone_login.tokens.access_token).await;
    phone.readable().await;
    laptop.revoke_device(phone_login.device_id).await.unwrap();

    let mut replayed = 0;
    while let Some(frame) = phone.recv().await {
        match frame.kind {
            Some(server_frame::Kind::Message(_)) => replayed += 1,
            Some(server_frame::Kind::Error(_)) => {}
            other => panic!("after {replayed} messages: {other:?}"),
        }
    }
    assert!(replayed < MESSAGES, "the logged-out device got its whole replay");
    node.shutdown().await;
}
