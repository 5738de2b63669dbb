//! Presence: whether a user is online, decided on the user's home shard.
//!
//! A user is online while any of its devices is connected. When the last one
//! disconnects (or is closed for missing heartbeats) the user stays online for a
//! grace period, so a quick reconnect does not flap; only then is it offline, with
//! `last_seen` the moment the last device left. Updates to subscribers are rate
//! limited per user: changes inside the interval collapse into one update carrying
//! the latest state.
//!
//! Sans-IO: the owner feeds connections, disconnections and clock ticks, and sends
//! the [`Update`]s it gets back. Generic over the subscriber handle `S`.

use confab_protocol::ids::UserId;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// What subscribers of `user` are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    /// Whether the user has a session anywhere.
    pub online: bool,
    /// When the user was last connected (ms since the epoch); 0 if never seen.
    pub last_seen_ms: u64,
}

/// A presence change to push to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update<S> {
    /// Whose presence changed.
    pub user: UserId,
    /// The presence now.
    pub presence: Presence,
    /// Who is told.
    pub subscribers: Vec<S>,
}

#[derive(Debug)]
struct Entry<S> {
    connected: bool,
    presence: Presence,
    /// Set while disconnected and inside the grace period.
    offline_at: Option<Instant>,
    /// What subscribers were last told, and when.
    announced: Option<Presence>,
    announced_at: Option<Instant>,
    subscribers: HashSet<S>,
}

/// Presence of the users whose home a shard is: grace periods, rate limits, subscribers.
#[derive(Debug)]
pub struct PresenceTracker<S> {
    users: HashMap<UserId, Entry<S>>,
    grace: Duration,
    min_interval: Duration,
}

impl<S: Clone + Eq + Hash> PresenceTracker<S> {
    /// A tracker that waits `grace` before reporting a disconnect and reports a user at most once per `min_interval`.
    pub fn new(grace: Duration, min_interval: Duration) -> Self {
        Self {
            users: HashMap::new(),
            grace,
            min_interval,
        }
    }

    fn entry(&mut self, user: UserId) -> &mut Entry<S> {
        self.users.entry(user).or_insert_with(|| Entry {
            connected: false,
            presence: Presence {
                online: false,
                last_seen_ms: 0,
            },
            offline_at: None,
            announced: None,
            announced_at: None,
            subscribers: HashSet::new(),
        })
    }

    /// The user gained its first connected device.
    pub fn connected(&mut self, user: UserId, now: Instant, now_ms: u64) -> Option<Update<S>> {
        let entry = self.entry(user);
        entry.connected = true;
        entry.offline_at = None;
        entry.presence = Presence {
            online: true,
            last_seen_ms: now_ms,
        };
        self.announce(user, now)
    }

    /// The user's last device left.
    pub fn disconnected(&mut self, user: UserId, now: Instant, now_ms: u64) {
        let grace = self.grace;
        let entry = self.entry(user);
        entry.connected = false;
        entry.presence.last_seen_ms = now_ms;
        entry.offline_at = Some(now + grace);
    }

    /// Adds a subscriber; returns the user's current presence.
    pub fn subscribe(&mut self, user: UserId, subscriber: S) -> Presence {
        let entry = self.entry(user);
        entry.subscribers.insert(subscriber);
        entry.presence
    }

    /// Ends `subscriber`'s subscription to `user`.
    pub fn unsubscribe(&mut self, user: UserId, subscriber: &S) {
        self.unsubscribe_where(user, |candidate| candidate == subscriber);
    }

    /// Removes every subscriber of `user` that `matches`.
    pub fn unsubscribe_where(&mut self, user: UserId, matches: impl Fn(&S) -> bool) {
        if let Some(entry) = self.users.get_mut(&user) {
            entry.subscribers.retain(|subscriber| !matches(subscriber));
        }
        self.forget_if_idle(user);
    }

    /// Grace periods that ended and rate-limited updates that are due.
    pub fn tick(&mut self, now: Instant) -> Vec<Update<S>> {
        let due: Vec<UserId> = self
            .users
            .iter()
            .filter(|(_, entry)| {
                entry.offline_at.is_some_and(|at| at <= now)
                    || (entry.announced != Some(entry.presence) && !entry.subscribers.is_empty())
            })
            .map(|(user, _)| *user)
            .collect();
        let mut updates = Vec::new();
        for user in due {
            if let Some(entry) = self.users.get_mut(&user)
                && entry.offline_at.is_some_and(|at| at <= now)
            {
                entry.offline_at = None;
                entry.presence.online = false;
            }
            updates.extend(self.announce(user, now));
            self.forget_if_idle(user);
        }
        updates
    }

