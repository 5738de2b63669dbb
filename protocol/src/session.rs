//! One connection's protocol state machine.
//!
//! States: awaiting `Hello` → open (unauthenticated) → authenticated. The session
//! validates each frame against the state and the limits and answers with a
//! [`Step`]: reply now, run a command, or close. Deadlines: `Hello` within the
//! handshake timeout, authentication within the auth timeout, and at least one
//! frame every three heartbeat intervals.

use crate::command::{Command, Request};
use crate::content::{Append, Content, GroupCommand, Role};
use crate::credentials::{Identity, InvalidPushToken, Password, PushToken, Username, device_label, device_name};
use crate::cursors::Cursors;
use crate::history::{HistoryRange, Marks};
use crate::ids::{ConversationId, DeviceId, GroupId, GroupIds, UserId};
use crate::rate::{Rate, TokenBucket};
use crate::reply::error_frame;
use confab_proto::FrameError;
use confab_proto::v1::{
    self, ClientFrame, ErrorCode, ProtocolVersion, ServerFrame, client_frame, conversation_ref, server_frame,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default History page when the request leaves `limit` at 0.
const DEFAULT_HISTORY_LIMIT: usize = 50;
/// Room kept in a frame for everything but the message body, so a message that was
/// accepted always fits in the frame that pushes it, and in a History or Sync reply
/// (with its sync token).
const FRAME_OVERHEAD_BYTES: usize = 16 * 1024;
/// Heartbeat intervals of silence after which the connection is closed.
const SILENT_INTERVALS: u32 = 3;

/// Limits a session enforces, from the config.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// The largest frame either side may send.
    pub max_frame_bytes: usize,
    /// How often the client pings; three intervals of silence close.
    pub heartbeat_interval: Duration,
    /// `Hello` must arrive within this.
    pub handshake_timeout: Duration,
    /// Authentication must succeed within this (from the start or a `LogOut`).
    pub auth_timeout: Duration,
    /// The longest message body, in characters.
    pub max_body_chars: usize,
    /// The longest idempotency key, in bytes.
    pub max_client_msg_id_bytes: usize,
    /// The most messages one History page holds.
    pub max_history_limit: u32,
    /// Failed credential checks after which the connection closes.
    pub max_auth_failures: u32,
    /// The most members a group has.
    pub max_group_members: usize,
    /// The longest group title, in characters.
    pub max_group_title_chars: usize,
    /// Typing signals per conversation at most once per this.
    pub typing_min_interval: Duration,
    /// The most users one presence request names.
    pub max_presence_subscriptions: usize,
    /// Messages (sends, edits, deletes, group changes) one connection may send.
    pub send_rate: Rate,
    /// Reads ([`Command::is_read`]) one connection may make.
    pub read_rate: Rate,
}

/// What the driver does with a frame.
#[derive(Debug)]
pub enum Step {
    /// Send this frame.
    Reply(ServerFrame),
    /// Execute this command and send its reply.
    Run(Request),
    /// Send this frame, then close the connection.
    Close(ServerFrame),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingHello,
    Open,
}

/// One connection's protocol state: where it is in the handshake, who it
/// authenticated as, its rates, its deadlines.
#[derive(Debug)]
pub struct Session {
    id: u64,
    state: State,
    identity: Option<Identity>,
    /// When the access token the session authenticated with expires.
    access_expires_at: Option<Instant>,
    /// Shared by every session of a node (an idle connection should not
    /// carry its own copy, nor of the group-id key below).
    limits: Arc<SessionLimits>,
    opened_at: Instant,
    last_heard: Instant,
    auth_failures: u32,
    group_ids: Arc<GroupIds>,
    /// This connection's share of messages.
    sends: TokenBucket,
    /// This connection's share of reads.
    reads: TokenBucket,
    /// When this device last sent typing to each conversation, and what.
    typing_sent: HashMap<ConversationId, (Instant, bool)>,
    /// A token the transport took before the protocol began (a WebSocket
    /// `?token=`): authenticated with right after `Hello`.
    upgrade_token: Option<String>,
}

/// A request rejected before it runs: the error to reply with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{1}")]
pub struct Rejection(ErrorCode, String);

impl crate::ErrorKind for Rejection {
    fn code(&self) -> ErrorCode {
        self.0
    }
}

fn reject<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection(code, message.into()))
}

impl Session {
    /// A session opened at `now`, waiting for `Hello`.
    pub fn new(
        id: u64,
        limits: impl Into<Arc<SessionLimits>>,
        group_ids: impl Into<Arc<GroupIds>>,
        now: Instant,
    ) -> Self {
        let (limits, group_ids) = (limits.into(), group_ids.into());
        Self {
            id,
            state: State::AwaitingHello,
            identity: None,
            access_expires_at: None,
            sends: TokenBucket::new(limits.send_rate, now),
            reads: TokenBucket::new(limits.read_rate, now),
            limits,
            opened_at: now,
            last_heard: now,
            auth_failures: 0,
            group_ids,
            typing_sent: HashMap::new(),
            upgrade_token: None,
        }
    }

    /// Authenticates with `access_token` as soon as `Hello` is answered, as if
    /// the client had sent `Authenticate` next: for a token the transport took
    /// before the protocol began (a WebSocket `?token=`). See
    /// [`Session::poll_request`].
    pub fn authenticate_after_hello(&mut self, access_token: String) {
        self.upgrade_token = Some(access_token);
    }

    /// A request the session makes itself, to run (in order) before the next
    /// frame is read: the `Authenticate` of [`Session::authenticate_after_hello`],
    /// once `Hello` was answered. Its reply has request id 0.
    pub fn poll_request(&mut self) -> Option<Request> {
        if self.state == State::AwaitingHello {
            return None;
        }
        self.upgrade_token.take().map(|access_token| Request {
            id: 0,
            command: Command::Authenticate {
                access_token,
                resume: None,
                device: None,
            },
        })
    }

