//! Drives one connection on its shard: reads frames from a transport, feeds them to
//! the sans-IO [`Session`], executes the commands it yields, and writes replies.
//!
//! Transports differ only in how bytes become frames ([`FrameSource`]) and how
//! queued frames reach the wire; everything here is shared by all of them.
//!
//! Concurrency within a connection: commands that change the authentication state
//! run one at a time, in order. `Send`, `History` and `GetUser` are pipelined: a
//! `Send` is handed to the owner shard in frame order (so one device's messages keep
//! their order) and up to `max_in_flight_requests` replies may be outstanding.
//!
//! Frames go into a bounded outbound queue. Pushes from other tasks never wait for
//! room (a full queue closes the connection as a slow consumer); this connection's
//! own replies do wait, which stops it reading further requests, but never longer
//! than three heartbeat intervals.

use super::Shard;
use super::mesh::{AppendReply, ShardMsg};
use super::quotas::OverQuota;
use super::sessions::{Kick, Replay, SessionHandle};
use super::{presence, signals};
use crate::auth::{AuthError, Grant};
use crate::chat::{self, ChatError};
use crate::transport::admission::UserPermit;
use crate::transport::outbound::{Outbound, Refused, Reservation};
use crate::transport::{Closed, FrameSource, Inbound, ReadError};
use bytes::Bytes;
use confab_proto::v1::{self, ServerFrame, server_frame::Kind};
use confab_proto::{FrameError, ProstMessage as _, encode_frame};
use confab_protocol::ids::UserId;
use confab_protocol::{Command, ErrorCode, ErrorKind, Request, Session, Step, error_frame, push_frame};
use confab_protocol::{Content, Cursors, GroupCommand};
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, StreamExt as _};
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

/// Runs a connection until it ends. `outbound` feeds the transport's writer.
pub(super) async fn run(
    shard: Rc<Shard>,
    mut source: impl FrameSource,
    outbound: Outbound,
    peer: SocketAddr,
) -> Closed {
    // Built outside this async fn: its locals would stay in the task's state
    // (the session twice) for as long as the connection lives.
    let mut connection = Connection::new(shard, source.upgrade_token(), outbound, peer);
    let session_id = connection.session.id();
    let closed = match connection.serve(source).await {
        Flow::Close(closed) => closed,
        Flow::Continue => Closed::PeerClosed,
    };
    tracing::debug!(%peer, session = format_args!("{session_id:016x}"), reason = closed.describe(), "connection closed");
    closed
}

struct Connection {
    shard: Rc<Shard>,
    session: Session,
    outbound: Outbound,
    kick: Rc<Kick>,
    /// The user this connection is registered for in the shard's sessions.
    registered: Option<confab_protocol::ids::UserId>,
    /// Its place in that user's share of connections.
    user_permit: Option<UserPermit>,
    /// Whom its user may see presence of, as lately worked out.
    visibility: Rc<RefCell<presence::Visibility>>,
    peer: SocketAddr,
}

/// A pipelined request's reply, when it resolves.
type Reply = LocalBoxFuture<'static, Answer>;

/// A reply frame and the queue room it was promised, given back once it is queued.
struct Answer {
    frame: ServerFrame,
    _room: Option<Reservation>,
}

/// Whether the connection goes on after a step.
enum Flow {
    Continue,
    Close(Closed),
}

impl Connection {
    fn new(shard: Rc<Shard>, upgrade_token: Option<String>, outbound: Outbound, peer: SocketAddr) -> Self {
        let mut session = Session::new(
            rand::random(),
            shard.limits.clone(),
            shard.group_ids.clone(),
            Instant::now(),
        );
        if let Some(access_token) = upgrade_token {
            session.authenticate_after_hello(access_token);
        }
        Self {
            shard,
            session,
            outbound,
            kick: Rc::new(Kick::default()),
            registered: None,
            user_permit: None,
            visibility: Rc::default(),
            peer,
        }
    }

