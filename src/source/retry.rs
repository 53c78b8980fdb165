//! Bounded retries with exponential backoff and full jitter, for one
//! upstream call. (The cache's longer-term outage backoff is separate.)

use std::{future::Future, time::Duration};

use rand::Rng;

use super::SourceError;

/// How a single fetch retries transient failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub max_attempts: u32,
    /// Upper bound of the first backoff.
    pub initial_backoff: Duration,
    /// Backoff ceiling.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// About what Google's libraries do: 5 attempts, 100 ms doubling to 2 s.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// What one attempt came to.
pub(crate) enum Attempt<T> {
    Done(T),
    /// Transient: try again after a backoff; the text is the last error.
    Retry(String),
    /// Permanent or malformed: stop now.
    Fail(SourceError),
}

impl RetryPolicy {
    /// Full jitter: uniform in [0, min(max, initial × 2^attempt)].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.max_backoff);
        let millis = cap.as_millis().min(u64::MAX as u128) as u64;
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }

    /// Runs `attempt` until it is done, fails permanently, or the attempts
    /// run out (then [`SourceError::Unavailable`] naming `upstream`).
    pub(crate) async fn run<T, F, Fut>(
        &self,
        upstream: &str,
        mut attempt: F,
    ) -> Result<T, SourceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let mut last = String::new();
        for n in 0..self.max_attempts.max(1) {
            if n > 0 {
                tokio::time::sleep(self.backoff(n - 1)).await;
            }
            match attempt().await {
                Attempt::Done(value) => return Ok(value),
                Attempt::Fail(err) => return Err(err),
                Attempt::Retry(message) => {
                    tracing::debug!(
                        upstream,
                        attempt = n + 1,
                        error = message.as_str(),
                        "transient upstream failure"
                    );
                    last = message;
                }
            }
        }
        Err(SourceError::Unavailable {
            upstream: upstream.to_owned(),
            attempts: self.max_attempts.max(1),
            message: last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        let p = RetryPolicy::default();
        for attempt in 0..40 {
            assert!(p.backoff(attempt) <= p.max_backoff);
        }
        assert!(p.backoff(0) <= p.initial_backoff);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_with_the_last_error() {
        let p = RetryPolicy::default();
        let mut calls = 0;
        let result: Result<(), _> = p
            .run("up", || {
                calls += 1;
                let n = calls;
                async move { Attempt::Retry(format!("boom {n}")) }
            })
            .await;
        assert_eq!(calls, 5);
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("up is unavailable after 5") && err.contains("boom 5"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_a_permanent_failure() {
        let mut calls = 0;
        let result: Result<(), _> = RetryPolicy::default()
            .run("up", || {
                calls += 1;
                async {
                    Attempt::Fail(SourceError::Rejected {
                        upstream: "up".into(),
                        status: 403,
                        message: "no".into(),
                    })
                }
            })
            .await;
        assert_eq!(calls, 1);
        assert!(result.unwrap_err().is_permanent());
    }
}
