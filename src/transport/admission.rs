//! Who may open a connection: a node-wide limit and a limit per source address.
//!
//! Every TCP or WebSocket connection is a file descriptor, so the node-wide limit
//! is the lower of `server.max_connections` and the process's open-files limit
//! minus `limits.reserved_file_descriptors`: whatever connections come, the store
//! (journals, segment files), listeners and certificates keep descriptors to work
//! with, and a connection beyond the limit is refused at once, with a reason,
//! instead of waiting in the backlog or meeting EMFILE.
//!
//! Per source address (an IPv6 client counts per /64, which one subscriber
//! usually holds whole), at most `limits.max_connections_per_ip` at once, so
//! one address cannot take every slot, and new connections at
//! `limits.connect_rate_per_ip` a second after a burst of
//! `connect_burst_per_ip`, so one address cannot keep the node busy accepting
//! and handshaking (TLS, QUIC) connections it drops at once. Loopback can be
//! exempted for load tests.
//!
//! Per account, at most `limits.max_connections_per_user` authenticated
//! connections at once, node-wide, so one account (with many addresses) cannot
//! take every slot either.
//!
//! Admission is decided once per connection, under one short lock: it is not on
//! the message path.

use crate::config::LimitsConfig;
use confab_protocol::ids::{SourceAddress, UserId};
use confab_protocol::{Rate, TokenBucket};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Addresses with connect buckets above which refilled ones are forgotten.
const PRUNE_ABOVE: usize = 4096;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node holds as many connections as it can.
    NodeFull,
    /// The source address holds as many connections as it may.
    AddressFull,
    /// The source address opens connections faster than it may.
    AddressRate,
    /// The account holds as many connections as it may.
    UserFull,
}

impl Refused {
    /// Why, for the log and the peer.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NodeFull => "the server is at its connection limit; retry later",
            Self::AddressFull => "too many connections from your address",
            Self::AddressRate => "connecting too often from your address; retry in a second",
            Self::UserFull => "this account holds as many connections as it may; close one first",
        }
    }

    /// Whether the refusal is about the client's address (not the node).
    pub fn is_address(self) -> bool {
        matches!(self, Self::AddressFull | Self::AddressRate)
    }
}

/// The node's connection slots; clones share them.
#[derive(Debug, Clone)]
pub struct Admission(Arc<Slots>);

#[derive(Debug)]
struct Slots {
    max_total: usize,
    max_per_address: usize,
    max_per_user: usize,
    connect_rate: Rate,
    exempt_loopback: bool,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: HashMap<SourceAddress, usize>,
    connects: HashMap<SourceAddress, TokenBucket>,
    by_user: HashMap<UserId, usize>,
}

/// A connection slot, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    slots: Arc<Slots>,
    address: Option<SourceAddress>,
}

impl Admission {
    /// Slots for at most `max_total` connections, `limits` per address.
    pub fn new(max_total: usize, limits: &LimitsConfig) -> Self {
        Self(Arc::new(Slots {
            max_total,
            max_per_address: limits.max_connections_per_ip,
            max_per_user: limits.max_connections_per_user,
            connect_rate: Rate {
                per_second: limits.connect_rate_per_ip,
                burst: limits.connect_burst_per_ip,
            },
            exempt_loopback: limits.exempt_loopback,
            counts: Mutex::default(),
        }))
    }

    /// The node-wide limit for `max_connections` under an open-files limit of
    /// `open_files`, keeping `reserved` descriptors for everything else.
    pub fn node_limit(max_connections: usize, open_files: u64, reserved: usize) -> usize {
        let descriptors = usize::try_from(open_files).unwrap_or(usize::MAX);
        max_connections.min(descriptors.saturating_sub(reserved))
    }

    /// Connections the node takes at most (the lower of the configured limit and what the open-files limit leaves).
    pub fn max_total(&self) -> usize {
        self.0.max_total
    }

    /// Takes a slot for a connection from `ip`, if one is free and the address
    /// may connect again now.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<Permit, Refused> {
        let slots = &self.0;
        let address = (!(slots.exempt_loopback && ip.is_loopback())).then(|| SourceAddress::of(ip));
        let mut counts = slots.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= slots.max_total {
            return Err(Refused::NodeFull);
        }
        if let Some(address) = address {
            if counts.by_address.get(&address).copied().unwrap_or(0) >= slots.max_per_address {
                return Err(Refused::AddressFull);
            }
            if counts.connects.len() > PRUNE_ABOVE {
                counts.connects.retain(|_, bucket| !bucket.is_full(now));
            }
            let rate = slots.connect_rate;
            let bucket = counts
                .connects
                .entry(address)
                .or_insert_with(|| TokenBucket::new(rate, now));
            if bucket.take(1.0, now).is_err() {
                return Err(Refused::AddressRate);
            }
            *counts.by_address.entry(address).or_default() += 1;
        }
        counts.total += 1;
        Ok(Permit {
            slots: slots.clone(),
            address,
        })
    }
}

/// An authenticated connection's place in its account's share, given back when
/// dropped.
#[derive(Debug)]
pub struct UserPermit {
    slots: Arc<Slots>,
    user: UserId,
}

impl Admission {
    /// Connections open on the node now.
    pub fn connections(&self) -> usize {
        self.0.counts.lock().unwrap_or_else(PoisonError::into_inner).total
    }

