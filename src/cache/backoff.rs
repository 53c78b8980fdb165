//! Backoff after failed upstream attempts for one key: exponential with
//! jitter from `retry_initial` to `retry_max`; permanent rejections wait the
//! full `retry_max` so one client's bad audience cannot hammer upstream.
//!
//! The n-th consecutive failure waits a uniform random time in
//! `[retry_initial, min(retry_max, retry_initial × 2^(n-1))]`: full jitter
//! above a floor, so a retry is never immediate.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

#[derive(Debug, Default)]
pub(super) struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Backoff {
    /// Whether a new attempt may start at `now`.
    pub(super) fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    /// When the current backoff ends, if one is in force.
    pub(super) fn retry_at(&self) -> Option<tokio::time::Instant> {
        self.retry_at
    }

    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    pub(super) fn failed(
        &mut self,
        now: Instant,
        permanent: bool,
        initial: Duration,
        max: Duration,
    ) {
        self.failures = self.failures.saturating_add(1);
        let delay = if permanent {
            max
        } else {
            let cap = initial
                .saturating_mul(2u32.saturating_pow(self.failures.saturating_sub(1).min(20)))
                .min(max);
            let low = initial.min(max).as_millis().min(u64::MAX as u128) as u64;
            let high = cap.as_millis().min(u64::MAX as u128) as u64;
            Duration::from_millis(rand::rng().random_range(low..=high.max(low)))
        };
        self.retry_at = Some(now + delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert!(b.ready(Instant::now()));
        for _ in 0..20 {
            let now = Instant::now();
            b.failed(now, false, initial, max);
            assert!(
                !b.ready(now + initial - Duration::from_millis(1)),
                "never sooner than retry_initial"
            );
            assert!(b.ready(now + max));
        }
        b.failed(Instant::now(), true, initial, max);
        assert!(!b.ready(Instant::now() + max - Duration::from_millis(1)));
        b.succeeded();
        assert!(b.ready(Instant::now()));
    }
}
