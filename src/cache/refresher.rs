//! One background task per cache entry: sleeps until the entry's next
//! planned refresh (or backoff retry), starts the shared fetch, and drops
//! the entry once it has been idle for `idle_evict_after`.

use std::sync::{Arc, Weak};

use tokio::time::Instant;

use super::{lock, Entry, Inner, TokenCache};

pub(super) async fn run(cache: Weak<Inner>, entry: Arc<Entry>) {
    loop {
        let Some(wake_at) = next_wake(&cache, &entry) else {
            return;
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake_at) => {}
            () = entry.wake.notified() => continue,
        }
        let Some(inner) = cache.upgrade() else {
            return;
        };
        let cache = TokenCache { inner };
        // An entry evicted for room (max_entries) has no refresher anymore.
        if !cache.inner.entries.holds(&entry) {
            return;
        }
        let now = Instant::now();
        let mut slot = lock(&entry.state);
        let idle = slot
            .last_used
            .is_none_or(|used| now >= used + cache.inner.settings.idle_evict_after);
        if idle && !slot.pinned && !entry.watched() && !slot.fetching {
            drop(slot);
            cache.inner.entries.remove(&entry);
            tracing::debug!(
                identity = entry.key.identity(),
                audience = crate::domain::LogText::new(entry.key.audience()).as_str(),
                "dropped idle entry"
            );
            return;
        }
        if slot.fetching || !slot.backoff.ready(now) {
            continue;
        }
        let wall = cache.inner.clock.now();
        let due = match (&slot.token, slot.refresh_at) {
            (Some(_), Some(at)) => wall >= at,
            (Some(_), None) => true,
            (None, _) => wants_retry(&slot, &entry),
        };
        if due {
            cache.start_fetch(&entry, &mut slot, super::budget::Priority::Background);
        }
    }
}

/// The instant to wake for the entry's next decision, or `None` when the
/// cache or the entry is gone. Each candidate lies in the future or is acted
/// on when reached, so the loop never spins: a due refresh waits for the
/// backoff, a running fetch wakes us through `Entry::wake`, and the idle
/// deadline only counts for entries that can be evicted.
fn next_wake(cache: &Weak<Inner>, entry: &Arc<Entry>) -> Option<Instant> {
    let inner = cache.upgrade()?;
    // Evicted or dropped (which wakes us): end now, releasing the entry,
    // not at its next planned refresh.
    if !inner.entries.holds(entry) {
        return None;
    }
    let slot = lock(&entry.state);
    let now = Instant::now();
    // Nothing can happen while nobody looks: check again after a full idle period.
    let mut wake = now + inner.settings.idle_evict_after;
    if !slot.fetching {
        let action_at = match (&slot.token, slot.refresh_at) {
            (Some(_), Some(at)) => Some(inner.clock.deadline_for(at)),
            (Some(_), None) => Some(now),
            (None, _) if wants_retry(&slot, entry) => Some(now),
            (None, _) => None,
        };
        if let Some(at) = action_at {
            let at = slot.backoff.retry_at().map_or(at, |retry| at.max(retry));
            wake = wake.min(at);
        }
        if !slot.pinned && !entry.watched() {
            let idle_at = slot
                .last_used
                .map_or(now, |used| used + inner.settings.idle_evict_after);
            wake = wake.min(idle_at);
        }
    }
    Some(wake)
}

/// Whether a key without a token is retried in the background: when someone
/// waits on it (prefetched or watched) or the last failure was transient; a
/// permanent rejection waits for a caller to ask again.
fn wants_retry(slot: &super::Slot, entry: &Entry) -> bool {
    slot.pinned || entry.watched() || slot.last_error.as_ref().is_some_and(|e| !e.is_permanent())
}
