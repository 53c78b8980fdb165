//! Backoff after failed upstream attempts for one key: exponential with
//! jitter from `retry_initial` to `retry_max`; permanent rejections wait the
//! full `retry_max` so one client's bad audience cannot hammer upstream; a
//! `Retry-After` the upstream sent is honoured, capped at `retry_max`.
//!
//! The n-th consecutive failure waits a uniform random time in
//! `[retry_initial, min(retry_max, retry_initial × 2^(n-1))]`: full jitter
//! above a floor, so a retry is never immediate.
//!
//! Two clocks run from one failure. The background refresher, and clients of
//! a key that has held a token, wait the full backoff. A client asking for a
//! key that never held one, after the upstream was merely unreachable or
//! erroring (no `Retry-After`), may start the next attempt after at most
//! [`ON_DEMAND_RETRY_CAP`]: once an outage ends, the first request gets a
//! token within seconds instead of errors until a long backoff runs out.
//! Single flight still allows one attempt at a time per key.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::source::SourceError;

/// Longest a client asking for a key that never held a token waits for the
/// next attempt after an outage-type failure (kept within
/// `[retry_initial, retry_max]`).
pub const ON_DEMAND_RETRY_CAP: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub(super) struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    on_demand_at: Option<Instant>,
}

impl Backoff {
    /// Whether a background attempt may start at `now`.
    pub(super) fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    /// Whether a client of a key that never held a token may start an
    /// attempt at `now`.
    pub(super) fn ready_on_demand(&self, now: Instant) -> bool {
        self.on_demand_at.is_none_or(|at| now >= at)
    }

    /// When a client of a key that never held a token may try again.
    pub(super) fn on_demand_at(&self) -> Option<Instant> {
        self.on_demand_at
    }

    /// When the current backoff ends, if one is in force.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    pub(super) fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    pub(super) fn failed(
        &mut self,
        now: Instant,
        err: &SourceError,
        initial: Duration,
        max: Duration,
    ) {
        self.failures = self.failures.saturating_add(1);
        let (delay, on_demand) = if err.is_permanent() {
            (max, max)
        } else {
            let cap = initial
                .saturating_mul(2u32.saturating_pow(self.failures.saturating_sub(1).min(20)))
                .min(max);
            let low = initial.min(max).as_millis().min(u64::MAX as u128) as u64;
            let high = cap.as_millis().min(u64::MAX as u128) as u64;
            let jittered = Duration::from_millis(rand::rng().random_range(low..=high.max(low)));
            match (err, err.retry_after()) {
                // The upstream said when: nobody asks before then.
                (_, Some(asked)) => {
                    let delay = jittered.max(asked.min(max));
                    (delay, delay)
                }
                (SourceError::Unavailable { .. }, None) => (
                    jittered,
                    jittered.min(ON_DEMAND_RETRY_CAP.max(initial).min(max)),
                ),
                // Junk answers (bad or too short-lived tokens) come back fast
                // and will again: everyone waits the full backoff.
                _ => (jittered, jittered),
            }
        };
        self.retry_at = Some(now + delay);
        self.on_demand_at = Some(now + on_demand);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outage(retry_after: Option<Duration>) -> SourceError {
        SourceError::Unavailable {
            upstream: "up".into(),
            message: "HTTP 503".into(),
            retry_after,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert!(b.ready(Instant::now()));
        for _ in 0..20 {
            let now = Instant::now();
            b.failed(now, &outage(None), initial, max);
            assert!(
                !b.ready(now + initial - Duration::from_millis(1)),
                "never sooner than retry_initial"
            );
            assert!(b.ready(now + max));
            assert!(b.ready_on_demand(now + ON_DEMAND_RETRY_CAP));
        }
        let rejected = SourceError::Rejected {
            upstream: "up".into(),
            status: 403,
            message: "no".into(),
        };
        b.failed(Instant::now(), &rejected, initial, max);
        let almost = Instant::now() + max - Duration::from_millis(1);
        assert!(!b.ready(almost) && !b.ready_on_demand(almost));
        b.succeeded();
        assert!(b.ready(Instant::now()) && b.ready_on_demand(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_up_to_retry_max() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let mut b = Backoff::default();
        let now = Instant::now();
        b.failed(now, &outage(Some(Duration::from_secs(30))), initial, max);
        let before = now + Duration::from_secs(30) - Duration::from_millis(1);
        assert!(!b.ready(before) && !b.ready_on_demand(before));
        b.failed(now, &outage(Some(Duration::from_secs(3600))), initial, max);
        assert!(b.ready(now + max) && b.ready_on_demand(now + max));
        assert!(!b.ready_on_demand(now + max - Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn junk_answers_wait_the_full_backoff_even_on_demand() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let junk = SourceError::InvalidResponse {
            upstream: "up".into(),
            message: "a token with 25s of life".into(),
        };
        let mut b = Backoff::default();
        for _ in 0..30 {
            b.failed(Instant::now(), &junk, initial, max);
            assert_eq!(b.on_demand_at, b.retry_at);
        }
    }
}