    /// Screens a frame that arrived as early data (QUIC 0-RTT), which an
    /// attacker can replay: only frames a replay cannot turn into a second effect
    /// pass (the handshake, reads, and authentication, which only binds this
    /// connection). Returns the close frame for any other.
    pub fn screen_early(&self, frame: &ClientFrame) -> Option<ServerFrame> {
        use client_frame::Kind as K;
        let replay_safe = matches!(
            frame.kind,
            Some(
                K::Hello(_)
                    | K::Ping(_)
                    | K::Authenticate(_)
                    | K::GetUser(_)
                    | K::History(_)
                    | K::Sync(_)
                    | K::ListConversations(_)
                    | K::ListMembers(_)
            )
        );
        (!replay_safe).then(|| {
            error_frame(
                frame.request_id,
                ErrorCode::BadRequest,
                "only idempotent frames (Hello, Ping, Authenticate, reads) are allowed in 0-RTT",
            )
        })
    }

    /// The id the `Welcome` names it by.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Who it authenticated as, if it has.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Handles one decoded frame.
    pub fn on_frame(&mut self, frame: ClientFrame, now: Instant) -> Step {
        self.last_heard = now;
        let request_id = frame.request_id;
        let Some(kind) = frame.kind else {
            return Step::Reply(error_frame(
                request_id,
                ErrorCode::BadRequest,
                "empty or unknown frame type",
            ));
        };
        if self.state == State::AwaitingHello {
            return self.on_hello(request_id, kind);
        }
        match self.parse(kind, now) {
            Ok(Parsed::Reply(kind)) => Step::Reply(ServerFrame {
                request_id,
                kind: Some(kind),
            }),
            Ok(Parsed::Run(command)) => match self.charge_read(&command, now) {
                Ok(()) => Step::Run(Request {
                    id: request_id,
                    command,
                }),
                Err(Rejection(code, message)) => Step::Reply(error_frame(request_id, code, message)),
            },
            Err(Rejection(code, message)) => Step::Reply(error_frame(request_id, code, message)),
        }
    }

    /// Records a transport-level keepalive: the peer is alive, though it sent no frame.
    pub fn on_keepalive(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The close frame for bytes that could not be decoded into a frame.
    pub fn on_decode_error(&self, err: &FrameError) -> ServerFrame {
        let code = match err {
            FrameError::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::BadRequest,
        };
        error_frame(0, code, err.to_string())
    }

    /// When [`Session::on_deadline`] must next be called.
    pub fn deadline(&self) -> Instant {
        let silence = self.last_heard + self.limits.heartbeat_interval * SILENT_INTERVALS;
        let setup = match (self.state, &self.identity) {
            (State::AwaitingHello, _) => Some(self.opened_at + self.limits.handshake_timeout),
            (State::Open, None) => Some(self.opened_at + self.limits.auth_timeout),
            (State::Open, Some(_)) => self.access_expires_at,
        };
        setup.map_or(silence, |setup| setup.min(silence))
    }

    /// The close frame if a deadline has passed.
    pub fn on_deadline(&self, now: Instant) -> Option<ServerFrame> {
        if now < self.deadline() {
            return None;
        }
        let expired = self.identity.is_some() && self.access_expires_at.is_some_and(|expiry| now >= expiry);
        let (code, message) = match (self.state, &self.identity) {
            (State::AwaitingHello, _) if now >= self.opened_at + self.limits.handshake_timeout => {
                (ErrorCode::Timeout, "no Hello in time")
            }
            (State::Open, None) if now >= self.opened_at + self.limits.auth_timeout => {
                (ErrorCode::Timeout, "not authenticated in time")
            }
            (State::Open, Some(_)) if expired => (
                ErrorCode::Unauthenticated,
                "the access token expired: refresh it and authenticate again",
            ),
            _ => (ErrorCode::Timeout, "connection silent for three heartbeat intervals"),
        };
        Some(error_frame(0, code, message))
    }

    /// Records a successful `Authenticate` with a token that expires at
    /// `expires_at`; the connection is closed then unless it authenticates again
    /// (with a refreshed token for the same device) before.
    pub fn authenticated(&mut self, identity: Identity, expires_at: Instant) {
        self.identity = Some(identity);
        self.access_expires_at = Some(expires_at);
    }

    /// Records a `LogOut`: the connection is unauthenticated again.
    pub fn logged_out(&mut self) {
        self.identity = None;
        self.access_expires_at = None;
        // The auth deadline counts from now, not from the connection's start.
        self.opened_at = self.last_heard;
    }

    /// Records that a command that touches authentication (one that is not
    /// [pipelined](Command::is_pipelined)) was refused with `code`. A refusal as
    /// UNAUTHENTICATED is a failed credential check (a wrong password, token or
    /// refresh token, a revoked device); returns the close frame once the
    /// connection has failed `max_auth_failures` times.
    pub fn on_refused(&mut self, code: ErrorCode) -> Option<ServerFrame> {
        if code != ErrorCode::Unauthenticated {
            return None;
        }
        self.auth_failures += 1;
        (self.auth_failures >= self.limits.max_auth_failures)
            .then(|| error_frame(0, ErrorCode::RateLimited, "too many failed authentication attempts"))
    }

    fn on_hello(&mut self, request_id: u64, kind: client_frame::Kind) -> Step {
        let client_frame::Kind::Hello(hello) = kind else {
            return Step::Close(error_frame(
                request_id,
                ErrorCode::BadRequest,
                "the first frame must be Hello",
            ));
        };
        if hello.protocol_version != ProtocolVersion::V1 as i32 {
            return Step::Close(error_frame(
                request_id,
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported; this server speaks 1",
                    hello.protocol_version
                ),
            ));
        }
        self.state = State::Open;
        let clamp = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        Step::Reply(ServerFrame {
            request_id,
            kind: Some(server_frame::Kind::Welcome(v1::Welcome {
                server_version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol_version: ProtocolVersion::V1 as i32,
                session_id: format!("{:016x}", self.id),
                limits: Some(v1::Limits {
                    max_frame_bytes: clamp(self.limits.max_frame_bytes),
                    heartbeat_interval_ms: u32::try_from(self.limits.heartbeat_interval.as_millis())
                        .unwrap_or(u32::MAX),
                    max_body_chars: clamp(self.limits.max_body_chars),
                    max_history_limit: self.limits.max_history_limit,
                }),
            })),
        })
    }

