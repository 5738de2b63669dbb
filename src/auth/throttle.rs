//! Slows password guessing and sign-up floods down, per account and per source
//! address, and shares the password-hashing pool fairly between addresses.
//!
//! - An account that fails `login_failures_per_account` log-ins in a row makes
//!   each further attempt wait (1 s, doubling up to a minute, from its last
//!   failure); after `login_failures_before_lockout` its password log-ins are
//!   locked for `login_lockout`. Its devices go on refreshing their tokens: a
//!   refresh needs no password, so an attacker cannot log a user's phones out.
//! - An address does the same after `login_failures_per_ip` failures, whichever
//!   accounts it tries, so reconnecting (which resets the per-connection count)
//!   gains nothing.
//! - An address may have at most half the hashing pool (at least two hashes)
//!   running or queued at once; more log-ins or sign-ups from it are refused at
//!   once instead of queueing in front of everyone else's. (The pool's queue is
//!   first come, first served: another address waits behind at most that many.)
//! - Sign-ups: `signups_per_ip_per_hour` per address (a burst of as many).
//!
//! A refused attempt costs no hash and is not counted as a failure. Failures
//! are forgotten after a quiet `login_lockout`. State lives in memory (a restart
//! forgets it), in maps of bounded size; loopback is exempt when
//! `limits.exempt_loopback` is set. Log-ins and sign-ups are not on the message
//! path, so one short lock is fine here.

use crate::config::LimitsConfig;
use confab_protocol::ids::SourceAddress;
use confab_protocol::{Rate, TokenBucket};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The first wait once failures pass their threshold; it doubles up to the max.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Entries kept per map before forgotten ones are swept (and then, if still
/// full, the new key is not tracked).
const MAX_TRACKED: usize = 100_000;

/// Why an attempt was refused before it cost a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Throttled {
    /// Too many failed log-ins for the account; retry after the wait.
    #[error("too many failed log-ins for this account; retry in {} s", secs(*.0))]
    Account(Duration),
    /// Too many failed log-ins from the address; retry after the wait.
    #[error("too many failed log-ins from your address; retry in {} s", secs(*.0))]
    Address(Duration),
    /// Too many log-ins or sign-ups at once from your address; retry shortly.
    #[error("too many log-ins or sign-ups at once from your address; retry shortly")]
    Hashing,
    /// Too many sign-ups from the address; retry after the wait.
    #[error("too many sign-ups from your address; retry in {} s", secs(*.0))]
    SignUps(Duration),
}

fn secs(wait: Duration) -> u64 {
    wait.as_secs().max(1)
}

/// Log-in and sign-up throttling, per account and per source address; clones share it.
#[derive(Debug, Clone)]
pub struct Throttle(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    policy: Policy,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
struct Policy {
    account_free_failures: u32,
    address_free_failures: u32,
    lockout_after: u32,
    lockout: Duration,
    hashes_per_address: usize,
    signups: Rate,
    exempt_loopback: bool,
}

#[derive(Debug, Default)]
struct State {
    accounts: HashMap<String, Failures>,
    addresses: HashMap<SourceAddress, Failures>,
    hashing: HashMap<SourceAddress, usize>,
    signups: HashMap<SourceAddress, TokenBucket>,
}

/// Failed attempts in a row, and when the last one was.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Failures {
    /// How long the next attempt must still wait, if at all.
    fn wait(&self, free: u32, policy: &Policy, now: Instant) -> Option<Duration> {
        let until = if self.count >= policy.lockout_after {
            self.last + policy.lockout
        } else if self.count >= free {
            let doublings = (self.count - free).min(16);
            self.last + FIRST_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
        } else {
            return None;
        };
        until.checked_duration_since(now).filter(|wait| !wait.is_zero())
    }

    fn forgotten(&self, policy: &Policy, now: Instant) -> bool {
        now.saturating_duration_since(self.last) >= policy.lockout
    }
}

/// A hash an address is running (or waiting for); its slot is given back on drop.
#[derive(Debug)]
pub struct HashSlot {
    throttle: Option<(Throttle, SourceAddress)>,
}

impl Drop for HashSlot {
    fn drop(&mut self) {
        if let Some((throttle, address)) = self.throttle.take() {
            let mut state = throttle.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(running) = state.hashing.get_mut(&address) {
                *running -= 1;
                if *running == 0 {
                    state.hashing.remove(&address);
                }
            }
        }
    }
}

