//! Faults from outside: a flood of connections up to the open-files limit, a full
//! disk. The store must refuse what it cannot make durable with a clear,
//! retryable error, never acknowledge it, and work again once the fault passes,
//! without a restart. Each test runs the real binary (its own process limits,
//! its own data dir).

use crate::common;
use crate::common::{BinaryNode, RawConnection, new_user, within};
use confab_client::proto::{ErrorCode, server_frame};
use std::time::Duration;

/// Idle connections (no account needed) used to fill the open-files limit, after
/// which the store failed with EMFILE and refused every write until a restart.
/// Now the connection limit keeps descriptors for the store: connections beyond
/// it are refused, and chat goes on during and after the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_cannot_starve_the_store() {
    let dir = tempfile::tempdir().unwrap();
    // 1 024 descriptors with 512 kept: room for about 500 connections.
    let node = BinaryNode::start(
        dir.path(),
        &[
            ("CONFAB_LIMITS__EXEMPT_LOOPBACK", "true"),
            ("CONFAB_STORE__DURABILITY", "buffered"),
        ],
        Some(1024),
    );
    let addr = confab_client::Endpoint::tcp(node.addr);
    let (alice, _, _) = new_user(addr, "flood").await;
    let (bob, bob_login, _) = new_user(addr, "flood").await;

    let flood = futures::future::join_all((0..1200).map(|_| tokio::net::TcpStream::connect(node.addr))).await;
    let mut flood: Vec<RawConnection> = flood
        .into_iter()
        .map(|stream| RawConnection::from_stream(stream.unwrap()))
        .collect();
    // Those beyond the limit are told so at once and closed; the rest wait idle.
    let refused = futures::future::join_all(flood.iter_mut().map(|connection| async move {
        matches!(
            tokio::time::timeout(Duration::from_secs(3), connection.recv()).await,
            Ok(Some(frame)) if matches!(&frame.kind, Some(server_frame::Kind::Error(e)) if e.code == ErrorCode::Unavailable as i32)
        )
    }))
    .await;
    let refused = refused.into_iter().filter(|refused| *refused).count();
    assert!((600..=800).contains(&refused), "{refused} of 1 200 refused");

    // Meanwhile, the store writes and reads.
    let acks = common::send_pipelined(&alice, bob_login.user_id, 500).await;
    let history = bob.full_history(&acks[0].conversation_id).await.unwrap();
    assert_eq!(history.len(), 500);
    drop(flood);
    // And after it, new users sign up and chat.
    within(Duration::from_secs(20), async {
        loop {
            let client = confab_client::Client::connect(addr).await;
            if let Ok(client) = client
                && client
                    .sign_up(&common::unique_name("after"), common::PASSWORD)
                    .await
                    .is_ok()
            {
                return;
            }
        }
    })
    .await;
    common::server_still_serves(addr).await;
}

