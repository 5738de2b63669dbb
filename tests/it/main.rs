//! The end-to-end suites, one module each, linked into one test binary: each
//! test starts real nodes on 127.0.0.1:0 with fresh data dirs (see
//! [`common`]). `cargo test --test it <module>::` runs one suite. The limits
//! suite is a binary of its own: it reads process-wide gauges and the
//! process's memory, which the other suites' nodes would move.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod accounts;
mod amend;
mod api;
mod bad_input;
mod cassandra_outage;
mod chat;
mod cluster;
mod durability;
mod faults;
mod groups;
mod idempotency;
mod jwt;
mod layers;
mod loadgen_smoke;
mod metrics;
mod presence;
mod protocol_doc;
mod push;
mod redis_outage;
mod signals;
mod store;
mod sync;
mod transports;