    async fn serve(&mut self, mut source: impl FrameSource) -> Flow {
        let mut in_flight: FuturesUnordered<Reply> = FuturesUnordered::new();
        let max_in_flight = self.shard.config.protocol.max_in_flight_requests;
        let shard = self.shard.clone();
        let kick = self.kick.clone();
        loop {
            let deadline = tokio::time::Instant::from_std(self.session.deadline());
            let flow = tokio::select! {
                biased;
                // Boxed so an idle connection's task stays small: the rare
                // paths, and a reply's send (one allocation per reply; inline,
                // its state added ~600 bytes to every connection).
                () = shard.drain.cancelled() => return Box::pin(self.going_away(in_flight)).await,
                reason = kick.kicked() => self.on_kick(reason),
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => Box::pin(self.send(&answer.frame)).await,
                inbound = source.next(), if in_flight.len() < max_in_flight => match inbound {
                    Ok(Some(Inbound::Frame(payload))) => {
                        Box::pin(self.on_payload(payload, false, &mut in_flight)).await
                    }
                    Ok(Some(Inbound::Early(payload))) => {
                        Box::pin(self.on_payload(payload, true, &mut in_flight)).await
                    }
                    Ok(Some(Inbound::Alive)) => {
                        self.session.on_keepalive(Instant::now());
                        Flow::Continue
                    }
                    Ok(None) => Flow::Close(Closed::PeerClosed),
                    Err(ReadError::Frame(err)) => {
                        tracing::info!(peer = %self.peer, error = %err, "undecodable frame; closing");
                        self.send_best_effort(self.session.on_decode_error(&err));
                        Flow::Close(match err {
                            FrameError::TooLarge { .. } => Closed::TooLarge,
                            _ => Closed::Violation,
                        })
                    }
                    Err(ReadError::Unsupported(what)) => {
                        tracing::info!(peer = %self.peer, what, "unsupported input; closing");
                        self.send_best_effort(error_frame(0, ErrorCode::BadRequest, what));
                        Flow::Close(Closed::UnsupportedData)
                    }
                    Err(ReadError::Io(_)) => Flow::Close(Closed::TransportError),
                },
                () = tokio::time::sleep_until(deadline) => match self.session.on_deadline(Instant::now()) {
                    Some(close) => {
                        tracing::info!(peer = %self.peer, "connection timed out");
                        self.send_best_effort(close);
                        Flow::Close(Closed::Timeout)
                    }
                    None => Flow::Continue,
                },
            };
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
    }

    /// Handles one frame (`early`: it arrived as replayable early data), then
    /// whatever the session asks to run before the next one.
    async fn on_payload(&mut self, payload: Bytes, early: bool, in_flight: &mut FuturesUnordered<Reply>) -> Flow {
        let frame = match v1::ClientFrame::decode(payload) {
            Ok(frame) => frame,
            Err(err) => {
                tracing::info!(peer = %self.peer, error = %err, "malformed frame; closing");
                self.send_best_effort(self.session.on_decode_error(&FrameError::Malformed(err)));
                return Flow::Close(Closed::Violation);
            }
        };
        if early && let Some(close) = self.session.screen_early(&frame) {
            tracing::info!(peer = %self.peer, "a frame with effects in 0-RTT; closing");
            self.send_best_effort(close);
            return Flow::Close(Closed::UnsupportedData);
        }
        let mut flow = self.on_frame(frame, in_flight).await;
        while let Flow::Continue = flow
            && let Some(request) = self.session.poll_request()
        {
            flow = self.run_in_order(request).await;
        }
        flow
    }

    async fn on_frame(&mut self, frame: v1::ClientFrame, in_flight: &mut FuturesUnordered<Reply>) -> Flow {
        match self.session.on_frame(frame, Instant::now()) {
            Step::Reply(reply) => self.send(&reply).await,
            Step::Close(reply) => {
                tracing::info!(peer = %self.peer, reply = ?reply.kind, "protocol violation; closing");
                self.send_best_effort(reply);
                Flow::Close(Closed::Violation)
            }
            Step::Run(request) if request.command.is_pipelined() => {
                in_flight.push(self.start(request).await);
                Flow::Continue
            }
            Step::Run(request) => self.run_in_order(request).await,
        }
    }

    /// Starts a pipelined command; its reply resolves later. A command that
    /// answers with a page of unknown size (up to a frame) reads the store only
    /// once room for it is reserved in the connection's reply budget, so a peer
    /// that pipelines page requests and does not read holds no more than that.
    async fn start(&self, request: Request) -> Reply {
        if request.command.is_read()
            && let Some(identity) = self.session.identity()
        {
            let shards = self.shard.directory.shards_of(identity.user).count_ones();
            let charged = self
                .shard
                .quotas
                .borrow_mut()
                .charge_read(identity.user, shards, Instant::now());
            if let Err(over) = charged {
                let frame = over_quota(request.id, over);
                return Box::pin(std::future::ready(Answer { frame, _room: None }));
            }
        }
        let paged = request.command.is_paged();
        let reply = self.execute(request).await;
        if !paged {
            return Box::pin(async move {
                Answer {
                    frame: reply.await,
                    _room: None,
                }
            });
        }
        let outbound = self.outbound.clone();
        let bytes = self.shard.limits.max_frame_bytes;
        Box::pin(async move {
            let room = outbound.reserve(bytes).await;
            Answer {
                frame: reply.await,
                _room: Some(room),
            }
        })
    }

    /// What a pipelined command does; nothing runs until the future is polled,
    /// except handing a message over to its owner (in frame order).
    async fn execute(&self, Request { id, command }: Request) -> LocalBoxFuture<'static, ServerFrame> {
        let shard = self.shard.clone();
        match command {
            Command::Append(append) => {
                let shards = shard.directory.shards_of(append.sender).count_ones();
                let charged = shard.quotas.borrow_mut().charge(
                    append.sender,
                    append.content.text_bytes(),
                    shards,
                    Instant::now(),
                );
                if let Err(over) = charged {
                    return Box::pin(std::future::ready(over_quota(id, over)));
                }
                if let Content::Group(GroupCommand::Create { members: users, .. } | GroupCommand::Add(users)) =
                    &append.content
                {
                    match shard.store.missing_users(users.clone()).await {
                        Ok(missing) if missing.is_empty() => {}
                        Ok(_) => {
                            return Box::pin(std::future::ready(failure(id, &ChatError::UnknownUser)));
                        }
                        Err(err) => {
                            return Box::pin(std::future::ready(failure(id, &ChatError::Store(err))));
                        }
                    }
                }
                let (reply, ack) = AppendReply::new(shard.id);
                let owner = shard.mesh.owner_of(append.conversation);
                // Handing over in frame order keeps one device's messages in order.
                // An append this shard owns skips the mailbox: no queue, no wake.
                if owner == shard.id {
                    super::owner::submit(&shard, append, reply);
                } else if shard.mesh.send(owner, ShardMsg::Append(append, reply)).await.is_err() {
                    return Box::pin(std::future::ready(failure(id, &ChatError::ShuttingDown)));
                }
                let decoded_at = Instant::now();
                Box::pin(async move {
                    let answer = ack.await;
                    crate::metrics::record_since(&shard.stages.acked, decoded_at);
                    match answer {
                        Ok(Ok(ack)) => reply_frame(id, Kind::SendAck(ack.into_proto())),
                        Ok(Err(err)) => failure(id, &err),
                        Err(_) => failure(id, &ChatError::ShuttingDown),
                    }
                })
            }
            Command::History {
                conversation,
                reader,
                range,
                limit,
            } => Box::pin(async move {
                answer(
                    id,
                    chat::history(
                        shard.store.as_ref(),
                        conversation,
                        reader,
                        range,
                        limit,
                        shard.limits.max_frame_bytes,
                    )
                    .await,
                    Kind::HistoryPage,
                )
            }),
            Command::Sync { user, cursors, limit } => Box::pin(async move {
                answer(
                    id,
                    chat::sync(shard.store.as_ref(), user, cursors, limit, shard.limits.max_frame_bytes).await,
                    Kind::SyncResult,
                )
            }),
            Command::ListConversations { user, after, limit } => Box::pin(async move {
                answer(
                    id,
                    chat::list_conversations(shard.store.as_ref(), user, after, limit, shard.limits.max_frame_bytes)
                        .await,
                    Kind::ConversationList,
                )
            }),
            Command::Mark {
                conversation,
                user,
                device,
                marks,
            } => Box::pin(async move {
                answer(
                    id,
                    signals::mark(&shard, conversation, user, device, marks).await,
                    Kind::Receipt,
                )
            }),
            Command::Typing {
                conversation,
                user,
                typing,
                ..
            } => Box::pin(async move {
                match signals::typing(&shard, conversation, user, typing).await {
                    Ok(()) => reply_frame(id, Kind::Done(v1::Done {})),
                    Err(err) => failure(id, &err),
                }
            }),
            Command::SubscribePresence { subscriber, users } => {
                let visibility = self.visibility.clone();
                Box::pin(async move {
                    answer(
                        id,
                        presence::subscribe_users(&shard, subscriber, users, &visibility).await,
                        Kind::PresenceList,
                    )
                })
            }
            Command::UnsubscribePresence { subscriber, users } => Box::pin(async move {
                presence::unsubscribe_users(&shard, subscriber, users).await;
                reply_frame(id, Kind::Done(v1::Done {}))
            }),
            Command::ListMembers {
                group,
                reader,
                after,
                limit,
            } => Box::pin(async move {
                answer(
                    id,
                    chat::members(shard.store.as_ref(), group, reader, after, limit).await,
                    Kind::MemberList,
                )
            }),
            Command::GetUser { username } => Box::pin(async move {
                match shard.accounts.user_by_name(&username).await {
                    Ok(user) => reply_frame(
                        id,
                        Kind::User(v1::User {
                            user_id: user.id.get(),
                            username: user.username,
                            display_name: user.display_name,
                        }),
                    ),
                    Err(err) => failure(id, &err),
                }
            }),
            other => Box::pin(std::future::ready(error_frame(
                id,
                ErrorCode::Internal,
                format!("{other:?} is not pipelined"),
            ))),
        }
    }

