//! The retry policy of every durable job (events and emails): exponential backoff with jitter,
//! bounded by a number of attempts. It is ours, not apalis-redis' (which retries any error 25
//! times with a linear delay): a failed job records its next attempt time in Postgres and
//! finishes; the sweeper enqueues it again when that time comes. So retries survive a Redis
//! that loses everything, and the schedule is the one documented here.

use std::time::Duration;

use rand::Rng;

/// How failed attempts are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure (`RETRY_BASE_MS`, default 1 s).
    pub base: Duration,
    /// Largest delay (`RETRY_MAX_MS`, default 10 min).
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(600),
        }
    }
}

impl Backoff {
    /// The exponential step after `failures` failures (1 → base, 2 → 2 × base, …), capped.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        self.base
            .saturating_mul(1u32 << exponent)
            .min(self.max)
            .max(self.base.min(self.max))
    }

    /// The delay before the next attempt: "equal jitter", a random point in the upper half
    /// of [`ceiling`](Self::ceiling), so replicas that failed together do not retry together,
    /// and no delay is shorter than half the step.
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=ceiling - half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_from_the_base_up_to_the_cap() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let steps: Vec<u128> = (1..=6).map(|n| backoff.ceiling(n).as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.ceiling(0).as_millis(), 100);
        assert_eq!(backoff.ceiling(u32::MAX).as_millis(), 1000);
    }

    #[test]
    fn jittered_delays_stay_in_the_upper_half_of_the_step() {
        let backoff = Backoff::default();
        for failures in 1..=12 {
            let ceiling = backoff.ceiling(failures);
            for _ in 0..50 {
                let delay = backoff.delay(failures);
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{delay:?} vs {ceiling:?}"
                );
            }
        }
    }
}
