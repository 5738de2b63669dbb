//! The app's tokens (JWT): any string is accepted or refused with a `JwtError`,
//! never a panic; any bytes are a JWKS document or a refusal.
#![no_main]

use confab::auth::JwtVerifier;
use confab::auth::jwt::KeySet;
use confab::config::Config;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// 2027-01-15, so that fuzzed `exp` and `nbf` land on both sides.
const NOW_MS: u64 = 1_800_000_000_000;

fn verifier() -> &'static JwtVerifier {
    static VERIFIER: OnceLock<JwtVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let mut config = Config::defaults().expect("the defaults load").auth.jwt;
        config.hs256_secret = "a shared secret of at least 32 bytes".into();
        config.issuer = "https://auth.example".into();
        config.audience = "chat".into();
        config.device_claim = "did".into();
        JwtVerifier::new(&config, None)
    })
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, document)) => {
            let _ = KeySet::parse(document);
        }
        Some((_, token)) => {
            if let Ok(token) = std::str::from_utf8(token) {
                let _ = verifier().check(token, NOW_MS);
            }
        }
        None => {}
    }
});
