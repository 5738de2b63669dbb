//! Which shards hold sessions of which users: a copy on every shard, kept current
//! by `Presence` messages, so an owner shard fans a message out only to the shards
//! that have a recipient.
//!
//! A user's bit for shard S is set before S answers that user's `Authenticate`
//! (S waits for every shard's ack), so no message sequenced after a successful
//! authentication misses the session. A stale bit costs one wasted delivery.

use super::{Shard, ShardId, ShardMsg};
use confab_protocol::ids::UserId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tokio::sync::{mpsc, oneshot};

/// A shard's session-directory role: its copy of the directory, and the
/// announcer that tells every shard (itself included) about its own sessions.
#[derive(Debug)]
pub(super) struct SessionDirectory {
    entries: RefCell<Directory>,
    announcer: mpsc::UnboundedSender<Update>,
}

/// A change of this shard's sessions for the announcer to broadcast, in order.
#[derive(Debug)]
pub(super) struct Update {
    user: UserId,
    online: bool,
    applied: Option<oneshot::Sender<()>>,
}

impl SessionDirectory {
    /// The directory, and the updates its announcer is to broadcast.
    pub(super) fn new() -> (Self, mpsc::UnboundedReceiver<Update>) {
        let (announcer, updates) = mpsc::unbounded_channel();
        let directory = Self {
            entries: RefCell::default(),
            announcer,
        };
        (directory, updates)
    }

    /// Bit i set = shard i has a session of `user`.
    pub(super) fn shards_of(&self, user: UserId) -> u64 {
        self.entries.borrow().shards_of(user)
    }

    /// The users with a session on this node that `keep` picks.
    pub(super) fn users(&self, keep: impl Fn(UserId) -> bool) -> Vec<UserId> {
        self.entries
            .borrow()
            .shards_of
            .keys()
            .copied()
            .filter(|user| keep(*user))
            .collect()
    }

    /// Applies a shard's announcement; returns whether `user` now has sessions
    /// anywhere, when that changed.
    pub(super) fn apply(&self, user: UserId, from: ShardId, online: bool) -> Option<bool> {
        let mut entries = self.entries.borrow_mut();
        let was_anywhere = entries.shards_of(user) != 0;
        entries.update(user, from, online);
        let is_anywhere = entries.shards_of(user) != 0;
        (was_anywhere != is_anywhere).then_some(is_anywhere)
    }

    /// Broadcasts that `user` has (or no longer has) a session here. When going
    /// online, returns a receiver that resolves once every shard applied it.
    pub(super) fn announce(&self, user: UserId, online: bool) -> Option<oneshot::Receiver<()>> {
        let (applied, done) = if online {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // The announcer lives as long as the shard; if it is gone we are stopping.
        let _ = self.announcer.send(Update { user, online, applied });
        done
    }
}

/// Bit masks of shards, by user.
#[derive(Debug, Default)]
struct Directory {
    shards_of: HashMap<UserId, u64>,
}

impl Directory {
    fn update(&mut self, user: UserId, shard: ShardId, online: bool) {
        let bit = 1u64 << shard.0;
        if online {
            *self.shards_of.entry(user).or_default() |= bit;
        } else if let Some(mask) = self.shards_of.get_mut(&user) {
            *mask &= !bit;
            if *mask == 0 {
                self.shards_of.remove(&user);
            }
        }
    }

    /// Bit i set = shard i has a session of `user`.
    fn shards_of(&self, user: UserId) -> u64 {
        self.shards_of.get(&user).copied().unwrap_or(0)
    }
}

/// Sends directory updates to every shard, one update at a time, so each shard sees
/// one user's updates from this shard in the order they happened.
pub(super) async fn run_announcer(shard: Rc<Shard>, mut updates: mpsc::UnboundedReceiver<Update>) {
    loop {
        let update = tokio::select! {
            update = updates.recv() => match update {
                Some(update) => update,
                None => return,
            },
            () = shard.stop.cancelled() => return,
        };
        let mut acks = Vec::new();
        for index in 0..shard.mesh.shard_count() {
            let ack = update.applied.as_ref().map(|_| {
                let (tx, rx) = oneshot::channel();
                acks.push(rx);
                tx
            });
            let msg = ShardMsg::Directory {
                user: update.user,
                from: shard.id,
                online: update.online,
                ack,
            };
            if shard.mesh.send(ShardId(index), msg).await.is_err() {
                return;
            }
        }
        if let Some(applied) = update.applied {
            shard.spawn_core(async move {
                for ack in acks {
                    let _ = ack.await;
                }
                let _ = applied.send(());
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_follow_presence() {
        let user = UserId::new(1).unwrap();
        let mut directory = Directory::default();
        directory.update(user, ShardId(0), true);
        directory.update(user, ShardId(3), true);
        assert_eq!(directory.shards_of(user), 0b1001);
        directory.update(user, ShardId(0), false);
        assert_eq!(directory.shards_of(user), 0b1000);
        directory.update(user, ShardId(3), false);
        assert_eq!(directory.shards_of(user), 0);
        assert!(directory.shards_of.is_empty());
    }
}
