//! A token bucket: `rate` tokens a second, holding at most `burst`. Time is
//! passed in, so limits are testable without sleeping.

use std::time::{Duration, Instant};

/// How fast something may happen, on average and at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added each second.
    pub per_second: f64,
    /// Tokens held at most: what may happen at once.
    pub burst: f64,
}

/// Tokens taken as things happen and refilled at a [`Rate`].
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst,
            updated: now,
        }
    }

    /// Takes `cost` tokens if there are that many; otherwise takes none and says
    /// how long until there will be. A cost above the burst is charged as the
    /// whole burst, so anything allowed at all can eventually pass.
    pub fn take(&mut self, cost: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let cost = cost.min(self.rate.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            return Ok(());
        }
        let wait = (cost - self.tokens) / self.rate.per_second.max(f64::MIN_POSITIVE);
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
    }

    /// Whether the bucket is full at `now`: it then carries no state worth keeping.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.rate.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        self.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(
            Rate {
                per_second: 10.0,
                burst: 3.0,
            },
            start,
        );
        for _ in 0..3 {
            assert_eq!(bucket.take(1.0, start), Ok(()));
        }
        assert_eq!(bucket.take(1.0, start), Err(Duration::from_millis(100)));
        assert_eq!(bucket.take(1.0, start + Duration::from_millis(100)), Ok(()));
        assert!(!bucket.is_full(start + Duration::from_millis(100)));
        assert!(bucket.is_full(start + Duration::from_secs(1)));
        // More than the burst costs the whole burst.
        assert_eq!(bucket.take(50.0, start + Duration::from_secs(1)), Ok(()));
        assert!(bucket.take(1.0, start + Duration::from_secs(1)).is_err());
    }
}
