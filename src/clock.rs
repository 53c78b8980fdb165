//! The one source of time for token-broker.
//!
//! Token lifetimes are wall-clock facts (`iat`/`exp` in seconds since the Unix
//! epoch) while timers are monotonic. Everything that compares against a
//! token's expiry or schedules a refresh asks this clock, so tests can run
//! hours of simulated time with tokio's paused clock and no sleeps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Wall-clock time as token-broker sees it.
#[derive(Clone, Debug)]
pub struct Clock {
    kind: ClockKind,
}

#[derive(Clone, Debug)]
enum ClockKind {
    /// The operating system's clock: production.
    System,
    /// The system clock shifted by a fixed amount (a host whose clock is off).
    Offset { ahead: Duration },
    /// Wall time derived from tokio's clock, anchored at creation, so that
    /// `tokio::time::pause`/`advance` moves it.
    Tokio { wall: SystemTime, mono: Instant },
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The real system clock.
    pub fn system() -> Self {
        Self {
            kind: ClockKind::System,
        }
    }

    /// A clock that follows tokio's (possibly paused) time, starting at the
    /// current system time.
    pub fn tokio() -> Self {
        Self {
            kind: ClockKind::Tokio {
                wall: SystemTime::now(),
                mono: Instant::now(),
            },
        }
    }

    /// The system clock running `ahead` of the real time, as on a host with
    /// a wrong clock; the emulator uses it to test Google's `iat`/`exp` checks.
    pub fn ahead_by(ahead: Duration) -> Self {
        Self {
            kind: ClockKind::Offset { ahead },
        }
    }

    /// The current wall-clock time.
    pub fn now(&self) -> SystemTime {
        match &self.kind {
            ClockKind::System => SystemTime::now(),
            ClockKind::Offset { ahead } => SystemTime::now() + *ahead,
            ClockKind::Tokio { wall, mono } => *wall + mono.elapsed(),
        }
    }

    /// The current time in whole seconds since the Unix epoch (JWT `NumericDate`).
    pub fn unix_seconds(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
    }

    /// How long from now until `at`; zero when `at` has passed.
    pub fn until(&self, at: SystemTime) -> Duration {
        at.duration_since(self.now()).unwrap_or(Duration::ZERO)
    }

    /// The tokio instant at which wall-clock time `at` is reached, for timers.
    pub fn deadline_for(&self, at: SystemTime) -> Instant {
        Instant::now() + self.until(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = Clock::tokio();
        let before = clock.now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let after = clock.now();
        assert_eq!(
            after.duration_since(before).unwrap(),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn until_is_zero_for_the_past() {
        let clock = Clock::system();
        assert_eq!(clock.until(UNIX_EPOCH), Duration::ZERO);
    }
}
