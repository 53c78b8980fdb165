//! The cache's one background task and its timer queue. Every entry has
//! exactly one deadline in the queue: its next planned refresh, backoff
//! retry or idle check, whichever comes first ([`TokenCache::next_wake`]).
//! The task sleeps until the earliest deadline, then decides for each
//! entry that is due ([`TokenCache::on_timer`]): drop it after
//! `idle_evict_after` unless it is prefetched or watched, or start its
//! background fetch, and plans its next deadline.
//!
//! One task and one ordered map for the whole cache, rather than a task,
//! a timer and a wake-up channel per entry: an entry costs one map item
//! here (issue 16: memory per entry). Whoever changes what an entry waits
//! for (a fetch finishing, a token dropped) re-plans its deadline at once
//! ([`TokenCache::schedule`]); removing an entry cancels it.
//!
//! Lock order: an entry's slot, then the queue; the task takes the queue
//! alone to pop what is due, and never holds it while taking a slot.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
};

use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::{budget::Priority, lock, Entry, Inner, Slot, TokenCache};

/// Most entries handled in one go before the task lets others run: a
/// hundred thousand keys due at once (a host back from suspend) must not
/// hold a worker thread for the whole of them.
const BATCH: usize = 256;

/// An entry's place in the queue, kept in its slot: the deadline, and a
/// sequence number that tells apart entries due at the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Timer {
    at: Instant,
    seq: u64,
}

/// The deadlines of every entry, and the task that waits for them.
pub(super) struct Timers {
    queue: Mutex<Queue>,
    /// Wakes the task when a deadline earlier than every other one is
    /// queued, or the cache is dropped.
    changed: Notify,
    closed: AtomicBool,
    /// The task, started with the first entry (an engine built outside a
    /// runtime, as `check-config` does, has none) and started again if its
    /// runtime went away.
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Queue {
    by_deadline: BTreeMap<Timer, Weak<Entry>>,
    next_seq: u64,
}

impl Timers {
    pub(super) fn new() -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            changed: Notify::new(),
            closed: AtomicBool::new(false),
            task: Mutex::new(None),
        }
    }

    /// Starts the task unless it runs.
    pub(super) fn ensure_task(self: &Arc<Self>, cache: Weak<Inner>) {
        let mut task = lock_plain(&self.task);
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            *task = Some(tokio::spawn(run(cache, self.clone())));
        }
    }

    /// Puts `entry`'s deadline at `at`, replacing the one in `timer` (the
    /// entry's slot field, so the caller holds the slot).
    pub(super) fn set(&self, timer: &mut Option<Timer>, at: Instant, entry: &Arc<Entry>) {
        let mut queue = lock_plain(&self.queue);
        if let Some(old) = timer.take() {
            queue.by_deadline.remove(&old);
        }
        let new = Timer {
            at,
            seq: queue.next_seq,
        };
        queue.next_seq += 1;
        queue.by_deadline.insert(new, Arc::downgrade(entry));
        let earliest = queue
            .by_deadline
            .first_key_value()
            .is_some_and(|(first, _)| *first == new);
        drop(queue);
        *timer = Some(new);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Takes `entry`'s deadline out of the queue (it was removed).
    pub(super) fn cancel(&self, timer: &mut Option<Timer>) {
        if let Some(old) = timer.take() {
            lock_plain(&self.queue).by_deadline.remove(&old);
        }
    }

    /// Up to [`BATCH`] deadlines reached at `now`, taken out of the queue,
    /// and the earliest one left.
    fn take_due(&self, now: Instant) -> (Vec<(Timer, Weak<Entry>)>, Option<Instant>) {
        let mut queue = lock_plain(&self.queue);
        let mut due = Vec::new();
        while let Some(entry) = queue.by_deadline.first_entry() {
            if entry.key().at > now || due.len() == BATCH {
                break;
            }
            let (timer, entry) = entry.remove_entry();
            due.push((timer, entry));
        }
        let next = queue.by_deadline.first_key_value().map(|(t, _)| t.at);
        (due, next)
    }

    /// How many deadlines are queued (one per entry).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock_plain(&self.queue).by_deadline.len()
    }

    /// The cache is gone: the task ends.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_one();
    }
}

