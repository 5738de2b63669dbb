//! Push notifications for users with no connection (docs/PUSH.md), against a
//! webhook receiver in the test that records each call and answers as told.

use crate::common::*;
use confab_client::proto::PushPlatform;
use confab_client::{Client, Event, UserId};
use hmac::{Hmac, Mac as _};
use serde_json::Value;
use sha2::Sha256;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SECRET: &str = "the push service's shared secret, 32+";
const WAIT: Duration = Duration::from_secs(10);

/// How the receiver answers a call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Answer {
    Status(u16),
    /// Never answers (the server's push.timeout ends the call).
    Hang,
}

/// A webhook receiver: the calls it got (answered 2xx or not), in order.
pub(crate) struct Receiver {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

#[derive(Debug, Clone)]
struct Call {
    timestamp: String,
    signature: String,
    body: String,
    answered: u16,
}

impl Call {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

impl Receiver {
    /// Answers 200 unless told otherwise by `answers` (taken one per call).
    pub(crate) async fn start(answers: &[Answer]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/push", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(answers.iter().copied().collect::<VecDeque<_>>()));
        let (recorded, scripted) = (calls.clone(), answers.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (recorded, scripted) = (recorded.clone(), scripted.clone());
                tokio::spawn(async move {
                    let Some((head, body)) = read_request(&mut stream).await else {
                        return;
                    };
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|line| {
                                let (key, value) = line.split_once(':')?;
                                key.eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
                            })
                            .unwrap_or_default()
                    };
                    let answer = scripted.lock().unwrap().pop_front().unwrap_or(Answer::Status(200));
                    let status = match answer {
                        Answer::Status(status) => status,
                        Answer::Hang => 0,
                    };
                    recorded.lock().unwrap().push(Call {
                        timestamp: header("x-confab-timestamp"),
                        signature: header("x-confab-signature"),
                        body,
                        answered: status,
                    });
                    if status == 0 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let response = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Self { url, calls }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls answered 2xx.
    fn taken(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|call| (200..300).contains(&call.answered))
            .collect()
    }

    /// The notifications for `user` in calls answered 2xx, once there are `count`.
    pub(crate) async fn until_notified(&self, user: UserId, count: usize) -> Vec<Value> {
        within(WAIT, async {
            loop {
                let notified = self.notifications_for(user, &self.taken());
                if notified.len() >= count {
                    return notified;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    fn notifications_for(&self, user: UserId, calls: &[Call]) -> Vec<Value> {
        calls
            .iter()
            .flat_map(|call| call.json()["notifications"].as_array().cloned().unwrap_or_default())
            .filter(|notification| notification["user_id"] == user.get())
            .collect()
    }

    /// The calls with a notification for `user`.
    fn calls_for(&self, user: UserId) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|call| !self.notifications_for(user, std::slice::from_ref(call)).is_empty())
            .collect()
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            if bytes.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&bytes[end + 4..end + 4 + length]).into_owned();
                return Some((head, body));
            }
        }
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        bytes.extend_from_slice(&chunk[..read]);
    }
}

/// A keyspace for one test's nodes (with Cassandra): a starting node takes up
/// every queued window of its keyspace, and the tests' nodes share one otherwise.
fn keyspace() -> String {
    unique_name("push").replace('x', "_")
}

/// A node's settings for `receiver`: notifications collapsed over `window`,
/// presence changes at once.
pub(crate) fn webhook_env<'a>(receiver: &'a Receiver, window: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CONFAB_PUSH__WEBHOOK_URL", receiver.url.as_str()),
        ("CONFAB_PUSH__WEBHOOK_SECRET", SECRET),
        ("CONFAB_PUSH__COLLAPSE_WINDOW", window),
        ("CONFAB_PUSH__TIMEOUT", "300ms"),
        ("CONFAB_PUSH__MAX_RETRY_INTERVAL", "1s"),
        ("CONFAB_CHAT__PRESENCE_GRACE", "10ms"),
        ("CONFAB_CHAT__PRESENCE_MIN_INTERVAL", "10ms"),
    ]
}

/// [`webhook_env`], in `keyspace` (with Cassandra).
fn push_env<'a>(receiver: &'a Receiver, window: &'a str, keyspace: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut env = webhook_env(receiver, window);
    if std::env::var("TEST_STORE").as_deref() == Ok("cassandra") {
        env.push(("CONFAB_CASSANDRA__KEYSPACE", keyspace));
    }
    env
}