    fn parse(&mut self, kind: client_frame::Kind, now: Instant) -> Result<Parsed, Rejection> {
        use client_frame::Kind as K;
        Ok(match kind {
            K::Hello(_) => return reject(ErrorCode::BadRequest, "Hello was already received"),
            K::Ping(ping) => Parsed::Reply(server_frame::Kind::Pong(v1::Pong { nonce: ping.nonce })),
            K::SignUp(sign_up) => Parsed::Run(Command::SignUp {
                username: Username::parse(&sign_up.username)
                    .or_else(|err| reject(ErrorCode::BadRequest, err.to_string()))?,
                password: Password::parse(sign_up.password)
                    .or_else(|err| reject(ErrorCode::BadRequest, err.to_string()))?,
            }),
            K::LogIn(log_in) => {
                // A malformed name or password cannot match an account: same answer as a wrong one.
                let invalid = || Rejection(ErrorCode::Unauthenticated, "invalid username or password".into());
                Parsed::Run(Command::LogIn {
                    username: Username::parse(&log_in.username).map_err(|_| invalid())?,
                    password: Password::parse(log_in.password).map_err(|_| invalid())?,
                    device_name: device_name(&log_in.device_name),
                })
            }
            K::Authenticate(authenticate) => {
                // Authenticating again (with a refreshed token, before the old
                // one expires) keeps the connection; resuming only opens one.
                if self.identity.is_some() && authenticate.resume.is_some() {
                    return reject(
                        ErrorCode::BadRequest,
                        "already authenticated: resume applies to a new connection",
                    );
                }
                let resume = match authenticate.resume {
                    Some(resume) => Some(cursors(&resume.sync_token, resume.cursors)?),
                    None => None,
                };
                Parsed::Run(Command::Authenticate {
                    access_token: authenticate.access_token,
                    resume,
                    device: device_label(&authenticate.device)
                        .or_else(|err| reject(ErrorCode::BadRequest, err.to_string()))?,
                })
            }
            K::RefreshToken(refresh) => Parsed::Run(Command::RefreshToken {
                refresh_token: refresh.refresh_token,
            }),
            K::LogOut(_) => {
                let (user, device) = self.require_identity()?;
                Parsed::Run(Command::LogOut { user, device })
            }
            K::MuteConversation(mute) => {
                let (user, _) = self.require_identity()?;
                self.charge_write(now)?;
                let conversation = ConversationId::parse(&mute.conversation_id)
                    .map_err(|err| Rejection(ErrorCode::BadRequest, err.to_string()))?;
                direct_member(conversation, user)?;
                Parsed::Run(Command::MuteConversation {
                    user,
                    conversation,
                    muted: mute.muted,
                })
            }
            K::RegisterPushToken(register) => {
                let (user, device) = self.require_identity()?;
                self.charge_write(now)?;
                let push = PushToken::parse(register.platform, register.token).map_err(|err| {
                    let code = match err {
                        InvalidPushToken::TooLong => ErrorCode::TooLarge,
                        _ => ErrorCode::BadRequest,
                    };
                    Rejection(code, err.to_string())
                })?;
                Parsed::Run(Command::RegisterPushToken { user, device, push })
            }
            K::ListDevices(_) => {
                let (user, device) = self.require_identity()?;
                Parsed::Run(Command::ListDevices { user, device })
            }
            K::RevokeDevice(revoke) => {
                let (user, current) = self.require_identity()?;
                let device = DeviceId::new(revoke.device_id)
                    .ok_or_else(|| Rejection(ErrorCode::BadRequest, "device_id is required".into()))?;
                if device == current {
                    return reject(ErrorCode::BadRequest, "this is the current device: use LogOut");
                }
                Parsed::Run(Command::RevokeDevice { user, device })
            }
            K::ChangePassword(change) => {
                self.require_identity()?;
                // A malformed current password cannot match: same answer as a wrong one.
                let current = Password::parse(change.current_password)
                    .map_err(|_| Rejection(ErrorCode::Unauthenticated, "invalid username or password".into()))?;
                let new = Password::parse(change.new_password)
                    .or_else(|err| reject(ErrorCode::BadRequest, err.to_string()))?;
                Parsed::Run(Command::ChangePassword { current, new })
            }
            K::GetUser(get_user) => {
                self.require_identity()?;
                Parsed::Run(Command::GetUser {
                    username: Username::lookup(&get_user.username)
                        .or_else(|err| reject(ErrorCode::BadRequest, err.to_string()))?,
                })
            }
            K::Send(send) => {
                let (sender, _) = self.require_identity()?;
                let conversation = self.conversation(send.conversation, sender)?;
                self.limits.check_body(&send.body)?;
                self.append(conversation, send.client_msg_id, Content::Text(send.body), now)?
            }
            K::EditMessage(edit) => {
                let (sender, _) = self.require_identity()?;
                let conversation = self.conversation(edit.conversation, sender)?;
                self.limits.check_body(&edit.body)?;
                let content = Content::Edit {
                    target: edit.seq,
                    body: edit.body,
                };
                self.append(conversation, edit.client_msg_id, content, now)?
            }
            K::DeleteMessage(delete) => {
                let (sender, _) = self.require_identity()?;
                let conversation = self.conversation(delete.conversation, sender)?;
                self.append(
                    conversation,
                    delete.client_msg_id,
                    Content::Delete { target: delete.seq },
                    now,
                )?
            }
            K::Typing(typing) => {
                let (user, device) = self.require_identity()?;
                let reference = v1::ConversationRef {
                    target: Some(conversation_ref::Target::ConversationId(typing.conversation_id)),
                };
                let conversation = self.conversation(Some(reference), user)?;
                self.throttle_typing(conversation, typing.typing, now)?;
                Parsed::Run(Command::Typing {
                    conversation,
                    user,
                    device,
                    typing: typing.typing,
                })
            }
            K::SubscribePresence(subscribe) => {
                let (subscriber, _) = self.require_identity()?;
                Parsed::Run(Command::SubscribePresence {
                    subscriber,
                    users: self.presence_users(subscribe.user_ids)?,
                })
            }
            K::UnsubscribePresence(unsubscribe) => {
                let (subscriber, _) = self.require_identity()?;
                Parsed::Run(Command::UnsubscribePresence {
                    subscriber,
                    users: self.presence_users(unsubscribe.user_ids)?,
                })
            }
            K::CreateGroup(create) => {
                let (creator, device) = self.require_identity()?;
                self.limits.check_client_msg_id(&create.client_msg_id)?;
                let group = self.group_ids.derive(creator, device, &create.client_msg_id);
                let command = GroupCommand::Create {
                    title: self.limits.group_title(&create.title)?,
                    members: self.limits.group_members(create.members)?,
                };
                self.append(
                    ConversationId::Group(group),
                    create.client_msg_id,
                    Content::Group(command),
                    now,
                )?
            }
            K::AddMembers(add) => {
                let command = GroupCommand::Add(self.limits.group_members(add.user_ids)?);
                self.group_change(&add.conversation_id, add.client_msg_id, command, now)?
            }
            K::RemoveMember(remove) => {
                let command = GroupCommand::Remove(user_id(remove.user_id)?);
                self.group_change(&remove.conversation_id, remove.client_msg_id, command, now)?
            }
            K::LeaveGroup(leave) => {
                self.group_change(&leave.conversation_id, leave.client_msg_id, GroupCommand::Leave, now)?
            }
            K::RenameGroup(rename) => {
                let command = GroupCommand::Rename(self.limits.group_title(&rename.title)?);
                self.group_change(&rename.conversation_id, rename.client_msg_id, command, now)?
            }
            K::SetRole(set_role) => {
                let role = match Role::from_proto(set_role.role) {
                    Some(role @ (Role::Member | Role::Admin)) => role,
                    _ => {
                        return reject(ErrorCode::BadRequest, "role must be ROLE_MEMBER or ROLE_ADMIN");
                    }
                };
                let command = GroupCommand::SetRole(user_id(set_role.user_id)?, role);
                self.group_change(&set_role.conversation_id, set_role.client_msg_id, command, now)?
            }
            K::Sync(sync) => {
                let (user, _) = self.require_identity()?;
                Parsed::Run(Command::Sync {
                    user,
                    cursors: cursors(&sync.sync_token, sync.cursors)?,
                    limit: page_limit(sync.limit, DEFAULT_SYNC_LIMIT, MAX_SYNC_LIMIT),
                })
            }
            K::ListConversations(list) => {
                let (user, _) = self.require_identity()?;
                let after = match list.page_token.as_str() {
                    "" => None,
                    token => Some(page_token(token)?),
                };
                Parsed::Run(Command::ListConversations {
                    user,
                    after,
                    limit: page_limit(list.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT),
                })
            }
            K::MarkDelivered(mark) => self.mark(
                &mark.conversation_id,
                Marks {
                    delivered_seq: mark.seq,
                    read_seq: 0,
                },
            )?,
            K::MarkRead(mark) => self.mark(
                &mark.conversation_id,
                Marks {
                    // What was read was delivered.
                    delivered_seq: mark.seq,
                    read_seq: mark.seq,
                },
            )?,
            K::ListMembers(list) => {
                let (reader, _) = self.require_identity()?;
                let group = group_id(&list.conversation_id)?;
                let limit = match list.limit {
                    0 => DEFAULT_MEMBER_LIMIT,
                    limit => widen(limit).min(MAX_MEMBER_LIMIT),
                };
                Parsed::Run(Command::ListMembers {
                    group,
                    reader,
                    after: UserId::new(list.after_user_id),
                    limit,
                })
            }
            K::History(history) => {
                let (reader, _) = self.require_identity()?;
                let conversation = self.conversation(history.conversation, reader)?;
                let range = match (history.before_seq, history.after_seq) {
                    (None, None) => HistoryRange::Latest,
                    (Some(before), None) => HistoryRange::Before(before),
                    (None, Some(after)) => HistoryRange::After(after),
                    (Some(_), Some(_)) => {
                        return reject(ErrorCode::BadRequest, "set at most one of before_seq and after_seq");
                    }
                };
                let limit = match history.limit {
                    0 => DEFAULT_HISTORY_LIMIT.min(widen(self.limits.max_history_limit)),
                    limit => widen(limit.min(self.limits.max_history_limit)),
                };
                Parsed::Run(Command::History {
                    conversation,
                    reader,
                    range,
                    limit,
                })
            }
        })
    }