/// The one background task: sleeps until the earliest deadline (or an
/// earlier one is queued), then handles every entry that is due. It holds
/// the cache only while handling, so dropping the cache ends it.
async fn run(cache: Weak<Inner>, timers: Arc<Timers>) {
    loop {
        let changed = timers.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if timers.closed.load(Ordering::Acquire) {
            return;
        }
        let (due, next) = timers.take_due(Instant::now());
        if !due.is_empty() {
            let Some(inner) = cache.upgrade() else {
                return;
            };
            let cache = TokenCache { inner };
            for (timer, entry) in due {
                // Gone: its last holder dropped it after it left the map.
                if let Some(entry) = entry.upgrade() {
                    cache.on_timer(&entry, timer);
                }
            }
            drop(cache);
            tokio::task::yield_now().await;
            continue;
        }
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = changed => {}
                }
            }
            None => changed.await,
        }
    }
}

impl TokenCache {
    /// Plans `entry`'s next deadline from its slot (held by the caller).
    pub(super) fn schedule(&self, entry: &Arc<Entry>, slot: &mut Slot) {
        let at = self.next_wake(slot);
        self.inner.timers.set(&mut slot.timer, at, entry);
    }

    /// Takes `entry`'s deadline out of the queue: it left the cache.
    pub(super) fn unschedule(&self, entry: &Entry) {
        let mut slot = lock(&entry.state);
        self.inner.timers.cancel(&mut slot.timer);
    }

    /// `entry`'s deadline `timer` was reached: drop it if idle, start its
    /// background fetch if due, and plan the next deadline.
    fn on_timer(&self, entry: &Arc<Entry>, timer: Timer) {
        // An entry evicted for room (max_entries) or dropped by a reload is
        // no longer refreshed.
        if !self.inner.entries.holds(entry) {
            return;
        }
        let now = Instant::now();
        let mut slot = lock(&entry.state);
        if slot.timer != Some(timer) {
            // Re-planned since it was taken from the queue: the new
            // deadline decides.
            return;
        }
        slot.timer = None;
        let idle = slot
            .last_used
            .is_none_or(|used| now >= used + self.inner.settings.idle_evict_after);
        if idle && !slot.pinned && !slot.watched() && !slot.fetching {
            drop(slot);
            self.inner.entries.remove(entry);
            tracing::debug!(
                identity = entry.key.identity(),
                audience = crate::domain::LogText::new(entry.key.audience()).as_str(),
                "dropped idle entry"
            );
            return;
        }
        if !slot.fetching && slot.backoff.ready(now) {
            let wall = self.inner.clock.now();
            let due = match (&slot.token, slot.refresh_at) {
                (Some(_), Some(at)) => wall >= at,
                (Some(_), None) => true,
                (None, _) => wants_retry(&slot),
            };
            if due {
                self.start_fetch(entry, &mut slot, Priority::Background);
            }
        }
        self.schedule(entry, &mut slot);
    }

    /// The instant of the entry's next decision. Each candidate lies in the
    /// future or is acted on when reached, so the queue never spins: a due
    /// refresh waits for the backoff, a running fetch re-plans when it
    /// ends, and the idle deadline only counts for entries that can be
    /// evicted.
    fn next_wake(&self, slot: &Slot) -> Instant {
        let settings = &self.inner.settings;
        let now = Instant::now();
        // Nothing can happen while nobody looks: check again after a full idle period.
        let mut wake = now + settings.idle_evict_after;
        if !slot.fetching {
            let action_at = match (&slot.token, slot.refresh_at) {
                (Some(_), Some(at)) => Some(self.inner.clock.deadline_for(at)),
                (Some(_), None) => Some(now),
                (None, _) if wants_retry(slot) => Some(now),
                (None, _) => None,
            };
            if let Some(at) = action_at {
                let at = slot.backoff.retry_at().map_or(at, |retry| at.max(retry));
                wake = wake.min(at);
            }
            if !slot.pinned && !slot.watched() {
                let idle_at = slot
                    .last_used
                    .map_or(now, |used| used + settings.idle_evict_after);
                wake = wake.min(idle_at);
            }
        }
        wake
    }
}

/// Whether a key without a token is retried in the background: when someone
/// waits on it (prefetched or watched) or the last failure was transient; a
/// permanent rejection waits for a caller to ask again.
fn wants_retry(slot: &Slot) -> bool {
    slot.pinned || slot.watched() || slot.last_error.as_ref().is_some_and(|e| !e.is_permanent())
}