    /// `user`'s authenticated connections on the node now.
    pub fn user_connections(&self, user: UserId) -> usize {
        let counts = self.0.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.by_user.get(&user).copied().unwrap_or(0)
    }

    /// Takes one of `user`'s connection slots, if it has one free.
    pub fn admit_user(&self, user: UserId) -> Result<UserPermit, Refused> {
        let slots = &self.0;
        let mut counts = slots.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.by_user.entry(user).or_default();
        if *count >= slots.max_per_user {
            return Err(Refused::UserFull);
        }
        *count += 1;
        Ok(UserPermit {
            slots: slots.clone(),
            user,
        })
    }
}

impl Drop for UserPermit {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.by_user.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                counts.by_user.remove(&self.user);
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.total -= 1;
        if let Some(address) = self.address
            && let Some(count) = counts.by_address.get_mut(&address)
        {
            *count -= 1;
            if *count == 0 {
                counts.by_address.remove(&address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(per_ip: usize, exempt_loopback: bool) -> LimitsConfig {
        let mut limits = crate::Config::defaults().unwrap().limits;
        limits.max_connections_per_ip = per_ip;
        limits.exempt_loopback = exempt_loopback;
        limits
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_account_holds_its_share_of_connections_and_gets_them_back() {
        let mut limits = limits(100, false);
        limits.max_connections_per_user = 2;
        let admission = Admission::new(100, &limits);
        let (user, other) = (UserId::new(1).unwrap(), UserId::new(2).unwrap());
        let first = admission.admit_user(user).unwrap();
        let _second = admission.admit_user(user).unwrap();
        assert_eq!(admission.admit_user(user).unwrap_err(), Refused::UserFull);
        let _other = admission.admit_user(other).unwrap();
        drop(first);
        admission.admit_user(user).unwrap();
    }

    #[test]
    fn one_address_cannot_connect_faster_than_its_rate() {
        let mut limits = limits(100, false);
        limits.connect_rate_per_ip = 10.0;
        limits.connect_burst_per_ip = 3.0;
        let admission = Admission::new(100, &limits);
        let now = Instant::now();
        for _ in 0..3 {
            drop(admission.admit(ip("10.0.0.1"), now).unwrap());
        }
        assert_eq!(admission.admit(ip("10.0.0.1"), now).unwrap_err(), Refused::AddressRate);
        let _other = admission.admit(ip("10.0.0.2"), now).unwrap();
        admission
            .admit(ip("10.0.0.1"), now + Duration::from_millis(100))
            .unwrap();
    }

    #[test]
    fn one_address_cannot_take_every_slot_and_slots_come_back() {
        let admission = Admission::new(10, &limits(2, false));
        let first = admission.admit(ip("10.0.0.1"), Instant::now()).unwrap();
        let _second = admission.admit(ip("10.0.0.1"), Instant::now()).unwrap();
        assert_eq!(
            admission.admit(ip("10.0.0.1"), Instant::now()).unwrap_err(),
            Refused::AddressFull
        );
        let _other = admission.admit(ip("10.0.0.2"), Instant::now()).unwrap();
        drop(first);
        admission.admit(ip("10.0.0.1"), Instant::now()).unwrap();
    }

    #[test]
    fn the_node_limit_holds_across_addresses() {
        let admission = Admission::new(2, &limits(5, false));
        let _a = admission.admit(ip("10.0.0.1"), Instant::now()).unwrap();
        let _b = admission.admit(ip("10.0.0.2"), Instant::now()).unwrap();
        assert_eq!(
            admission.admit(ip("10.0.0.3"), Instant::now()).unwrap_err(),
            Refused::NodeFull
        );
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let admission = Admission::new(10, &limits(1, false));
        let _a = admission.admit(ip("2001:db8::1"), Instant::now()).unwrap();
        assert_eq!(
            admission.admit(ip("2001:db8::2"), Instant::now()).unwrap_err(),
            Refused::AddressFull
        );
        let _b = admission.admit(ip("2001:db8:0:1::1"), Instant::now()).unwrap();
        let _c = admission.admit(ip("10.0.0.1"), Instant::now()).unwrap();
        assert_eq!(
            admission.admit(ip("::ffff:10.0.0.1"), Instant::now()).unwrap_err(),
            Refused::AddressFull
        );
    }

    #[test]
    fn loopback_is_exempt_only_when_configured() {
        let exempt = Admission::new(10, &limits(1, true));
        let _held: Vec<Permit> = (0..5)
            .map(|_| exempt.admit(ip("127.0.0.1"), Instant::now()).unwrap())
            .collect();
        let strict = Admission::new(10, &limits(1, false));
        let _one = strict.admit(ip("127.0.0.1"), Instant::now()).unwrap();
        assert_eq!(
            strict.admit(ip("127.0.0.1"), Instant::now()).unwrap_err(),
            Refused::AddressFull
        );
    }

    #[test]
    fn descriptors_are_kept_for_the_rest_of_the_process() {
        assert_eq!(Admission::node_limit(100_000, 20_000, 512), 19_488);
        assert_eq!(Admission::node_limit(1_000, 20_000, 512), 1_000);
        assert_eq!(Admission::node_limit(1_000, 100, 512), 0);
    }
}
