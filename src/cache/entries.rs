//! The cache's entries under their bound (`refresh.max_entries`). A new key
//! is admitted, and the least recently used entry evicted to make room for
//! it, under one lock, so no burst of concurrent new keys can pass the
//! bound; the victim comes from an ordered index ([`RecencyOrder`]) in
//! O(log n), never from a scan of the whole map. Lookups of held keys take
//! only the map's own shard lock, and a hot key takes the index lock only
//! when it has drifted into the older half of the order.
//!
//! Lock order: `order`, then a map shard, then an entry's slot (then the
//! refresher's queue). Nothing takes `order` while holding a map guard or a
//! slot.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use dashmap::DashMap;

use super::{lock, CacheKey, Entry};

/// How many of the oldest entries one admission looks at for one it may
/// evict. Entries in use (a fetch under way, prefetched, watched) are
/// skipped and moved to the young end, so the next admission does not look
/// at them again; if all of these are in use the new key is refused rather
/// than the bound exceeded.
const EVICTION_SCAN: usize = 64;

/// Why a key was not admitted.
pub(super) enum Refusal<E> {
    /// The caller's gate said no; nothing was created or evicted.
    Gate(E),
    /// The cache is at its bound and every entry looked at is in use.
    Full,
}

pub(super) struct Entries {
    map: DashMap<CacheKey, Arc<Entry>>,
    /// Taken for every insertion and removal, so the map and the order hold
    /// the same entries and the bound is checked and kept atomically.
    order: Mutex<RecencyOrder<Arc<Entry>>>,
    /// The order's next stamp, mirrored for the lock-free check in [`Entries::touch`].
    issued: AtomicU64,
    max: usize,
}

impl Entries {
    pub(super) fn new(max: usize) -> Self {
        Self {
            map: DashMap::new(),
            order: Mutex::new(RecencyOrder::new()),
            issued: AtomicU64::new(0),
            max: max.max(1),
        }
    }

