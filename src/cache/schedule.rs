//! When to refresh a token: before it turns stale, spread by jitter so that
//! thousands of keys do not refresh together; and, when upstream handed back
//! the same token (the metadata server caches its own, PROTOCOLS.md §3), at
//! half the remaining usable life, so repeated early answers converge on the
//! moment a new token can be had without ever spinning.

use std::time::{Duration, SystemTime};

use rand::Rng;

use super::EXPIRY_MARGIN;
use crate::config::RefreshSettings;

/// Never plan two attempts closer than this, whatever the token says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The wall-clock time of the next refresh of a token (of either kind)
/// expiring at `expires_at`, received at `now`.
pub fn plan_refresh(
    expires_at: SystemTime,
    now: SystemTime,
    same_as_before: bool,
    settings: &RefreshSettings,
) -> SystemTime {
    let remaining = expires_at.duration_since(now).unwrap_or_default();
    let usable = remaining.saturating_sub(EXPIRY_MARGIN);
    let halfway = now + (usable / 2).max(MIN_INTERVAL);
    if same_as_before {
        return halfway;
    }
    let jitter = random_up_to(settings.jitter);
    let planned = expires_at
        .checked_sub(settings.refresh_before_expiry + jitter)
        .unwrap_or(now);
    if planned > now {
        planned
    } else {
        // A token shorter-lived than the window: refresh halfway through.
        halfway
    }
}

fn random_up_to(max: Duration) -> Duration {
    let millis = max.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(rand::rng().random_range(0..=millis))
}