impl Throttle {
    /// `hashing_pool`: how many hashes the node runs at once.
    pub fn new(limits: &LimitsConfig, hashing_pool: usize) -> Self {
        let hourly = f64::from(limits.signups_per_ip_per_hour);
        Self(Arc::new(Shared {
            policy: Policy {
                account_free_failures: limits.login_failures_per_account,
                address_free_failures: limits.login_failures_per_ip,
                lockout_after: limits.login_failures_before_lockout,
                lockout: limits.login_lockout,
                hashes_per_address: (hashing_pool / 2).max(2),
                signups: Rate {
                    per_second: hourly / 3600.0,
                    burst: hourly,
                },
                exempt_loopback: limits.exempt_loopback,
            },
            state: Mutex::default(),
        }))
    }

    /// Before a log-in's hash: refused while the account or the address backs
    /// off, or while the address has its share of the hashing pool.
    pub fn before_log_in(&self, account: &str, from: Option<IpAddr>, now: Instant) -> Result<HashSlot, Throttled> {
        let policy = &self.0.policy;
        let address = self.tracked(from);
        let mut state = self.lock();
        if let Some(wait) = state
            .accounts
            .get(account)
            .and_then(|failures| failures.wait(policy.account_free_failures, policy, now))
        {
            return Err(Throttled::Account(wait));
        }
        if let Some(wait) = address
            .and_then(|address| state.addresses.get(&address))
            .and_then(|failures| failures.wait(policy.address_free_failures, policy, now))
        {
            return Err(Throttled::Address(wait));
        }
        self.take_slot(&mut state, address)
    }

    /// Before a sign-up's hash: within the address's sign-up rate and its share
    /// of the hashing pool.
    pub fn before_sign_up(&self, from: Option<IpAddr>, now: Instant) -> Result<HashSlot, Throttled> {
        let address = self.tracked(from);
        let mut state = self.lock();
        // A sign-up refused for want of a hashing slot uses none of the budget.
        let busy = address.and_then(|address| state.hashing.get(&address).copied());
        if busy.is_some_and(|running| running >= self.0.policy.hashes_per_address) {
            return Err(Throttled::Hashing);
        }
        if let Some(address) = address {
            let rate = self.0.policy.signups;
            if !state.signups.contains_key(&address) && state.signups.len() >= MAX_TRACKED {
                state.signups.retain(|_, bucket| !bucket.is_full(now));
            }
            if state.signups.contains_key(&address) || state.signups.len() < MAX_TRACKED {
                let bucket = state
                    .signups
                    .entry(address)
                    .or_insert_with(|| TokenBucket::new(rate, now));
                bucket.take(1.0, now).map_err(Throttled::SignUps)?;
            }
        }
        self.take_slot(&mut state, address)
    }

    /// A log-in failed: count it against the account and the address.
    pub fn failed(&self, account: &str, from: Option<IpAddr>, now: Instant) {
        let policy = self.0.policy;
        let address = self.tracked(from);
        let mut state = self.lock();
        record_failure(&mut state.accounts, account.to_owned(), &policy, now);
        if let Some(address) = address {
            record_failure(&mut state.addresses, address, &policy, now);
        }
    }

    /// A log-in succeeded: the account's failures are forgotten (the address's
    /// stay: it may be guessing other accounts).
    pub fn succeeded(&self, account: &str) {
        self.lock().accounts.remove(account);
    }

    fn take_slot(&self, state: &mut State, address: Option<SourceAddress>) -> Result<HashSlot, Throttled> {
        let Some(address) = address else {
            return Ok(HashSlot { throttle: None });
        };
        let running = state.hashing.entry(address).or_default();
        if *running >= self.0.policy.hashes_per_address {
            return Err(Throttled::Hashing);
        }
        *running += 1;
        Ok(HashSlot {
            throttle: Some((self.clone(), address)),
        })
    }

