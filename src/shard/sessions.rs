//! The authenticated sessions a shard owns, by user, and delivery to them.
//!
//! Delivery never waits: a frame goes into the session's bounded outbound queue or,
//! when that is full, the session is kicked as a slow consumer (it reconnects and
//! catches up from history) so one stalled phone cannot hold up a shard.

use super::mesh::Delivery;
use super::outbound::Outbound;
use crate::ids::{ConversationId, DeviceId, Seq, UserId};
use crate::protocol::{ErrorCode, error_frame};
use bytes::Bytes;
use confab_proto::v1::ServerFrame;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tokio::sync::Notify;

/// Tells a connection to close, with the frame to say why.
#[derive(Debug, Default)]
pub struct Kick {
    reason: RefCell<Option<ServerFrame>>,
    notify: Notify,
}

impl Kick {
    pub fn kick(&self, reason: ServerFrame) {
        self.reason.borrow_mut().get_or_insert(reason);
        self.notify.notify_one();
    }

    /// Waits for a kick and returns its reason.
    pub async fn kicked(&self) -> ServerFrame {
        loop {
            if let Some(reason) = self.reason.borrow_mut().take() {
                return reason;
            }
            self.notify.notified().await;
        }
    }
}

/// Pushes held back while a resuming session replays what it missed.
pub type Held = Rc<RefCell<Option<Vec<(ConversationId, Seq, Bytes)>>>>;

/// Pushes a resuming session may hold before it counts as a slow consumer.
const MAX_HELD: usize = 4096;

#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub session_id: u64,
    pub device: DeviceId,
    pub outbound: Outbound,
    pub kick: Rc<Kick>,
    /// `Some` while the session replays: live pushes wait here.
    pub held: Held,
}

#[derive(Debug, Default)]
pub struct LocalSessions {
    by_user: HashMap<UserId, Vec<SessionHandle>>,
}

impl LocalSessions {
    pub fn add(&mut self, user: UserId, handle: SessionHandle) {
        self.by_user.entry(user).or_default().push(handle);
    }

    /// Removes a session; returns true when it was the user's last one here.
    pub fn remove(&mut self, user: UserId, session_id: u64) -> bool {
        let Some(handles) = self.by_user.get_mut(&user) else {
            return false;
        };
        handles.retain(|handle| handle.session_id != session_id);
        if handles.is_empty() {
            self.by_user.remove(&user);
            true
        } else {
            false
        }
    }

    /// Closes every session of `device` (it logged out elsewhere).
    pub fn revoke(&self, user: UserId, device: DeviceId) {
        for handle in self.by_user.get(&user).into_iter().flatten() {
            if handle.device == device {
                handle
                    .kick
                    .kick(error_frame(0, ErrorCode::Unauthenticated, "the device was logged out"));
            }
        }
    }

    pub fn deliver(&self, delivery: &Delivery) {
        for user in delivery.users.iter() {
            for handle in self.by_user.get(user).into_iter().flatten() {
                if delivery.skip_device == Some((*user, handle.device)) {
                    continue;
                }
                let queued = match handle.held.borrow_mut().as_mut() {
                    // Replaying: live pushes wait behind the replay. One that cannot
                    // wait must not overtake it: the session is closed and resumes.
                    Some(held) if held.len() < MAX_HELD => {
                        held.push((delivery.conversation, delivery.seq, delivery.frame.clone()));
                        true
                    }
                    Some(_) => false,
                    None => handle.outbound.try_send(delivery.frame.clone()).is_ok(),
                };
                if !queued {
                    tracing::warn!(user = %user, session = handle.session_id, "slow consumer: closing session");
                    handle.kick.kick(error_frame(
                        0,
                        ErrorCode::SlowConsumer,
                        "outbound queue full: reconnect and fetch history",
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_hold_closes_the_session_instead_of_overtaking_the_replay() {
        let user = UserId::new(1).unwrap();
        let conversation = ConversationId::direct(user, UserId::new(2).unwrap());
        let outbound = Outbound::new(16);
        let held: Held = Rc::new(RefCell::new(Some(vec![(conversation, 1, Bytes::new()); MAX_HELD])));
        let kick = Rc::new(Kick::default());
        let mut sessions = LocalSessions::default();
        sessions.add(
            user,
            SessionHandle {
                session_id: 1,
                device: DeviceId::new(1).unwrap(),
                outbound: outbound.clone(),
                kick: kick.clone(),
                held,
            },
        );
        sessions.deliver(&Delivery {
            conversation,
            seq: 2,
            frame: Bytes::from_static(b"live"),
            users: std::sync::Arc::new([user]),
            skip_device: None,
        });
        assert_eq!(outbound.try_recv(), None, "the live push must not jump the replay");
        let reason = kick.kicked().await;
        assert!(
            matches!(reason.kind, Some(confab_proto::v1::server_frame::Kind::Error(e)) if e.code == ErrorCode::SlowConsumer as i32)
        );
    }
}