/// Bob's phone registers its push token, then goes away; Alice sees him go.
/// Alice, her id, Bob's id and name.
async fn bob_goes_offline(addr: confab_client::Endpoint) -> (Client, UserId, UserId, String) {
    bob_goes_offline_muting(addr, false).await
}

/// As [`bob_goes_offline`], Bob having muted his conversation with Alice, or not.
async fn bob_goes_offline_muting(addr: confab_client::Endpoint, mute: bool) -> (Client, UserId, UserId, String) {
    let (alice, alice_login, _) = new_user(addr, "alice").await;
    let (bob, bob_login, bob_name) = new_user(addr, "bob").await;
    bob.register_push_token(PushPlatform::Fcm, "bob-phone").await.unwrap();
    alice
        .send_direct(bob_login.user_id, "hello", "are you there?")
        .await
        .unwrap();
    let hello = within(WAIT, bob.next_message()).await.unwrap();
    if mute {
        bob.mute_conversation(&hello.conversation_id, true).await.unwrap();
    }
    alice.subscribe_presence(&[bob_login.user_id]).await.unwrap();
    drop(bob);
    until_offline(&alice).await;
    (alice, alice_login.user_id, bob_login.user_id, bob_name)
}

/// Until `watcher` hears that a user it follows went offline.
pub(crate) async fn until_offline(watcher: &Client) {
    within(WAIT, async {
        loop {
            if let Some(Event::Presence(presence)) = watcher.next_event().await
                && !presence.online
            {
                return;
            }
        }
    })
    .await;
}

