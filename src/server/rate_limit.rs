//! Per-uid token buckets for new audiences: a client may ask for tokens it
//! already has as often as it likes, but each request that would make the
//! broker fetch a key it does not hold spends from its uid's bucket, so one
//! local user cannot make the daemon hammer Google. A pod known only by its
//! source address has a bucket of its own, by that address.

use std::{sync::Mutex, time::Duration};

use super::share::Sharer;

use dashmap::DashMap;
use tokio::time::Instant;

pub struct MissLimiter {
    per_minute: u32,
    burst: u32,
    buckets: DashMap<Sharer, Mutex<Bucket>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl MissLimiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            burst: burst.max(1),
            buckets: DashMap::new(),
        }
    }

    /// Spends one new-audience token for `uid` (or a pod's address); on
    /// refusal, how long until one is available.
    pub fn check(&self, uid: impl Into<Sharer>) -> Result<(), Duration> {
        let uid = uid.into();
        let now = Instant::now();
        let rate = f64::from(self.per_minute) / 60.0;
        let entry = self.buckets.entry(uid).or_insert_with(|| {
            Mutex::new(Bucket {
                tokens: f64::from(self.burst),
                updated: now,
            })
        });
        let mut bucket = entry.lock().unwrap_or_else(|p| p.into_inner());
        let refill = now.duration_since(bucket.updated).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(f64::from(self.burst));
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate_then_recovery_per_uid() {
        let limiter = MissLimiter::new(60, 3);
        for _ in 0..3 {
            limiter.check(Some(1000)).unwrap();
        }
        let wait = limiter.check(Some(1000)).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        // Another uid has its own bucket.
        limiter.check(Some(1001)).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        limiter.check(Some(1000)).unwrap();
        assert!(limiter.check(Some(1000)).is_err());
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            limiter.check(Some(1000)).unwrap();
        }
    }
}
