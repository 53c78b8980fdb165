//! The parts of the running configuration a reload changes in place: the
//! access policy and the per-uid new-audience limit. Read on every request
//! (an `Arc` clone under a briefly held lock), replaced by SIGHUP.
//!
//! Each applied reload is also announced ([`Live::reloaded`]), so open
//! `WatchIdToken` streams re-check their grant at once instead of at their
//! next token.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::rate_limit::MissLimiter;
use crate::{config::LimitSettings, policy::Policy};

pub struct Live {
    policy: RwLock<Arc<Policy>>,
    limits: RwLock<(LimitSettings, Arc<MissLimiter>)>,
    /// Counts applied reloads.
    reloads: watch::Sender<u64>,
}

impl Live {
    pub fn new(policy: Arc<Policy>, limits: LimitSettings) -> Self {
        let limiter = Arc::new(limiter_for(&limits));
        Self {
            policy: RwLock::new(policy),
            limits: RwLock::new((limits, limiter)),
            reloads: watch::Sender::new(0),
        }
    }

    /// Sees each reload announced after this call.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Announces a reload once the new policy and identities are all in
    /// place, so what a stream re-checks is the whole new configuration.
    pub fn reloaded(&self) {
        self.reloads.send_modify(|n| *n += 1);
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The limits and the limiter built from them.
    pub fn limits(&self) -> (LimitSettings, Arc<MissLimiter>) {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_policy(&self, policy: Arc<Policy>) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// New rate-limit settings start with full buckets; unchanged ones keep
    /// their buckets, so a reload is not a way around the limit.
    pub fn set_limits(&self, limits: LimitSettings) {
        let mut current = self.limits.write().unwrap_or_else(|p| p.into_inner());
        let same_rate = current.0.new_audiences_per_minute == limits.new_audiences_per_minute
            && current.0.new_audience_burst == limits.new_audience_burst;
        if !same_rate {
            current.1 = Arc::new(limiter_for(&limits));
        }
        current.0 = limits;
    }
}

fn limiter_for(limits: &LimitSettings) -> MissLimiter {
    MissLimiter::new(limits.new_audiences_per_minute, limits.new_audience_burst)
}
