//! Typed identifiers shared by every layer: users, devices, conversations, sequence
//! numbers. Network input is parsed into these at the edge; code past the edge never
//! handles raw integers or strings for ids.

use std::fmt;

/// A registered user. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(u64);

/// One logged-in device of a user (a phone, a browser tab's storage...). Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(u64);

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

/// Position of a message in its conversation: 1, 2, 3... with no gaps.
pub type Seq = u64;

/// A conversation. A direct conversation's id is derived from its two members, so
/// it needs no creation step and both members compute the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConversationId {
    /// Between two users, stored with the smaller id first.
    Direct { low: UserId, high: UserId },
}

/// Why a conversation id string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed conversation id {0:?}: expected \"d:<low user id>:<high user id>\"")]
pub struct MalformedConversationId(pub String);

impl ConversationId {
    /// The direct conversation between `a` and `b` (order does not matter).
    pub fn direct(a: UserId, b: UserId) -> Self {
        Self::Direct {
            low: a.min(b),
            high: a.max(b),
        }
    }

    /// Users who take part (both for a direct conversation; one when it is a note to self).
    pub fn members(&self) -> impl Iterator<Item = UserId> + '_ {
        let Self::Direct { low, high } = *self;
        std::iter::once(low).chain((low != high).then_some(high))
    }

    pub fn has_member(&self, user: UserId) -> bool {
        self.members().any(|member| member == user)
    }

    /// Parses the canonical text form, the one `Display` writes.
    pub fn parse(text: &str) -> Result<Self, MalformedConversationId> {
        let malformed = || MalformedConversationId(text.chars().take(64).collect());
        let rest = text.strip_prefix("d:").ok_or_else(malformed)?;
        let (low, high) = rest.split_once(':').ok_or_else(malformed)?;
        let id = |part: &str| -> Option<UserId> {
            // Reject signs, leading zeros and other non-canonical spellings.
            if part.starts_with('0') || part.starts_with('+') {
                return None;
            }
            UserId::new(part.parse().ok()?)
        };
        match (id(low), id(high)) {
            (Some(low), Some(high)) if low <= high => Ok(Self::Direct { low, high }),
            _ => Err(malformed()),
        }
    }

    /// Stable 64-bit hash, used to pick the owner shard.
    pub fn hash64(&self) -> u64 {
        let Self::Direct { low, high } = *self;
        // SplitMix64 finaliser over both ids: cheap and well spread.
        let mut x = low.get() ^ high.get().rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// Binary form used as a key prefix in stores: fixed length per kind, so no
    /// conversation's key is a prefix of another's.
    pub fn to_key(&self) -> [u8; 17] {
        let Self::Direct { low, high } = *self;
        let mut key = [0u8; 17];
        key[0] = b'd';
        key[1..9].copy_from_slice(&low.get().to_be_bytes());
        key[9..17].copy_from_slice(&high.get().to_be_bytes());
        key
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self::Direct { low, high } = self;
        write!(f, "d:{low}:{high}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
        assert_eq!(id.members().collect::<Vec<_>>(), vec![user(3), user(9)]);
    }

    #[test]
    fn note_to_self_has_one_member() {
        let id = ConversationId::direct(user(5), user(5));
        assert_eq!(id.members().collect::<Vec<_>>(), vec![user(5)]);
    }

    #[test]
    fn non_canonical_ids_are_rejected() {
        for bad in [
            "", "d:", "d:1", "d:9:3", "d:0:3", "d:03:9", "d:+3:9", "g:1", "d:1:2:3", "d:1:x",
        ] {
            assert!(ConversationId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
