//! Typed identifiers shared by every layer: users, devices, conversations, sequence
//! numbers. Network input is parsed into these at the edge; code past the edge never
//! handles raw integers or strings for ids.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use std::fmt;

/// A registered user. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(u64);

/// One logged-in device of a user (a phone, a browser tab's storage...). Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(u64);

/// A group conversation. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(u64);

macro_rules! nonzero_id {
    ($name:ident) => {
        impl $name {
            /// Returns `None` for 0, which the protocol uses for "unset".
            pub fn new(raw: u64) -> Option<Self> {
                (raw != 0).then_some(Self(raw))
            }

            /// A fresh random id.
            pub fn random() -> Self {
                loop {
                    if let Some(id) = Self::new(rand::random()) {
                        return id;
                    }
                }
            }

            /// The raw id, as the wire carries it.
            pub fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

nonzero_id!(UserId);
nonzero_id!(DeviceId);
nonzero_id!(GroupId);

/// Names the group a device creates: derived from (creator, device,
/// client_msg_id), so a retried `CreateGroup` names the same group and is
/// deduplicated like a send, but under a server secret (HMAC-SHA256), so nobody
/// can compute, and create first, the id another user's `CreateGroup` will get.
#[derive(Clone)]
pub struct GroupIds(Hmac<Sha256>);

impl fmt::Debug for GroupIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupIds(<key redacted>)")
    }
}

impl GroupIds {
    /// Derivation under `secret`.
    pub fn new(secret: &[u8; 32]) -> Self {
        // HMAC pads a key shorter than its block with zeros: this is that key.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(secret);
        Self(<Hmac<Sha256> as KeyInit>::new(&block.into()))
    }

    /// The id of the group `creator`'s `device` creates with `client_msg_id`.
    pub fn derive(&self, creator: UserId, device: DeviceId, client_msg_id: &str) -> GroupId {
        let mut mac = self.0.clone();
        mac.update(&creator.get().to_be_bytes());
        mac.update(&device.get().to_be_bytes());
        mac.update(client_msg_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&digest[..8]);
        GroupId::new(u64::from_be_bytes(raw)).unwrap_or(GroupId(1))
    }
}

/// SplitMix64 finaliser: cheap and well spread. Stable across versions and
/// machines, because which shard owns a conversation is computed from it.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Where a client connects from, as per-address limits count it: an IPv4
/// address whole, an IPv6 one by its /64 (one subscriber usually holds a whole
/// /64), an IPv4-mapped IPv6 address as its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceAddress(u128);

impl SourceAddress {
    /// The source `ip` counts as.
    pub fn of(ip: std::net::IpAddr) -> Self {
        match ip {
            std::net::IpAddr::V4(v4) => Self(u128::from(v4.to_bits())),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(u128::from(v4.to_bits())),
                None => Self(v6.to_bits() & !u128::from(u64::MAX) | 1 << 127),
            },
        }
    }
}

/// Position of a message in its conversation: 1, 2, 3... with no gaps.
pub type Seq = u64;

/// A conversation. A direct conversation's id is derived from its two members, so
/// it needs no creation step and both members compute the same id. A group's
/// members are state, kept by its owner shard and the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConversationId {
    /// Between two users, stored with the smaller id first.
    Direct {
        /// The member with the smaller id.
        low: UserId,
        /// The other member (the same one for a user's notes to itself).
        high: UserId,
    },
    /// A group, named by its id.
    Group(GroupId),
}

/// Why a conversation id string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed conversation id {0:?}: expected \"d:<low user id>:<high user id>\" or \"g:<group id>\"")]
pub struct MalformedConversationId(pub String);

/// A conversation's key prefix in stores (see [`ConversationId::to_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationKey {
    bytes: [u8; 17],
    len: usize,
}

impl AsRef<[u8]> for ConversationKey {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl ConversationId {
    /// The direct conversation between `a` and `b` (order does not matter).
    pub fn direct(a: UserId, b: UserId) -> Self {
        Self::Direct {
            low: a.min(b),
            high: a.max(b),
        }
    }

    /// The two users of a direct conversation (one when it is a note to self);
    /// nothing for a group, whose members are state.
    pub fn direct_members(&self) -> impl Iterator<Item = UserId> + '_ {
        let pair = match *self {
            Self::Direct { low, high } => Some((low, (low != high).then_some(high))),
            Self::Group(_) => None,
        };
        pair.into_iter()
            .flat_map(|(low, high)| std::iter::once(low).chain(high))
    }

