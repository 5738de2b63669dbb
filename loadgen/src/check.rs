//! The correctness checker every run goes through, sans-IO: it is fed what was
//! acknowledged and what was delivered, and finds lost, duplicated and reordered
//! messages and gaps in the seqs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// A loadgen-local device (one connection).
pub type Device = u32;

/// Identifies one message of the run: its sending device and that device's counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    pub sender: Device,
    pub counter: u64,
}

/// A broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Acknowledged, but never delivered to a device that should have it.
    Lost { id: MessageId, device: Device },
    /// Delivered twice to one device.
    Duplicate { id: MessageId, device: Device },
    /// A device got `seq` after a later one of the same conversation.
    OutOfOrder {
        device: Device,
        conversation: String,
        seq: u64,
        after: u64,
    },
    /// No acknowledged message holds this seq, though later ones exist.
    Gap { conversation: String, seq: u64 },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lost { id, device } => write!(
                f,
                "lost: message {}#{} never reached device {device}",
                id.sender, id.counter
            ),
            Self::Duplicate { id, device } => {
                write!(
                    f,
                    "duplicate: message {}#{} reached device {device} twice",
                    id.sender, id.counter
                )
            }
            Self::OutOfOrder {
                device,
                conversation,
                seq,
                after,
            } => {
                write!(
                    f,
                    "out of order: device {device} got {conversation} seq {seq} after seq {after}"
                )
            }
            Self::Gap { conversation, seq } => write!(f, "gap: {conversation} has no seq {seq}"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Checker {
    /// Who must receive each acknowledged message, per sender by counter.
    /// Counters run 0, 1, 2... per sender, so each sender's list is written
    /// front to back and touches its memory a page at a time; one map of every
    /// message was written all over at once, and faulting in its hundreds of
    /// megabytes (a 300 s run) held the ack lock for most of a second.
    expected: HashMap<Device, Vec<Option<Arc<[Device]>>>>,
    /// Acknowledged seqs per conversation.
    seqs: HashMap<String, Vec<u64>>,
    delivered: HashSet<(Device, MessageId)>,
    last_seq: HashMap<(Device, String), u64>,
    violations: Vec<Violation>,
    deliveries: u64,
}

impl Checker {
    /// Room for `messages` acknowledged messages from `sender`, so that no
    /// growth (a copy of its list so far, under the lock every ack takes, and
    /// for every sender at about the same moment) lands mid-run.
    pub fn reserve(&mut self, sender: Device, messages: usize) {
        self.expected.entry(sender).or_default().reserve(messages);
    }

    /// `id` was acknowledged with `seq` in `conversation`; `recipients` must get
    /// it (shared by every message of a flow: nothing is allocated per ack).
    pub fn acked(&mut self, id: MessageId, conversation: &str, seq: u64, recipients: Arc<[Device]>) {
        let acked = self.expected.entry(id.sender).or_default();
        let index = usize::try_from(id.counter).unwrap_or(usize::MAX);
        if acked.len() <= index {
            acked.resize(index.saturating_add(1), None);
        }
        acked[index] = Some(recipients);
        match self.seqs.get_mut(conversation) {
            Some(seqs) => seqs.push(seq),
            None => {
                self.seqs.insert(conversation.to_owned(), vec![seq]);
            }
        }
    }

    /// `device` received `seq` of `conversation`, carrying `id`.
    pub fn delivered(&mut self, device: Device, conversation: &str, seq: u64, id: MessageId) {
        self.deliveries += 1;
        if !self.delivered.insert((device, id)) {
            self.violations.push(Violation::Duplicate { id, device });
            return;
        }
        let last = self.last_seq.entry((device, conversation.to_owned())).or_insert(0);
        if seq <= *last {
            self.violations.push(Violation::OutOfOrder {
                device,
                conversation: conversation.to_owned(),
                seq,
                after: *last,
            });
        }
        *last = (*last).max(seq);
    }

    pub fn deliveries(&self) -> u64 {
        self.deliveries
    }

    /// Every violation found, once the run has drained.
    pub fn finish(mut self) -> Vec<Violation> {
        let mut lost: Vec<Violation> = self
            .expected
            .iter()
            .flat_map(|(sender, acked)| {
                acked.iter().enumerate().filter_map(move |(counter, recipients)| {
                    let id = MessageId {
                        sender: *sender,
                        counter: counter as u64,
                    };
                    recipients.as_ref().map(|recipients| (id, recipients))
                })
            })
            .flat_map(|(id, recipients)| recipients.iter().map(move |device| (id, *device)))
            .filter(|(id, device)| !self.delivered.contains(&(*device, *id)))
            .map(|(id, device)| Violation::Lost { id, device })
            .collect();
        lost.sort_by_key(|violation| match violation {
            Violation::Lost { id, device } => (*id, *device),
            _ => (MessageId { sender: 0, counter: 0 }, 0),
        });
        self.violations.extend(lost);
        let seqs: BTreeMap<_, _> = self.seqs.into_iter().collect();
        for (conversation, mut seqs) in seqs {
            seqs.sort_unstable();
            seqs.dedup();
            for pair in seqs.windows(2) {
                for missing in pair[0] + 1..pair[1] {
                    self.violations.push(Violation::Gap {
                        conversation: conversation.clone(),
                        seq: missing,
                    });
                }
            }
        }
        self.violations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sender: Device, counter: u64) -> MessageId {
        MessageId { sender, counter }
    }

    /// Three messages from device 0 to devices 1 and 2, delivered as `deliveries`.
    fn run(deliveries: &[(Device, u64)]) -> Vec<Violation> {
        let mut checker = Checker::default();
        for counter in 1..=3 {
            checker.acked(id(0, counter), "d:1:2", counter, [1, 2].into());
        }
        for (device, seq) in deliveries {
            checker.delivered(*device, "d:1:2", *seq, id(0, *seq));
        }
        checker.finish()
    }

    #[test]
    fn a_clean_stream_passes() {
        assert_eq!(run(&[(1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)]), vec![]);
    }

    #[test]
    fn an_injected_loss_is_flagged() {
        let violations = run(&[(1, 1), (2, 1), (1, 2), (1, 3), (2, 3)]);
        assert_eq!(
            violations,
            vec![Violation::Lost {
                id: id(0, 2),
                device: 2
            }]
        );
    }

    #[test]
    fn an_injected_duplicate_is_flagged() {
        let violations = run(&[(1, 1), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)]);
        assert_eq!(
            violations,
            vec![Violation::Duplicate {
                id: id(0, 1),
                device: 1
            }]
        );
    }

    #[test]
    fn an_injected_reordering_is_flagged() {
        let violations = run(&[(1, 2), (1, 1), (2, 1), (2, 2), (1, 3), (2, 3)]);
        assert!(matches!(
            violations.as_slice(),
            [Violation::OutOfOrder {
                device: 1,
                seq: 1,
                after: 2,
                ..
            }]
        ));
    }

    #[test]
    fn a_gap_in_acknowledged_seqs_is_flagged() {
        let mut checker = Checker::default();
        checker.acked(id(0, 1), "g:9", 1, [].into());
        checker.acked(id(0, 2), "g:9", 3, [].into());
        assert_eq!(
            checker.finish(),
            vec![Violation::Gap {
                conversation: "g:9".into(),
                seq: 2
            }]
        );
    }
}
