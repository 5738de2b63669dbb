//! Async Rust client for the confab chat protocol (v1) over TCP, TLS, WebSocket
//! or QUIC (see [`Endpoint`]).
//!
//! Used by the integration tests, the load generator and future mobile bindings.
//! One [`Client`] is one connection: it performs the `Hello` handshake, pings at the
//! server's heartbeat interval, matches replies to requests by `request_id` (so any
//! number of requests can be in flight from `&self`), and queues server pushes as
//! [`Event`]s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), confab_client::ClientError> {
//! let server: confab_client::Endpoint = "127.0.0.1:7300".parse().map_err(confab_client::ClientError::Transport)?;
//! let client = confab_client::Client::connect(server).await?;
//! client.sign_up("alice", "correct horse").await?;
//! let login = client.log_in("alice", "correct horse", "laptop").await?;
//! client.authenticate(&login.tokens.access_token).await?;
//! let bob = client.user("bob").await?;
//! let ack = client.send_direct(bob.user_id, "msg-1", "hi bob").await?;
//! println!("stored as #{} in {}", ack.seq, ack.conversation_id);
//! # Ok(()) }
//! ```

mod failover;
mod transport;

pub use failover::Failover;

pub use transport::{
    DEFAULT_WEBSOCKET_PATH, Endpoint, QUIC_ALPN, Transport, UDP_BUFFER_BYTES, parse_fingerprint, pinned_tls_config,
    quic_client_endpoint, udp_socket,
};

use bytes::Bytes;
use confab_proto::v1::{
    self, ClientFrame, ErrorCode, ProtocolVersion, ServerFrame, client_frame, conversation_ref, server_frame,
};
use confab_proto::{FrameDecoder, FrameError, encode_frame};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use transport::{FrameReader, FrameWriter, QuicHandles};

pub use confab_proto::v1 as proto;
pub use confab_protocol::ids::{DeviceId, UserId};
pub use quinn;

/// Largest frame the client accepts before the server told it its limit.
const HANDSHAKE_MAX_FRAME: usize = 1024 * 1024;
/// The request id of an `Authenticate` sent with the `Hello` (which is request 1).
const OPENING_AUTHENTICATE_ID: u64 = 2;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame from server: {0}")]
    Frame(#[from] FrameError),
    #[error("server error {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Transport(String),
}

impl ClientError {
    /// The protocol error code, when the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A device's login (`LoggedIn`): whose device it is, and its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Login {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub tokens: v1::Tokens,
}

impl TryFrom<v1::LoggedIn> for Login {
    type Error = ClientError;

    fn try_from(logged_in: v1::LoggedIn) -> Result<Self, ClientError> {
        Ok(Self {
            user_id: user_id(logged_in.user_id)?,
            device_id: DeviceId::new(logged_in.device_id)
                .ok_or_else(|| ClientError::Unexpected("LoggedIn without a device id".into()))?,
            tokens: logged_in
                .tokens
                .ok_or_else(|| ClientError::Unexpected("LoggedIn without tokens".into()))?,
        })
    }
}

/// A user as `GetUser` answers.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub user_id: UserId,
    pub username: String,
    /// Empty: show the username.
    pub display_name: String,
}

/// Something the server pushed.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Message(v1::Message),
    /// Another member's receipt watermarks rose (coalesced).
    Receipt(v1::Receipt),
    Typing(v1::TypingUpdate),
    Presence(v1::PresenceUpdate),
    GoingAway(v1::GoingAway),
    /// The connection ended; with the server's reason when it gave one.
    Closed(Option<v1::Error>),
}

/// Connection options.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub client_name: String,
    /// Send pings at the server's heartbeat interval.
    pub heartbeat: bool,
    /// Local address to connect from (e.g. one of 127.0.0.x, to use more than one
    /// address's ephemeral ports); `None` lets the OS choose.
    pub local_ip: Option<std::net::IpAddr>,
    /// Name the TLS certificate is checked against (SNI).
    pub tls_server_name: String,
    /// Path of the server's WebSocket endpoint.
    pub websocket_path: String,
    /// QUIC: an endpoint (one UDP socket) to share with other clients, as a load
    /// generator with thousands of connections should; `None` gives this client a
    /// socket of its own, which [`Client::rebind`] can move.
    pub quic_endpoint: Option<quinn::Endpoint>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_name: "confab-client".into(),
            heartbeat: true,
            local_ip: None,
            tls_server_name: "localhost".into(),
            websocket_path: DEFAULT_WEBSOCKET_PATH.into(),
            quic_endpoint: None,
        }
    }
}

