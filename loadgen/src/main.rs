//! `confab-loadgen`: the benchmark and correctness load generator.
//!
//! Scenarios (connect, direct, group, sync, echo-baseline) arrive with the loadgen
//! issue; until then the binary only says so and exits with status 2.

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    eprintln!(
        "confab-loadgen {}: no scenarios yet (connect, direct, group, sync and \
         echo-baseline are planned); see BENCHMARKS.md",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
