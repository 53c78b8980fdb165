//! The token cache: one entry per (identity, audience), answered from memory
//! while the token has life left, with ONE upstream fetch shared by every
//! concurrent asker of a key (single-flight).
//!
//! States (DESIGN.md "Token lifecycle"): a token with more than
//! `refresh_before_expiry` left is fresh and served; inside that window it is
//! stale, served at once while one background refresh runs; under
//! [`EXPIRY_MARGIN`] it counts as expired and callers wait on the shared
//! fetch. After a failed attempt, further attempts back off
//! ([`backoff::Backoff`]), and callers with nothing valid to be served get
//! the last error at once instead of hammering upstream.

mod backoff;
mod key;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use dashmap::DashMap;
use tokio::{
    sync::{watch, Semaphore},
    time::Instant,
};

pub use key::{validate_audience, AudienceError, CacheKey};

use crate::{
    clock::Clock,
    config::RefreshSettings,
    source::{IdTokenSource, SourceError},
    token::IdToken,
};
use backoff::Backoff;

/// A token with less life than this is treated as expired (clock skew).
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// How a request was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Fresh token from memory.
    Hit,
    /// Token inside the refresh window, served while a refresh runs.
    Stale,
    /// This request started the upstream fetch and waited for it.
    Miss,
    /// This request joined a fetch another request had started.
    Wait,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Wait => "wait",
        }
    }
}

/// A token answered from the cache.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub token: IdToken,
    pub outcome: CacheOutcome,
}

/// Why the cache has no token to give.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("no identity named {0:?} is configured")]
    UnknownIdentity(String),
    #[error(transparent)]
    InvalidAudience(#[from] AudienceError),
    #[error(transparent)]
    Upstream(#[from] SourceError),
    #[error(
        "min_valid_for of {}s is more than the {}s of life a freshly minted token has",
        wanted.as_secs(), available.as_secs()
    )]
    TooShortLived {
        wanted: Duration,
        available: Duration,
    },
}

/// What `ListTokens` shows of an entry: never the token itself.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub key: CacheKey,
    pub issued_at: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    pub state: EntryState,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    Fresh,
    Stale,
    Expired,
    Failed,
    /// No token yet, first fetch under way.
    Pending,
}

/// The per-identity upstream: its source and the bound on concurrent calls.
struct Upstream {
    source: Arc<dyn IdTokenSource>,
    permits: Arc<Semaphore>,
}

/// Shared, cheaply cloneable handle to the cache.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    upstreams: HashMap<String, Upstream>,
    entries: DashMap<CacheKey, Arc<Entry>>,
    settings: RefreshSettings,
    clock: Clock,
}

struct Entry {
    key: CacheKey,
    state: Mutex<Slot>,
    /// Bumped after every completed upstream attempt; waiters watch it.
    attempts: watch::Sender<u64>,
}

#[derive(Default)]
struct Slot {
    token: Option<IdToken>,
    last_error: Option<SourceError>,
    fetching: bool,
    generation: u64,
    last_used: Option<Instant>,
    backoff: Backoff,
}

