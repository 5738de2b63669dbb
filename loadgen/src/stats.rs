//! Latency histograms and the run report (human summary and JSON).

use crate::check::Violation;
use hdrhistogram::Histogram;
use serde::Serialize;
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
    pub violations: Vec<String>,
}

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