    /// Takes a read from the connection's read rate, if `command` is one.
    fn charge_read(&mut self, command: &Command, now: Instant) -> Result<(), Rejection> {
        if !command.is_read() {
            return Ok(());
        }
        self.reads.take(1.0, now).or_else(|wait| {
            reject(
                ErrorCode::RateLimited,
                format!(
                    "reading too fast on this connection; retry in {} ms",
                    wait.as_millis().max(1)
                ),
            )
        })
    }

    /// Takes a write (a message, a group change, a push setting) from the
    /// connection's send rate.
    fn charge_write(&mut self, now: Instant) -> Result<(), Rejection> {
        self.sends.take(1.0, now).or_else(|wait| {
            reject(
                ErrorCode::RateLimited,
                format!(
                    "sending too fast on this connection; retry in {} ms",
                    wait.as_millis().max(1)
                ),
            )
        })
    }

    /// A message or group change by the authenticated device, within the
    /// connection's send rate.
    fn append(
        &mut self,
        conversation: ConversationId,
        client_msg_id: String,
        content: Content,
        now: Instant,
    ) -> Result<Parsed, Rejection> {
        let (sender, sender_device) = self.require_identity()?;
        self.limits.check_client_msg_id(&client_msg_id)?;
        self.charge_write(now)?;
        Ok(Parsed::Run(Command::Append(Append {
            conversation,
            sender,
            sender_device,
            client_msg_id,
            content,
        })))
    }

    /// At most one typing signal per conversation per interval; a change of state
    /// (stopping) always goes through.
    fn throttle_typing(&mut self, conversation: ConversationId, typing: bool, now: Instant) -> Result<(), Rejection> {
        let interval = self.limits.typing_min_interval;
        if let Some((sent, state)) = self.typing_sent.get(&conversation)
            && *state == typing
            && now.duration_since(*sent) < interval
        {
            return reject(ErrorCode::RateLimited, "typing is sent at most once per interval");
        }
        if self.typing_sent.len() >= MAX_TYPING_CONVERSATIONS {
            self.typing_sent
                .retain(|_, (sent, _)| now.duration_since(*sent) < interval);
        }
        self.typing_sent.insert(conversation, (now, typing));
        Ok(())
    }

    fn mark(&self, conversation_id: &str, marks: Marks) -> Result<Parsed, Rejection> {
        let (user, device) = self.require_identity()?;
        let reference = v1::ConversationRef {
            target: Some(conversation_ref::Target::ConversationId(conversation_id.to_owned())),
        };
        let conversation = self.conversation(Some(reference), user)?;
        Ok(Parsed::Run(Command::Mark {
            conversation,
            user,
            device,
            marks,
        }))
    }

