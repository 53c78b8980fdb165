//! The parts of the running configuration a reload changes in place: the
//! access policy and the per-uid new-audience limit. Read on every request
//! (an `Arc` clone under a briefly held lock), replaced by SIGHUP.

use std::sync::{Arc, RwLock};

use super::rate_limit::MissLimiter;
use crate::{config::LimitSettings, policy::Policy};

pub struct Live {
    policy: RwLock<Arc<Policy>>,
    limits: RwLock<(LimitSettings, Arc<MissLimiter>)>,
}

impl Live {
    pub fn new(policy: Arc<Policy>, limits: LimitSettings) -> Self {
        let limiter = Arc::new(limiter_for(&limits));
        Self {
            policy: RwLock::new(policy),
            limits: RwLock::new((limits, limiter)),
        }
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