    /// Runs a command that touches the session's authentication, in order.
    async fn run_in_order(&mut self, Request { id, command }: Request) -> Flow {
        let accounts = self.shard.accounts.clone();
        let result = match command {
            Command::SignUp { username, password } => accounts
                .sign_up(username, password, Some(self.peer.ip()))
                .await
                .map(|user| Kind::SignedUp(v1::SignedUp { user_id: user.get() })),
            Command::LogIn {
                username,
                password,
                device_name,
            } => accounts
                .log_in(username, password, device_name, Some(self.peer.ip()))
                .await
                .map(|grant| {
                    Kind::LoggedIn(v1::LoggedIn {
                        user_id: grant.user.get(),
                        device_id: grant.device.get(),
                        tokens: Some(tokens(grant)),
                    })
                }),
            Command::RefreshToken { refresh_token } => match accounts.refresh(&refresh_token).await {
                Ok(grant) => Ok(Kind::LoggedIn(v1::LoggedIn {
                    user_id: grant.user.get(),
                    device_id: grant.device.get(),
                    tokens: Some(tokens(grant)),
                })),
                Err(AuthError::RefreshReused { user, device }) => {
                    // Whoever holds the device's connections may be the thief.
                    self.shard.revoke(user, device).await;
                    Err(AuthError::RefreshReused { user, device })
                }
                Err(err) => Err(err),
            },
            Command::ListDevices { user, device } => {
                let listed = futures::try_join!(accounts.devices(user), async {
                    Ok(self.shard.store.push_tokens(user).await?)
                },);
                listed.map(|(devices, tokens)| {
                    let push_platform = |id| {
                        tokens
                            .iter()
                            .find(|(device, _)| *device == id)
                            .map_or(v1::PushPlatform::Unspecified, |(_, token)| token.platform)
                    };
                    Kind::DeviceList(v1::DeviceList {
                        devices: devices
                            .into_iter()
                            .map(|record| v1::Device {
                                device_id: record.id.get(),
                                current: record.id == device,
                                push_platform: push_platform(record.id) as i32,
                                name: record.name,
                                created_at_ms: record.created_at_ms,
                                refreshed_at_ms: record.refreshed_at_ms,
                            })
                            .collect(),
                    })
                })
            }
            Command::MuteConversation {
                user,
                conversation,
                muted,
            } => {
                // A conversation of the user's (now or before): no rows for others.
                if let Err(err) = chat::access(self.shard.store.as_ref(), conversation, user).await {
                    return self.send(&failure(id, &err)).await;
                }
                let stored = self.shard.store.set_muted(user, conversation, muted).await;
                stored.map(|()| Kind::Done(v1::Done {})).map_err(AuthError::from)
            }
            Command::RegisterPushToken { user, device, push } => {
                let registered = self.shard.store.set_push_token(user, device, push).await;
                registered.map(|()| Kind::Done(v1::Done {})).map_err(AuthError::from)
            }
            Command::RevokeDevice { user, device } => match accounts.revoke_device(user, device).await {
                Ok(()) => {
                    self.shard.revoke(user, device).await;
                    Ok(Kind::Done(v1::Done {}))
                }
                Err(err) => Err(err),
            },
            Command::ChangePassword { current, new } => match self.session.identity().cloned() {
                None => Err(AuthError::InvalidCredentials),
                Some(identity) => match accounts
                    .change_password(&identity, current, new, Some(self.peer.ip()))
                    .await
                {
                    Ok(revoked) => {
                        for device in revoked {
                            self.shard.revoke(identity.user, device).await;
                        }
                        Ok(Kind::Done(v1::Done {}))
                    }
                    Err(err) => Err(err),
                },
            },
            Command::Authenticate {
                access_token,
                resume,
                device,
            } => match accounts.authenticate(&access_token, device.as_deref()).await {
                Ok(identity) if self.session.identity().is_some() => return self.reauthenticate(id, identity).await,
                Ok(identity) => {
                    let permit = match self.shard.admission.admit_user(identity.user) {
                        Ok(permit) => permit,
                        Err(refused) => {
                            tracing::info!(peer = %self.peer, user = %identity.user, "{}", refused.reason());
                            return self
                                .send(&error_frame(id, ErrorCode::RateLimited, refused.reason()))
                                .await;
                        }
                    };
                    self.user_permit = Some(permit);
                    if let Some(pusher) = &self.shard.pusher {
                        pusher.online(identity.user);
                    }
                    // A resuming session holds live pushes until its replay is out;
                    // it may hold as many as its queue takes.
                    let replay = resume.is_some().then(|| {
                        let max_held = self.shard.config.protocol.outbound_queue_frames;
                        Rc::new(RefCell::new(Replay::new(max_held)))
                    });
                    self.register(&identity, replay.clone()).await;
                    let user = identity.user;
                    let reply = v1::Authenticated {
                        user_id: user.get(),
                        device_id: identity.device.get(),
                        username: identity.username.clone(),
                        display_name: identity.display_name.clone(),
                        ..v1::Authenticated::default()
                    };
                    let expires_at = instant_of(identity.expires_at_ms);
                    self.session.authenticated(identity, expires_at);
                    let Some((cursors, replay)) = resume.zip(replay) else {
                        return self.send(&reply_frame(id, Kind::Authenticated(reply))).await;
                    };
                    // A resume waits for the peer to read; a kick (the device
                    // logged out, a slow consumer) or a shutdown cuts it short.
                    let (kick, drain) = (self.kick.clone(), self.shard.drain.clone());
                    let interrupted = tokio::select! {
                        biased;
                        // The serve loop says GoingAway next.
                        () = drain.cancelled() => None,
                        reason = kick.kicked() => Some(reason),
                        flow = self.resume(id, reply, user, cursors, &replay) => return flow,
                    };
                    return match interrupted {
                        Some(reason) => self.on_kick(reason),
                        None => Flow::Continue,
                    };
                }
                Err(err) => Err(err),
            },
            Command::LogOut { user, device } => match accounts.log_out(user, device).await {
                Ok(()) => {
                    self.unregister();
                    self.session.logged_out();
                    self.shard.revoke(user, device).await;
                    Ok(Kind::LoggedOut(v1::LoggedOut {}))
                }
                Err(err) => Err(err),
            },
            pipelined => {
                let reply = self.execute(Request { id, command: pipelined }).await.await;
                return self.send(&reply).await;
            }
        };
        match result {
            Ok(kind) => self.send(&reply_frame(id, kind)).await,
            Err(err) => {
                if !matches!(err.code(), ErrorCode::Internal) {
                    tracing::info!(peer = %self.peer, error = %err, "request refused");
                } else {
                    tracing::error!(peer = %self.peer, error = %err, "request failed");
                }
                let flow = self.send(&failure(id, &err)).await;
                match (flow, self.session.on_refused(err.code())) {
                    (Flow::Continue, Some(close)) => {
                        self.send_best_effort(close);
                        Flow::Close(Closed::Violation)
                    }
                    (flow, _) => flow,
                }
            }
        }
    }