    pub(super) fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        // The guard is dropped at the end of this statement.
        self.map.get(key).map(|item| item.value().clone())
    }

    /// Whether `entry` is still the one held for its key (not evicted,
    /// dropped or replaced).
    pub(super) fn holds(&self, entry: &Arc<Entry>) -> bool {
        self.map
            .get(&entry.key)
            .is_some_and(|item| Arc::ptr_eq(item.value(), entry))
    }

    /// How many entries are held. From the order, not the map: the map's
    /// count adds up its shards one by one, so while an eviction in one
    /// shard and an insertion in another run it can count one too many.
    pub(super) fn len(&self) -> usize {
        lock_order(&self.order).len()
    }

    /// Every entry held, at one instant, for listings.
    pub(super) fn snapshot(&self) -> Vec<Arc<Entry>> {
        lock_order(&self.order).items().cloned().collect()
    }

    /// The entry for `key`, admitting it when not held: `gate` is asked
    /// first (once, and only for a key not held), then room is made by
    /// evicting the least recently used entry not in use, then `create`
    /// makes the entry; `evicted` is told of the entry evicted for it, once
    /// it has left the map. Returns the entry and whether this call created
    /// it. A refusal leaves nothing behind.
    pub(super) fn get_or_admit<E>(
        &self,
        key: &CacheKey,
        gate: impl FnOnce() -> Result<(), E>,
        create: impl FnOnce() -> Arc<Entry>,
        evicted: impl FnOnce(&Arc<Entry>),
    ) -> Result<(Arc<Entry>, bool), Refusal<E>> {
        if let Some(entry) = self.get(key) {
            return Ok((entry, false));
        }
        let mut order = lock_order(&self.order);
        // Another caller may have admitted it while we waited for the lock.
        if let Some(entry) = self.get(key) {
            return Ok((entry, false));
        }
        let victim = if order.len() >= self.max {
            Some(find_victim(&mut order).ok_or(Refusal::Full)?)
        } else {
            None
        };
        gate().map_err(Refusal::Gate)?;
        if let Some(stamp) = victim {
            if let Some(victim) = order.remove(stamp) {
                self.map.remove(&victim.key);
                // Out of the refresher's queue now, so the entry is released
                // at once rather than at its next deadline.
                evicted(&victim);
                tracing::debug!(
                    identity = victim.key.identity(),
                    audience = crate::domain::LogText::new(victim.key.audience()).as_str(),
                    "evicted least recently used entry"
                );
            }
        }
        let entry = create();
        entry
            .recency
            .store(order.insert(entry.clone()), Ordering::Relaxed);
        // Keyed by the entry's own key, which shares its text with it.
        self.map.insert(entry.key.clone(), entry.clone());
        self.issued.store(order.next_stamp(), Ordering::Relaxed);
        Ok((entry, true))
    }

    /// Marks `entry` used now. Free for an entry in the younger half of the
    /// order (it cannot be the next victim); otherwise O(log n) under the lock.
    pub(super) fn touch(&self, entry: &Entry) {
        let stamp = entry.recency.load(Ordering::Relaxed);
        let younger = self.issued.load(Ordering::Relaxed).saturating_sub(stamp);
        if younger <= (self.max / 2) as u64 {
            return;
        }
        let mut order = lock_order(&self.order);
        // None: evicted, or moved by a concurrent touch; nothing to do.
        if let Some(moved) = order.touch(stamp) {
            entry.recency.store(moved, Ordering::Relaxed);
            self.issued.store(order.next_stamp(), Ordering::Relaxed);
        }
    }

    /// Removes `entry` if it is still the one held for its key.
    pub(super) fn remove(&self, entry: &Arc<Entry>) -> bool {
        let mut order = lock_order(&self.order);
        let removed = self
            .map
            .remove_if(&entry.key, |_, held| Arc::ptr_eq(held, entry))
            .is_some();
        if removed {
            order.remove(entry.recency.load(Ordering::Relaxed));
        }
        removed
    }

    /// Removes every entry of `identity`; returns them.
    pub(super) fn remove_identity(&self, identity: &str) -> Vec<Arc<Entry>> {
        let mut order = lock_order(&self.order);
        let mut removed = Vec::new();
        self.map.retain(|key, entry| {
            let keep = key.identity() != identity;
            if !keep {
                removed.push(entry.clone());
            }
            keep
        });
        for entry in &removed {
            order.remove(entry.recency.load(Ordering::Relaxed));
        }
        removed
    }
}

/// The oldest entry not in use, among the [`EVICTION_SCAN`] oldest; the
/// ones in use are moved to the young end as they are passed.
fn find_victim(order: &mut RecencyOrder<Arc<Entry>>) -> Option<u64> {
    for _ in 0..EVICTION_SCAN.min(order.len()) {
        let (stamp, entry) = order.oldest()?;
        let in_use = {
            let slot = lock(&entry.state);
            slot.fetching || slot.pinned || slot.watched()
        };
        if !in_use {
            return Some(stamp);
        }
        let entry = entry.clone();
        if let Some(moved) = order.touch(stamp) {
            entry.recency.store(moved, Ordering::Relaxed);
        }
    }
    None
}

fn lock_order<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Held for map and index updates only; a panic elsewhere cannot leave
    // the two half-updated in a way that matters more than refusing service.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Items in the order they were last used: each holds a stamp from a
/// counter that only grows, and the smallest stamp is the least recently
/// used. Every operation is O(log n).
pub(super) struct RecencyOrder<T> {
    by_stamp: BTreeMap<u64, T>,
    next: u64,
}

