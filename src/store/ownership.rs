//! Cluster mode's ownership of conversations, as the store keeps it
//! (docs/CLUSTER.md, "Who may write a seq"): node incarnations that can be
//! fenced, epochs claimed once per change of owner, and the rule that says
//! which stored rows a later epoch has made stale.
//!
//! The values and rules here are the backend's contract; the Cassandra store
//! implements them (`cassandra/ownership.rs`).

use confab_protocol::ids::Seq;
use std::fmt;

/// One run of one node in a cluster: a fresh random id at every start, so a
/// node that was declared dead (and fenced) and comes back is a different
/// member. Never zero.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Incarnation(u64);

impl Incarnation {
    /// A fresh random incarnation.
    pub fn random() -> Self {
        Self(rand::random::<u64>() | 1)
    }

    /// The incarnation with this id (zero is taken as one).
    pub fn new(id: u64) -> Self {
        Self(id.max(1))
    }

    /// Its id.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Reads the form [`Display`](fmt::Display) writes: 16 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 16 {
            return None;
        }
        u64::from_str_radix(text, 16).ok().filter(|&id| id != 0).map(Self)
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Incarnation({self})")
    }
}

/// Whether a node is live, as this node last saw the cluster.
pub type Liveness = std::sync::Arc<dyn Fn(Incarnation) -> bool + Send + Sync>;

/// A conversation's owner generation: 1 for its first owner, one more at each
/// change of owner. Rows written before cluster mode count as epoch 0.
pub type Epoch = u64;

/// Epochs above this do not fit the write timestamps ([`write_timestamp`]).
pub const MAX_EPOCH: Epoch = (1 << 22) - 1;

/// Seqs at or above this do not fit the write timestamps.
pub const MAX_SEQ: Seq = (1 << 40) - 1;

/// The timestamp of every write of a message row in cluster mode:
/// `2⁶² + epoch·2⁴⁰ + seq`, where `seq` is the highest seq of the
/// conversation's flush. Of two writes to one row the later epoch's wins, and
/// within an epoch the later flush's, whatever order they land in; and every
/// one of them is later than any row a single node wrote (wall-clock
/// microseconds, below 2⁶² for another hundred thousand years).
pub fn write_timestamp(epoch: Epoch, seq: Seq) -> i64 {
    let value = (1u64 << 62) | (epoch.min(MAX_EPOCH) << 40) | seq.min(MAX_SEQ);
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What a claim got: the epoch, and the seq it continues from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The new epoch.
    pub epoch: Epoch,
    /// The first seq this epoch may write: one above the highest stored seq
    /// that no later epoch made stale.
    pub next_seq: Seq,
}

/// Why a claim was not made.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Its owner is neither fenced nor has it released the conversation.
    #[error("owned by {owner} (epoch {epoch}), which has neither released it nor been fenced")]
    Owned {
        /// The owner's incarnation.
        owner: Incarnation,
        /// Its epoch.
        epoch: Epoch,
    },
    /// Another node's claim of the same epoch applied first.
    #[error("another node claimed it first")]
    Lost,
    /// This node has been fenced: it owns nothing any more.
    #[error("this node has been fenced")]
    Fenced,
    /// This node has not joined a cluster.
    #[error("this node has not joined a cluster")]
    NotJoined,
    /// The epochs of the conversation are used up ([`MAX_EPOCH`]).
    #[error("the conversation has run out of epochs")]
    OutOfEpochs,
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] super::StoreError),
}

/// The epochs of one conversation with the seq each started at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Epochs(Vec<(Epoch, Seq)>);

impl Epochs {
    /// From (epoch, start seq) pairs in any order.
    pub fn new(mut starts: Vec<(Epoch, Seq)>) -> Self {
        starts.sort_unstable();
        Self(starts)
    }

    /// Whether a row that `epoch` wrote at `seq` is stale: some later epoch
    /// starts at or below `seq`, so that epoch's owner had been fenced or had
    /// handed over before the row was known to be stored, and never
    /// acknowledged it.
    pub fn is_stale(&self, epoch: Epoch, seq: Seq) -> bool {
        self.0.iter().any(|&(later, start)| later > epoch && start <= seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_stale_once_a_later_epoch_starts_at_or_below_it() {
        // Epoch 1 from seq 1, epoch 2 took over at 11, epoch 3 at 15.
        let epochs = Epochs::new(vec![(3, 15), (1, 1), (2, 11)]);
        assert!(!epochs.is_stale(1, 10), "acknowledged by epoch 1");
        assert!(epochs.is_stale(1, 11), "landed after epoch 2 read its start");
        assert!(epochs.is_stale(1, 20));
        assert!(!epochs.is_stale(2, 14));
        assert!(epochs.is_stale(2, 15));
        assert!(!epochs.is_stale(3, 1_000));
        // A keyspace a single node wrote up to seq 20, then the first claim.
        let first_claim = Epochs::new(vec![(1, 21)]);
        assert!(!first_claim.is_stale(0, 20), "a single node's rows stay");
        assert!(first_claim.is_stale(0, 21));
        assert!(!Epochs::default().is_stale(0, 5));
    }

    #[test]
    fn a_later_epoch_always_writes_later_and_so_does_a_later_flush_of_one_epoch() {
        assert!(write_timestamp(2, 1) > write_timestamp(1, MAX_SEQ));
        assert!(write_timestamp(1, 8) > write_timestamp(1, 7));
        assert!(
            write_timestamp(0, 0) > 4_000_000_000_000_000,
            "above wall-clock microseconds"
        );
        assert!(write_timestamp(MAX_EPOCH, MAX_SEQ) > write_timestamp(MAX_EPOCH - 1, MAX_SEQ));
        assert!(write_timestamp(MAX_EPOCH, MAX_SEQ) > 0);
    }

    #[test]
    fn an_incarnation_reads_back_what_it_writes() {
        let node = Incarnation::random();
        assert_eq!(Incarnation::parse(&node.to_string()), Some(node));
        assert_eq!(Incarnation::parse("0000000000000000"), None);
        assert_eq!(Incarnation::parse("xyz"), None);
        assert_eq!(Incarnation::new(0).get(), 1);
    }
}