/// A small file system of the test's own (tmpfs), unmounted when dropped. `None`
/// where the test may not mount one (not root).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk to the last byte with a file, then frees `leave_mib` of it.
    fn fill(&self, leave_mib: u64) {
        use std::io::Write as _;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(28) => break,
                Err(err) => panic!("filling the disk: {err}"),
            }
        }
        drop(file);
        let size = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(size.saturating_sub(leave_mib * 1024 * 1024)).unwrap();
    }

    fn free_all(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Sends `id` until the store takes it (polling with a deadline); returns its seq.
async fn send_until_taken(client: &confab_client::Client, to: confab_client::UserId, id: &str) -> u64 {
    within(Duration::from_secs(30), async {
        loop {
            match client.send_direct(to, id, "after the disk was freed").await {
                Ok(ack) => return ack.seq,
                Err(err) => assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Every message of the conversation is one of `acked`'s seqs or a later one,
/// with no gap, and every acknowledged one is there with its id.
async fn assert_history_holds(client: &confab_client::Client, conversation: &str, acked: &[(u64, String)]) {
    let history = client.full_history(conversation).await.unwrap();
    let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=history.len() as u64).collect::<Vec<_>>(), "gap-free");
    for (seq, id) in acked {
        assert_eq!(
            &history[(*seq - 1) as usize].client_msg_id,
            id,
            "acknowledged seq {seq}"
        );
    }
}

/// SIGTERM; the node must exit 0.
async fn stop_cleanly(mut node: BinaryNode) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = within(Duration::from_secs(20), async {
        loop {
            if let Some(status) = node.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(exit.success(), "a graceful stop exits 0, was {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_refuses_writes_as_unavailable_until_space_is_freed() {
    let Some(disk) = SmallDisk::mount(64) else { return };
    let env = [
        ("CONFAB_STORE__MIN_FREE_MIB", "16"),
        ("CONFAB_METRICS__LISTEN", "127.0.0.1:0"),
    ];
    let node = BinaryNode::start(&disk.path().join("data"), &env, None);
    let addr = confab_client::Endpoint::tcp(node.addr);
    let ops = node.metrics.unwrap();
    assert_eq!(common::http_get(ops, "/readyz").await.1, "ready\n");
    let (alice, _, _) = new_user(addr, "full").await;
    let (bob, bob_login, _) = new_user(addr, "full").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let id = format!("before-{i}");
        acked.push((
            alice.send_direct(bob_login.user_id, &id, "before").await.unwrap().seq,
            id,
        ));
    }
    let conversation = alice.send_direct(bob_login.user_id, "before-20", "x").await.unwrap();
    acked.push((conversation.seq, "before-20".into()));

    disk.fill(4);
    let refused = alice
        .send_direct(bob_login.user_id, "during", "refused")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Unavailable), "{refused}");
    assert!(refused.to_string().contains("storage is full"), "{refused}");
    let sign_up = confab_client::Client::connect(addr).await.unwrap();
    let refused = sign_up
        .sign_up(&common::unique_name("full"), common::PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Unavailable), "{refused}");
    // Reads go on; the node says it is not ready, and why.
    assert_history_holds(&bob, &conversation.conversation_id, &acked).await;
    // (A probe's answer stands for a second: poll.)
    let (status, reason) = readyz_until(ops, false).await;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(reason.contains("storage is full"), "{reason}");

    disk.free_all();
    let seq = send_until_taken(&alice, bob_login.user_id, "during").await;
    acked.push((seq, "during".into()));
    assert_history_holds(&bob, &conversation.conversation_id, &acked).await;
    // Taking writes again: ready again.
    assert_eq!(readyz_until(ops, true).await.1, "ready\n");
    stop_cleanly(node).await;
}

/// `/readyz` once it says ready (or not), within a deadline.
async fn readyz_until(ops: std::net::SocketAddr, ready: bool) -> (String, String) {
    within(Duration::from_secs(10), async {
        loop {
            let (status, body) = common::http_get(ops, "/readyz").await;
            if status.contains(" 200 ") == ready {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// With the free-space check off, the disk fills under fjall itself: its journal
/// write fails and it refuses every later write. That used to last until a
/// restart; now the store reopens itself once space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_on_a_full_disk_passes_without_a_restart() {
    let Some(disk) = SmallDisk::mount(64) else { return };
    let node = BinaryNode::start(&disk.path().join("data"), &[("CONFAB_STORE__MIN_FREE_MIB", "0")], None);
    let addr = confab_client::Endpoint::tcp(node.addr);
    let (alice, _, _) = new_user(addr, "enospc").await;
    let (bob, bob_login, _) = new_user(addr, "enospc").await;
    let first = alice.send_direct(bob_login.user_id, "before", "before").await.unwrap();
    let mut acked = vec![(first.seq, "before".to_owned())];

    disk.fill(0);
    // Sends are refused, retryably, never acknowledged unstored. (A few small
    // batches may still fit in a block the journal already had.)
    let mut refused = None;
    for i in 0..200 {
        let id = format!("full-{i}");
        match alice.send_direct(bob_login.user_id, &id, &"x".repeat(4000)).await {
            Ok(ack) => acked.push((ack.seq, id)),
            Err(err) => {
                assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
                refused = Some(id);
                break;
            }
        }
    }
    let refused = refused.expect("a full disk refuses writes");

    disk.free_all();
    // The retry of the refused send is stored once (or found stored, if its
    // batch reached the journal before the failure).
    let seq = send_until_taken(&alice, bob_login.user_id, &refused).await;
    acked.push((seq, refused));
    let next = alice.send_direct(bob_login.user_id, "after", "after").await.unwrap();
    acked.push((next.seq, "after".into()));
    assert_history_holds(&bob, &first.conversation_id, &acked).await;
    let (_carol, _, _) = new_user(addr, "enospc").await;
    stop_cleanly(node).await;
}

/// A transparent huge page is zeroed whole (2 MiB) by the first touch, on the
/// thread that touched it: shards and the store writer stalled for tens of ms
/// that way under load. The node opts out for its whole process.
#[test]
fn the_node_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let node = BinaryNode::start(dir.path(), &[], None);
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.child.id())).unwrap();
    let line = status.lines().find(|line| line.starts_with("THP_enabled:"));
    // Older kernels do not report it (the prctl itself dates from 3.15).
    if let Some(line) = line {
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
}

/// A node that cannot start says why once, and exits non-zero: the reason is
/// the chain of causes, not each cause repeated inside the next.
#[test]
fn a_node_that_cannot_start_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("serve")
        .env("CONFAB_SERVER__LISTEN", "127.0.0.1:0")
        .env("CONFAB_WEBSOCKET__ENABLED", "false")
        .env("CONFAB_QUIC__ENABLED", "false")
        .env("CONFAB_STORE__DATA_DIR", dir.path())
        .env("CONFAB_AUTH__TOKEN_KEY", "not base64!")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = "auth.token_key is not valid base64";
    assert!(
        stderr.contains("loading the token signing key: auth.token_key"),
        "{stderr}"
    );
    assert_eq!(stderr.matches(reason).count(), 1, "{stderr}");
}
