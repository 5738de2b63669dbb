//! The confab load generator: scenarios that drive a confab server on loopback
//! through the real protocol (`confab-client`), time it with open-loop,
//! coordinated-omission-correct latency, and check every run for lost,
//! duplicated or reordered messages and gaps in seqs.

/// The correctness checker (sans-IO).
pub mod check;
/// The connect storm and idle memory per connection.
pub mod connect;
/// The raw loopback echo baseline.
pub mod echo;
/// One account sending as fast as the server lets it.
pub mod flood;
/// A member's connection, which moves when its server goes away.
pub mod line;
/// Real log-ins during a password-guessing attack.
pub mod logins;
/// What a loadgen message body carries.
pub mod payload;
/// The relay baseline: the 1:1 pattern with no storage.
pub mod relay;
/// Who talks to whom: direct and group scenarios.
pub mod scenario;
/// The server's CPU, memory and metrics, read during a run.
pub mod server;
/// Users and connections for a run.
pub mod setup;
/// Latency histograms and reports.
pub mod stats;
/// The shared open-loop traffic runner.
pub mod traffic;
