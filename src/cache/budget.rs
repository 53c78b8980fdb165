//! The upstream budget: a ceiling on one identity's calls to Google per
//! second, shared by every kind of fetch. A fleet that boots together with
//! hundreds of prefetched audiences per node must not exceed Google's
//! quotas; a caller waiting for a token must not queue behind the prefetch.
//!
//! A token bucket (`qps` per second, bursts up to `qps`), on tokio's clock so
//! paused-time tests drive it. Calls a caller waits on ([`Priority::Waiting`])
//! go first: background calls (prefetch, refresh) take a token only while no
//! waiting call wants one.

use std::{sync::Mutex, time::Duration};

use tokio::{sync::Notify, time::Instant};

/// Who is waiting for an upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A client request waits on this fetch.
    Waiting,
    /// Prefetch or a background refresh: nobody waits on it.
    Background,
}

struct State {
    tokens: f64,
    refilled: Instant,
    /// Waiting-priority calls that want a token now.
    waiting: usize,
}

/// One identity's budget.
pub struct UpstreamBudget {
    qps: f64,
    state: Mutex<State>,
    /// Wakes background calls when the last waiting call has its token.
    released: Notify,
}

impl UpstreamBudget {
    /// `qps` calls per second on average, up to `qps` at once.
    pub fn new(qps: u32) -> Self {
        let qps = f64::from(qps.max(1));
        Self {
            qps,
            state: Mutex::new(State {
                tokens: qps,
                refilled: Instant::now(),
                waiting: 0,
            }),
            released: Notify::new(),
        }
    }

    /// Waits until a call may go upstream, and spends its token.
    pub async fn acquire(&self, priority: Priority) {
        let _waiting = (priority == Priority::Waiting).then(|| WaitingGuard::new(self));
        loop {
            // Registered before the check, so a release between the check
            // and the wait is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let wait = {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let earned = now.duration_since(state.refilled).as_secs_f64() * self.qps;
                state.tokens = (state.tokens + earned).min(self.qps);
                state.refilled = now;
                let may = priority == Priority::Waiting || state.waiting == 0;
                if may && state.tokens >= 1.0 {
                    state.tokens -= 1.0;
                    return;
                }
                if may {
                    Some(Duration::from_secs_f64((1.0 - state.tokens) / self.qps))
                } else {
                    // Behind a waiting call: until it is served.
                    None
                }
            };
            match wait {
                Some(wait) => {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = released => {}
                    }
                }
                None => released.await,
            }
        }
    }
}

/// Counts a waiting-priority call while it wants a token, whatever way its
/// future ends (served, or dropped by a caller that gave up).
struct WaitingGuard<'a>(&'a UpstreamBudget);

impl<'a> WaitingGuard<'a> {
    fn new(budget: &'a UpstreamBudget) -> Self {
        budget
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting += 1;
        WaitingGuard(budget)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        state.waiting -= 1;
        let last = state.waiting == 0;
        drop(state);
        if last {
            self.0.released.notify_waiters();
        }
    }
}

/// Whether `max_entries` keys, each refreshed once per `usable` of a token's
/// life, fit under `qps`: the calls per second they need at steady state.
pub fn steady_state_qps(max_entries: usize, usable: Duration) -> f64 {
    max_entries as f64 / usable.as_secs_f64().max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn spends_no_faster_than_the_rate_after_a_burst() {
        let budget = UpstreamBudget::new(20);
        let started = Instant::now();
        for _ in 0..220 {
            budget.acquire(Priority::Background).await;
        }
        // 20 at once, then 200 at 20 per second.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(11),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_calls_go_before_background_ones() {
        let budget = Arc::new(UpstreamBudget::new(10));
        // Drain the burst, then queue a long background backlog.
        for _ in 0..10 {
            budget.acquire(Priority::Background).await;
        }
        let backlog: Vec<_> = (0..100)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move { budget.acquire(Priority::Background).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A caller arrives behind 90 background calls: it waits for a token
        // or two (100 ms each), not for the backlog's 9 s.
        let t0 = Instant::now();
        budget.acquire(Priority::Waiting).await;
        assert!(
            t0.elapsed() <= Duration::from_millis(200),
            "{:?}",
            t0.elapsed()
        );
        for task in backlog {
            task.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_does_not_block_the_background() {
        let budget = Arc::new(UpstreamBudget::new(1));
        budget.acquire(Priority::Background).await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), budget.acquire(Priority::Waiting))
                .await;
        assert!(gave_up.is_err());
        // The abandoned waiting call no longer holds the background back.
        tokio::time::timeout(Duration::from_secs(2), budget.acquire(Priority::Background))
            .await
            .expect("background served once the caller left");
    }

    #[test]
    fn steady_state() {
        assert!((steady_state_qps(10_000, Duration::from_secs(2700)) - 3.7).abs() < 0.01);
    }
}
