//! The decoder of what nodes send each other through their inboxes: any bytes
//! are an envelope or an error, never a panic, and an envelope that decodes
//! encodes back to bytes that decode the same.
#![no_main]

use confab::cluster::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(envelope) = Envelope::decode(bytes) {
        let again = Envelope::decode(&envelope.encode()).expect("an encoded envelope decodes");
        assert_eq!(again, envelope);
    }
});
