//! Sync: what a device has not seen yet, across all its conversations, in one call.
//!
//! A device's position is a set of per-conversation cursors (the last seq it has).
//! Clients send them explicitly, or send back the opaque `sync_token` of their
//! previous Sync (or resumed Authenticate), which is those cursors encoded. Exact
//! per-conversation cursors (rather than one global position) are what make the
//! guarantee hold: no message is skipped and none is sent twice, even though
//! conversations are sequenced on different shards.
//!
//! Sans-IO: [`plan`] decides from the conversation heads which conversations to
//! report and from which seq to read each; the caller reads and assembles.

use crate::store::ConversationHead;
use confab_protocol::Cursors;
use confab_protocol::ids::Seq;

/// One conversation to report, and which of its messages to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The conversation's head as stored.
    pub head: ConversationHead,
    /// Read messages after this seq...
    pub after: Seq,
    /// ...at most this many.
    pub take: usize,
}

/// What a sync sends: the changed conversations, most recently active first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The conversations to report.
    pub conversations: Vec<Planned>,
    /// Changed conversations left out (over `max_conversations`) or messages left
    /// unread (over `max_messages`): the device should sync again.
    pub has_more: bool,
}

/// Plans a sync of the conversations in `heads` for a device at `cursors`: every
/// conversation with messages past its cursor, up to `max_conversations`, with up
/// to `max_messages` messages in all (oldest unseen first within a conversation).
pub fn plan(
    mut heads: Vec<ConversationHead>,
    cursors: &Cursors,
    max_conversations: usize,
    max_messages: usize,
) -> Plan {
    heads.retain(|head| head.last_seq > cursors.seq(head.conversation));
    heads.sort_by(|a, b| {
        b.last_time_ms
            .cmp(&a.last_time_ms)
            .then(a.conversation.cmp(&b.conversation))
    });
    let mut has_more = heads.len() > max_conversations;
    heads.truncate(max_conversations);
    let mut budget = max_messages;
    let conversations = heads
        .into_iter()
        .map(|head| {
            let after = cursors.seq(head.conversation);
            let unseen = usize::try_from(head.last_seq - after).unwrap_or(usize::MAX);
            let take = unseen.min(budget);
            budget -= take;
            has_more |= take < unseen;
            Planned { head, after, take }
        })
        .collect();
    Plan {
        conversations,
        has_more,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_protocol::ids::{ConversationId, GroupId, UserId};

    fn user(raw: u64) -> UserId {
        UserId::new(raw).unwrap()
    }

    fn head(conversation: ConversationId, last_seq: Seq, last_time_ms: u64) -> ConversationHead {
        ConversationHead {
            conversation,
            last_seq,
            last_time_ms,
            left_seq: None,
            read_seq: 0,
            title: None,
        }
    }

    #[test]
    fn plan_reports_changed_conversations_newest_first_within_budget() {
        let quiet = ConversationId::direct(user(1), user(2));
        let busy = ConversationId::direct(user(1), user(3));
        let fresh = ConversationId::Group(GroupId::new(9).unwrap());
        let mut cursors = Cursors::default();
        cursors.advance(quiet, 5);
        cursors.advance(busy, 10);
        let heads = vec![head(quiet, 5, 300), head(busy, 40, 200), head(fresh, 3, 100)];

        let all = plan(heads.clone(), &cursors, 10, 100);
        let planned: Vec<_> = all
            .conversations
            .iter()
            .map(|p| (p.head.conversation, p.after, p.take))
            .collect();
        assert_eq!(
            planned,
            vec![(busy, 10, 30), (fresh, 0, 3)],
            "unchanged conversations are left out"
        );
        assert!(!all.has_more);

        let limited = plan(heads.clone(), &cursors, 10, 20);
        let takes: Vec<_> = limited.conversations.iter().map(|p| p.take).collect();
        assert_eq!(takes, vec![20, 0]);
        assert!(limited.has_more);

        let narrow = plan(heads, &cursors, 1, 100);
        assert_eq!(narrow.conversations.len(), 1);
        assert!(narrow.has_more);
    }
}