/// Requests waiting for their reply; `None` once the connection has ended, so a
/// request made after that fails at once instead of waiting forever.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<ServerFrame>>>>>;

/// One connection to a confab server.
#[derive(Debug)]
pub struct Client {
    outbound: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
    next_request_id: AtomicU64,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    welcome: v1::Welcome,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    quic: Option<QuicHandles>,
    zero_rtt_accepted: Option<bool>,
}

impl Client {
    pub async fn connect(endpoint: impl Into<Endpoint>) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, ClientOptions::default()).await
    }

    /// Connects and completes the `Hello` handshake.
    pub async fn connect_with(endpoint: impl Into<Endpoint>, options: ClientOptions) -> Result<Self, ClientError> {
        Ok(Self::open(endpoint.into(), options, None).await?.0)
    }

    /// Connects and authenticates with `access_token` in one round trip:
    /// `Authenticate` goes out in the same write as `Hello` (the server processes
    /// the two in order), instead of after the `Welcome` as with
    /// [`Client::connect_with`] then [`Client::authenticate`].
    pub async fn connect_authenticated(
        endpoint: impl Into<Endpoint>,
        options: ClientOptions,
        access_token: &str,
    ) -> Result<(Self, v1::Authenticated), ClientError> {
        let authenticate = ClientFrame {
            request_id: OPENING_AUTHENTICATE_ID,
            kind: Some(client_frame::Kind::Authenticate(v1::Authenticate {
                access_token: access_token.into(),
                ..v1::Authenticate::default()
            })),
        };
        let (client, reply) = Self::open(endpoint.into(), options, Some(encode_frame(&authenticate))).await?;
        let reply = reply
            .ok_or(ClientError::Closed)?
            .await
            .map_err(|_| ClientError::Closed)?;
        match reply.kind {
            Some(server_frame::Kind::Authenticated(authenticated)) => Ok((client, authenticated)),
            other => Err(unexpected_or_error(other)),
        }
    }

    /// Connects and says `Hello`, followed in the same write by `authenticate`
    /// (request [`OPENING_AUTHENTICATE_ID`]) when given, whose reply is returned
    /// as a receiver.
    async fn open(
        endpoint: Endpoint,
        options: ClientOptions,
        authenticate: Option<Bytes>,
    ) -> Result<(Self, Option<oneshot::Receiver<ServerFrame>>), ClientError> {
        let transport::Connected {
            mut reader,
            mut writer,
            quic,
            zero_rtt,
        } = transport::connect(&endpoint, &options).await?;
        let hello = ClientFrame {
            request_id: 1,
            kind: Some(client_frame::Kind::Hello(v1::Hello {
                protocol_version: ProtocolVersion::V1 as i32,
                client_name: options.client_name.clone(),
                client_version: env!("CARGO_PKG_VERSION").into(),
            })),
        };
        let opening: Vec<Bytes> = std::iter::once(encode_frame(&hello)).chain(authenticate).collect();
        let (welcome, zero_rtt_accepted) = match zero_rtt {
            None => (handshake(&mut reader, &mut writer, &opening).await?, None),
            Some(accepted) => match handshake(&mut reader, &mut writer, &opening).await {
                Ok(welcome) => (welcome, Some(accepted.await)),
                // The server refused the early data (e.g. it forgot the ticket):
                // the stream is gone, so say Hello again on a fresh one.
                Err(first) => match (accepted.await, &quic) {
                    (false, Some(quic)) => {
                        (reader, writer) = transport::reopen_quic_stream(quic).await?;
                        (handshake(&mut reader, &mut writer, &opening).await?, Some(false))
                    }
                    _ => return Err(first),
                },
            },
        };
        let limits = welcome.limits.unwrap_or_default();
        let decoder = FrameDecoder::new(limits.max_frame_bytes as usize);

        let mut waiting = HashMap::new();
        let authenticated = (opening.len() > 1).then(|| {
            let (reply_tx, reply) = oneshot::channel();
            waiting.insert(OPENING_AUTHENTICATE_ID, reply_tx);
            reply
        });
        let pending: Pending = Arc::new(Mutex::new(Some(waiting)));
        let (outbound, queued) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::unbounded_channel();
        let mut tasks = vec![
            tokio::spawn(write_frames(writer, queued)),
            tokio::spawn(read_frames(reader, decoder, pending.clone(), event_tx)),
        ];
        if options.heartbeat && limits.heartbeat_interval_ms > 0 {
            let interval = Duration::from_millis(u64::from(limits.heartbeat_interval_ms));
            tasks.push(tokio::spawn(heartbeat(outbound.clone(), interval)));
        }
        let client = Self {
            outbound,
            pending,
            next_request_id: AtomicU64::new(OPENING_AUTHENTICATE_ID + 1),
            events: tokio::sync::Mutex::new(events),
            welcome,
            tasks,
            quic,
            zero_rtt_accepted,
        };
        Ok((client, authenticated))
    }

    /// QUIC only: whether the handshake went out as 0-RTT and the server accepted
    /// it (`None`: no 0-RTT was attempted, e.g. on a first connection).
    pub fn zero_rtt_accepted(&self) -> Option<bool> {
        self.zero_rtt_accepted
    }

    /// QUIC only: moves the connection to a new local UDP socket, as when a phone
    /// changes networks; the session carries on.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> Result<(), ClientError> {
        match &self.quic {
            Some(quic) => Ok(quic.endpoint.rebind(socket)?),
            None => Err(ClientError::Transport("rebind needs the QUIC transport".into())),
        }
    }

    /// QUIC only: the address the server currently sees for this client.
    pub fn quic_local_addr(&self) -> Option<std::net::SocketAddr> {
        self.quic.as_ref().and_then(|quic| quic.endpoint.local_addr().ok())
    }

    /// What the server said in its handshake reply.
    pub fn welcome(&self) -> &v1::Welcome {
        &self.welcome
    }

    /// Sends a request and waits for its reply; error replies become `Err`.
    pub async fn request(&self, kind: client_frame::Kind) -> Result<server_frame::Kind, ClientError> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| ClientError::Closed)?
            .as_mut()
            .ok_or(ClientError::Closed)?
            .insert(request_id, reply_tx);
        let frame = ClientFrame {
            request_id,
            kind: Some(kind),
        };
        self.outbound
            .send(encode_frame(&frame))
            .map_err(|_| ClientError::Closed)?;
        let reply = reply.await.map_err(|_| ClientError::Closed)?;
        match reply.kind {
            Some(server_frame::Kind::Error(error)) => Err(server_error(error)),
            Some(kind) => Ok(kind),
            None => Err(ClientError::Unexpected("empty reply".into())),
        }
    }

    /// Writes raw bytes on the connection, for tests of malformed input.
    pub fn send_raw(&self, bytes: Bytes) -> Result<(), ClientError> {
        self.outbound.send(bytes).map_err(|_| ClientError::Closed)
    }

    /// The next pushed event; `None` once the connection is gone and all events were read.
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.recv().await
    }

    /// Moves the pushed events that are waiting, up to `limit`, into `events`,
    /// waiting for at least one; returns how many (0 once the connection is gone
    /// and all events were read). Cancel-safe. For readers of many pushes: one
    /// call per batch instead of one per event.
    pub async fn next_events(&self, events: &mut Vec<Event>, limit: usize) -> usize {
        self.events.lock().await.recv_many(events, limit).await
    }

    /// The next pushed message, skipping other events; `Err` if the connection ends first.
    pub async fn next_message(&self) -> Result<v1::Message, ClientError> {
        loop {
            match self.next_event().await {
                Some(Event::Message(message)) => return Ok(message),
                Some(Event::GoingAway(_) | Event::Receipt(_) | Event::Typing(_) | Event::Presence(_)) => continue,
                Some(Event::Closed(Some(error))) => return Err(server_error(error)),
                Some(Event::Closed(None)) | None => return Err(ClientError::Closed),
            }
        }
    }

    pub async fn ping(&self, nonce: u64) -> Result<u64, ClientError> {
        match self.request(client_frame::Kind::Ping(v1::Ping { nonce })).await? {
            server_frame::Kind::Pong(pong) => Ok(pong.nonce),
            other => Err(unexpected(other)),
        }
    }

    /// Creates an account; returns the new user id.
    pub async fn sign_up(&self, username: &str, password: &str) -> Result<UserId, ClientError> {
        let request = client_frame::Kind::SignUp(v1::SignUp {
            username: username.into(),
            password: password.into(),
        });
        match self.request(request).await? {
            server_frame::Kind::SignedUp(signed_up) => user_id(signed_up.user_id),
            other => Err(unexpected(other)),
        }
    }

    /// Logs a new device in; the reply carries its tokens.
    pub async fn log_in(&self, username: &str, password: &str, device_name: &str) -> Result<Login, ClientError> {
        let request = client_frame::Kind::LogIn(v1::LogIn {
            username: username.into(),
            password: password.into(),
            device_name: device_name.into(),
        });
        match self.request(request).await? {
            server_frame::Kind::LoggedIn(logged_in) => logged_in.try_into(),
            other => Err(unexpected(other)),
        }
    }

    /// Binds this connection to the token's user and device.
    pub async fn authenticate(&self, access_token: &str) -> Result<v1::Authenticated, ClientError> {
        self.authenticate_device(access_token, "").await
    }

    /// Binds this connection to the user of a token of the app's sign-in (JWT)
    /// and, when the token names no device, to the user's device `device`.
    pub async fn authenticate_device(
        &self,
        access_token: &str,
        device: &str,
    ) -> Result<v1::Authenticated, ClientError> {
        let request = client_frame::Kind::Authenticate(v1::Authenticate {
            access_token: access_token.into(),
            device: device.into(),
            resume: None,
        });
        match self.request(request).await? {
            server_frame::Kind::Authenticated(authenticated) => Ok(authenticated),
            other => Err(unexpected(other)),
        }
    }

    /// Authenticates and resumes: the server first pushes what the device missed
    /// since `sync_token` (and `cursors`), then replies, then pushes live messages.
    pub async fn authenticate_resume(
        &self,
        access_token: &str,
        sync_token: &str,
        cursors: &[(String, u64)],
    ) -> Result<v1::Authenticated, ClientError> {
        let request = client_frame::Kind::Authenticate(v1::Authenticate {
            access_token: access_token.into(),
            resume: Some(v1::Resume {
                sync_token: sync_token.into(),
                cursors: conversation_cursors(cursors),
            }),
            ..v1::Authenticate::default()
        });
        match self.request(request).await? {
            server_frame::Kind::Authenticated(authenticated) => Ok(authenticated),
            other => Err(unexpected(other)),
        }
    }

    /// What this device has not seen, across all its conversations.
    pub async fn sync(
        &self,
        sync_token: &str,
        cursors: &[(String, u64)],
        limit: u32,
    ) -> Result<v1::SyncResult, ClientError> {
        let request = client_frame::Kind::Sync(v1::Sync {
            sync_token: sync_token.into(),
            cursors: conversation_cursors(cursors),
            limit,
        });
        match self.request(request).await? {
            server_frame::Kind::SyncResult(result) => Ok(result),
            other => Err(unexpected(other)),
        }
    }

    /// One page of the user's conversations, most recently active first.
    pub async fn list_conversations(&self, page_token: &str, limit: u32) -> Result<v1::ConversationList, ClientError> {
        let request = client_frame::Kind::ListConversations(v1::ListConversations {
            page_token: page_token.into(),
            limit,
        });
        match self.request(request).await? {
            server_frame::Kind::ConversationList(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }

    /// Current presence of `user_ids` this user may see, and pushes when it changes.
    pub async fn subscribe_presence(&self, user_ids: &[UserId]) -> Result<v1::PresenceList, ClientError> {
        let request = client_frame::Kind::SubscribePresence(v1::SubscribePresence {
            user_ids: raw_ids(user_ids),
        });
        match self.request(request).await? {
            server_frame::Kind::PresenceList(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }

    /// Tells the other members this user is (or stopped) typing.
    pub async fn typing(&self, conversation_id: &str, typing: bool) -> Result<(), ClientError> {
        let request = client_frame::Kind::Typing(v1::Typing {
            conversation_id: conversation_id.into(),
            typing,
        });
        match self.request(request).await? {
            server_frame::Kind::Done(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn mark_delivered(&self, conversation_id: &str, seq: u64) -> Result<v1::Receipt, ClientError> {
        self.receipt(client_frame::Kind::MarkDelivered(v1::MarkDelivered {
            conversation_id: conversation_id.into(),
            seq,
        }))
        .await
    }

    pub async fn mark_read(&self, conversation_id: &str, seq: u64) -> Result<v1::Receipt, ClientError> {
        self.receipt(client_frame::Kind::MarkRead(v1::MarkRead {
            conversation_id: conversation_id.into(),
            seq,
        }))
        .await
    }

    async fn receipt(&self, request: client_frame::Kind) -> Result<v1::Receipt, ClientError> {
        match self.request(request).await? {
            server_frame::Kind::Receipt(receipt) => Ok(receipt),
            other => Err(unexpected(other)),
        }
    }

    /// Signs up (if needed), logs in and authenticates in one go; returns the login.
    pub async fn register_and_authenticate(
        &self,
        username: &str,
        password: &str,
        device_name: &str,
    ) -> Result<Login, ClientError> {
        match self.sign_up(username, password).await {
            Ok(_) => {}
            Err(err) if err.code() == Some(ErrorCode::AlreadyExists) => {}
            Err(err) => return Err(err),
        }
        let login = self.log_in(username, password, device_name).await?;
        self.authenticate(&login.tokens.access_token).await?;
        Ok(login)
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<Login, ClientError> {
        let request = client_frame::Kind::RefreshToken(v1::RefreshToken {
            refresh_token: refresh_token.into(),
        });
        match self.request(request).await? {
            server_frame::Kind::LoggedIn(logged_in) => logged_in.try_into(),
            other => Err(unexpected(other)),
        }
    }

    pub async fn log_out(&self) -> Result<(), ClientError> {
        match self.request(client_frame::Kind::LogOut(v1::LogOut {})).await? {
            server_frame::Kind::LoggedOut(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The user's logged-in devices.
    pub async fn list_devices(&self) -> Result<Vec<v1::Device>, ClientError> {
        match self
            .request(client_frame::Kind::ListDevices(v1::ListDevices {}))
            .await?
        {
            server_frame::Kind::DeviceList(list) => Ok(list.devices),
            other => Err(unexpected(other)),
        }
    }

    /// Where this device is reached while it has no connection (an empty
    /// `token` removes it).
    pub async fn register_push_token(&self, platform: v1::PushPlatform, token: &str) -> Result<(), ClientError> {
        let request = client_frame::Kind::RegisterPushToken(v1::RegisterPushToken {
            platform: platform as i32,
            token: token.into(),
        });
        match self.request(request).await? {
            server_frame::Kind::Done(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Mutes (or unmutes) a conversation in this user's push notifications.
    pub async fn mute_conversation(&self, conversation_id: &str, muted: bool) -> Result<(), ClientError> {
        let request = client_frame::Kind::MuteConversation(v1::MuteConversation {
            conversation_id: conversation_id.into(),
            muted,
        });
        match self.request(request).await? {
            server_frame::Kind::Done(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Logs another of the user's devices out.
    pub async fn revoke_device(&self, device_id: DeviceId) -> Result<(), ClientError> {
        match self
            .request(client_frame::Kind::RevokeDevice(v1::RevokeDevice {
                device_id: device_id.get(),
            }))
            .await?
        {
            server_frame::Kind::Done(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sets a new password; the user's other devices are logged out.
    pub async fn change_password(&self, current_password: &str, new_password: &str) -> Result<(), ClientError> {
        let request = client_frame::Kind::ChangePassword(v1::ChangePassword {
            current_password: current_password.into(),
            new_password: new_password.into(),
        });
        match self.request(request).await? {
            server_frame::Kind::Done(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Looks a user up by username.
    pub async fn user(&self, username: &str) -> Result<User, ClientError> {
        let request = client_frame::Kind::GetUser(v1::GetUser {
            username: username.into(),
        });
        match self.request(request).await? {
            server_frame::Kind::User(user) => Ok(User {
                user_id: user_id(user.user_id)?,
                username: user.username,
                display_name: user.display_name,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a message to the direct conversation with `user_id`.
    pub async fn send_direct(
        &self,
        user_id: UserId,
        client_msg_id: &str,
        body: &str,
    ) -> Result<v1::SendAck, ClientError> {
        self.send(
            conversation_ref::Target::DirectUserId(user_id.get()),
            client_msg_id,
            body,
        )
        .await
    }

    pub async fn send(
        &self,
        conversation: conversation_ref::Target,
        client_msg_id: &str,
        body: &str,
    ) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::Send(v1::Send {
            conversation: Some(v1::ConversationRef {
                target: Some(conversation),
            }),
            client_msg_id: client_msg_id.into(),
            body: body.into(),
        }))
        .await
    }

    /// Replaces the body of one of this user's messages.
    pub async fn edit_message(
        &self,
        conversation_id: &str,
        client_msg_id: &str,
        seq: u64,
        body: &str,
    ) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::EditMessage(v1::EditMessage {
            conversation: Some(v1::ConversationRef {
                target: Some(conversation_ref::Target::ConversationId(conversation_id.into())),
            }),
            client_msg_id: client_msg_id.into(),
            seq,
            body: body.into(),
        }))
        .await
    }

    /// Deletes one of this user's messages.
    pub async fn delete_message(
        &self,
        conversation_id: &str,
        client_msg_id: &str,
        seq: u64,
    ) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::DeleteMessage(v1::DeleteMessage {
            conversation: Some(v1::ConversationRef {
                target: Some(conversation_ref::Target::ConversationId(conversation_id.into())),
            }),
            client_msg_id: client_msg_id.into(),
            seq,
        }))
        .await
    }

    /// Creates a group; the ack names its conversation id. Retrying with the same
    /// `client_msg_id` returns the same ack.
    pub async fn create_group(
        &self,
        client_msg_id: &str,
        title: &str,
        members: &[UserId],
    ) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::CreateGroup(v1::CreateGroup {
            client_msg_id: client_msg_id.into(),
            title: title.into(),
            members: raw_ids(members),
        }))
        .await
    }

    pub async fn add_members(
        &self,
        conversation_id: &str,
        client_msg_id: &str,
        user_ids: &[UserId],
    ) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::AddMembers(v1::AddMembers {
            conversation_id: conversation_id.into(),
            client_msg_id: client_msg_id.into(),
            user_ids: raw_ids(user_ids),
        }))
        .await
    }

    pub async fn remove_member(
        &self,
        conversation_id: &str,
        client_msg_id: &str,
        user_id: UserId,
    ) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::RemoveMember(v1::RemoveMember {
            conversation_id: conversation_id.into(),
            client_msg_id: client_msg_id.into(),
            user_id: user_id.get(),
        }))
        .await
    }

    pub async fn leave_group(&self, conversation_id: &str, client_msg_id: &str) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::LeaveGroup(v1::LeaveGroup {
            conversation_id: conversation_id.into(),
            client_msg_id: client_msg_id.into(),
        }))
        .await
    }

    pub async fn rename_group(
        &self,
        conversation_id: &str,
        client_msg_id: &str,
        title: &str,
    ) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::RenameGroup(v1::RenameGroup {
            conversation_id: conversation_id.into(),
            client_msg_id: client_msg_id.into(),
            title: title.into(),
        }))
        .await
    }

    pub async fn set_role(
        &self,
        conversation_id: &str,
        client_msg_id: &str,
        user_id: UserId,
        role: v1::Role,
    ) -> Result<v1::SendAck, ClientError> {
        self.ack(client_frame::Kind::SetRole(v1::SetRole {
            conversation_id: conversation_id.into(),
            client_msg_id: client_msg_id.into(),
            user_id: user_id.get(),
            role: role as i32,
        }))
        .await
    }

    /// One page of a group's current members, by user id: those after
    /// `after` (`None`: from the first).
    pub async fn list_members(
        &self,
        conversation_id: &str,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<v1::MemberList, ClientError> {
        let request = client_frame::Kind::ListMembers(v1::ListMembers {
            conversation_id: conversation_id.into(),
            after_user_id: after.map_or(0, UserId::get),
            limit,
        });
        match self.request(request).await? {
            server_frame::Kind::MemberList(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }

    /// A request answered by a `SendAck`.
    async fn ack(&self, request: client_frame::Kind) -> Result<v1::SendAck, ClientError> {
        match self.request(request).await? {
            server_frame::Kind::SendAck(ack) => Ok(ack),
            other => Err(unexpected(other)),
        }
    }

    /// One page of a conversation's history (see `History` in docs/PROTOCOL.md).
    pub async fn history(
        &self,
        conversation_id: &str,
        before_seq: Option<u64>,
        after_seq: Option<u64>,
        limit: u32,
    ) -> Result<v1::HistoryPage, ClientError> {
        let request = client_frame::Kind::History(v1::History {
            conversation: Some(v1::ConversationRef {
                target: Some(conversation_ref::Target::ConversationId(conversation_id.into())),
            }),
            before_seq,
            after_seq,
            limit,
        });
        match self.request(request).await? {
            server_frame::Kind::HistoryPage(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// Every message of a conversation, oldest first, paging forward.
    pub async fn full_history(&self, conversation_id: &str) -> Result<Vec<v1::Message>, ClientError> {
        let mut messages = Vec::new();
        let mut after = 0;
        loop {
            let page = self.history(conversation_id, None, Some(after), 0).await?;
            if let Some(last) = page.messages.last() {
                after = last.seq;
            }
            messages.extend(page.messages);
            if !page.has_more {
                return Ok(messages);
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(quic) = &self.quic {
            quic.connection.close(quinn::VarInt::from_u32(0), b"client closed");
        }
    }
}

/// Sends the encoded `Hello` and reads the `Welcome`.
/// Writes the opening frames (`Hello`, maybe `Authenticate`) and reads the `Welcome`.
async fn handshake(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    opening: &[Bytes],
) -> Result<v1::Welcome, ClientError> {
    writer.write_all(opening).await?;
    let reply = reader
        .next(&FrameDecoder::new(HANDSHAKE_MAX_FRAME))
        .await?
        .ok_or(ClientError::Closed)?;
    match reply.kind {
        Some(server_frame::Kind::Welcome(welcome)) => Ok(welcome),
        other => Err(unexpected_or_error(other)),
    }
}

async fn read_frames(
    mut reader: FrameReader,
    decoder: FrameDecoder,
    pending: Pending,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut close_reason = None;
    while let Ok(Some(frame)) = reader.next(&decoder).await {
        if frame.request_id != 0 {
            let waiter = pending
                .lock()
                .ok()
                .and_then(|mut pending| pending.as_mut()?.remove(&frame.request_id));
            if let Some(waiter) = waiter {
                let _ = waiter.send(frame);
            }
            continue;
        }
        let event = match frame.kind {
            Some(server_frame::Kind::Message(message)) => Event::Message(message),
            Some(server_frame::Kind::Receipt(receipt)) => Event::Receipt(receipt),
            Some(server_frame::Kind::TypingUpdate(typing)) => Event::Typing(typing),
            Some(server_frame::Kind::PresenceUpdate(presence)) => Event::Presence(presence),
            Some(server_frame::Kind::GoingAway(going_away)) => Event::GoingAway(going_away),
            Some(server_frame::Kind::Error(error)) => {
                close_reason = Some(error);
                continue;
            }
            _ => continue,
        };
        let _ = events.send(event);
    }
    // Waiters of unanswered requests see their channel close, and later ones
    // are refused.
    if let Ok(mut pending) = pending.lock() {
        *pending = None;
    }
    let _ = events.send(Event::Closed(close_reason));
}

async fn write_frames(mut writer: FrameWriter, mut queued: mpsc::UnboundedReceiver<Bytes>) {
    while let Some(frame) = queued.recv().await {
        if writer.write(frame).await.is_err() {
            return;
        }
    }
    writer.shutdown().await;
}

async fn heartbeat(outbound: mpsc::UnboundedSender<Bytes>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let ping = ClientFrame {
            request_id: 0,
            kind: Some(client_frame::Kind::Ping(v1::Ping { nonce: 0 })),
        };
        if outbound.send(encode_frame(&ping)).is_err() {
            return;
        }
    }
}

fn conversation_cursors(cursors: &[(String, u64)]) -> Vec<v1::ConversationCursor> {
    cursors
        .iter()
        .map(|(conversation_id, seq)| v1::ConversationCursor {
            conversation_id: conversation_id.clone(),
            seq: *seq,
        })
        .collect()
}

fn server_error(error: v1::Error) -> ClientError {
    ClientError::Server {
        code: ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified),
        message: error.message,
    }
}

/// A user id from the server, which never names user 0.
fn user_id(raw: u64) -> Result<UserId, ClientError> {
    UserId::new(raw).ok_or_else(|| ClientError::Unexpected("user id 0".into()))
}

fn raw_ids(ids: &[UserId]) -> Vec<u64> {
    ids.iter().map(|id| id.get()).collect()
}

fn unexpected(kind: server_frame::Kind) -> ClientError {
    ClientError::Unexpected(format!("{kind:?}"))
}

fn unexpected_or_error(kind: Option<server_frame::Kind>) -> ClientError {
    match kind {
        Some(server_frame::Kind::Error(error)) => server_error(error),
        other => ClientError::Unexpected(format!("{other:?}")),
    }
}
