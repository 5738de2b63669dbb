//! The sync-token decoder: any string is a token or a `MalformedToken`, never a
//! panic, and a token that decodes encodes back to cursors that decode the same.
#![no_main]

use confab_protocol::Cursors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|token: &str| {
    if let Ok(cursors) = Cursors::from_token(token) {
        let again = Cursors::from_token(&cursors.to_token()).expect("an encoded token decodes");
        assert_eq!(again, cursors);
    }
});
