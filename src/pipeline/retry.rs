//! When a message that could not be finished is tried again.
//!
//! Guarantee: the n-th retry of a message waits a uniformly random time in
//! `[0, min(max, initial · 2ⁿ⁻¹)]` ("full jitter", so that many workers that
//! failed together do not retry together), or what the other side asked for
//! with `Retry-After` when that is longer, never more than `max`. After
//! `max_attempts` attempts the policy's [`OnExhausted`] applies; with
//! `pause` the message keeps being retried every `max`.

use crate::config::{OnExhausted, RetryConfig};
use rand::Rng as _;
use std::time::Duration;

/// The retry policy of a worker.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Delay ceiling of the first retry.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Attempts (the first call included) before `on_exhausted`.
    pub max_attempts: u32,
    /// What happens then.
    pub on_exhausted: OnExhausted,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Attempts are used up and the policy says dead-letter.
    DeadLetter,
    /// Attempts are used up and the policy says hold the partition: try
    /// again after this delay (the longest), loudly.
    PausedRetryAfter(Duration),
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(c: &RetryConfig) -> Self {
        Self {
            initial: Duration::from_millis(c.initial_delay_ms),
            max: Duration::from_millis(c.max_delay_ms),
            max_attempts: c.max_attempts,
            on_exhausted: c.on_exhausted,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        (&RetryConfig::default()).into()
    }
}

impl RetryPolicy {
    /// The step after the `attempts`-th failed attempt (1 for the first
    /// call), given the delay the other side asked for.
    pub fn after_failure(&self, attempts: u32, asked: Option<Duration>) -> NextStep {
        if attempts >= self.max_attempts {
            return match self.on_exhausted {
                OnExhausted::DeadLetter => NextStep::DeadLetter,
                OnExhausted::Pause => NextStep::PausedRetryAfter(self.max),
            };
        }
        NextStep::RetryAfter(self.delay(attempts, asked))
    }

    /// The delay before retry number `n` (1-based).
    pub fn delay(&self, n: u32, asked: Option<Duration>) -> Duration {
        let shift = n.saturating_sub(1).min(30);
        let ceiling = self.initial.saturating_mul(1 << shift).min(self.max);
        let jittered = Duration::from_nanos(
            rand::rng().random_range(0..=ceiling.as_nanos().min(u64::MAX as u128) as u64),
        );
        jittered.max(asked.unwrap_or_default()).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on_exhausted: OnExhausted) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            max_attempts: 4,
            on_exhausted,
        }
    }

    #[test]
    fn delays_stay_under_the_exponential_ceiling_and_the_maximum() {
        let p = policy(OnExhausted::Pause);
        for _ in 0..1000 {
            assert!(p.delay(1, None) <= Duration::from_millis(100));
            assert!(p.delay(3, None) <= Duration::from_millis(400));
            assert!(p.delay(40, None) <= Duration::from_secs(2));
        }
        // Full jitter really spreads: 1000 draws under a 400 ms ceiling are
        // not all the same.
        let draws: std::collections::BTreeSet<_> = (0..1000).map(|_| p.delay(3, None)).collect();
        assert!(draws.len() > 100, "only {} distinct delays", draws.len());
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_maximum() {
        let p = policy(OnExhausted::Pause);
        assert_eq!(
            p.delay(1, Some(Duration::from_millis(1500))),
            Duration::from_millis(1500)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn exhausted_attempts_take_the_configured_outcome() {
        let dl = policy(OnExhausted::DeadLetter);
        assert!(matches!(dl.after_failure(3, None), NextStep::RetryAfter(_)));
        assert_eq!(dl.after_failure(4, None), NextStep::DeadLetter);
        let pause = policy(OnExhausted::Pause);
        assert_eq!(
            pause.after_failure(4, None),
            NextStep::PausedRetryAfter(Duration::from_secs(2))
        );
        assert_eq!(
            pause.after_failure(400, None),
            NextStep::PausedRetryAfter(Duration::from_secs(2))
        );
    }
}
