//! Connecting to one of several nodes (a cluster's): each in turn from a given
//! start, with a pause after each failure that doubles up to a cap and is
//! drawn uniformly below it (full jitter), so clients of a node that died do
//! not all arrive at the next one at the same instant.

use crate::{Client, ClientError, ClientOptions, Endpoint};
use std::time::Duration;

/// How [`Client::connect_any`] goes through its nodes.
#[derive(Debug, Clone)]
pub struct Failover {
    /// The cap of the pause after the first failure; it doubles after each.
    pub first_delay: Duration,
    /// The largest cap.
    pub max_delay: Duration,
    /// Times through the whole list before giving up.
    pub rounds: usize,
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            rounds: 3,
        }
    }
}

impl Failover {
    /// The pause after failure number `failures` (1-based): uniform below the
    /// cap for that many failures.
    fn pause(&self, failures: u32) -> Duration {
        let cap = self
            .first_delay
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1)))
            .min(self.max_delay);
        cap.mul_f64(rand::random::<f64>())
    }
}

impl Client {
    /// Connects to the first of `endpoints` that answers, trying them in turn
    /// from `start` (wrapping around), pausing with jitter after each failure,
    /// for at most `failover.rounds` times through the list. Returns the client
    /// and the index of its endpoint (start there + 1 next time to move on), or
    /// the last failure.
    pub async fn connect_any(
        endpoints: &[Endpoint],
        start: usize,
        options: ClientOptions,
        failover: &Failover,
    ) -> Result<(Self, usize), ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::Transport("connect_any needs at least one endpoint".into()));
        }
        let attempts = endpoints.len().saturating_mul(failover.rounds.max(1));
        let mut failures = 0u32;
        let mut last = None;
        for attempt in 0..attempts {
            let index = (start + attempt) % endpoints.len();
            match Self::connect_with(endpoints[index], options.clone()).await {
                Ok(client) => return Ok((client, index)),
                Err(err) => {
                    tracing::debug!(endpoint = ?endpoints[index], error = %err, "node unreachable; trying the next");
                    last = Some(err);
                    failures = failures.saturating_add(1);
                    if attempt + 1 < attempts {
                        tokio::time::sleep(failover.pause(failures)).await;
                    }
                }
            }
        }
        Err(last.unwrap_or(ClientError::Closed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_stay_below_a_cap_that_doubles_up_to_the_largest() {
        let failover = Failover {
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(35),
            rounds: 1,
        };
        for (failures, cap) in [(1, 10), (2, 20), (3, 35), (30, 35)] {
            for _ in 0..100 {
                assert!(failover.pause(failures) <= Duration::from_millis(cap), "{failures}");
            }
        }
        let pauses: std::collections::HashSet<Duration> = (0..20).map(|_| failover.pause(3)).collect();
        assert!(pauses.len() > 1, "jittered");
    }
}