    /// `Authenticate` on an authenticated connection: with a (refreshed) token of
    /// the same device, the connection lives on until that token expires.
    async fn reauthenticate(&mut self, id: u64, identity: confab_protocol::Identity) -> Flow {
        let same = self
            .session
            .identity()
            .is_some_and(|current| (current.user, current.device) == (identity.user, identity.device));
        if !same {
            let reply = error_frame(
                id,
                ErrorCode::BadRequest,
                "authenticated as another device; log out first",
            );
            return self.send(&reply).await;
        }
        let reply = v1::Authenticated {
            user_id: identity.user.get(),
            device_id: identity.device.get(),
            username: identity.username.clone(),
            ..v1::Authenticated::default()
        };
        let expires_at = instant_of(identity.expires_at_ms);
        self.session.authenticated(identity, expires_at);
        self.send(&reply_frame(id, Kind::Authenticated(reply))).await
    }

    /// Makes this connection reachable for pushes, on every shard's directory,
    /// before the client hears it is authenticated.
    async fn register(&mut self, identity: &confab_protocol::Identity, replay: Option<Rc<RefCell<Replay>>>) {
        self.shard.sessions.borrow_mut().add(
            identity.user,
            SessionHandle {
                session_id: self.session.id(),
                device: identity.device,
                outbound: self.outbound.clone(),
                kick: self.kick.clone(),
                replay,
            },
        );
        self.registered = Some(identity.user);
        if let Some(applied) = self.shard.directory.announce(identity.user, true) {
            // Fails only if a shard stopped, i.e. during shutdown.
            let _ = applied.await;
        }
    }

