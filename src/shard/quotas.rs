//! What one user may send and read, node-wide, without a lock or a hop per
//! request.
//!
//! Each shard keeps token buckets (messages, bytes of text, reads) for the users
//! who send or read through it. A user whose sessions sit on several shards is
//! charged that many tokens per request on each of them (the directory says how
//! many), so together they allow about the user's configured rate. A bucket that
//! has refilled holds nothing worth keeping and is forgotten.
//!
//! The per-connection limit is the session's (see `protocol::Session`).

use crate::config::LimitsConfig;
use confab_protocol::ids::UserId;
use confab_protocol::{Rate, TokenBucket};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Users with buckets above which refilled ones are forgotten.
const PRUNE_ABOVE: usize = 4096;

/// Why a message was refused, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OverQuota {
    pub what: &'static str,
    pub retry_in: Duration,
}

#[derive(Debug)]
pub(super) struct UserQuotas {
    messages: Rate,
    bytes: Rate,
    reads: Rate,
    users: HashMap<UserId, UserQuota>,
}

#[derive(Debug)]
struct UserQuota {
    messages: TokenBucket,
    bytes: TokenBucket,
    reads: TokenBucket,
}

impl UserQuotas {
    pub(super) fn new(limits: &LimitsConfig) -> Self {
        let bytes_a_day = limits.send_mib_per_user_per_day * 1024.0 * 1024.0;
        Self {
            messages: Rate {
                per_second: limits.send_rate_per_user,
                burst: limits.send_burst_per_user,
            },
            bytes: Rate {
                per_second: bytes_a_day / 86_400.0,
                burst: bytes_a_day,
            },
            reads: Rate {
                per_second: limits.read_rate_per_user,
                burst: limits.read_burst_per_user,
            },
            users: HashMap::new(),
        }
    }

    /// Charges one message with `bytes` of text to `user`, whose sessions are
    /// on `shards` shards.
    pub(super) fn charge(&mut self, user: UserId, bytes: usize, shards: u32, now: Instant) -> Result<(), OverQuota> {
        let share = f64::from(shards.max(1));
        let quota = self.quota(user, now);
        quota.messages.take(share, now).map_err(|retry_in| OverQuota {
            what: "sending too fast for one user",
            retry_in,
        })?;
        quota
            .bytes
            .take(bytes as f64 * share, now)
            .map_err(|retry_in| OverQuota {
                what: "this user stored its day's share of messages",
                retry_in,
            })
    }

    /// Charges one read to `user`, whose sessions are on `shards` shards.
    pub(super) fn charge_read(&mut self, user: UserId, shards: u32, now: Instant) -> Result<(), OverQuota> {
        let share = f64::from(shards.max(1));
        self.quota(user, now)
            .reads
            .take(share, now)
            .map_err(|retry_in| OverQuota {
                what: "reading too fast for one user",
                retry_in,
            })
    }

    fn quota(&mut self, user: UserId, now: Instant) -> &mut UserQuota {
        if self.users.len() > PRUNE_ABOVE {
            self.users.retain(|_, quota| {
                !(quota.messages.is_full(now) && quota.bytes.is_full(now) && quota.reads.is_full(now))
            });
        }
        let (messages, bytes, reads) = (self.messages, self.bytes, self.reads);
        self.users.entry(user).or_insert_with(|| UserQuota {
            messages: TokenBucket::new(messages, now),
            bytes: TokenBucket::new(bytes, now),
            reads: TokenBucket::new(reads, now),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> UserQuotas {
        let mut limits = crate::Config::defaults().unwrap().limits;
        limits.send_rate_per_user = 10.0;
        limits.send_burst_per_user = 4.0;
        limits.send_mib_per_user_per_day = 1.0;
        limits.read_rate_per_user = 10.0;
        limits.read_burst_per_user = 2.0;
        UserQuotas::new(&limits)
    }

    #[test]
    fn reads_have_a_bucket_of_their_own() {
        let now = Instant::now();
        let mut quotas = quotas();
        let user = UserId::new(1).unwrap();
        quotas.charge_read(user, 1, now).unwrap();
        quotas.charge_read(user, 1, now).unwrap();
        let refused = quotas.charge_read(user, 1, now).unwrap_err();
        assert_eq!(refused.retry_in, Duration::from_millis(100));
        quotas.charge(user, 10, 1, now).unwrap();
        quotas.charge_read(user, 1, now + Duration::from_millis(100)).unwrap();
    }

    #[test]
    fn a_user_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let now = Instant::now();
        let mut quotas = quotas();
        let (flooder, other) = (UserId::new(1).unwrap(), UserId::new(2).unwrap());
        for _ in 0..4 {
            quotas.charge(flooder, 10, 1, now).unwrap();
        }
        let refused = quotas.charge(flooder, 10, 1, now).unwrap_err();
        assert_eq!(refused.retry_in, Duration::from_millis(100));
        quotas.charge(other, 10, 1, now).unwrap();
        quotas.charge(flooder, 10, 1, now + Duration::from_millis(100)).unwrap();
    }

    #[test]
    fn sessions_on_two_shards_pay_double_on_each() {
        let now = Instant::now();
        let mut quotas = quotas();
        let user = UserId::new(1).unwrap();
        quotas.charge(user, 0, 2, now).unwrap();
        quotas.charge(user, 0, 2, now).unwrap();
        assert!(quotas.charge(user, 0, 2, now).is_err());
    }

    #[test]
    fn a_days_bytes_run_out() {
        let now = Instant::now();
        let mut quotas = quotas();
        let user = UserId::new(1).unwrap();
        quotas.charge(user, 700 * 1024, 1, now).unwrap();
        let refused = quotas
            .charge(user, 700 * 1024, 1, now + Duration::from_secs(1))
            .unwrap_err();
        assert!(refused.retry_in > Duration::from_secs(3600), "{refused:?}");
    }
}
