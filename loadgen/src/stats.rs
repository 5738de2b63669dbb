//! Latency histograms and the run report (human summary and JSON).

use crate::check::Violation;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Latencies in microseconds, from 1 µs to 60 s at 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid"))
    }
}

impl Latency {
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(micros);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn summary(&self) -> Percentiles {
        let ms = |quantile: f64| self.0.value_at_quantile(quantile) as f64 / 1000.0;
        Percentiles {
            count: self.0.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.0.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Everything a run measured, with the parameters that produced it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub parameters: serde_json::Value,
    pub seconds: f64,
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    pub deliveries: u64,
    pub acked_per_second: f64,
    pub deliveries_per_second: f64,
    /// Intended send time → SendAck.
    pub ack_latency: Percentiles,
    /// Intended send time → delivery at a recipient (sync: catch-up time per device).
    pub delivery_latency: Percentiles,
    pub delivery_label: String,
    /// The same-run raw echo baseline, when measured.
    pub echo_baseline_per_second: Option<f64>,
    /// The same-run relay baseline (`direct --relay-baseline`), when measured.
    pub relay_baseline: Option<RelayReport>,
    /// Server CPU time (all threads) over the run per delivery (`--server-pid`).
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The same by server thread name (a pool's threads summed under one).
    pub server_cpu_us_per_delivery_by_thread: Option<BTreeMap<String, f64>>,
    /// Percent of the machine's CPU time that was busy over the run (every
    /// process: server, loadgen, anything else), and percent its host took.
    pub machine_busy_percent: Option<f64>,
    pub machine_steal_percent: Option<f64>,
    /// The server's metrics at the end of the run (`--metrics`), by series.
    pub server_metrics: Option<BTreeMap<String, f64>>,
    pub violations: Vec<String>,
}

/// The relay baseline at the run's rate (or, ramping, at the highest rate that held).
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    pub rate: f64,
    pub deliveries_per_second: f64,
    pub ack_latency: Percentiles,
    pub delivery_latency: Percentiles,
    /// Ramping: the highest rate whose p99 stayed within the bound.
    pub highest_rate_within_bound: Option<f64>,
}

/// Stages of the server's send path, as its metrics name them.
const STAGES: [&str; 5] = ["to_owner", "sequenced", "committed", "delivered", "acked"];

impl Report {
    /// The human summary.
    pub fn print(&self) -> String {
        let line = |name: &str, p: &Percentiles| {
            format!(
                "  {name:<20} p50 {:>8.3} ms  p90 {:>8.3}  p99 {:>8.3}  p99.9 {:>8.3}  max {:>8.3}  (n={})\n",
                p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms, p.count
            )
        };
        let mut text = format!(
            "{} in {:.2} s: sent {}, acked {} ({:.0}/s), errors {}, deliveries {} ({:.0}/s)\n",
            self.scenario,
            self.seconds,
            self.sent,
            self.acked,
            self.acked_per_second,
            self.errors,
            self.deliveries,
            self.deliveries_per_second
        );
        if self.ack_latency.count > 0 {
            text += &line("send → ack", &self.ack_latency);
        }
        text += &line(&self.delivery_label, &self.delivery_latency);
        if let Some(echo) = self.echo_baseline_per_second {
            text += &format!(
                "  echo baseline {echo:.0} msgs/s; deliveries are {:.1}% of it\n",
                100.0 * self.deliveries_per_second / echo
            );
        }
        if let Some(relay) = &self.relay_baseline {
            text += &line(&format!("relay at {:.0}/s", relay.rate), &relay.delivery_latency);
            if let Some(highest) = relay.highest_rate_within_bound {
                text += &format!(
                    "  relay holds the bound up to {highest:.0}/s; this run's best is {:.1}% of it\n",
                    100.0 * self.acked_per_second / highest
                );
            }
        }
        if let Some(cpu) = self.server_cpu_us_per_delivery {
            text += &format!("  server CPU {cpu:.1} µs per delivery\n");
        }
        if let Some(threads) = &self.server_cpu_us_per_delivery_by_thread {
            text += "  by thread (µs per delivery):";
            for (name, us) in threads {
                text += &format!("  {name} {us:.1}");
            }
            text += "\n";
        }
        if let (Some(busy), Some(steal)) = (self.machine_busy_percent, self.machine_steal_percent) {
            text += &format!("  machine CPU {busy:.0}% busy, {steal:.1}% taken by the host (steal)\n");
        }
        if let Some(metrics) = &self.server_metrics {
            text += "  server stages, last minute (ms):";
            for stage in STAGES {
                let quantile = |q: &str| {
                    let series = format!("confab_send_stage_seconds{{stage=\"{stage}\",quantile=\"{q}\"}}");
                    metrics.get(&series).map_or(f64::NAN, |seconds| seconds * 1000.0)
                };
                text += &format!("  {stage} p50 {:.3} p99 {:.3}", quantile("0.5"), quantile("0.99"));
            }
            text += "\n  server store, last minute (ms):";
            for (name, summary) in [
                ("commit", "confab_store_commit_seconds"),
                ("check", "confab_store_check_seconds"),
            ] {
                let quantile = |q: &str| {
                    let series = format!("{summary}{{quantile=\"{q}\"}}");
                    metrics.get(&series).map_or(f64::NAN, |seconds| seconds * 1000.0)
                };
                text += &format!("  {name} p99 {:.3} max {:.3}", quantile("0.99"), quantile("1"));
            }
            let appends = |path: &str| {
                metrics
                    .get(&format!("confab_store_appends_total{{path=\"{path}\"}}"))
                    .copied()
            };
            if let (Some(in_place), Some(writer)) = (appends("in_place"), appends("writer")) {
                text += &format!("  batches {:.0} in place, {:.0} by the writer thread", in_place, writer);
            }
            text += "\n";
        }
        match self.violations.len() {
            0 => text += "  correctness: no loss, no duplicates, in order, no gaps\n",
            n => {
                text += &format!("  CORRECTNESS VIOLATIONS: {n}; first ones:\n");
                for violation in self.violations.iter().take(10) {
                    text += &format!("    {violation}\n");
                }
            }
        }
        text
    }
}

pub fn describe(violations: &[Violation]) -> Vec<String> {
    violations.iter().map(ToString::to_string).collect()
}
