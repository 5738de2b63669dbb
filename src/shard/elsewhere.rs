//! Cluster mode: which users have sessions on other nodes, as a presence home
//! here learns it from the presence homes there ([`Sessions`] entries on the
//! bus): each change as it happens, and now and then a home's whole set (a
//! snapshot) that replaces what was known from it, so a change lost on the
//! way is corrected by the next snapshot. A node that leaves the live set
//! takes its users' sessions with it.

use crate::cluster::Incarnation;
use crate::cluster::envelope::Sessions;
use confab_protocol::ids::UserId;
use std::collections::{HashMap, HashSet};

/// A user whose sessions on other nodes went from none to some (`true`) or
/// from some to none (`false`).
pub(super) type Flip = (UserId, bool);

/// Who has sessions on which other node, by the home there that told.
#[derive(Debug, Default)]
pub(super) struct Elsewhere {
    by_home: HashMap<(Incarnation, u32), HashSet<UserId>>,
    /// Per user, how many of those sets hold it.
    homes: HashMap<UserId, u32>,
}

impl Elsewhere {
    /// Whether `user` has a session on another node.
    pub(super) fn has(&self, user: UserId) -> bool {
        self.homes.contains_key(&user)
    }

    /// Takes what a home of another node told; returns whose sessions
    /// elsewhere came or went.
    pub(super) fn apply(&mut self, sessions: Sessions) -> Vec<Flip> {
        let key = (sessions.node, sessions.home);
        let mut flips = Vec::new();
        if sessions.snapshot {
            let told: HashSet<UserId> = sessions.online.into_iter().collect();
            let known = self.by_home.remove(&key).unwrap_or_default();
            for user in known.difference(&told) {
                self.leave(*user, &mut flips);
            }
            for user in told.difference(&known) {
                self.join(*user, &mut flips);
            }
            if !told.is_empty() {
                self.by_home.insert(key, told);
            }
            return flips;
        }
        let set = self.by_home.entry(key).or_default();
        let (mut joined, mut left) = (Vec::new(), Vec::new());
        for user in sessions.online {
            if set.insert(user) {
                joined.push(user);
            }
        }
        for user in sessions.offline {
            if set.remove(&user) {
                left.push(user);
            }
        }
        if set.is_empty() {
            self.by_home.remove(&key);
        }
        for user in joined {
            self.join(user, &mut flips);
        }
        for user in left {
            self.leave(user, &mut flips);
        }
        flips
    }

    /// Drops what nodes no longer live had told; returns whose sessions
    /// elsewhere went with them.
    pub(super) fn forget_nodes(&mut self, is_live: impl Fn(Incarnation) -> bool) -> Vec<Flip> {
        let gone: Vec<(Incarnation, u32)> = self
            .by_home
            .keys()
            .filter(|(node, _)| !is_live(*node))
            .copied()
            .collect();
        let mut flips = Vec::new();
        for key in gone {
            for user in self.by_home.remove(&key).unwrap_or_default() {
                self.leave(user, &mut flips);
            }
        }
        flips
    }

    fn join(&mut self, user: UserId, flips: &mut Vec<Flip>) {
        let homes = self.homes.entry(user).or_default();
        *homes += 1;
        if *homes == 1 {
            flips.push((user, true));
        }
    }

    fn leave(&mut self, user: UserId, flips: &mut Vec<Flip>) {
        let Some(homes) = self.homes.get_mut(&user) else { return };
        *homes -= 1;
        if *homes == 0 {
            self.homes.remove(&user);
            flips.push((user, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    fn told(node: u64, snapshot: bool, online: &[u64], offline: &[u64]) -> Sessions {
        Sessions {
            node: Incarnation::new(node),
            home: 0,
            snapshot,
            online: online.iter().map(|raw| user(*raw)).collect(),
            offline: offline.iter().map(|raw| user(*raw)).collect(),
        }
    }

    #[test]
    fn a_user_is_elsewhere_while_any_node_has_a_session_of_it() {
        let mut elsewhere = Elsewhere::default();
        assert_eq!(elsewhere.apply(told(7, false, &[1], &[])), vec![(user(1), true)]);
        assert_eq!(elsewhere.apply(told(8, false, &[1], &[])), vec![], "already elsewhere");
        assert_eq!(elsewhere.apply(told(7, false, &[1], &[])), vec![], "told twice");
        assert_eq!(elsewhere.apply(told(7, false, &[], &[1])), vec![]);
        assert!(elsewhere.has(user(1)));
        assert_eq!(elsewhere.apply(told(8, false, &[], &[1])), vec![(user(1), false)]);
        assert!(!elsewhere.has(user(1)));
        assert_eq!(elsewhere.apply(told(8, false, &[], &[1])), vec![], "a repeated leave");
    }

    #[test]
    fn a_snapshot_replaces_what_its_home_told_and_corrects_a_lost_change() {
        let mut elsewhere = Elsewhere::default();
        elsewhere.apply(told(7, false, &[1, 2], &[]));
        // "2 left" and "3 came" were lost; the snapshot says so.
        let mut flips = elsewhere.apply(told(7, true, &[1, 3], &[]));
        flips.sort_by_key(|(user, _)| user.get());
        assert_eq!(flips, vec![(user(2), false), (user(3), true)]);
        let mut flips = elsewhere.apply(told(7, true, &[], &[]));
        flips.sort_by_key(|(user, _)| user.get());
        assert_eq!(flips, vec![(user(1), false), (user(3), false)]);
        assert!(elsewhere.by_home.is_empty() && elsewhere.homes.is_empty());
    }

    #[test]
    fn a_node_that_leaves_takes_its_users_sessions_along() {
        let mut elsewhere = Elsewhere::default();
        elsewhere.apply(told(7, false, &[1, 2], &[]));
        elsewhere.apply(told(8, false, &[2], &[]));
        let flips = elsewhere.forget_nodes(|node| node == Incarnation::new(8));
        assert_eq!(flips, vec![(user(1), false)]);
        assert!(elsewhere.has(user(2)));
    }
}