fn lock_plain<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Held for a few map operations; nothing in them can leave the queue
    // half-updated in a way that matters.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        time::{Duration, UNIX_EPOCH},
    };

    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};

    use crate::{
        cache::{CacheKey, TokenCache},
        clock::Clock,
        config::RefreshSettings,
        domain::SourceKind,
        source::{FetchFuture, IdTokenSource},
        token::IdToken,
    };

    /// Hour-long tokens on the cache's clock, without a network.
    struct Hourly {
        clock: Clock,
        calls: AtomicUsize,
    }

    impl IdTokenSource for Hourly {
        fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::Relaxed);
                let now = self.clock.now();
                let iat = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
                let claims =
                    serde_json::json!({"aud": audience, "iat": iat, "exp": iat + 3600, "n": n});
                let jwt = format!(
                    "{}.{}.c2ln",
                    URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
                    URL_SAFE_NO_PAD.encode(claims.to_string())
                );
                Ok(IdToken::parse(&jwt, audience, now).unwrap())
            })
        }

        fn kind(&self) -> SourceKind {
            SourceKind::Metadata
        }

        fn upstream(&self) -> &str {
            "test source"
        }
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn key(i: usize) -> CacheKey {
        CacheKey::new("default", &format!("https://a{i}.example.com")).unwrap()
    }

    /// Issue 16: the cache keeps one task and exactly one queued deadline
    /// per entry, through admissions, evictions, refreshes, idle drops and
    /// a reload's removal, so nothing per entry outlives it.
    #[tokio::test(start_paused = true)]
    async fn one_task_for_the_cache_and_one_deadline_per_entry() {
        let clock = Clock::tokio();
        let source = Arc::new(Hourly {
            clock: clock.clone(),
            calls: AtomicUsize::new(0),
        });
        let settings = RefreshSettings {
            max_entries: 100,
            upstream_qps: 10_000,
            ..RefreshSettings::default()
        };
        let idle = settings.idle_evict_after;
        let cache = TokenCache::new(
            [(
                "default".to_owned(),
                source.clone() as Arc<dyn IdTokenSource>,
            )],
            settings,
            clock,
        );
        let tasks_before = alive_tasks();
        for i in 0..300 {
            cache.get(&key(i), Duration::ZERO).await.unwrap();
        }
        settle().await;
        assert_eq!(cache.len(), 100);
        assert_eq!(
            cache.inner.timers.len(),
            100,
            "evicted entries left deadlines"
        );
        assert_eq!(
            alive_tasks(),
            tasks_before + 1,
            "300 admissions: the one refresher task, nothing per entry"
        );
        assert_eq!(source.calls.load(Ordering::Relaxed), 300);

        // Past the refresh window: the one task refreshed every entry held.
        for _ in 0..50 {
            tokio::time::advance(Duration::from_secs(60)).await;
            settle().await;
        }
        assert_eq!(source.calls.load(Ordering::Relaxed), 400);
        assert_eq!(cache.inner.timers.len(), 100);
        assert_eq!(alive_tasks(), tasks_before + 1);

        // Idle past idle_evict_after: dropped, deadlines and all.
        for _ in 0..((idle.as_secs() / 3600) + 1) {
            tokio::time::advance(Duration::from_secs(3600)).await;
            settle().await;
        }
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.inner.timers.len(), 0);

        // A reload removing the identity takes its deadlines with it.
        for i in 0..10 {
            cache.get(&key(i), Duration::ZERO).await.unwrap();
        }
        assert_eq!(cache.inner.timers.len(), 10);
        cache.remove_identity("default");
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.inner.timers.len(), 0);

        // Dropping the cache ends its task.
        drop(cache);
        settle().await;
        assert_eq!(alive_tasks(), tasks_before);
    }

    /// Entries due at one instant (no jitter, admitted together) are all
    /// handled, a batch at a time, by the one task.
    #[tokio::test(start_paused = true)]
    async fn a_crowd_due_at_one_instant_is_refreshed_in_batches() {
        let clock = Clock::tokio();
        let source = Arc::new(Hourly {
            clock: clock.clone(),
            calls: AtomicUsize::new(0),
        });
        let settings = RefreshSettings {
            jitter: Duration::ZERO,
            upstream_qps: 10_000,
            ..RefreshSettings::default()
        };
        let cache = TokenCache::new(
            [(
                "default".to_owned(),
                source.clone() as Arc<dyn IdTokenSource>,
            )],
            settings,
            clock,
        );
        let tasks_before = alive_tasks();
        let crowd = 3 * super::BATCH + 10;
        for i in 0..crowd {
            cache.get(&key(i), Duration::ZERO).await.unwrap();
        }
        assert_eq!(source.calls.load(Ordering::Relaxed), crowd);
        // All planned for the same instant, 45 minutes on.
        tokio::time::advance(Duration::from_secs(45 * 60)).await;
        for _ in 0..50 {
            settle().await;
        }
        assert_eq!(source.calls.load(Ordering::Relaxed), 2 * crowd);
        assert_eq!(cache.inner.timers.len(), crowd);
        assert_eq!(alive_tasks(), tasks_before + 1);
    }
}