    /// Parses the canonical text form, the one `Display` writes.
    pub fn parse(text: &str) -> Result<Self, MalformedConversationId> {
        let malformed = || MalformedConversationId(text.chars().take(64).collect());
        let id = |part: &str| -> Option<u64> {
            // Reject signs, leading zeros and other non-canonical spellings.
            if part.starts_with('0') || part.starts_with('+') {
                return None;
            }
            part.parse().ok()
        };
        if let Some(group) = text.strip_prefix("g:") {
            return id(group).and_then(GroupId::new).map(Self::Group).ok_or_else(malformed);
        }
        let rest = text.strip_prefix("d:").ok_or_else(malformed)?;
        let (low, high) = rest.split_once(':').ok_or_else(malformed)?;
        match (id(low).and_then(UserId::new), id(high).and_then(UserId::new)) {
            (Some(low), Some(high)) if low <= high => Ok(Self::Direct { low, high }),
            _ => Err(malformed()),
        }
    }

    /// Stable 64-bit hash, used to pick the owner shard.
    pub fn hash64(&self) -> u64 {
        match *self {
            Self::Direct { low, high } => mix(low.get() ^ high.get().rotate_left(32)),
            Self::Group(group) => mix(group.get() ^ 0x6772_6f75_7000_0000),
        }
    }

    /// Binary form used as a key prefix in stores: a kind byte then fixed-length
    /// ids, so no conversation's key is a prefix of another's.
    pub fn to_key(&self) -> ConversationKey {
        let mut bytes = [0u8; 17];
        let len = match *self {
            Self::Direct { low, high } => {
                bytes[0] = b'd';
                bytes[1..9].copy_from_slice(&low.get().to_be_bytes());
                bytes[9..17].copy_from_slice(&high.get().to_be_bytes());
                17
            }
            Self::Group(group) => {
                bytes[0] = b'g';
                bytes[1..9].copy_from_slice(&group.get().to_be_bytes());
                9
            }
        };
        ConversationKey { bytes, len }
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct { low, high } => write!(f, "d:{low}:{high}"),
            Self::Group(group) => write!(f, "g:{group}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    #[test]
    fn direct_id_is_symmetric_and_round_trips() {
        let id = ConversationId::direct(user(9), user(3));
        assert_eq!(id, ConversationId::direct(user(3), user(9)));
        assert_eq!(id.to_string(), "d:3:9");
        assert_eq!(ConversationId::parse("d:3:9"), Ok(id));
        assert_eq!(id.direct_members().collect::<Vec<_>>(), vec![user(3), user(9)]);
    }

    #[test]
    fn group_ids_round_trip_and_derive_stably_under_their_key_only() {
        let ids = GroupIds::new(&[7; 32]);
        let device = DeviceId::new(2).unwrap();
        let group = ids.derive(user(1), device, "create-1");
        assert_eq!(group, ids.derive(user(1), device, "create-1"));
        assert_ne!(group, ids.derive(user(1), device, "create-2"));
        // Another server secret, another id: without it nobody can tell which
        // group a user's CreateGroup will name, so nobody can take it first.
        assert_ne!(group, GroupIds::new(&[8; 32]).derive(user(1), device, "create-1"));
        // Fields do not run into each other.
        assert_ne!(
            ids.derive(user(1), device, "2"),
            ids.derive(user(1), DeviceId::new(22).unwrap(), "")
        );
        let id = ConversationId::Group(group);
        assert_eq!(ConversationId::parse(&id.to_string()), Ok(id));
        assert_eq!(id.direct_members().count(), 0);
        assert_eq!(id.to_key().as_ref().len(), 9);
        assert!(ConversationId::parse("g:0").is_err());
    }

    #[test]
    fn note_to_self_has_one_member() {
        let id = ConversationId::direct(user(5), user(5));
        assert_eq!(id.direct_members().collect::<Vec<_>>(), vec![user(5)]);
    }

    #[test]
    fn non_canonical_ids_are_rejected() {
        for bad in [
            "", "d:", "d:1", "d:9:3", "d:0:3", "d:03:9", "d:+3:9", "g:", "g:01", "x:1", "d:1:2:3", "d:1:x",
        ] {
            assert!(ConversationId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
