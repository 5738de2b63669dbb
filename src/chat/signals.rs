//! Ephemeral signals to a conversation's members: receipt updates and typing.
//! Never stored; fanned out by the conversation's owner shard like messages.
//!
//! Receipt updates are coalesced: the owner keeps the latest watermarks per
//! (conversation, user) and sends them once per flush interval, so a user reading
//! 100 messages one by one causes one update, not 100.

use confab_protocol::Marks;
use confab_protocol::ids::{ConversationId, UserId};
use std::collections::HashMap;

/// A signal a member sends to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The user's watermarks rose (after a MarkDelivered / MarkRead).
    Receipt(Marks),
    /// The user started (true) or stopped (false) typing.
    Typing(bool),
}

/// Latest receipt watermarks waiting to be sent.
#[derive(Debug, Default)]
pub struct ReceiptCoalescer {
    pending: HashMap<(ConversationId, UserId), Marks>,
}

impl ReceiptCoalescer {
    /// Records new watermarks; returns true when nothing was pending before, i.e.
    /// the caller must schedule a flush.
    pub fn record(&mut self, conversation: ConversationId, user: UserId, marks: Marks) -> bool {
        let first = self.pending.is_empty();
        let pending = self.pending.entry((conversation, user)).or_default();
        *pending = pending.merged(marks);
        first
    }

    /// Everything pending, once each.
    pub fn drain(&mut self) -> Vec<(ConversationId, UserId, Marks)> {
        self.pending
            .drain()
            .map(|((conversation, user), marks)| (conversation, user, marks))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hundred_reads_coalesce_into_one_update() {
        let user = UserId::new(1).unwrap();
        let conversation = ConversationId::direct(user, UserId::new(2).unwrap());
        let mut coalescer = ReceiptCoalescer::default();
        let mut flushes = 0;
        for seq in 1..=100 {
            let marks = Marks {
                delivered_seq: seq,
                read_seq: seq,
            };
            flushes += usize::from(coalescer.record(conversation, user, marks));
        }
        assert_eq!(flushes, 1, "one flush scheduled");
        let drained = coalescer.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].2.read_seq, 100);
        assert!(coalescer.drain().is_empty());
        // Out-of-order reports never lower what is sent.
        coalescer.record(
            conversation,
            user,
            Marks {
                delivered_seq: 7,
                read_seq: 7,
            },
        );
        coalescer.record(
            conversation,
            user,
            Marks {
                delivered_seq: 5,
                read_seq: 3,
            },
        );
        assert_eq!(
            coalescer.drain()[0].2,
            Marks {
                delivered_seq: 7,
                read_seq: 7
            }
        );
    }
}
