//! Which shards hold sessions of which users: a copy on every shard, kept current
//! by `Presence` messages, so an owner shard fans a message out only to the shards
//! that have a recipient.
//!
//! A user's bit for shard S is set before S answers that user's `Authenticate`
//! (S waits for every shard's ack), so no message sequenced after a successful
//! authentication misses the session. A stale bit costs one wasted delivery.

use super::ShardId;
use confab_protocol::ids::UserId;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Directory {
    shards_of: HashMap<UserId, u64>,
}

impl Directory {
    pub fn update(&mut self, user: UserId, shard: ShardId, online: bool) {
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
    pub fn shards_of(&self, user: UserId) -> u64 {
        self.shards_of.get(&user).copied().unwrap_or(0)
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