    fn group_change(
        &mut self,
        conversation_id: &str,
        client_msg_id: String,
        command: GroupCommand,
        now: Instant,
    ) -> Result<Parsed, Rejection> {
        self.require_identity()?;
        let group = group_id(conversation_id)?;
        self.append(
            ConversationId::Group(group),
            client_msg_id,
            Content::Group(command),
            now,
        )
    }

    /// User ids of a presence request: none 0, bounded, no repeats.
    fn presence_users(&self, raw: Vec<u64>) -> Result<Vec<UserId>, Rejection> {
        if raw.len() > self.limits.max_presence_subscriptions {
            return reject(
                ErrorCode::TooLarge,
                format!("at most {} users per request", self.limits.max_presence_subscriptions),
            );
        }
        let mut users = raw.into_iter().map(user_id).collect::<Result<Vec<_>, _>>()?;
        users.sort_unstable();
        users.dedup();
        Ok(users)
    }

    fn require_identity(&self) -> Result<(UserId, DeviceId), Rejection> {
        match &self.identity {
            Some(identity) => Ok((identity.user, identity.device)),
            None => reject(ErrorCode::Unauthenticated, "authenticate first"),
        }
    }

    /// Resolves a conversation reference for `user`, who must be a member.
    fn conversation(&self, reference: Option<v1::ConversationRef>, user: UserId) -> Result<ConversationId, Rejection> {
        let target = reference.and_then(|reference| reference.target);
        let conversation = match target {
            None => return reject(ErrorCode::BadRequest, "conversation is required"),
            Some(conversation_ref::Target::DirectUserId(other)) => match UserId::new(other) {
                Some(other) => ConversationId::direct(user, other),
                None => return reject(ErrorCode::BadRequest, "direct_user_id must not be 0"),
            },
            Some(conversation_ref::Target::ConversationId(text)) => {
                ConversationId::parse(&text).or_else(|err| reject(ErrorCode::BadRequest, err.to_string()))?
            }
        };
        direct_member(conversation, user)?;
        Ok(conversation)
    }
}

impl SessionLimits {
    /// A group title: trimmed, not empty, not too long.
    pub fn group_title(&self, raw: &str) -> Result<String, Rejection> {
        let title = raw.trim();
        if title.is_empty() {
            return reject(ErrorCode::BadRequest, "title is required");
        }
        if title.chars().count() > self.max_group_title_chars {
            return reject(
                ErrorCode::TooLarge,
                format!("title is longer than {} characters", self.max_group_title_chars),
            );
        }
        Ok(title.to_owned())
    }

    /// User ids of a group change: none 0, at most the group size.
    pub fn group_members(&self, raw: Vec<u64>) -> Result<Vec<UserId>, Rejection> {
        if raw.len() > self.max_group_members {
            return reject(
                ErrorCode::TooLarge,
                format!("a group has at most {} members", self.max_group_members),
            );
        }
        raw.into_iter().map(user_id).collect()
    }

    /// Checks a sender's idempotency key: present, and within its limit.
    pub fn check_client_msg_id(&self, client_msg_id: &str) -> Result<(), Rejection> {
        if client_msg_id.is_empty() {
            return reject(ErrorCode::BadRequest, "client_msg_id is required");
        }
        if client_msg_id.len() > self.max_client_msg_id_bytes {
            return reject(
                ErrorCode::TooLarge,
                format!("client_msg_id is longer than {} bytes", self.max_client_msg_id_bytes),
            );
        }
        Ok(())
    }

    /// Checks a message body: not empty, within the character and frame limits.
    pub fn check_body(&self, body: &str) -> Result<(), Rejection> {
        if body.is_empty() {
            return reject(ErrorCode::BadRequest, "body is empty");
        }
        let max_bytes = self.max_frame_bytes.saturating_sub(FRAME_OVERHEAD_BYTES);
        if body.len() > max_bytes || body.chars().count() > self.max_body_chars {
            return reject(
                ErrorCode::TooLarge,
                format!("body exceeds {} characters or {max_bytes} bytes", self.max_body_chars),
            );
        }
        Ok(())
    }
}

enum Parsed {
    Reply(server_frame::Kind),
    Run(Command),
}

/// Conversations whose last typing signal a session remembers before forgetting
/// the stale ones.
const MAX_TYPING_CONVERSATIONS: usize = 64;

/// Default and largest Sync reply (messages) and ListConversations page.
const DEFAULT_SYNC_LIMIT: usize = 500;
const MAX_SYNC_LIMIT: usize = 1000;
const DEFAULT_LIST_LIMIT: usize = 50;
const MAX_LIST_LIMIT: usize = 200;

fn page_limit(requested: u32, default: usize, max: usize) -> usize {
    match requested {
        0 => default,
        limit => widen(limit).min(max),
    }
}

/// A device's cursors: its sync token merged with explicit cursors.
fn cursors(token: &str, explicit: Vec<v1::ConversationCursor>) -> Result<Cursors, Rejection> {
    let mut cursors = Cursors::from_token(token).or_else(|err| reject(ErrorCode::BadRequest, err.to_string()))?;
    for cursor in explicit {
        let conversation = ConversationId::parse(&cursor.conversation_id)
            .or_else(|err| reject(ErrorCode::BadRequest, err.to_string()))?;
        cursors.advance(conversation, cursor.seq);
    }
    Ok(cursors)
}

/// ListConversations page tokens: `<last activity ms>.<conversation id>`.
pub fn encode_page_token(last_activity_ms: u64, conversation: ConversationId) -> String {
    format!("{last_activity_ms}.{conversation}")
}

fn page_token(token: &str) -> Result<(u64, ConversationId), Rejection> {
    let malformed = || Rejection(ErrorCode::BadRequest, "malformed page token".into());
    let (time, conversation) = token.split_once('.').ok_or_else(malformed)?;
    let time = time.parse().map_err(|_| malformed())?;
    let conversation = ConversationId::parse(conversation).map_err(|_| malformed())?;
    Ok((time, conversation))
}

/// Default and largest ListMembers page.
const DEFAULT_MEMBER_LIMIT: usize = 100;
const MAX_MEMBER_LIMIT: usize = 1000;

