//! Push notifications for users with no connection (docs/PUSH.md).
//!
//! Owner shards hand the worker an event for each committed text message a
//! member could not get live ([`Pusher::message`]); sessions tell it when a
//! user authenticates ([`Pusher::online`]). The worker, on a thread and runtime
//! of its own, keeps one collapse window per user: the first message opens it,
//! later ones add to its counts, and when it closes one notification per device
//! with a push token goes to the app's webhook in one signed call. A user who
//! connects meanwhile gets none: it has what it missed by resume or Sync.
//!
//! Windows are kept in the store (`PushStore::put_pending_push`, written at
//! most once per tick per user) and read back at start, and a window is
//! forgotten only after the webhook answered 2xx: a failed call is retried
//! with backoff, a restart delivers what was queued. Events themselves travel
//! in memory: a crash loses at most a tick's worth of them (notifications,
//! never messages), and a full queue drops them (counted in
//! `confab_push_dropped_total`) rather than stall a shard.

mod webhook;

use crate::clock::unix_ms;
use crate::config::PushConfig;
use crate::http::HttpUrl;
use crate::store::{PendingConversation, PendingPush, Store};
use crate::transport::admission::Admission;
use confab_protocol::ids::{ConversationId, Seq, UserId};
use futures::stream::{self, StreamExt as _};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use webhook::{Notification, Webhook};

/// Events waiting for the worker; more are dropped.
const QUEUE: usize = 65_536;
/// Notifications in one webhook call.
const MAX_PER_CALL: usize = 100;
/// Conversations one notification lists (the most recent).
const MAX_CONVERSATIONS: usize = 20;
/// Store writes of windows in flight at once.
const STORE_CONCURRENCY: usize = 64;
/// The first retry of a failed call waits this long, then twice as long...
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// What the worker hears.
#[derive(Debug)]
enum PushEvent {
    /// A committed text message `user` could not get live.
    Message {
        user: UserId,
        conversation: ConversationId,
        seq: Seq,
        sender: UserId,
        body: String,
    },
    /// `user` authenticated a connection.
    Online(UserId),
}

/// Hands events to the push worker; cheap to clone, never waits.
#[derive(Debug, Clone)]
pub struct Pusher {
    events: mpsc::Sender<PushEvent>,
    max_body_chars: usize,
}

impl Pusher {
    /// `user` could not get a committed message live.
    pub fn message(&self, user: UserId, conversation: ConversationId, seq: Seq, sender: UserId, body: &str) {
        let body = body.chars().take(self.max_body_chars).collect();
        self.send(PushEvent::Message {
            user,
            conversation,
            seq,
            sender,
            body,
        });
    }

    /// `user` authenticated a connection: its open window is moot.
    pub fn online(&self, user: UserId) {
        self.send(PushEvent::Online(user));
    }

    fn send(&self, event: PushEvent) {
        if self.events.try_send(event).is_err() {
            metrics::counter!("confab_push_dropped_total").increment(1);
        }
    }
}