impl<T> RecencyOrder<T> {
    pub(super) fn new() -> Self {
        Self {
            by_stamp: BTreeMap::new(),
            next: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.by_stamp.len()
    }

    /// The stamp the next insert or touch will give.
    pub(super) fn next_stamp(&self) -> u64 {
        self.next
    }

    /// Adds `item` as the most recently used; returns its stamp.
    pub(super) fn insert(&mut self, item: T) -> u64 {
        let stamp = self.next;
        self.next += 1;
        self.by_stamp.insert(stamp, item);
        stamp
    }

    /// Makes the item at `stamp` the most recently used; its new stamp, or
    /// `None` when no item has that stamp.
    pub(super) fn touch(&mut self, stamp: u64) -> Option<u64> {
        let item = self.by_stamp.remove(&stamp)?;
        Some(self.insert(item))
    }

    pub(super) fn remove(&mut self, stamp: u64) -> Option<T> {
        self.by_stamp.remove(&stamp)
    }

    /// Every item, least recently used first.
    pub(super) fn items(&self) -> impl Iterator<Item = &T> {
        self.by_stamp.values()
    }

    /// The least recently used item and its stamp.
    pub(super) fn oldest(&self) -> Option<(u64, &T)> {
        self.by_stamp.first_key_value().map(|(s, item)| (*s, item))
    }
}

#[cfg(test)]
mod tests {
    use super::RecencyOrder;

    fn order_of(order: &RecencyOrder<&'static str>) -> Vec<&'static str> {
        order.items().copied().collect()
    }

    #[test]
    fn the_oldest_is_the_least_recently_inserted_or_touched() {
        let mut order = RecencyOrder::new();
        let a = order.insert("a");
        let b = order.insert("b");
        let c = order.insert("c");
        assert_eq!(order.oldest(), Some((a, &"a")));
        let a = order.touch(a).unwrap();
        assert_eq!(order_of(&order), ["b", "c", "a"]);
        assert_eq!(order.oldest(), Some((b, &"b")));
        order.touch(c).unwrap();
        assert_eq!(order_of(&order), ["b", "a", "c"]);
        assert_eq!(order.remove(b), Some("b"));
        assert_eq!(order.oldest(), Some((a, &"a")));
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn stale_stamps_are_ignored() {
        let mut order = RecencyOrder::new();
        let a = order.insert("a");
        let moved = order.touch(a).unwrap();
        assert_ne!(moved, a);
        // The old stamp names nothing any more: a late, concurrent touch or
        // remove through it must not move or drop anything.
        assert_eq!(order.touch(a), None);
        assert_eq!(order.remove(a), None);
        assert_eq!(order.len(), 1);
        assert_eq!(order.remove(moved), Some("a"));
        assert_eq!(order.oldest(), None);
        assert_eq!(order.touch(moved), None);
    }

    #[test]
    fn stamps_only_grow_and_next_stamp_tells_how_many_were_issued() {
        let mut order = RecencyOrder::new();
        let mut last = None;
        for i in 0..100 {
            let stamp = order.insert(i);
            assert!(last.is_none_or(|l| stamp > l));
            last = Some(stamp);
            if i % 3 == 0 {
                last = order.touch(stamp).or(last);
            }
        }
        assert_eq!(order.next_stamp(), 100 + 34);
        assert_eq!(order.len(), 100);
    }

    /// Against a naive model (a Vec kept in use order), over a long random
    /// sequence of operations: same oldest item after every step.
    #[test]
    fn agrees_with_a_naive_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mut order = RecencyOrder::new();
        let mut stamps: std::collections::HashMap<u32, u64> = Default::default();
        let mut model: Vec<u32> = Vec::new();
        for step in 0..20_000u32 {
            match rng.random_range(0..3) {
                0 => {
                    stamps.insert(step, order.insert(step));
                    model.push(step);
                }
                1 if !model.is_empty() => {
                    let item = model.remove(rng.random_range(0..model.len()));
                    let stamp = stamps[&item];
                    stamps.insert(item, order.touch(stamp).unwrap());
                    model.push(item);
                }
                2 if !model.is_empty() => {
                    let item = model.remove(rng.random_range(0..model.len()));
                    assert_eq!(order.remove(stamps.remove(&item).unwrap()), Some(item));
                }
                _ => {}
            }
            assert_eq!(order.len(), model.len());
            assert_eq!(order.oldest().map(|(_, i)| *i), model.first().copied());
        }
    }
}