    /// The address limits count `from` under, unless it is exempt.
    fn tracked(&self, from: Option<IpAddr>) -> Option<SourceAddress> {
        from.filter(|ip| !(self.0.policy.exempt_loopback && ip.is_loopback()))
            .map(SourceAddress::of)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn record_failure<K: std::hash::Hash + Eq>(failures: &mut HashMap<K, Failures>, key: K, policy: &Policy, now: Instant) {
    if failures.len() >= MAX_TRACKED && !failures.contains_key(&key) {
        failures.retain(|_, entry| !entry.forgotten(policy, now));
        if failures.len() >= MAX_TRACKED {
            return;
        }
    }
    let entry = failures.entry(key).or_insert(Failures { count: 0, last: now });
    if entry.forgotten(policy, now) {
        entry.count = 0;
    }
    entry.count = entry.count.saturating_add(1);
    entry.last = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(pool: usize) -> Throttle {
        let mut limits = crate::Config::defaults().unwrap().limits;
        limits.login_failures_per_account = 3;
        limits.login_failures_per_ip = 5;
        limits.login_failures_before_lockout = 6;
        limits.login_lockout = Duration::from_secs(900);
        limits.signups_per_ip_per_hour = 2;
        limits.exempt_loopback = false;
        Throttle::new(&limits, pool)
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn an_account_backs_off_exponentially_then_locks_and_success_forgets() {
        let throttle = throttle(8);
        let start = Instant::now();
        let mut now = start;
        for _ in 0..3 {
            drop(throttle.before_log_in("alice", ip(1), now).unwrap());
            throttle.failed("alice", ip(2), now);
        }
        assert_eq!(
            throttle.before_log_in("alice", ip(3), now).unwrap_err(),
            Throttled::Account(Duration::from_secs(1)),
            "from any address"
        );
        now += Duration::from_secs(1);
        drop(throttle.before_log_in("alice", ip(3), now).unwrap());
        throttle.failed("alice", ip(3), now);
        assert_eq!(
            throttle.before_log_in("alice", ip(4), now).unwrap_err(),
            Throttled::Account(Duration::from_secs(2))
        );
        now += Duration::from_secs(2);
        throttle.failed("alice", ip(4), now);
        throttle.failed("alice", ip(5), now);
        assert_eq!(
            throttle.before_log_in("alice", ip(6), now).unwrap_err(),
            Throttled::Account(Duration::from_secs(900)),
            "locked"
        );
        assert!(
            throttle.before_log_in("bob", ip(6), now).is_ok(),
            "other accounts are not"
        );
        throttle.succeeded("alice");
        assert!(throttle.before_log_in("alice", ip(6), now).is_ok());
    }

    #[test]
    fn an_address_guessing_many_accounts_backs_off() {
        let throttle = throttle(8);
        let now = Instant::now();
        for account in ["a", "b", "c", "d", "e"] {
            throttle.failed(account, ip(1), now);
        }
        assert!(matches!(
            throttle.before_log_in("f", ip(1), now),
            Err(Throttled::Address(_))
        ));
        assert!(throttle.before_log_in("f", ip(2), now).is_ok());
    }

    #[test]
    fn an_address_gets_at_most_half_the_hashing_pool() {
        let throttle = throttle(4);
        let now = Instant::now();
        let first = throttle.before_log_in("a", ip(1), now).unwrap();
        let _second = throttle.before_sign_up(ip(1), now).unwrap();
        assert_eq!(throttle.before_log_in("b", ip(1), now).unwrap_err(), Throttled::Hashing);
        assert!(
            throttle.before_log_in("b", ip(2), now).is_ok(),
            "others get their share"
        );
        drop(first);
        assert!(throttle.before_log_in("b", ip(1), now).is_ok());
    }

    #[test]
    fn sign_ups_per_address_follow_their_hourly_rate() {
        let throttle = throttle(2);
        let now = Instant::now();
        let hashing = [
            throttle.before_log_in("a", ip(1), now).unwrap(),
            throttle.before_log_in("b", ip(1), now).unwrap(),
        ];
        // Refused while the address's share of hashing is in use: no budget spent.
        assert_eq!(throttle.before_sign_up(ip(1), now).unwrap_err(), Throttled::Hashing);
        drop(hashing);
        drop(throttle.before_sign_up(ip(1), now).unwrap());
        drop(throttle.before_sign_up(ip(1), now).unwrap());
        assert!(matches!(
            throttle.before_sign_up(ip(1), now),
            Err(Throttled::SignUps(_))
        ));
        assert!(throttle.before_sign_up(ip(2), now).is_ok());
        assert!(throttle.before_sign_up(ip(1), now + Duration::from_secs(1800)).is_ok());
    }
}