impl TokenCache {
    pub fn new(
        sources: impl IntoIterator<Item = (String, Arc<dyn IdTokenSource>)>,
        settings: RefreshSettings,
        clock: Clock,
    ) -> Self {
        let upstreams = sources
            .into_iter()
            .map(|(name, source)| {
                let permits = Arc::new(Semaphore::new(settings.upstream_concurrency.max(1)));
                (name, Upstream { source, permits })
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                upstreams,
                entries: DashMap::new(),
                settings,
                clock,
            }),
        }
    }

    /// The configured identity names.
    pub fn identities(&self) -> impl Iterator<Item = &str> {
        self.inner.upstreams.keys().map(String::as_str)
    }

    /// The source behind an identity.
    pub fn source(&self, identity: &str) -> Option<&Arc<dyn IdTokenSource>> {
        self.inner.upstreams.get(identity).map(|u| &u.source)
    }

    /// A token for `key` with more than `min_valid` (and [`EXPIRY_MARGIN`])
    /// of life left. Waits on the shared upstream fetch when needed; callers
    /// bound the wait with their own deadline.
    pub async fn get(&self, key: &CacheKey, min_valid: Duration) -> Result<Lookup, CacheError> {
        if !self.inner.upstreams.contains_key(key.identity()) {
            return Err(CacheError::UnknownIdentity(key.identity().to_owned()));
        }
        let need = min_valid.max(EXPIRY_MARGIN);
        let entry = self.entry(key);
        let mut started = false;
        let mut waited = false;
        loop {
            let (mut attempts, seen) = {
                let mut slot = lock(&entry.state);
                let now = self.inner.clock.now();
                slot.last_used = Some(Instant::now());
                if let Some(token) = &slot.token {
                    let left = token.remaining(now);
                    if left > need {
                        let token = token.clone();
                        let outcome = if left <= self.inner.settings.refresh_before_expiry {
                            self.refresh_in_background(&entry, &mut slot);
                            CacheOutcome::Stale
                        } else if started {
                            CacheOutcome::Miss
                        } else if waited {
                            CacheOutcome::Wait
                        } else {
                            CacheOutcome::Hit
                        };
                        return Ok(Lookup { token, outcome });
                    }
                }
                if waited {
                    // One attempt completed since we began waiting and it gave
                    // nothing usable: answer with what it said, never loop.
                    return Err(self.failure(&slot, need));
                }
                if !slot.fetching && !slot.backoff.ready(Instant::now()) {
                    if let Some(err) = &slot.last_error {
                        return Err(CacheError::Upstream(err.clone()));
                    }
                }
                let attempts = entry.attempts.subscribe();
                if !slot.fetching {
                    started = true;
                    self.start_fetch(&entry, &mut slot);
                }
                (attempts, slot.generation)
            };
            // The sender lives in `entry`, which we hold: this cannot fail.
            let _ = attempts.wait_for(|generation| *generation > seen).await;
            waited = true;
        }
    }

    /// Metadata of every entry, for `ListTokens`. Never token text.
    pub fn list(&self) -> Vec<EntryInfo> {
        let now = self.inner.clock.now();
        let mut infos: Vec<EntryInfo> = self
            .inner
            .entries
            .iter()
            .map(|item| {
                let entry = item.value().clone();
                let slot = lock(&entry.state);
                let state = match (&slot.token, &slot.last_error) {
                    (Some(token), _) => {
                        let left = token.remaining(now);
                        if left <= EXPIRY_MARGIN {
                            EntryState::Expired
                        } else if left <= self.inner.settings.refresh_before_expiry {
                            EntryState::Stale
                        } else {
                            EntryState::Fresh
                        }
                    }
                    (None, Some(_)) => EntryState::Failed,
                    (None, None) => EntryState::Pending,
                };
                EntryInfo {
                    key: entry.key.clone(),
                    issued_at: slot.token.as_ref().map(IdToken::issued_at),
                    expires_at: slot.token.as_ref().map(IdToken::expires_at),
                    state,
                    last_error: slot.last_error.as_ref().map(ToString::to_string),
                }
            })
            .collect();
        infos.sort_by(|a, b| a.key.cmp(&b.key));
        infos
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.entries.is_empty()
    }

    fn entry(&self, key: &CacheKey) -> Arc<Entry> {
        if let Some(entry) = self.inner.entries.get(key) {
            return entry.value().clone();
        }
        if self.inner.entries.len() >= self.inner.settings.max_entries {
            self.evict_least_recently_used();
        }
        // The DashMap guard is dropped at the end of this statement.
        self.inner
            .entries
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    key: key.clone(),
                    state: Mutex::new(Slot::default()),
                    attempts: watch::channel(0).0,
                })
            })
            .value()
            .clone()
    }

    /// Makes room for one more entry. Entries with a fetch under way are kept.
    fn evict_least_recently_used(&self) {
        let victim = self
            .inner
            .entries
            .iter()
            .filter_map(|item| {
                let slot = lock(&item.value().state);
                (!slot.fetching).then(|| (slot.last_used, item.key().clone()))
            })
            .min_by_key(|(used, _)| *used)
            .map(|(_, key)| key);
        if let Some(key) = victim {
            self.inner.entries.remove(&key);
            tracing::debug!(
                identity = key.identity(),
                audience = key.audience(),
                "evicted least recently used entry"
            );
        }
    }

    fn refresh_in_background(&self, entry: &Arc<Entry>, slot: &mut Slot) {
        if !slot.fetching && slot.backoff.ready(Instant::now()) {
            self.start_fetch(entry, slot);
        }
    }

    /// Starts the one upstream fetch for `entry`; it runs detached from any
    /// caller, so a client that goes away does not cancel it for the others.
    fn start_fetch(&self, entry: &Arc<Entry>, slot: &mut Slot) {
        slot.fetching = true;
        let cache = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            let result = cache.fetch(&entry.key).await;
            let generation = {
                let mut slot = lock(&entry.state);
                match result {
                    Ok(token) => {
                        slot.token = Some(token);
                        slot.last_error = None;
                        slot.backoff.succeeded();
                    }
                    Err(err) => {
                        tracing::warn!(
                            identity = entry.key.identity(),
                            audience = entry.key.audience(),
                            error = %err,
                            "upstream fetch failed"
                        );
                        let settings = &cache.inner.settings;
                        slot.backoff.failed(
                            Instant::now(),
                            err.is_permanent(),
                            settings.retry_initial,
                            settings.retry_max,
                        );
                        slot.last_error = Some(err);
                    }
                }
                slot.fetching = false;
                slot.generation += 1;
                slot.generation
            };
            entry.attempts.send_replace(generation);
        });
    }

    async fn fetch(&self, key: &CacheKey) -> Result<IdToken, SourceError> {
        let upstream = &self.inner.upstreams[key.identity()];
        // The semaphore is never closed, so acquire cannot fail.
        let _permit = upstream.permits.acquire().await;
        let started = Instant::now();
        let result = upstream.source.fetch(key.audience()).await;
        tracing::debug!(
            identity = key.identity(),
            audience = key.audience(),
            upstream = upstream.source.upstream(),
            ok = result.is_ok(),
            latency_ms = started.elapsed().as_millis() as u64,
            "upstream call"
        );
        result
    }

    fn failure(&self, slot: &Slot, need: Duration) -> CacheError {
        match (&slot.last_error, &slot.token) {
            (Some(err), _) => CacheError::Upstream(err.clone()),
            (None, Some(token)) => CacheError::TooShortLived {
                wanted: need,
                available: token.remaining(self.inner.clock.now()),
            },
            (None, None) => CacheError::TooShortLived {
                wanted: need,
                available: Duration::ZERO,
            },
        }
    }
}

/// Slot locks are held for a few field reads and writes, never across
/// `.await`; a poisoned lock only means a panic elsewhere mid-update of
/// plain data, so carry on with it.
fn lock(mutex: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
