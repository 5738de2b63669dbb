//! Reading a conversation: which slice of its history, and a device's receipt
//! watermarks in it.

use crate::ids::Seq;

/// Which slice of a conversation's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryRange {
    /// The newest messages.
    Latest,
    /// Messages with seq < the bound, the closest ones first.
    Before(Seq),
    /// Messages with seq > the bound, the closest ones first.
    After(Seq),
}

/// One device's receipt watermarks in one conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Marks {
    /// Everything up to this seq reached the device.
    pub delivered_seq: Seq,
    /// Everything up to this seq was shown to the user.
    pub read_seq: Seq,
}

impl Marks {
    /// Each watermark the higher of the two (watermarks only rise).
    pub fn merged(self, other: Marks) -> Marks {
        Marks {
            delivered_seq: self.delivered_seq.max(other.delivered_seq),
            read_seq: self.read_seq.max(other.read_seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_marks_keep_the_higher_of_each_watermark() {
        let delivered_far = Marks {
            delivered_seq: 9,
            read_seq: 2,
        };
        let read_far = Marks {
            delivered_seq: 5,
            read_seq: 5,
        };
        let both = Marks {
            delivered_seq: 9,
            read_seq: 5,
        };
        assert_eq!(delivered_far.merged(read_far), both);
        assert_eq!(read_far.merged(delivered_far), both);
    }
}