/// Starts the worker for `config` (its `webhook_url` set) until `stop`.
pub fn start(
    config: &PushConfig,
    store: Arc<dyn Store>,
    admission: Admission,
    stop: CancellationToken,
) -> std::io::Result<(Pusher, std::thread::JoinHandle<()>)> {
    let url = HttpUrl::parse(&config.webhook_url).map_err(std::io::Error::other)?;
    let webhook = Webhook::new(url, &config.webhook_secret, config.timeout).map_err(std::io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (events, queued) = mpsc::channel(QUEUE);
    let worker = Worker {
        store,
        admission,
        webhook,
        collapse_window: config.collapse_window,
        include_body: config.include_body,
        max_retry_interval: config.max_retry_interval.max(FIRST_RETRY),
        windows: HashMap::new(),
        forgotten: Vec::new(),
        retry_at: None,
        retry_delay: FIRST_RETRY,
    };
    let thread = std::thread::Builder::new()
        .name("confab-push".into())
        .spawn(move || runtime.block_on(worker.run(queued, stop)))?;
    let pusher = Pusher {
        events,
        max_body_chars: config.max_body_chars,
    };
    Ok((pusher, thread))
}

/// One user's open window.
struct Window {
    pending: PendingPush,
    closes_at: Instant,
    /// Changed since last written to the store.
    dirty: bool,
}

impl Window {
    fn add(&mut self, conversation: ConversationId, seq: Seq, sender: UserId, body: String) {
        self.pending.count += 1;
        self.dirty = true;
        let conversations = &mut self.pending.conversations;
        if let Some(index) = conversations.iter().position(|c| c.conversation == conversation) {
            let mut entry = conversations.remove(index);
            entry.count += 1;
            entry.last_seq = entry.last_seq.max(seq);
            entry.sender = sender;
            entry.body = body;
            conversations.push(entry);
        } else {
            conversations.push(PendingConversation {
                conversation,
                count: 1,
                last_seq: seq,
                sender,
                body,
            });
            if conversations.len() > MAX_CONVERSATIONS {
                conversations.remove(0);
            }
        }
    }
}

struct Worker {
    store: Arc<dyn Store>,
    admission: Admission,
    webhook: Webhook,
    collapse_window: Duration,
    include_body: bool,
    max_retry_interval: Duration,
    windows: HashMap<UserId, Window>,
    /// Windows closed without a call, still in the store.
    forgotten: Vec<UserId>,
    /// After a failed call: not before this.
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl Worker {
    async fn run(mut self, mut events: mpsc::Receiver<PushEvent>, stop: CancellationToken) {
        self.reopen().await;
        let period = (self.collapse_window / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => break,
                },
                _ = tick.tick() => self.on_tick().await,
                () = stop.cancelled() => break,
            }
        }
        // What came in since the last tick, for the next start.
        while let Ok(event) = events.try_recv() {
            self.on_event(event);
        }
        self.write_windows().await;
    }

    /// The windows the last run left open, closing when they would have.
    async fn reopen(&mut self) {
        let pending = match self.store.pending_pushes().await {
            Ok(pending) => pending,
            Err(err) => {
                tracing::warn!(error = %err, "could not read the queued push notifications");
                return;
            }
        };
        let now_ms = unix_ms();
        for (user, pending) in pending {
            let open_ms = now_ms.saturating_sub(pending.since_ms);
            let left = self.collapse_window.saturating_sub(Duration::from_millis(open_ms));
            let window = Window {
                pending,
                closes_at: Instant::now() + left,
                dirty: false,
            };
            self.windows.insert(user, window);
        }
        if !self.windows.is_empty() {
            tracing::info!(users = self.windows.len(), "queued push notifications taken up again");
        }
    }

    fn on_event(&mut self, event: PushEvent) {
        match event {
            PushEvent::Message {
                user,
                conversation,
                seq,
                sender,
                body,
            } => {
                let collapse_window = self.collapse_window;
                let window = self.windows.entry(user).or_insert_with(|| Window {
                    pending: PendingPush {
                        since_ms: unix_ms(),
                        ..PendingPush::default()
                    },
                    closes_at: Instant::now() + collapse_window,
                    dirty: true,
                });
                window.add(conversation, seq, sender, body);
            }
            PushEvent::Online(user) => {
                if self.windows.remove(&user).is_some() {
                    self.forgotten.push(user);
                }
            }
        }
    }

    async fn on_tick(&mut self) {
        self.write_windows().await;
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let now = Instant::now();
        let due: Vec<UserId> = self
            .windows
            .iter()
            .filter(|(_, window)| window.closes_at <= now)
            .map(|(user, _)| *user)
            .take(MAX_PER_CALL)
            .collect();
        let mut notifications = Vec::new();
        let mut notified = Vec::new();
        for user in due {
            // Connected now: it has what it missed.
            if self.admission.user_connections(user) > 0 {
                self.close(user);
                continue;
            }
            let read = futures::try_join!(self.store.push_tokens(user), self.store.muted(user));
            let (tokens, muted) = match read {
                Ok(read) => read,
                Err(err) => {
                    tracing::warn!(error = %err, %user, "could not read push tokens; retrying");
                    continue;
                }
            };
            if tokens.is_empty() {
                self.close(user);
                continue;
            }
            let Some(window) = self.windows.get(&user) else {
                continue;
            };
            for (device, token) in tokens {
                notifications.push(Notification::new(
                    (user, device),
                    token,
                    &window.pending,
                    self.include_body,
                    &muted,
                ));
            }
            notified.push(user);
        }
        if notifications.is_empty() {
            self.write_windows().await;
            return;
        }
        match self.webhook.post(&notifications, unix_ms() / 1000).await {
            Ok(()) => {
                metrics::counter!("confab_push_notifications_total").increment(notifications.len() as u64);
                for user in notified {
                    self.close(user);
                }
                self.retry_at = None;
                self.retry_delay = FIRST_RETRY;
            }
            Err(reason) => {
                tracing::warn!(%reason, notifications = notifications.len(), retry_in = ?self.retry_delay, "push webhook call failed");
                metrics::counter!("confab_push_failures_total").increment(1);
                self.retry_at = Some(Instant::now() + self.retry_delay);
                self.retry_delay = (self.retry_delay * 2).min(self.max_retry_interval);
            }
        }
        self.write_windows().await;
    }

    /// Ends `user`'s window (sent or moot).
    fn close(&mut self, user: UserId) {
        if self.windows.remove(&user).is_some() {
            self.forgotten.push(user);
        }
    }

    /// Brings the store up to date: changed windows written, closed ones
    /// deleted, [`STORE_CONCURRENCY`] at a time (so the store commits them
    /// together: with `sync` durability, one fsync for many, not one each). A
    /// failure leaves them for the next tick.
    async fn write_windows(&mut self) {
        let store = &self.store;
        // Reopened meanwhile: their new state is written below.
        let closed: Vec<UserId> = std::mem::take(&mut self.forgotten)
            .into_iter()
            .filter(|user| !self.windows.contains_key(user))
            .collect();
        let deleted: Vec<_> = stream::iter(closed)
            .map(|user| async move { (user, store.delete_pending_push(user).await) })
            .buffer_unordered(STORE_CONCURRENCY)
            .collect()
            .await;
        for (user, result) in deleted {
            if let Err(err) = result {
                tracing::warn!(error = %err, %user, "could not forget a push window; retrying");
                self.forgotten.push(user);
            }
        }
        let changed: Vec<(UserId, PendingPush)> = self
            .windows
            .iter()
            .filter(|(_, window)| window.dirty)
            .map(|(user, window)| (*user, window.pending.clone()))
            .collect();
        let written: Vec<_> = stream::iter(changed)
            .map(|(user, pending)| async move { (user, store.put_pending_push(user, pending).await) })
            .buffer_unordered(STORE_CONCURRENCY)
            .collect()
            .await;
        for (user, result) in written {
            match (result, self.windows.get_mut(&user)) {
                (Ok(()), Some(window)) => window.dirty = false,
                (Ok(()), None) => {}
                (Err(err), _) => tracing::warn!(error = %err, %user, "could not keep a push window; retrying"),
            }
        }
    }
}
