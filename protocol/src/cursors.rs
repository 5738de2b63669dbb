//! A device's position across its conversations: per-conversation cursors and
//! their opaque `sync_token` form.
//!
//! Exact per-conversation cursors (rather than one global position) are what let
//! Sync and resume promise that no message is skipped and none is sent twice,
//! though conversations are sequenced independently.

use crate::ids::{ConversationId, GroupId, Seq, UserId};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use std::collections::BTreeMap;

const TOKEN_PREFIX: &str = "s1.";

/// Per-conversation cursors: the last seq a device has of each conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursors(BTreeMap<ConversationId, Seq>);

/// Why a sync token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed sync token")]
pub struct MalformedToken;

impl Cursors {
    /// The last seq the device has of `conversation` (0: none).
    pub fn seq(&self, conversation: ConversationId) -> Seq {
        self.0.get(&conversation).copied().unwrap_or(0)
    }

    /// Every conversation's cursor.
    pub fn iter(&self) -> impl Iterator<Item = (ConversationId, Seq)> + '_ {
        self.0.iter().map(|(conversation, seq)| (*conversation, *seq))
    }

    /// Raises the cursor of `conversation` to `seq` (never lowers it).
    pub fn advance(&mut self, conversation: ConversationId, seq: Seq) {
        let cursor = self.0.entry(conversation).or_default();
        *cursor = (*cursor).max(seq);
    }

    /// Raises every cursor to the other's where that is higher.
    pub fn merge(&mut self, other: &Cursors) {
        for (conversation, seq) in &other.0 {
            self.advance(*conversation, *seq);
        }
    }

    /// The opaque token form: varint-encoded (kind, ids, seq) triples.
    pub fn to_token(&self) -> String {
        let mut raw = Vec::with_capacity(self.0.len() * 12);
        for (conversation, seq) in &self.0 {
            match conversation {
                ConversationId::Direct { low, high } => {
                    raw.push(b'd');
                    put_varint(&mut raw, low.get());
                    put_varint(&mut raw, high.get());
                }
                ConversationId::Group(group) => {
                    raw.push(b'g');
                    put_varint(&mut raw, group.get());
                }
            }
            put_varint(&mut raw, *seq);
        }
        format!("{TOKEN_PREFIX}{}", B64.encode(raw))
    }

    /// Parses a token from [`Cursors::to_token`]; the empty token is "nothing seen".
    pub fn from_token(token: &str) -> Result<Self, MalformedToken> {
        if token.is_empty() {
            return Ok(Self::default());
        }
        let raw = B64
            .decode(token.strip_prefix(TOKEN_PREFIX).ok_or(MalformedToken)?)
            .map_err(|_| MalformedToken)?;
        let mut input = raw.as_slice();
        let mut cursors = Self::default();
        while let Some((&kind, rest)) = input.split_first() {
            input = rest;
            let conversation = match kind {
                b'd' => {
                    let low = UserId::new(take_varint(&mut input)?).ok_or(MalformedToken)?;
                    let high = UserId::new(take_varint(&mut input)?).ok_or(MalformedToken)?;
                    ConversationId::direct(low, high)
                }
                b'g' => ConversationId::Group(GroupId::new(take_varint(&mut input)?).ok_or(MalformedToken)?),
                _ => return Err(MalformedToken),
            };
            cursors.advance(conversation, take_varint(&mut input)?);
        }
        Ok(cursors)
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(low_seven_bits(value) | 0x80);
        value >>= 7;
    }
    out.push(low_seven_bits(value));
}

fn low_seven_bits(value: u64) -> u8 {
    u8::try_from(value & 0x7f).unwrap_or_default()
}

fn take_varint(input: &mut &[u8]) -> Result<u64, MalformedToken> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(MalformedToken)?;
        *input = rest;
        value |= u64::from(byte & 0x7f).checked_shl(shift).ok_or(MalformedToken)?;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(MalformedToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let mut cursors = Cursors::default();
        cursors.advance(ConversationId::direct(user(3), user(u64::MAX)), 500);
        cursors.advance(ConversationId::Group(GroupId::new(7).unwrap()), 1);
        let token = cursors.to_token();
        assert_eq!(Cursors::from_token(&token), Ok(cursors));
        assert_eq!(Cursors::from_token(""), Ok(Cursors::default()));
        for bad in ["s1.!!", "x1.AAAA", "s1.eA", "s1.ZAEB"] {
            assert_eq!(Cursors::from_token(bad), Err(MalformedToken), "{bad}");
        }
    }

    #[test]
    fn cursors_only_move_forward() {
        let a = ConversationId::direct(user(1), user(2));
        let mut cursors = Cursors::default();
        cursors.advance(a, 10);
        cursors.advance(a, 4);
        assert_eq!(cursors.seq(a), 10);
        let mut other = Cursors::default();
        other.advance(a, 12);
        cursors.merge(&other);
        assert_eq!(cursors.seq(a), 12);
    }
}