/// Refuses a direct conversation `user` is not one of: its members are in its
/// id. A group's are checked where its membership lives.
fn direct_member(conversation: ConversationId, user: UserId) -> Result<(), Rejection> {
    let outsider = matches!(conversation, ConversationId::Direct { .. })
        && !conversation.direct_members().any(|member| member == user);
    match outsider {
        true => reject(ErrorCode::Forbidden, "not a member of this conversation"),
        false => Ok(()),
    }
}

fn user_id(raw: u64) -> Result<UserId, Rejection> {
    UserId::new(raw).map_or_else(|| reject(ErrorCode::BadRequest, "user id must not be 0"), Ok)
}

fn group_id(conversation_id: &str) -> Result<GroupId, Rejection> {
    match ConversationId::parse(conversation_id) {
        Ok(ConversationId::Group(group)) => Ok(group),
        Ok(ConversationId::Direct { .. }) => reject(ErrorCode::BadRequest, "not a group conversation"),
        Err(err) => reject(ErrorCode::BadRequest, err.to_string()),
    }
}

/// A count from the wire as a `usize` (saturating where `usize` is narrower).
fn widen(count: u32) -> usize {
    usize::try_from(count).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use client_frame::Kind as K;

    fn limits() -> SessionLimits {
        SessionLimits {
            max_frame_bytes: 64 * 1024,
            heartbeat_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(60),
            max_body_chars: 100,
            max_client_msg_id_bytes: 16,
            max_history_limit: 200,
            max_auth_failures: 3,
            max_group_members: 10,
            max_group_title_chars: 16,
            typing_min_interval: Duration::from_secs(1),
            max_presence_subscriptions: 4,
            send_rate: Rate {
                per_second: 1.0,
                burst: 3.0,
            },
            read_rate: Rate {
                per_second: 2.0,
                burst: 2.0,
            },
        }
    }

    fn frame(request_id: u64, kind: K) -> ClientFrame {
        ClientFrame {
            request_id,
            kind: Some(kind),
        }
    }

    fn hello(version: ProtocolVersion) -> K {
        K::Hello(v1::Hello {
            protocol_version: version as i32,
            client_name: "test".into(),
            client_version: "0".into(),
        })
    }

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    fn error_code(step: &Step) -> Option<ErrorCode> {
        let frame = match step {
            Step::Reply(frame) | Step::Close(frame) => frame,
            Step::Run(_) => return None,
        };
        match &frame.kind {
            Some(server_frame::Kind::Error(error)) => ErrorCode::try_from(error.code).ok(),
            _ => None,
        }
    }

    fn open_session(now: Instant) -> Session {
        let mut session = Session::new(1, limits(), GroupIds::new(&[1; 32]), now);
        assert!(matches!(
            session.on_frame(frame(1, hello(ProtocolVersion::V1)), now),
            Step::Reply(_)
        ));
        session
    }

    fn identity(me: u64) -> Identity {
        Identity {
            user: user(me),
            device: DeviceId::new(1).unwrap(),
            username: "me".into(),
            display_name: String::new(),
            expires_at_ms: 0,
        }
    }

    fn authenticated_session(now: Instant, me: u64) -> Session {
        let mut session = open_session(now);
        session.authenticated(identity(me), now + Duration::from_secs(3600));
        session
    }

    /// Every connection holds one, idle or not: the node-wide parts (limits,
    /// the group-id key) are shared, not copied (they were 288 bytes more).
    #[test]
    fn a_session_carries_no_copy_of_what_every_session_shares() {
        let size = std::mem::size_of::<Session>();
        assert!(size <= 400, "a Session is {size} bytes");
        let session = Session::new(1, limits(), GroupIds::new(&[1; 32]), Instant::now());
        let again = Session::new(
            2,
            Arc::clone(&session.limits),
            Arc::clone(&session.group_ids),
            Instant::now(),
        );
        assert!(Arc::ptr_eq(&session.limits, &again.limits));
    }

    #[test]
    fn an_expired_access_token_closes_the_connection_unless_it_authenticates_again() {
        let start = Instant::now();
        let mut session = open_session(start);
        let expiry = start + Duration::from_secs(20);
        session.authenticated(identity(1), expiry);
        assert_eq!(session.deadline(), expiry.min(session.deadline()));
        assert!(session.on_deadline(expiry - Duration::from_millis(1)).is_none());
        // Authenticating again on the connection (a refreshed token) moves it.
        let again = session.on_frame(
            frame(
                5,
                K::Authenticate(v1::Authenticate {
                    access_token: "refreshed".into(),
                    ..v1::Authenticate::default()
                }),
            ),
            start + Duration::from_secs(10),
        );
        assert!(matches!(again, Step::Run(_)), "{again:?}");
        session.authenticated(identity(1), start + Duration::from_secs(40));
        assert!(session.on_deadline(expiry).is_none());
        let later = start + Duration::from_secs(40);
        session.on_keepalive(later);
        let close = session.on_deadline(later).unwrap();
        assert!(
            matches!(close.kind, Some(server_frame::Kind::Error(ref e)) if e.code == ErrorCode::Unauthenticated as i32),
            "{close:?}"
        );
        // Resuming is for new connections only.
        let resume = session.on_frame(
            frame(
                6,
                K::Authenticate(v1::Authenticate {
                    access_token: "x".into(),
                    resume: Some(v1::Resume::default()),
                    ..v1::Authenticate::default()
                }),
            ),
            later,
        );
        assert_eq!(error_code(&resume), Some(ErrorCode::BadRequest));
    }

    fn send(conversation: conversation_ref::Target, client_msg_id: &str, body: &str) -> K {
        K::Send(v1::Send {
            conversation: Some(v1::ConversationRef {
                target: Some(conversation),
            }),
            client_msg_id: client_msg_id.into(),
            body: body.into(),
        })
    }

    #[test]
    fn a_connection_sends_its_burst_then_is_rate_limited_and_stays_open() {
        let now = Instant::now();
        let mut session = authenticated_session(now, 1);
        let to = conversation_ref::Target::DirectUserId(2);
        for i in 0..3 {
            let step = session.on_frame(frame(i, send(to.clone(), &format!("m{i}"), "hi")), now);
            assert!(matches!(step, Step::Run(_)), "{step:?}");
        }
        let refused = session.on_frame(frame(9, send(to.clone(), "m9", "hi")), now);
        assert!(matches!(refused, Step::Reply(_)), "not a close: {refused:?}");
        assert_eq!(error_code(&refused), Some(ErrorCode::RateLimited));
        let later = now + Duration::from_secs(1);
        assert!(matches!(
            session.on_frame(frame(10, send(to, "m10", "hi")), later),
            Step::Run(_)
        ));
    }

    #[test]
    fn push_settings_are_writes_within_the_send_rate() {
        let now = Instant::now();
        let mut session = authenticated_session(now, 1);
        let token = |token: &str| {
            K::RegisterPushToken(v1::RegisterPushToken {
                platform: v1::PushPlatform::Fcm as i32,
                token: token.into(),
            })
        };
        let mute = K::MuteConversation(v1::MuteConversation {
            conversation_id: ConversationId::direct(user(1), user(2)).to_string(),
            muted: true,
        });
        for (i, kind) in [token("a"), mute.clone(), token("b")].into_iter().enumerate() {
            let step = session.on_frame(frame(i as u64 + 1, kind), now);
            assert!(matches!(step, Step::Run(_)), "{step:?}");
        }
        let refused = session.on_frame(frame(9, mute), now);
        assert_eq!(error_code(&refused), Some(ErrorCode::RateLimited));
        let stranger = K::MuteConversation(v1::MuteConversation {
            conversation_id: ConversationId::direct(user(2), user(3)).to_string(),
            muted: true,
        });
        let later = now + Duration::from_secs(1);
        let refused = session.on_frame(frame(10, stranger), later);
        assert_eq!(error_code(&refused), Some(ErrorCode::Forbidden));
    }

    #[test]
    fn reads_have_a_rate_of_their_own_and_other_requests_do_not_count() {
        let now = Instant::now();
        let mut session = authenticated_session(now, 1);
        let history = || {
            K::History(v1::History {
                conversation: Some(v1::ConversationRef {
                    target: Some(conversation_ref::Target::DirectUserId(2)),
                }),
                before_seq: None,
                after_seq: None,
                limit: 10,
            })
        };
        let get_user = K::GetUser(v1::GetUser { username: "bob".into() });
        assert!(matches!(session.on_frame(frame(1, history()), now), Step::Run(_)));
        assert!(matches!(session.on_frame(frame(2, get_user), now), Step::Run(_)));
        let refused = session.on_frame(frame(3, history()), now);
        assert_eq!(error_code(&refused), Some(ErrorCode::RateLimited), "{refused:?}");
        // Sends, pings and marks are not reads.
        let to = conversation_ref::Target::DirectUserId(2);
        assert!(matches!(
            session.on_frame(frame(4, send(to, "m1", "hi")), now),
            Step::Run(_)
        ));
        assert!(matches!(
            session.on_frame(frame(5, K::Ping(v1::Ping { nonce: 1 })), now),
            Step::Reply(_)
        ));
        let later = now + Duration::from_millis(500);
        assert!(matches!(session.on_frame(frame(6, history()), later), Step::Run(_)));
    }

    #[test]
    fn first_frame_must_be_hello() {
        let now = Instant::now();
        let mut session = Session::new(1, limits(), GroupIds::new(&[1; 32]), now);
        let step = session.on_frame(frame(1, K::Ping(v1::Ping { nonce: 1 })), now);
        assert!(matches!(step, Step::Close(_)));
        assert_eq!(error_code(&step), Some(ErrorCode::BadRequest));
    }

    #[test]
    fn wrong_version_closes_with_unsupported_version() {
        let now = Instant::now();
        let mut session = Session::new(1, limits(), GroupIds::new(&[1; 32]), now);
        let step = session.on_frame(frame(1, hello(ProtocolVersion::Unspecified)), now);
        assert!(matches!(step, Step::Close(_)));
        assert_eq!(error_code(&step), Some(ErrorCode::UnsupportedVersion));
    }

    #[test]
    fn hello_is_answered_with_limits_and_session_id() {
        let now = Instant::now();
        let mut session = Session::new(0xabc, limits(), GroupIds::new(&[1; 32]), now);
        let Step::Reply(reply) = session.on_frame(frame(7, hello(ProtocolVersion::V1)), now) else {
            panic!("expected a reply");
        };
        assert_eq!(reply.request_id, 7);
        let Some(server_frame::Kind::Welcome(welcome)) = reply.kind else {
            panic!("expected Welcome");
        };
        assert_eq!(welcome.session_id, "0000000000000abc");
        let limits = welcome.limits.unwrap();
        assert_eq!(limits.max_frame_bytes, 64 * 1024);
        assert_eq!(limits.heartbeat_interval_ms, 10_000);
    }

    #[test]
    fn chat_needs_authentication() {
        let now = Instant::now();
        let mut session = open_session(now);
        let step = session.on_frame(
            frame(2, send(conversation_ref::Target::DirectUserId(5), "m1", "hi")),
            now,
        );
        assert_eq!(error_code(&step), Some(ErrorCode::Unauthenticated));
        assert!(
            matches!(step, Step::Reply(_)),
            "an unauthenticated request is not fatal"
        );
    }

    #[test]
    fn send_resolves_the_direct_conversation() {
        let now = Instant::now();
        let mut session = authenticated_session(now, 9);
        let step = session.on_frame(
            frame(2, send(conversation_ref::Target::DirectUserId(5), "m1", "hi")),
            now,
        );
        let Step::Run(Request {
            id: 2,
            command: Command::Append(Append { conversation, .. }),
        }) = step
        else {
            panic!("expected Send, got {step:?}");
        };
        assert_eq!(conversation, ConversationId::direct(user(5), user(9)));
    }

    #[test]
    fn foreign_conversations_are_forbidden() {
        let now = Instant::now();
        let mut session = authenticated_session(now, 9);
        let step = session.on_frame(
            frame(
                2,
                send(conversation_ref::Target::ConversationId("d:1:2".into()), "m1", "hi"),
            ),
            now,
        );
        assert_eq!(error_code(&step), Some(ErrorCode::Forbidden));
        let step = session.on_frame(
            frame(
                3,
                send(conversation_ref::Target::ConversationId("bogus".into()), "m1", "hi"),
            ),
            now,
        );
        assert_eq!(error_code(&step), Some(ErrorCode::BadRequest));
    }

    #[test]
    fn oversized_and_empty_fields_are_rejected() {
        let now = Instant::now();
        let mut session = authenticated_session(now, 9);
        let to = || conversation_ref::Target::DirectUserId(5);
        let long_body = "é".repeat(101);
        for (kind, code) in [
            (send(to(), "m1", &long_body), ErrorCode::TooLarge),
            (send(to(), "m1", ""), ErrorCode::BadRequest),
            (send(to(), "", "hi"), ErrorCode::BadRequest),
            (send(to(), &"x".repeat(17), "hi"), ErrorCode::TooLarge),
        ] {
            assert_eq!(error_code(&session.on_frame(frame(2, kind), now)), Some(code));
        }
        assert!(matches!(
            session.on_frame(frame(2, send(to(), "m1", &"é".repeat(100))), now),
            Step::Run(_)
        ));
    }

    #[test]
    fn history_limit_is_capped_and_bounds_are_exclusive() {
        let now = Instant::now();
        let mut session = authenticated_session(now, 9);
        let history = |before_seq, after_seq, limit| {
            K::History(v1::History {
                conversation: Some(v1::ConversationRef {
                    target: Some(conversation_ref::Target::DirectUserId(5)),
                }),
                before_seq,
                after_seq,
                limit,
            })
        };
        let Step::Run(Request {
            command: Command::History { limit, range, .. },
            ..
        }) = session.on_frame(frame(1, history(Some(10), None, 1000)), now)
        else {
            panic!("expected History");
        };
        assert_eq!((limit, range), (200, HistoryRange::Before(10)));
        let step = session.on_frame(frame(1, history(Some(10), Some(2), 5)), now);
        assert_eq!(error_code(&step), Some(ErrorCode::BadRequest));
    }

    #[test]
    fn deadlines_close_silent_and_unauthenticated_connections() {
        let start = Instant::now();
        let session = Session::new(1, limits(), GroupIds::new(&[1; 32]), start);
        assert_eq!(session.deadline(), start + Duration::from_secs(5));
        assert!(session.on_deadline(start + Duration::from_secs(4)).is_none());
        assert!(session.on_deadline(start + Duration::from_secs(5)).is_some());

        let mut session = authenticated_session(start, 9);
        let later = start + Duration::from_secs(20);
        session.on_frame(frame(1, K::Ping(v1::Ping { nonce: 1 })), later);
        assert_eq!(session.deadline(), later + Duration::from_secs(30));
        let close = session.on_deadline(later + Duration::from_secs(30)).unwrap();
        assert!(matches!(close.kind, Some(server_frame::Kind::Error(ref e)) if e.code == ErrorCode::Timeout as i32));
    }

    #[test]
    fn typing_is_throttled_per_conversation_but_stopping_goes_through() {
        let start = Instant::now();
        let mut session = authenticated_session(start, 9);
        let typing = |typing| {
            frame(
                1,
                K::Typing(v1::Typing {
                    conversation_id: "d:5:9".into(),
                    typing,
                }),
            )
        };
        assert!(matches!(session.on_frame(typing(true), start), Step::Run(_)));
        let again = session.on_frame(typing(true), start + Duration::from_millis(500));
        assert_eq!(error_code(&again), Some(ErrorCode::RateLimited));
        assert!(matches!(
            session.on_frame(typing(false), start + Duration::from_millis(600)),
            Step::Run(_)
        ));
        assert!(matches!(
            session.on_frame(typing(true), start + Duration::from_millis(1700)),
            Step::Run(_)
        ));
    }

    #[test]
    fn repeated_auth_failures_close_the_connection() {
        let now = Instant::now();
        let mut session = open_session(now);
        assert!(session.on_refused(ErrorCode::Unauthenticated).is_none());
        for other in [ErrorCode::NotFound, ErrorCode::RateLimited, ErrorCode::Unavailable] {
            assert!(
                session.on_refused(other).is_none(),
                "{other:?} is no failed credential check"
            );
        }
        assert!(session.on_refused(ErrorCode::Unauthenticated).is_none());
        let close = session.on_refused(ErrorCode::Unauthenticated).map(Step::Close);
        assert_eq!(close.as_ref().and_then(error_code), Some(ErrorCode::RateLimited));
    }

    /// Early data can be replayed: anything with an effect beyond binding this
    /// connection must wait for the handshake.
    #[test]
    fn only_idempotent_frames_pass_as_early_data() {
        let session = Session::new(1, limits(), GroupIds::new(&[1; 32]), Instant::now());
        let safe = [
            hello(ProtocolVersion::V1),
            K::Authenticate(v1::Authenticate::default()),
            K::History(v1::History::default()),
            K::Sync(v1::Sync::default()),
        ];
        for kind in safe {
            assert!(session.screen_early(&frame(1, kind.clone())).is_none(), "{kind:?}");
        }
        let effects = [
            K::Send(v1::Send::default()),
            K::SignUp(v1::SignUp::default()),
            K::LogIn(v1::LogIn::default()),
            K::RefreshToken(v1::RefreshToken::default()),
            K::MarkRead(v1::MarkRead::default()),
            K::CreateGroup(v1::CreateGroup::default()),
        ];
        for kind in effects {
            let close = session.screen_early(&frame(4, kind.clone())).map(Step::Close);
            assert_eq!(
                close.as_ref().and_then(error_code),
                Some(ErrorCode::BadRequest),
                "{kind:?}"
            );
        }
        let empty = ClientFrame {
            request_id: 1,
            kind: None,
        };
        assert!(
            session.screen_early(&empty).is_some(),
            "an unknown frame is no safe one"
        );
    }

    /// A token taken at the WebSocket upgrade authenticates right after
    /// `Hello`, once, as request 0.
    #[test]
    fn an_upgrade_token_authenticates_after_hello() {
        let now = Instant::now();
        let mut session = Session::new(1, limits(), GroupIds::new(&[1; 32]), now);
        session.authenticate_after_hello("token".into());
        assert!(session.poll_request().is_none(), "not before Hello");
        assert!(matches!(
            session.on_frame(frame(1, hello(ProtocolVersion::V1)), now),
            Step::Reply(_)
        ));
        let request = session.poll_request().unwrap();
        assert_eq!(request.id, 0);
        assert!(matches!(
            request.command,
            Command::Authenticate { ref access_token, resume: None, .. } if access_token == "token"
        ));
        assert!(session.poll_request().is_none(), "only once");
    }
}
