//! A member's connection, which moves when its server goes away.
//!
//! In a run over several servers (a cluster's nodes), a member whose
//! connection closes (its node killed or drained) connects to the next server
//! with a jittered pause ([`Client::connect_any`]), resumes from the last seq
//! it received of each conversation (the server replays what it missed), and
//! its sender retries what was not acknowledged with the same ids, as an app
//! would. So the correctness check of a run spans a node's death: nothing
//! acknowledged lost, nothing twice.
//!
//! Only the member's receiver moves it: it moves once it has read everything
//! the old connection received, so the cursors it resumes from are exact (a
//! sender that moved first would resume from cursors missing what was still
//! queued, and the replay would repeat it). A sender whose connection closed
//! waits for the move.

use crate::setup::Connector;
use confab_client::proto::Message;
use confab_client::{Client, ClientError, Failover};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// How long a send waits, over retries, for its ack across a move.
const PATIENCE: Duration = Duration::from_secs(30);
/// Pause before retrying a send refused as UNAVAILABLE (a conversation
/// between holders).
const UNAVAILABLE_PAUSE: Duration = Duration::from_millis(50);

/// One member's connection, current and next.
#[derive(Debug)]
pub struct Line {
    current: watch::Sender<Arc<Client>>,
    /// The connector's server index of the current connection.
    server: AtomicUsize,
    connector: Connector,
    access_token: String,
    /// Per conversation, the last seq the member received (kept across rounds
    /// of a ramp, so a resume never replays an earlier round).
    cursors: Mutex<HashMap<String, u64>>,
}

impl Line {
    /// A line on `client`, connected to the connector's server `server`.
    pub fn new(client: Client, server: usize, connector: Connector, access_token: String) -> Self {
        Self {
            current: watch::Sender::new(Arc::new(client)),
            server: AtomicUsize::new(server),
            connector,
            access_token,
            cursors: Mutex::default(),
        }
    }

    /// The current connection.
    pub fn client(&self) -> Arc<Client> {
        self.current.borrow().clone()
    }

    /// Whether a closed connection moves to another server (a run over several).
    pub fn moves(&self) -> bool {
        self.connector.servers().len() > 1
    }

    /// What the member received last, per conversation.
    pub fn cursors(&self) -> HashMap<String, u64> {
        self.cursors.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sends, and on a closed connection or an UNAVAILABLE refusal retries with
    /// the same id (an idempotent retry) for up to [`PATIENCE`] when the line
    /// moves; otherwise the first answer is final.
    pub async fn send(
        &self,
        target: confab_client::proto::conversation_ref::Target,
        client_msg_id: &str,
        body: &str,
    ) -> Result<confab_client::proto::SendAck, ClientError> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut waiting = self.current.subscribe();
        loop {
            let client = waiting.borrow_and_update().clone();
            let error = match client.send(target.clone(), client_msg_id, body).await {
                Ok(ack) => return Ok(ack),
                Err(error) if !self.moves() => return Err(error),
                Err(error) => error,
            };
            let retry = match &error {
                ClientError::Server { code, .. } => *code == confab_client::proto::ErrorCode::Unavailable,
                _ => true,
            };
            if !retry || tokio::time::Instant::now() >= deadline {
                return Err(error);
            }
            if matches!(error, ClientError::Server { .. }) {
                tokio::time::sleep(UNAVAILABLE_PAUSE).await;
                continue;
            }
            // The connection is gone: wait for the receiver to move the line.
            if Arc::ptr_eq(&client, &waiting.borrow()) {
                let moved = tokio::time::timeout_at(deadline, waiting.changed()).await;
                if !matches!(moved, Ok(Ok(()))) {
                    return Err(error);
                }
            }
        }
    }

    /// The receiver's part: the connection closed after it read everything,
    /// having last received `cursors`. Connects to the next server and
    /// resumes. Returns the messages the member must also take (a resume that
    /// could not replay everything is followed by `Sync` until complete; the
    /// replay itself arrives as pushes on the new connection).
    pub async fn move_on(&self, cursors: &HashMap<String, u64>) -> Result<Vec<Message>, ClientError> {
        self.keep_cursors(cursors);
        let from = self.server.load(Ordering::Relaxed);
        let (client, server) = self.connector.connect_after(from, &Failover::default()).await?;
        let cursors: Vec<(String, u64)> = cursors.iter().map(|(id, seq)| (id.clone(), *seq)).collect();
        let resumed = client.authenticate_resume(&self.access_token, "", &cursors).await?;
        let mut synced = Vec::new();
        let (mut token, mut more) = (resumed.sync_token, !resumed.recovered);
        while more {
            let page = client.sync(&token, &[], 1_000).await?;
            synced.extend(page.conversations.into_iter().flat_map(|state| state.messages));
            (token, more) = (page.sync_token, page.has_more);
        }
        self.server.store(server, Ordering::Relaxed);
        self.current.send_replace(Arc::new(client));
        Ok(synced)
    }

    /// Keeps what the member received, for the next round's moves.
    pub fn keep_cursors(&self, cursors: &HashMap<String, u64>) {
        *self.cursors.lock().unwrap_or_else(PoisonError::into_inner) = cursors.clone();
    }
}
