//! Where a conversation should be owned: rendezvous (highest random weight)
//! hashing of its id over the live incarnations.
//!
//! Every node computes the same answer from the same live set, with no table
//! to agree on, and when a node joins or leaves only the conversations whose
//! highest weight was (or becomes) that node move. The answer says who should
//! try to own a conversation; who may write it is decided by the epochs in the
//! store (docs/CLUSTER.md).

use super::Incarnation;
use confab_protocol::ids::{ConversationId, mix};

/// The incarnation among `live` that should own `conversation`, or `None` when
/// `live` is empty.
pub fn owner(conversation: ConversationId, live: &[Incarnation]) -> Option<Incarnation> {
    let key = conversation.hash64();
    live.iter().copied().max_by_key(|node| (weight(key, *node), *node))
}

/// A conversation's weight on one node: stable across versions and machines,
/// like [`ConversationId::hash64`].
fn weight(conversation: u64, node: Incarnation) -> u64 {
    mix(conversation ^ mix(node.get()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_protocol::ids::GroupId;
    use std::collections::HashMap;

    fn nodes(ids: &[u64]) -> Vec<Incarnation> {
        ids.iter().map(|&id| Incarnation::new(id)).collect()
    }

    fn groups() -> impl Iterator<Item = ConversationId> {
        (1..=30_000).map(|id| ConversationId::Group(GroupId::new(id).unwrap()))
    }

    #[test]
    fn no_live_node_owns_nothing() {
        assert_eq!(owner(ConversationId::Group(GroupId::new(1).unwrap()), &[]), None);
    }

    #[test]
    fn the_answer_does_not_depend_on_the_order_of_the_live_set() {
        let forwards = nodes(&[11, 22, 33, 44]);
        let backwards: Vec<_> = forwards.iter().rev().copied().collect();
        for conversation in groups().take(1000) {
            assert_eq!(owner(conversation, &forwards), owner(conversation, &backwards));
        }
    }

    #[test]
    fn conversations_spread_evenly_over_the_nodes() {
        let live = nodes(&[7, 8, 9]);
        let mut counts: HashMap<Incarnation, usize> = HashMap::new();
        for conversation in groups() {
            *counts.entry(owner(conversation, &live).unwrap()).or_default() += 1;
        }
        for node in &live {
            let share = counts[node] as f64 / 30_000.0;
            assert!((0.30..0.37).contains(&share), "{node:?} owns {share:.3}");
        }
    }

    #[test]
    fn only_the_conversations_of_a_node_that_leaves_move() {
        let before = nodes(&[7, 8, 9]);
        let after = nodes(&[7, 9]);
        let mut moved = 0;
        for conversation in groups() {
            let was = owner(conversation, &before).unwrap();
            let is = owner(conversation, &after).unwrap();
            if was == Incarnation::new(8) {
                moved += 1;
            } else {
                assert_eq!(was, is, "{conversation} moved off a node that stayed");
            }
        }
        assert!(moved > 9000, "node 8 owned {moved} of 30 000");
    }
}
