//! What a loadgen message carries in its body: who sent it, its counter, and when
//! it was meant to be sent, so any receiver can check it and time it.

use crate::check::{Device, MessageId};

const PREFIX: &str = "lg1:";

/// `lg1:<sender>:<counter>:<intended send, ns since run start>:` padded with `.`
/// to `size` bytes.
pub fn encode(id: MessageId, intended_ns: u64, size: usize) -> String {
    let mut body = format!("{PREFIX}{}:{}:{intended_ns}:", id.sender, id.counter);
    if body.len() < size {
        body.extend(std::iter::repeat_n('.', size - body.len()));
    }
    body
}

/// The id and intended send time in a body, if it is a loadgen body.
pub fn decode(body: &str) -> Option<(MessageId, u64)> {
    let mut fields = body.strip_prefix(PREFIX)?.split(':');
    let sender: Device = fields.next()?.parse().ok()?;
    let counter = fields.next()?.parse().ok()?;
    let intended_ns = fields.next()?.parse().ok()?;
    Some((MessageId { sender, counter }, intended_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_at_the_requested_size() {
        let id = MessageId { sender: 7, counter: 42 };
        let body = encode(id, 123_456, 100);
        assert_eq!(body.len(), 100);
        assert_eq!(decode(&body), Some((id, 123_456)));
        assert_eq!(decode("hello"), None);
    }
}