    /// Pushes what a resuming device missed, then the Authenticated reply, then the
    /// live pushes held meanwhile that the replay did not already cover. Live
    /// pushes were held from before the replay read the store, so together they
    /// leave no gap; the replay's cursors stay as a floor under every later push,
    /// so none comes twice. If more live pushes came than could be held, the
    /// reply says `recovered = false` and the device syncs from its token.
    async fn resume(
        &mut self,
        id: u64,
        mut reply: v1::Authenticated,
        user: UserId,
        cursors: Cursors,
        replay: &RefCell<Replay>,
    ) -> Flow {
        let (cursors, flow) = self.replay(&mut reply, user, cursors).await;
        if !matches!(flow, Flow::Continue) {
            return flow;
        }
        // The replay stays open until the reply has room: live pushes that
        // overflow the hold meanwhile only make the reply say recovered =
        // false, where after the replay closes they would close the session
        // as a slow consumer before it had its answer.
        let flow = self.wait_for_room().await;
        if !matches!(flow, Flow::Continue) {
            return flow;
        }
        if !replay.borrow_mut().replayed(&cursors) {
            tracing::info!(peer = %self.peer, "live pushes overflowed the hold while resuming; the device must sync");
            reply.recovered = false;
        }
        reply.sync_token = cursors.to_token();
        if self
            .outbound
            .try_send(encode_frame(&reply_frame(id, Kind::Authenticated(reply))))
            .is_err()
        {
            return Flow::Close(Closed::TransportError);
        }
        // The held pushes go out in order, new ones queue behind them, and the
        // session goes live only with headroom in its queue: the replay leaves
        // it nearly full, and live pushes that arrive before the writer has run
        // would otherwise close the session that has just caught up as a slow
        // consumer.
        loop {
            let next = replay.borrow_mut().next_held();
            let flow = match next {
                Some(frame) => self.send_encoded(frame).await,
                None => {
                    let flow = self.patiently(self.outbound.half_empty()).await;
                    if matches!(flow, Flow::Continue) && replay.borrow_mut().go_live() {
                        return Flow::Continue;
                    }
                    flow
                }
            };
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
    }

    /// Sends what the device at `cursors` missed, up to `max_replay_messages`,
    /// read in chunks of at most the connection's reply budget, so a resuming
    /// peer that does not read holds no more than that. Returns the
    /// cursors the device has reached; `reply` counts the messages and says
    /// whether they were all there was.
    async fn replay(&self, reply: &mut v1::Authenticated, user: UserId, mut cursors: Cursors) -> (Cursors, Flow) {
        let limit = self.shard.config.protocol.max_replay_messages;
        let chunk_bytes = self.outbound.reply_bytes();
        loop {
            let remaining = limit.saturating_sub(reply.replayed as usize);
            let chunk =
                match chat::catch_up(self.shard.store.as_ref(), user, cursors.clone(), remaining, chunk_bytes).await {
                    Ok(chunk) => chunk,
                    Err(err) => {
                        tracing::error!(peer = %self.peer, error = %err, "replay failed; the device must sync");
                        reply.recovered = false;
                        return (cursors, Flow::Continue);
                    }
                };
            let mut sent: u32 = 0;
            for message in chunk.conversations.into_iter().flat_map(|state| state.messages) {
                let flow = self.send(&push_frame(Kind::Message(message))).await;
                if !matches!(flow, Flow::Continue) {
                    return (cursors, flow);
                }
                sent += 1;
            }
            reply.replayed += sent;
            cursors = chunk.cursors;
            // More remains either past this chunk's bytes (go on) or past the
            // limit (the device syncs for the rest).
            if !chunk.has_more || sent == 0 || reply.replayed as usize >= limit {
                reply.recovered = !chunk.has_more;
                return (cursors, Flow::Continue);
            }
        }
    }

    fn unregister(&mut self) {
        self.user_permit = None;
        if let Some(user) = self.registered.take() {
            let last = self.shard.sessions.borrow_mut().remove(user, self.session.id());
            if last {
                self.shard.directory.announce(user, false);
            }
        }
    }

    /// Queues a reply, waiting for room: a peer that pipelines requests gets
    /// back-pressure, not a disconnect. One that reads nothing for three heartbeat
    /// intervals is abandoned.
    async fn send(&self, frame: &ServerFrame) -> Flow {
        self.send_encoded(encode_frame(frame)).await
    }

    async fn send_encoded(&self, frame: Bytes) -> Flow {
        self.patiently(self.outbound.send(frame)).await
    }

    /// Waits until the outbound queue takes a frame, with the same patience.
    async fn wait_for_room(&self) -> Flow {
        self.patiently(self.outbound.room()).await
    }

    async fn patiently(&self, queued: impl Future<Output = Result<(), Refused>>) -> Flow {
        let patience = self.shard.limits.heartbeat_interval * 3;
        match tokio::time::timeout(patience, queued).await {
            Ok(Ok(())) => Flow::Continue,
            Ok(Err(_)) => Flow::Close(Closed::TransportError),
            Err(_) => {
                tracing::warn!(peer = %self.peer, "slow consumer: replies not read; closing");
                Flow::Close(Closed::SlowConsumer)
            }
        }
    }

    /// Closes for a kick, telling the peer why.
    fn on_kick(&self, reason: ServerFrame) -> Flow {
        let slow = matches!(&reason.kind, Some(Kind::Error(error)) if error.code == ErrorCode::SlowConsumer as i32);
        self.send_best_effort(reason);
        Flow::Close(if slow { Closed::SlowConsumer } else { Closed::Kicked })
    }

    /// Queues a frame if there is room; used for the last frame before closing.
    fn send_best_effort(&self, frame: ServerFrame) {
        let _ = self.outbound.try_send(encode_frame(&frame));
    }

    /// Shutdown: finish what is in flight (bounded by the grace period), then tell
    /// the client to reconnect after a jittered delay.
    async fn going_away(&mut self, mut in_flight: FuturesUnordered<Reply>) -> Flow {
        let grace = self.shard.config.server.shutdown_grace;
        let finish = async {
            while let Some(answer) = in_flight.next().await {
                if !matches!(self.send(&answer.frame).await, Flow::Continue) {
                    break;
                }
            }
        };
        if tokio::time::timeout(grace, finish).await.is_err() {
            tracing::warn!(peer = %self.peer, "requests still in flight after the grace period");
        }
        let max_delay = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX).max(1);
        self.send_best_effort(ServerFrame {
            request_id: 0,
            kind: Some(Kind::GoingAway(v1::GoingAway {
                reconnect_after_ms: rand::random_range(0..max_delay),
                reason: "server shutting down".into(),
            })),
        });
        Flow::Close(Closed::ShuttingDown)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// The instant a Unix time in ms (an access token's expiry) falls at, on this
/// process's monotonic clock; a time decades away counts as a year from now.
fn instant_of(unix_ms: u64) -> Instant {
    let left = std::time::Duration::from_millis(unix_ms.saturating_sub(crate::clock::unix_ms()));
    let now = Instant::now();
    now.checked_add(left.min(std::time::Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

fn reply_frame(request_id: u64, kind: Kind) -> ServerFrame {
    ServerFrame {
        request_id,
        kind: Some(kind),
    }
}

/// The reply to a request: its result as `kind`, or the error.
fn answer<T, E: ErrorKind>(request_id: u64, result: Result<T, E>, kind: fn(T) -> Kind) -> ServerFrame {
    match result {
        Ok(value) => reply_frame(request_id, kind(value)),
        Err(err) => failure(request_id, &err),
    }
}

fn failure(request_id: u64, err: &impl ErrorKind) -> ServerFrame {
    error_frame(request_id, err.code(), err.client_message())
}

fn tokens(grant: Grant) -> v1::Tokens {
    v1::Tokens {
        access_token: grant.access_token,
        access_expires_at_ms: grant.access_expires_at_ms,
        refresh_token: grant.refresh_token,
        refresh_expires_at_ms: grant.refresh_expires_at_ms,
    }
}

/// The reply to a request beyond its user's quota.
fn over_quota(id: u64, over: OverQuota) -> ServerFrame {
    let message = format!("{}; retry in {} ms", over.what, over.retry_in.as_millis().max(1));
    error_frame(id, ErrorCode::RateLimited, message)
}