    /// When `tick` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.users
            .values()
            .filter_map(|entry| {
                let pending = (entry.announced != Some(entry.presence) && !entry.subscribers.is_empty())
                    .then(|| {
                        entry
                            .announced_at
                            .map_or(entry.offline_at, |at| Some(at + self.min_interval))
                    })
                    .flatten();
                match (entry.offline_at, pending) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    /// The update subscribers are owed now, if any and if the rate limit allows.
    fn announce(&mut self, user: UserId, now: Instant) -> Option<Update<S>> {
        let min_interval = self.min_interval;
        let entry = self.users.get_mut(&user)?;
        // Inside the grace period the user still shows online.
        let shown = Presence {
            online: entry.presence.online || entry.offline_at.is_some(),
            ..entry.presence
        };
        if entry
            .announced
            .is_some_and(|announced| announced.online == shown.online)
            || entry.subscribers.is_empty()
        {
            entry.announced = Some(entry.presence);
            return None;
        }
        if entry.announced_at.is_some_and(|at| now < at + min_interval) {
            return None;
        }
        entry.announced = Some(entry.presence);
        entry.announced_at = Some(now);
        Some(Update {
            user,
            presence: shown,
            subscribers: entry.subscribers.iter().cloned().collect(),
        })
    }

    /// Drops what nobody needs: offline, not in a grace period, no subscribers.
    fn forget_if_idle(&mut self, user: UserId) {
        let idle = self
            .users
            .get(&user)
            .is_some_and(|entry| !entry.connected && entry.offline_at.is_none() && entry.subscribers.is_empty());
        if idle {
            self.users.remove(&user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);
    const INTERVAL: Duration = Duration::from_secs(1);

    fn user() -> UserId {
        UserId::new(1).unwrap()
    }

    fn tracker() -> PresenceTracker<u32> {
        let mut tracker = PresenceTracker::new(GRACE, INTERVAL);
        tracker.subscribe(user(), 7);
        tracker
    }

    #[test]
    fn online_is_immediate_and_offline_waits_for_the_grace_period() {
        let start = Instant::now();
        let mut tracker = tracker();
        let update = tracker.connected(user(), start, 1000).unwrap();
        assert_eq!(
            update.presence,
            Presence {
                online: true,
                last_seen_ms: 1000
            }
        );
        assert_eq!(update.subscribers, vec![7]);

        tracker.disconnected(user(), start + Duration::from_secs(5), 6000);
        assert!(
            tracker.tick(start + Duration::from_secs(20)).is_empty(),
            "still in the grace period"
        );
        assert_eq!(tracker.next_deadline(), Some(start + Duration::from_secs(35)));
        let updates = tracker.tick(start + Duration::from_secs(35));
        assert_eq!(updates.len(), 1);
        assert_eq!(
            updates[0].presence,
            Presence {
                online: false,
                last_seen_ms: 6000
            }
        );
    }

    #[test]
    fn a_quick_reconnect_does_not_flap() {
        let start = Instant::now();
        let mut tracker = tracker();
        tracker.connected(user(), start, 1000);
        tracker.disconnected(user(), start + Duration::from_secs(2), 3000);
        assert!(
            tracker
                .connected(user(), start + Duration::from_secs(4), 5000)
                .is_none()
        );
        assert!(tracker.tick(start + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn updates_are_rate_limited_and_carry_the_latest_state() {
        let start = Instant::now();
        let mut tracker = PresenceTracker::new(Duration::ZERO, INTERVAL);
        tracker.subscribe(user(), 7);
        assert!(tracker.connected(user(), start, 1).is_some());
        // Flapping inside one interval: nothing is sent at once...
        tracker.disconnected(user(), start + Duration::from_millis(100), 2);
        assert!(tracker.tick(start + Duration::from_millis(100)).is_empty());
        assert!(
            tracker
                .connected(user(), start + Duration::from_millis(200), 3)
                .is_none()
        );
        tracker.disconnected(user(), start + Duration::from_millis(300), 4);
        // ...then one update with the latest state.
        let updates = tracker.tick(start + Duration::from_millis(1100));
        assert_eq!(updates.len(), 1);
        assert_eq!(
            updates[0].presence,
            Presence {
                online: false,
                last_seen_ms: 4
            }
        );
        assert!(tracker.tick(start + Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn users_nobody_watches_are_forgotten_once_offline() {
        let start = Instant::now();
        let mut tracker = PresenceTracker::<u32>::new(GRACE, INTERVAL);
        tracker.connected(user(), start, 1);
        tracker.disconnected(user(), start, 1);
        tracker.tick(start + GRACE);
        assert!(tracker.users.is_empty());
    }
}
