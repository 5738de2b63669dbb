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
//! one address cannot take every slot. Loopback can be exempted for load tests.
//!
//! Admission is decided once per connection, under one short lock: it is not on
//! the message path.

use crate::config::LimitsConfig;
use crate::ids::SourceAddress;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node holds as many connections as it can.
    NodeFull,
    /// The source address holds as many connections as it may.
    AddressFull,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NodeFull => "the server is at its connection limit; retry later",
            Self::AddressFull => "too many connections from your address",
        }
    }
}

/// The node's connection slots; clones share them.
#[derive(Debug, Clone)]
pub struct Admission(Arc<Slots>);

#[derive(Debug)]
struct Slots {
    max_total: usize,
    max_per_address: usize,
    exempt_loopback: bool,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: HashMap<SourceAddress, usize>,
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

    pub fn max_total(&self) -> usize {
        self.0.max_total
    }

    /// Takes a slot for a connection from `ip`, if one is free.
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refused> {
        let slots = &self.0;
        let address = (!(slots.exempt_loopback && ip.is_loopback())).then(|| SourceAddress::of(ip));
        let mut counts = slots.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= slots.max_total {
            return Err(Refused::NodeFull);
        }
        if let Some(address) = address {
            let count = counts.by_address.entry(address).or_default();
            if *count >= slots.max_per_address {
                return Err(Refused::AddressFull);
            }
            *count += 1;
        }
        counts.total += 1;
        Ok(Permit {
            slots: slots.clone(),
            address,
        })
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
    fn one_address_cannot_take_every_slot_and_slots_come_back() {
        let admission = Admission::new(10, &limits(2, false));
        let first = admission.admit(ip("10.0.0.1")).unwrap();
        let _second = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(admission.admit(ip("10.0.0.1")).unwrap_err(), Refused::AddressFull);
        let _other = admission.admit(ip("10.0.0.2")).unwrap();
        drop(first);
        admission.admit(ip("10.0.0.1")).unwrap();
    }

    #[test]
    fn the_node_limit_holds_across_addresses() {
        let admission = Admission::new(2, &limits(5, false));
        let _a = admission.admit(ip("10.0.0.1")).unwrap();
        let _b = admission.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(admission.admit(ip("10.0.0.3")).unwrap_err(), Refused::NodeFull);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let admission = Admission::new(10, &limits(1, false));
        let _a = admission.admit(ip("2001:db8::1")).unwrap();
        assert_eq!(admission.admit(ip("2001:db8::2")).unwrap_err(), Refused::AddressFull);
        let _b = admission.admit(ip("2001:db8:0:1::1")).unwrap();
        let _c = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            admission.admit(ip("::ffff:10.0.0.1")).unwrap_err(),
            Refused::AddressFull
        );
    }

    #[test]
    fn loopback_is_exempt_only_when_configured() {
        let exempt = Admission::new(10, &limits(1, true));
        let _held: Vec<Permit> = (0..5).map(|_| exempt.admit(ip("127.0.0.1")).unwrap()).collect();
        let strict = Admission::new(10, &limits(1, false));
        let _one = strict.admit(ip("127.0.0.1")).unwrap();
        assert_eq!(strict.admit(ip("127.0.0.1")).unwrap_err(), Refused::AddressFull);
    }

    #[test]
    fn descriptors_are_kept_for_the_rest_of_the_process() {
        assert_eq!(Admission::node_limit(100_000, 20_000, 512), 19_488);
        assert_eq!(Admission::node_limit(1_000, 20_000, 512), 1_000);
        assert_eq!(Admission::node_limit(1_000, 100, 512), 0);
    }
}