fn signature_of(call: &Call) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{}.{}", call.timestamp, call.body).as_bytes());
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_member_gets_one_signed_call_per_window_with_the_count() {
    let receiver = Receiver::start(&[]).await;
    let mut node = TestServer::start_with(2, &push_env(&receiver, "300ms", &keyspace())).await;
    let (alice, alice_id, bob_id, _) = bob_goes_offline(node.addr).await;
    for i in 0..3 {
        alice
            .send_direct(bob_id, &format!("m{i}"), &format!("message {i}"))
            .await
            .unwrap();
    }
    let notification = &receiver.until_notified(bob_id, 1).await[0];
    let call = &receiver.calls_for(bob_id)[0];
    assert_eq!(call.signature, signature_of(call), "signed");
    assert_eq!(notification["platform"], "fcm");
    assert_eq!(notification["token"], "bob-phone");
    assert_eq!(notification["count"], 3);
    let conversation = &notification["conversations"][0];
    assert_eq!(
        (conversation["count"].clone(), conversation["body"].clone()),
        (3.into(), "message 2".into())
    );
    assert_eq!(conversation["sender_user_id"], alice_id.get());
    // Nothing more for that window; a later message opens the next one.
    alice.send_direct(bob_id, "m3", "one more").await.unwrap();
    let notified = receiver.until_notified(bob_id, 2).await;
    assert_eq!(notified.len(), 2);
    assert_eq!(notified[1]["count"], 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_is_retried_until_it_takes_the_notification() {
    let receiver = Receiver::start(&[Answer::Status(500), Answer::Hang, Answer::Status(503)]).await;
    let mut node = TestServer::start_with(2, &push_env(&receiver, "100ms", &keyspace())).await;
    let (alice, _, bob_id, _) = bob_goes_offline(node.addr).await;
    alice.send_direct(bob_id, "m1", "hello?").await.unwrap();
    let notified = receiver.until_notified(bob_id, 1).await;
    assert_eq!(notified[0]["count"], 1, "nothing lost, nothing doubled");
    let answered: Vec<u16> = receiver.calls_for(bob_id).iter().map(|call| call.answered).collect();
    assert_eq!(answered, [500, 0, 503, 200]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_back_online_within_the_window_gets_no_notification() {
    let receiver = Receiver::start(&[]).await;
    let mut node = TestServer::start_with(2, &push_env(&receiver, "1s", &keyspace())).await;
    let (alice, _, bob_id, bob_name) = bob_goes_offline(node.addr).await;
    alice.send_direct(bob_id, "m1", "while you were out").await.unwrap();
    // Bob comes back and syncs before the window closes ...
    let (bob, _) = second_device(node.addr, &bob_name).await;
    let synced = bob.sync("", &[], 100).await.unwrap();
    let bodies = synced.conversations.iter().flat_map(|c| &c.messages);
    assert!(bodies.clone().any(|m| m.body == "while you were out"), "{synced:?}");
    drop(bob);
    until_offline(&alice).await;
    // ... so the window ends without a call; the next message after that gets one.
    alice.send_direct(bob_id, "m2", "later").await.unwrap();
    let notification = &receiver.until_notified(bob_id, 1).await[0];
    assert_eq!(notification["count"], 1, "only the message after the reconnect");
    assert_eq!(notification["conversations"][0]["body"], "later");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_notifications_are_delivered_after_a_restart() {
    // The first node's webhook refuses everything: the window stays queued.
    let down = Receiver::start(&[Answer::Status(500); 100]).await;
    let dir = tempfile::tempdir().unwrap();
    let keyspace = keyspace();
    let server = start_server(config(dir.path(), 2, &push_env(&down, "100ms", &keyspace)));
    let addr = confab_client::Endpoint::tcp(server.local_addr());
    let (alice, _, bob_id, _) = bob_goes_offline(addr).await;
    alice.send_direct(bob_id, "m1", "before the restart").await.unwrap();
    within(WAIT, async {
        while down.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(alice);
    server.shutdown().await.unwrap();

    let up = Receiver::start(&[]).await;
    let server = start_server(config(dir.path(), 2, &push_env(&up, "100ms", &keyspace)));
    let notification = &up.until_notified(bob_id, 1).await[0];
    assert_eq!(notification["conversations"][0]["body"], "before the restart");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_muted_conversation_is_counted_without_its_text() {
    let receiver = Receiver::start(&[]).await;
    let mut node = TestServer::start_with(2, &push_env(&receiver, "100ms", &keyspace())).await;
    let (alice, _, bob_id, _) = bob_goes_offline_muting(node.addr, true).await;
    alice.send_direct(bob_id, "m1", "a secret").await.unwrap();
    let notification = &receiver.until_notified(bob_id, 1).await[0];
    assert_eq!(notification["count"], 1);
    assert_eq!(notification["conversations"][0]["body"], "");
    assert!(!receiver.calls_for(bob_id)[0].body.contains("a secret"));
    // Muting is for a conversation of one's own.
    let (carol, _, _) = new_user(node.addr, "carol").await;
    let conversation = notification["conversations"][0]["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = carol.mute_conversation(&conversation, true).await;
    assert_eq!(code(refused), confab_client::proto::ErrorCode::Forbidden);
    let refused = carol.mute_conversation("nonsense", true).await;
    assert_eq!(code(refused), confab_client::proto::ErrorCode::BadRequest);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_offline_member_of_a_group_is_notified_once() {
    const MEMBERS: usize = 20;
    let receiver = Receiver::start(&[]).await;
    let mut node = TestServer::start_with(2, &push_env(&receiver, "200ms", &keyspace())).await;
    let (alice, _, _) = new_user(node.addr, "host").await;
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let (member, login, _) = new_user(node.addr, "member").await;
        member
            .register_push_token(PushPlatform::Apns, &format!("phone-{i}"))
            .await
            .unwrap();
        members.push((member, login.user_id));
    }
    let ids: Vec<UserId> = members.iter().map(|(_, id)| *id).collect();
    let group = alice.create_group("g", "Everyone", &ids).await.unwrap();
    alice.subscribe_presence(&ids).await.unwrap();
    drop(members);
    for _ in 0..MEMBERS {
        until_offline(&alice).await;
    }
    let target = confab_client::proto::conversation_ref::Target::ConversationId(group.conversation_id.clone());
    alice.send(target, "m1", "meeting at 3").await.unwrap();
    for id in ids {
        let notified = receiver.until_notified(id, 1).await;
        assert_eq!(notified.len(), 1, "once each");
        assert_eq!(notified[0]["conversations"][0]["body"], "meeting at 3");
    }
    node.shutdown().await;
}
