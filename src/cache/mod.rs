//! The token cache: one entry per (identity, audience) for ID tokens and per
//! (identity, scope set) for access tokens ([`TokenKind`]), answered from
//! memory while the token has life left, with ONE upstream fetch shared by
//! every concurrent asker of a key (single-flight). Both kinds share every
//! rule below; access tokens are the bearers of identities built on others
//! (impersonation, workload identity federation), which reach them through
//! [`TokenCache::access_tokens`] (the source layer's [`AccessTokens`]).
//!
//! States (DESIGN.md "Token lifecycle"): a token with more than
//! `refresh_before_expiry` left is fresh and served; inside that window it is
//! stale, served at once while one background refresh runs; under
//! [`EXPIRY_MARGIN`] it counts as expired and callers wait on the shared
//! fetch. After a failed attempt, further attempts back off
//! ([`backoff::Backoff`]), and callers with nothing valid to be served get
//! the last error at once instead of hammering upstream. An answer that
//! leaves nothing to serve (the same token again, or a token with no more
//! than [`EXPIRY_MARGIN`] of life) is such a failure, not a success.
//!
//! Whatever happens inside a fetch, a panic included, its completion runs
//! ([`InFlight`]): no key can be left marked as fetching.
//!
//! One background task for the whole cache ([`refresher`]), with one
//! deadline per entry in its timer queue, renews each token before it turns
//! stale, at a time spread by jitter ([`schedule::plan_refresh`]), and drops
//! an entry once nobody has asked for it in `idle_evict_after` (unless it is
//! prefetched or watched). An entry holds its token once; a watch channel
//! for `WatchIdToken` streams exists only while someone watches.

mod backoff;
pub mod budget;
mod entries;
mod key;
mod refresher;
mod schedule;

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, Arc, Mutex, MutexGuard, RwLock},
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{watch, Notify, Semaphore},
    time::Instant,
};

pub use key::{CacheKey, TokenKind, MAX_SCOPES, MAX_SCOPE_LEN};

use crate::{
    clock::Clock,
    config::RefreshSettings,
    domain::{AudienceError, IdentityError},
    source::{
        access::{AccessFuture, AccessOf, AccessTokens},
        IdTokenSource, SourceError, ATTEMPT_TIMEOUT,
    },
    token::{AccessToken, IdToken},
};
use backoff::Backoff;
pub use backoff::ON_DEMAND_RETRY_CAP;
use entries::{Entries, Refusal};

/// A token with less life than this is treated as expired (clock skew).
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// How long Google's ID tokens live (PROTOCOLS.md): the life a freshly
/// minted token is assumed to have when bounding `min_valid_for`.
pub const GOOGLE_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Longest a caller of a key that never held a token rides the key's
/// retries: every attempt it waits for ends within this of its arrival (an
/// attempt lasts at most [`ATTEMPT_TIMEOUT`]). Well inside the 30 s a
/// request waits by default, so a cold caller behind a failing or hung
/// upstream gets UNAVAILABLE with the upstream's last error, not
/// DEADLINE_EXCEEDED.
pub const COLD_WAIT_BUDGET: Duration = Duration::from_secs(15);

/// What a waiting caller does next.
enum Next {
    /// Wait for the attempt after this generation to complete.
    Join(u64),
    /// Sleep until the key's next attempt may start.
    Sleep(Instant),
}

/// How a request was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// An access token answered from the cache.
#[derive(Debug, Clone)]
pub struct AccessLookup {
    pub token: AccessToken,
    pub outcome: CacheOutcome,
}

/// The token an entry holds, of the entry's [`TokenKind`].
#[derive(Debug, Clone)]
enum Held {
    Id(IdToken),
    Access(AccessToken),
}

impl Held {
    fn remaining(&self, now: SystemTime) -> Duration {
        match self {
            Held::Id(t) => t.remaining(now),
            Held::Access(t) => t.remaining(now),
        }
    }

    fn issued_at(&self) -> SystemTime {
        match self {
            Held::Id(t) => t.issued_at(),
            Held::Access(t) => t.issued_at(),
        }
    }

    fn expires_at(&self) -> SystemTime {
        match self {
            Held::Id(t) => t.expires_at(),
            Held::Access(t) => t.expires_at(),
        }
    }

    fn same_token_as(&self, other: &Held) -> bool {
        match (self, other) {
            (Held::Id(a), Held::Id(b)) => a.same_token_as(b),
            (Held::Access(a), Held::Access(b)) => a.same_token_as(b),
            _ => false,
        }
    }
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
    InvalidIdentity(#[from] IdentityError),
    #[error("invalid scopes: {0}")]
    InvalidScopes(String),
    #[error(transparent)]
    Upstream(#[from] SourceError),
    /// The caller's `min_valid_for` asks for more life than the newest
    /// token has.
    #[error(
        "min_valid_for of {}s is more than the {}s of life left in the newest token the upstream gave",
        wanted.as_secs(), available.as_secs()
    )]
    TooShortLived {
        wanted: Duration,
        available: Duration,
    },
    #[error(
        "the token cache is full: all {max_entries} entries (refresh.max_entries) are in use \
         by fetches, watch streams or prefetch; retry shortly"
    )]
    Full { max_entries: usize },
    /// Nothing servable is held and no attempt may start yet (backoff), with
    /// no upstream error to report.
    #[error(
        "no token with more than {}s of life is held (the cached one has {}s left); the next upstream attempt is due in {}s",
        EXPIRY_MARGIN.as_secs(), left.as_secs(), retry_in.as_secs()
    )]
    NoFreshToken { left: Duration, retry_in: Duration },
}

/// Why [`TokenCache::admit`] did not admit a key.
#[derive(Debug)]
pub enum AdmitError<E> {
    /// The caller's gate refused it; nothing was created or evicted.
    Refused(E),
    /// The cache could not take it.
    Cache(CacheError),
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

/// The per-identity upstream: its source and the bounds on concurrent
/// calls, one per token kind: an ID-token fetch of an identity built on
/// others waits for an access-token fetch inside it, which must never wait
/// for a permit the ID-token fetches hold.
#[derive(Clone)]
struct Upstream {
    /// The identity's name, shared by the keys of all its entries.
    name: Arc<str>,
    source: Arc<dyn IdTokenSource>,
    /// Calls per second to Google, shared by every kind of fetch.
    budget: Arc<budget::UpstreamBudget>,
    permits: Arc<Semaphore>,
    access_permits: Arc<Semaphore>,
    base_permits: Arc<Semaphore>,
}

impl Upstream {
    fn new(name: &str, source: Arc<dyn IdTokenSource>, settings: &RefreshSettings) -> Self {
        let permits = || Arc::new(Semaphore::new(settings.upstream_concurrency.max(1)));
        Self {
            name: name.into(),
            source,
            budget: Arc::new(budget::UpstreamBudget::new(settings.upstream_qps)),
            permits: permits(),
            access_permits: permits(),
            base_permits: permits(),
        }
    }

    fn permits(&self, kind: TokenKind) -> &Semaphore {
        match kind {
            TokenKind::IdToken => &self.permits,
            TokenKind::AccessToken(AccessOf::Identity) => &self.access_permits,
            TokenKind::AccessToken(AccessOf::Base) => &self.base_permits,
        }
    }
}

/// Shared, cheaply cloneable handle to the cache.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    /// Changed in place by a config reload; read briefly, never across `.await`.
    upstreams: RwLock<HashMap<String, Upstream>>,
    entries: Entries,
    /// Every entry's next deadline, and the one task that keeps them.
    timers: Arc<refresher::Timers>,
    settings: RefreshSettings,
    clock: Clock,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.timers.close();
    }
}

struct Entry {
    key: CacheKey,
    state: Mutex<Slot>,
    /// Notified after every completed upstream attempt (the slot's
    /// `generation` bumped); callers waiting on a fetch wait for it.
    attempts: Notify,
    /// Its place in the eviction order ([`entries`]).
    recency: AtomicU64,
}

#[derive(Default)]
struct Slot {
    token: Option<Held>,
    /// Boxed: most entries hold none, and a `SourceError` inline would
    /// cost every entry its size.
    last_error: Option<Box<SourceError>>,
    fetching: bool,
    generation: u64,
    last_used: Option<Instant>,
    backoff: Backoff,
    /// Wall-clock time of the next planned refresh of a held token.
    refresh_at: Option<SystemTime>,
    /// Prefetched entries are kept fresh and never idle-evicted.
    pinned: bool,
    /// Its deadline in the refresher's queue.
    timer: Option<refresher::Timer>,
    /// Each new token, for `WatchIdToken`/`WatchAccessToken` streams and
    /// token files: made when the first one watches, so an entry nobody
    /// watches holds its token once. Its receivers keep the entry from
    /// idle eviction.
    watchers: Option<Watchers>,
}

/// The watch channel of an entry's kind.
enum Watchers {
    Id(watch::Sender<Option<IdToken>>),
    Access(watch::Sender<Option<AccessToken>>),
}

impl Watchers {
    fn receiver_count(&self) -> usize {
        match self {
            Watchers::Id(tx) => tx.receiver_count(),
            Watchers::Access(tx) => tx.receiver_count(),
        }
    }
}

impl Slot {
    fn watched(&self) -> bool {
        self.watchers
            .as_ref()
            .is_some_and(|w| w.receiver_count() > 0)
    }

    /// Hands a new token to the watchers, if anyone still watches; a
    /// channel nobody watches any more is dropped with its copy.
    fn publish(&mut self, token: &Held) {
        if !self.watched() {
            self.watchers = None;
            return;
        }
        match (&self.watchers, token) {
            (Some(Watchers::Id(tx)), Held::Id(token)) => {
                tx.send_replace(Some(token.clone()));
            }
            (Some(Watchers::Access(tx)), Held::Access(token)) => {
                tx.send_replace(Some(token.clone()));
            }
            _ => {}
        }
    }

    /// A receiver of the entry's ID tokens, making the channel if need be.
    fn watch_id(&mut self) -> watch::Receiver<Option<IdToken>> {
        if let Some(Watchers::Id(tx)) = &self.watchers {
            return tx.subscribe();
        }
        let current = match &self.token {
            Some(Held::Id(token)) => Some(token.clone()),
            _ => None,
        };
        let (tx, rx) = watch::channel(current);
        self.watchers = Some(Watchers::Id(tx));
        rx
    }

    /// A receiver of the entry's access tokens, making the channel if need be.
    fn watch_access(&mut self) -> watch::Receiver<Option<AccessToken>> {
        if let Some(Watchers::Access(tx)) = &self.watchers {
            return tx.subscribe();
        }
        let current = match &self.token {
            Some(Held::Access(token)) => Some(token.clone()),
            _ => None,
        };
        let (tx, rx) = watch::channel(current);
        self.watchers = Some(Watchers::Access(tx));
        rx
    }
}

impl TokenCache {
    pub fn new(
        sources: impl IntoIterator<Item = (String, Arc<dyn IdTokenSource>)>,
        settings: RefreshSettings,
        clock: Clock,
    ) -> Self {
        let upstreams: HashMap<String, Upstream> = sources
            .into_iter()
            .map(|(name, source)| {
                let upstream = Upstream::new(&name, source, &settings);
                (name, upstream)
            })
            .collect();
        let sources: Vec<_> = upstreams.values().map(|u| u.source.clone()).collect();
        let cache = Self {
            inner: Arc::new(Inner {
                upstreams: RwLock::new(upstreams),
                entries: Entries::new(settings.max_entries),
                timers: Arc::new(refresher::Timers::new()),
                settings,
                clock,
            }),
        };
        let tokens = cache.access_tokens();
        for source in sources {
            source.attach(&tokens);
        }
        cache
    }

    /// The cache's access tokens as the source layer sees them, for the
    /// sources that present another credential's token as a bearer. It
    /// holds the cache weakly: the sources it is handed to live in the cache.
    pub fn access_tokens(&self) -> Arc<dyn AccessTokens> {
        Arc::new(EngineAccess(Arc::downgrade(&self.inner)))
    }

    /// The configured identity names.
    pub fn identities(&self) -> Vec<String> {
        let mut names: Vec<String> = self.upstreams().keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether `identity` is configured.
    pub fn knows(&self, identity: &str) -> bool {
        self.upstreams().contains_key(identity)
    }

    /// The source behind an identity.
    pub fn source(&self, identity: &str) -> Option<Arc<dyn IdTokenSource>> {
        self.upstreams().get(identity).map(|u| u.source.clone())
    }

    /// Adds or replaces an identity's source (config reload). Replacing one
    /// drops its cached tokens: they came from the old credential.
    pub fn set_identity(&self, name: &str, source: Arc<dyn IdTokenSource>) {
        source.attach(&self.access_tokens());
        let upstream = Upstream::new(name, source, &self.inner.settings);
        let replaced = self
            .inner
            .upstreams
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), upstream)
            .is_some();
        if replaced {
            self.drop_entries_of(name);
        }
    }

    /// Removes an identity and its cached tokens (config reload).
    pub fn remove_identity(&self, name: &str) {
        self.inner
            .upstreams
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.drop_entries_of(name);
    }

    fn drop_entries_of(&self, identity: &str) {
        for entry in self.inner.entries.remove_identity(identity) {
            // No longer refreshed; released once its last holder lets go,
            // which ends its watchers' streams.
            self.unschedule(&entry);
        }
    }

    fn upstreams(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Upstream>> {
        self.inner
            .upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A token for `key` with more than `min_valid` (and [`EXPIRY_MARGIN`])
    /// of life left. Waits on the shared upstream fetch when needed; callers
    /// bound the wait with their own deadline.
    ///
    /// A caller of a key that never held a token rides the key's retries (on
    /// its backoff schedule, not extra ones) for as long as the next attempt
    /// can end within [`COLD_WAIT_BUDGET`] of its arrival; then it gets the
    /// last upstream error. Every other caller with nothing to be served
    /// gets the error of the one attempt it waited for, or at once when the
    /// key is backing off.
    pub async fn get(&self, key: &CacheKey, min_valid: Duration) -> Result<Lookup, CacheError> {
        match self.lookup(key, min_valid, true).await? {
            (Held::Id(token), outcome) => Ok(Lookup { token, outcome }),
            (Held::Access(_), _) => Err(CacheError::InvalidScopes(
                "an access-token key was asked for an ID token".into(),
            )),
        }
    }

    /// Like [`TokenCache::get`], for an access-token key
    /// ([`CacheKey::access`]).
    pub async fn get_access(
        &self,
        key: &CacheKey,
        min_valid: Duration,
    ) -> Result<AccessLookup, CacheError> {
        self.access_lookup(key, min_valid, true).await
    }

    async fn access_lookup(
        &self,
        key: &CacheKey,
        min_valid: Duration,
        ride: bool,
    ) -> Result<AccessLookup, CacheError> {
        match self.lookup(key, min_valid, ride).await? {
            (Held::Access(token), outcome) => Ok(AccessLookup { token, outcome }),
            (Held::Id(_), _) => Err(CacheError::InvalidScopes(
                "an ID-token key was asked for an access token".into(),
            )),
        }
    }

    /// Drops `refused` if it is still the token held for `key` (an upstream
    /// answered 401 to it), so the next ask fetches a new one. Callers that
    /// saw the same token refused drop it once between them.
    pub fn invalidate(&self, key: &CacheKey, refused: &AccessToken) {
        let Some(entry) = self.inner.entries.get(key) else {
            return;
        };
        let mut slot = lock(&entry.state);
        let same = matches!(&slot.token, Some(Held::Access(held)) if held.same_token_as(refused));
        if same {
            slot.token = None;
            slot.refresh_at = None;
            self.schedule(&entry, &mut slot);
            drop(slot);
            tracing::debug!(
                identity = key.identity(),
                scopes = key.audience(),
                "access token refused upstream; dropped"
            );
        }
    }

    /// The lookup behind [`TokenCache::get`] and [`TokenCache::get_access`].
    /// `ride`: whether a cold caller rides the key's retries (a client does;
    /// a fetch asking for its bearer takes the one attempt's answer, as its
    /// own fetch is retried on its own backoff).
    async fn lookup(
        &self,
        key: &CacheKey,
        min_valid: Duration,
        ride: bool,
    ) -> Result<(Held, CacheOutcome), CacheError> {
        if !self.upstreams().contains_key(key.identity()) {
            return Err(CacheError::UnknownIdentity(key.identity().to_owned()));
        }
        let need = min_valid.max(EXPIRY_MARGIN);
        let entry = self.entry(key)?;
        self.inner.entries.touch(&entry);
        let arrived = Instant::now();
        let mut started = false;
        let mut waited = false;
        loop {
            let next = {
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
                        return Ok((token, outcome));
                    }
                }
                // Nothing servable: join the running attempt, or start one
                // unless the key is backing off. A key that never held a token
                // has nothing to lose by asking sooner after an outage
                // (ON_DEMAND_RETRY_CAP); one that held a token waits out its
                // backoff, even inside the margin.
                let now = Instant::now();
                let cold = slot.token.is_none();
                let may_start = if cold {
                    slot.backoff.ready_on_demand(now)
                } else {
                    slot.backoff.ready(now)
                };
                if waited && (!cold || !ride) {
                    // One attempt completed since we began waiting and it gave
                    // nothing usable: answer with what it said, never loop.
                    return Err(self.failure(&slot, min_valid));
                }
                if slot.fetching {
                    Next::Join(slot.generation)
                } else if may_start {
                    started = true;
                    self.start_fetch(&entry, &mut slot, budget::Priority::Waiting);
                    Next::Join(slot.generation)
                } else {
                    let retry_at = slot.backoff.on_demand_at().unwrap_or(now);
                    let permanent = slot.last_error.as_ref().is_some_and(|e| e.is_permanent());
                    if cold
                        && ride
                        && !permanent
                        && retry_at + ATTEMPT_TIMEOUT <= arrived + COLD_WAIT_BUDGET
                    {
                        Next::Sleep(retry_at)
                    } else {
                        return Err(self.failure(&slot, min_valid));
                    }
                }
            };
            match next {
                Next::Join(seen) => {
                    attempt_after(&entry, seen).await;
                    waited = true;
                }
                Next::Sleep(until) => tokio::time::sleep_until(until).await,
            }
        }
    }

    /// Metadata of every entry, for `ListTokens`: ID tokens and identities'
    /// own access tokens (`AccessOf::Base` entries are internal). Never
    /// token text.
    pub fn list(&self) -> Vec<EntryInfo> {
        let now = self.inner.clock.now();
        let mut infos: Vec<EntryInfo> = self
            .inner
            .entries
            .snapshot()
            .into_iter()
            // The credential under an identity (a federated token) is no
            // product of its own: not shown.
            .filter(|entry| entry.key.kind() != TokenKind::AccessToken(AccessOf::Base))
            .map(|entry| {
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
                    issued_at: slot.token.as_ref().map(Held::issued_at),
                    expires_at: slot.token.as_ref().map(Held::expires_at),
                    state,
                    last_error: slot.last_error.as_ref().map(ToString::to_string),
                }
            })
            .collect();
        infos.sort_by(|a, b| a.key.cmp(&b.key));
        infos
    }

    /// Like [`TokenCache::get`], then a receiver that sees every later token
    /// for the key. Holding the receiver keeps the entry from idle eviction.
    pub async fn watch(
        &self,
        key: &CacheKey,
        min_valid: Duration,
    ) -> Result<(Lookup, watch::Receiver<Option<IdToken>>), CacheError> {
        let lookup = self.get(key, min_valid).await?;
        let entry = self.entry(key)?;
        let mut receiver = lock(&entry.state).watch_id();
        // What the caller already has counts as seen.
        receiver.mark_unchanged();
        Ok((lookup, receiver))
    }

    /// Like [`TokenCache::watch`], for an access-token key.
    pub async fn watch_access(
        &self,
        key: &CacheKey,
        min_valid: Duration,
    ) -> Result<(AccessLookup, watch::Receiver<Option<AccessToken>>), CacheError> {
        let lookup = self.get_access(key, min_valid).await?;
        let entry = self.entry(key)?;
        let mut receiver = lock(&entry.state).watch_access();
        receiver.mark_unchanged();
        Ok((lookup, receiver))
    }

    /// Pins `keys` (kept fresh, never idle-evicted) and fetches each; resolves
    /// when every key holds a valid token. Failed keys keep being retried by
    /// their refresher with backoff, so this waits through an outage.
    pub async fn prefetch(&self, keys: Vec<CacheKey>) {
        let mut pending = Vec::new();
        for key in keys {
            if !self.upstreams().contains_key(key.identity()) {
                continue;
            }
            let entry = match self.entry(&key) {
                Ok(entry) => entry,
                Err(err) => {
                    tracing::warn!(
                        identity = key.identity(),
                        audience = crate::domain::LogText::new(key.audience()).as_str(),
                        error = %err,
                        "cannot prefetch"
                    );
                    continue;
                }
            };
            {
                let mut slot = lock(&entry.state);
                slot.pinned = true;
                if slot.token.is_none() && !slot.fetching {
                    self.start_fetch(&entry, &mut slot, budget::Priority::Background);
                }
            }
            pending.push(async move { token_held(&entry).await });
        }
        for wait in pending {
            wait.await;
        }
    }

    /// Admits `key` into the cache without fetching, unless it is held
    /// already: `gate` is asked first, once, and only for a key not held (a
    /// new audience), atomically with the admission, so concurrent askers
    /// of one new key pass the gate once. A refusal leaves nothing behind.
    /// True when this call admitted the key.
    pub fn admit<E>(
        &self,
        key: &CacheKey,
        gate: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, AdmitError<E>> {
        self.entry_admitted(key, gate)
            .map(|(_, created)| created)
            .map_err(|refusal| match refusal {
                Refusal::Gate(err) => AdmitError::Refused(err),
                Refusal::Full => AdmitError::Cache(self.full()),
            })
    }

    /// The time on the cache's clock, which token expiries are compared
    /// with (a door reporting a token's life left uses the same).
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// The longest `min_valid_for` a request may ask: a fresh token's
    /// usable life, [`GOOGLE_TOKEN_LIFETIME`] less the refresh window. Any
    /// more could never be answered from the cache, so every request would
    /// mint a token.
    pub fn max_min_valid(&self) -> Duration {
        GOOGLE_TOKEN_LIFETIME.saturating_sub(self.inner.settings.refresh_before_expiry)
    }

    /// Whether answering `key` with `min_valid` forces a new token although
    /// one is held that serves callers without it: `Ok(true)` then, so the
    /// server can charge the caller for the mint. A request that joins a
    /// fetch already under way, or whose key holds no usable token, forces
    /// nothing. An error when the held token's whole life is shorter than
    /// `min_valid` (a new one would be no better, so minting is pointless).
    pub fn forces_mint(&self, key: &CacheKey, min_valid: Duration) -> Result<bool, CacheError> {
        if min_valid <= EXPIRY_MARGIN {
            return Ok(false);
        }
        let Some(entry) = self.inner.entries.get(key) else {
            return Ok(false);
        };
        let slot = lock(&entry.state);
        let Some(token) = &slot.token else {
            return Ok(false);
        };
        let left = token.remaining(self.inner.clock.now());
        if left > min_valid || left <= EXPIRY_MARGIN || slot.fetching {
            return Ok(false);
        }
        let lifetime = token
            .expires_at()
            .duration_since(token.issued_at())
            .unwrap_or_default();
        if lifetime <= min_valid {
            return Err(CacheError::TooShortLived {
                wanted: min_valid,
                available: lifetime,
            });
        }
        Ok(true)
    }

    /// The smallest time to expiry among held ID tokens, if any are held.
    pub fn min_time_to_expiry(&self) -> Option<Duration> {
        let now = self.inner.clock.now();
        self.inner
            .entries
            .snapshot()
            .into_iter()
            .filter(|entry| entry.key.kind() == TokenKind::IdToken)
            .filter_map(|entry| lock(&entry.state).token.as_ref().map(|t| t.remaining(now)))
            .min()
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.entries.len() == 0
    }

    /// The entry for `key`, admitted if need be.
    fn entry(&self, key: &CacheKey) -> Result<Arc<Entry>, CacheError> {
        self.entry_admitted(key, || Ok::<(), std::convert::Infallible>(()))
            .map(|(entry, _)| entry)
            .map_err(|_| self.full())
    }

    /// The entry for `key`, and whether this call created it (and queued
    /// its first deadline).
    fn entry_admitted<E>(
        &self,
        key: &CacheKey,
        gate: impl FnOnce() -> Result<(), E>,
    ) -> Result<(Arc<Entry>, bool), Refusal<E>> {
        let (entry, created) = self.inner.entries.get_or_admit(
            key,
            gate,
            || {
                // The identity's name once for all its entries. (The
                // upstreams' lock is taken under the entries' order lock;
                // nothing takes them the other way round.)
                let key = match self.upstreams().get(key.identity()) {
                    Some(upstream) => key.sharing_identity(&upstream.name),
                    None => key.clone(),
                };
                let entry = Arc::new(Entry {
                    key,
                    // Counted as used from creation, so the refresher does
                    // not take a just-admitted entry for an idle one.
                    state: Mutex::new(Slot {
                        last_used: Some(Instant::now()),
                        ..Slot::default()
                    }),
                    attempts: Notify::new(),
                    recency: AtomicU64::new(0),
                });
                // Queued before anyone else can see it, so no eviction can
                // come between and leave a deadline behind.
                self.inner.timers.ensure_task(Arc::downgrade(&self.inner));
                self.schedule(&entry, &mut lock(&entry.state));
                entry
            },
            // Evicted for room: no longer refreshed, released at once.
            |evicted| self.unschedule(evicted),
        )?;
        Ok((entry, created))
    }

    fn full(&self) -> CacheError {
        CacheError::Full {
            max_entries: self.inner.settings.max_entries,
        }
    }

    /// A stale token was served: refresh now unless a refresh is running,
    /// backing off, or deliberately planned later (the same token came back).
    fn refresh_in_background(&self, entry: &Arc<Entry>, slot: &mut Slot) {
        let due = slot
            .refresh_at
            .is_none_or(|at| self.inner.clock.now() >= at);
        if !slot.fetching && due && slot.backoff.ready(Instant::now()) {
            self.start_fetch(entry, slot, budget::Priority::Background);
        }
    }

    /// Starts the one upstream fetch for `entry`; it runs detached from any
    /// caller, so a client that goes away does not cancel it for the others.
    /// Its call waits for the identity's upstream budget first, callers'
    /// fetches (`priority` `Waiting`) ahead of prefetch and refresh.
    fn start_fetch(&self, entry: &Arc<Entry>, slot: &mut Slot, priority: budget::Priority) {
        slot.fetching = true;
        let flight = InFlight {
            cache: self.clone(),
            entry: entry.clone(),
            recorded: false,
        };
        tokio::spawn(async move {
            let result = flight.cache.fetch(&flight.entry.key, priority).await;
            flight.finish(result);
        });
    }

    /// Records one finished upstream attempt (the slot's token, error and
    /// backoff) and publishes a new token to watchers. [`InFlight`] then
    /// ends the attempt and tells everyone waiting.
    fn record(&self, entry: &Entry, result: Result<Held, SourceError>) {
        let settings = &self.inner.settings;
        let now = self.inner.clock.now();
        {
            let mut slot = lock(&entry.state);
            let same = match &result {
                Ok(token) => slot
                    .token
                    .as_ref()
                    .is_some_and(|old| old.same_token_as(token)),
                Err(_) => false,
            };
            // A token that cannot be served (the same one again with no
            // more than the margin left, or one minted with so little life)
            // is a failed attempt: it backs off rather than being asked for
            // again at once.
            let result = result.and_then(|token| {
                let left = token.remaining(now);
                if left > EXPIRY_MARGIN {
                    return Ok(token);
                }
                let upstream = self
                    .source(entry.key.identity())
                    .map(|s| s.upstream().to_owned())
                    .unwrap_or_else(|| format!("identity {:?}", entry.key.identity()));
                let message = if same {
                    format!(
                        "it returned the token it already gave, now with {}s left; the broker serves a token only while more than {}s are left, and the upstream has no fresher one yet",
                        left.as_secs(),
                        EXPIRY_MARGIN.as_secs()
                    )
                } else {
                    format!(
                        "it returned a token with only {}s of life; the broker serves a token only while more than {}s are left",
                        left.as_secs(),
                        EXPIRY_MARGIN.as_secs()
                    )
                };
                Err(SourceError::InvalidResponse { upstream, message })
            });
            match result {
                Ok(token) => {
                    if same {
                        // The metadata server answered from its own cache:
                        // still usable, but not a new token. It ends no
                        // backoff; the next try waits for a new token.
                        tracing::debug!(
                            identity = entry.key.identity(),
                            audience = crate::domain::LogText::new(entry.key.audience()).as_str(),
                            "upstream returned the same token"
                        );
                    } else {
                        slot.publish(&token);
                        slot.backoff.succeeded();
                    }
                    slot.refresh_at = Some(schedule::plan_refresh(
                        token.expires_at(),
                        now,
                        same,
                        settings,
                    ));
                    slot.token = Some(token);
                    slot.last_error = None;
                }
                Err(err) => {
                    if slot.token.is_some() {
                        crate::metrics::get()
                            .refresh_failures
                            .get_or_create(&crate::metrics::IdentityLabels {
                                identity: crate::metrics::identity_label(entry.key.identity()),
                            })
                            .inc();
                    }
                    tracing::warn!(
                        identity = entry.key.identity(),
                        audience = crate::domain::LogText::new(entry.key.audience()).as_str(),
                        error = err.to_string(),
                        "upstream fetch failed"
                    );
                    slot.backoff.failed(
                        Instant::now(),
                        &err,
                        settings.retry_initial,
                        settings.retry_max,
                    );
                    slot.last_error = Some(Box::new(err));
                }
            }
        }
    }

    /// One upstream attempt, bounded by [`ATTEMPT_TIMEOUT`] from the moment
    /// it is asked for, waiting for a free upstream slot included.
    async fn fetch(&self, key: &CacheKey, priority: budget::Priority) -> Result<Held, SourceError> {
        let Some(upstream) = self.upstreams().get(key.identity()).cloned() else {
            // Removed by a reload while this fetch was queued.
            return Err(SourceError::Unavailable {
                upstream: format!("identity {:?}", key.identity()),
                message: "the identity was removed from the configuration".into(),
                retry_after: None,
            });
        };
        // The budget's wait is not part of the attempt's bound: a prefetch of
        // thousands of audiences queues here for as long as it takes.
        upstream.budget.acquire(priority).await;
        let timed_out = |message: String| SourceError::Unavailable {
            upstream: upstream.source.upstream().to_owned(),
            message,
            retry_after: None,
        };
        let deadline = Instant::now() + ATTEMPT_TIMEOUT;
        // The semaphore is never closed, so acquire cannot fail.
        let _permit = tokio::time::timeout_at(deadline, upstream.permits(key.kind()).acquire())
            .await
            .map_err(|_| {
                timed_out(format!(
                    "no upstream call slot came free within {}s (refresh.upstream_concurrency = {} calls are in flight and not finishing)",
                    ATTEMPT_TIMEOUT.as_secs(),
                    self.inner.settings.upstream_concurrency
                ))
            })?;
        let started = Instant::now();
        let source = &upstream.source;
        let call = async {
            match key.kind() {
                TokenKind::IdToken => match key.account() {
                    Some(account) => source.fetch_as(account, key.audience()).await,
                    None => source.fetch(key.audience()).await,
                }
                .map(|mut token| {
                    // The entry holds the audience once: in its key.
                    token.share_audience(key.shared_target());
                    Held::Id(token)
                }),
                TokenKind::AccessToken(of) => {
                    let fetcher = match of {
                        AccessOf::Identity => source.access(),
                        AccessOf::Base => source.base_access(),
                    };
                    let Some(fetcher) = fetcher else {
                        return Err(SourceError::InvalidResponse {
                            upstream: source.upstream().to_owned(),
                            message: format!(
                                "identity {:?} cannot mint access tokens",
                                key.identity()
                            ),
                        });
                    };
                    match key.account() {
                        Some(account) => fetcher.fetch_access_as(account, key.audience()).await,
                        None => fetcher.fetch_access(key.audience()).await,
                    }
                    .map(Held::Access)
                }
            }
        };
        let result = tokio::time::timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| {
                Err(timed_out(format!(
                    "no answer within {}s",
                    ATTEMPT_TIMEOUT.as_secs()
                )))
            });
        let metrics = crate::metrics::get();
        let source = upstream.source.kind().as_str();
        metrics
            .upstream_duration
            .get_or_create(&crate::metrics::SourceLabels {
                identity: crate::metrics::identity_label(key.identity()),
                source,
            })
            .observe(started.elapsed().as_secs_f64());
        metrics
            .upstream_requests
            .get_or_create(&crate::metrics::UpstreamLabels {
                identity: crate::metrics::identity_label(key.identity()),
                source,
                outcome: match &result {
                    Ok(_) => "ok",
                    Err(SourceError::Rejected { .. }) => "rejected",
                    Err(SourceError::Unavailable { .. }) => "unavailable",
                    Err(_) => "invalid_response",
                },
            })
            .inc();
        tracing::debug!(
            identity = key.identity(),
            audience = crate::domain::LogText::new(key.audience()).as_str(),
            upstream = upstream.source.upstream(),
            ok = result.is_ok(),
            latency_ms = started.elapsed().as_millis() as u64,
            "upstream call"
        );
        result
    }

    /// Why a caller asking for `min_valid` (its own `min_valid_for`, zero
    /// when it sent none) gets no token now.
    fn failure(&self, slot: &Slot, min_valid: Duration) -> CacheError {
        let left = slot
            .token
            .as_ref()
            .map_or(Duration::ZERO, |t| t.remaining(self.inner.clock.now()));
        match &slot.last_error {
            Some(err) => CacheError::Upstream(SourceError::clone(err)),
            None if min_valid > EXPIRY_MARGIN && left > EXPIRY_MARGIN => {
                CacheError::TooShortLived {
                    wanted: min_valid,
                    available: left,
                }
            }
            None => CacheError::NoFreshToken {
                left,
                retry_in: slot.backoff.retry_at().map_or(Duration::ZERO, |at| {
                    at.saturating_duration_since(Instant::now())
                }),
            },
        }
    }
}

/// One upstream attempt under way for an entry. However the attempt ends
/// (an answer, a panic in the source or in recording, the runtime shutting
/// down), dropping this clears `fetching`, bumps the generation and wakes
/// waiters and the refresher, so no bug can wedge a key.
struct InFlight {
    cache: TokenCache,
    entry: Arc<Entry>,
    recorded: bool,
}

impl InFlight {
    fn finish(mut self, result: Result<Held, SourceError>) {
        self.recorded = true;
        self.cache.record(&self.entry, result);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.recorded {
            // A panic under the fetch (a bug), or the runtime dropping the
            // task as the broker stops.
            tracing::warn!(
                identity = self.entry.key.identity(),
                audience = crate::domain::LogText::new(self.entry.key.audience()).as_str(),
                "an upstream fetch ended without an answer (it panicked, or the broker is stopping); the key backs off and retries"
            );
            let upstream = self
                .cache
                .source(self.entry.key.identity())
                .map(|s| s.upstream().to_owned())
                .unwrap_or_else(|| format!("identity {:?}", self.entry.key.identity()));
            self.recorded = true;
            self.cache.record(
                &self.entry,
                Err(SourceError::Unavailable {
                    upstream,
                    message: "the fetch ended without an answer (an internal error; see the broker's log)".into(),
                    retry_after: None,
                }),
            );
        }
        // Asked before the slot is taken (lock order: map, then slot). An
        // entry a reload dropped while it fetched is not queued again.
        let held = self.cache.inner.entries.holds(&self.entry);
        {
            let mut slot = lock(&self.entry.state);
            slot.fetching = false;
            slot.generation += 1;
            if held {
                self.cache.schedule(&self.entry, &mut slot);
            }
        }
        self.entry.attempts.notify_waiters();
    }
}

/// Waits until an upstream attempt after generation `seen` of `entry` has
/// completed.
async fn attempt_after(entry: &Entry, seen: u64) {
    loop {
        // Registered before the check, so a completion between the check
        // and the wait is not missed.
        let done = entry.attempts.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if lock(&entry.state).generation > seen {
            return;
        }
        done.await;
    }
}

/// Waits until `entry` holds a token (a prefetch's first).
async fn token_held(entry: &Entry) {
    loop {
        let done = entry.attempts.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if lock(&entry.state).token.is_some() {
            return;
        }
        done.await;
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

/// The cache as the source layer's [`AccessTokens`]: what an identity built
/// on others presents as its bearer. Holds the cache weakly, as the sources
/// holding it live in the cache.
struct EngineAccess(std::sync::Weak<Inner>);

impl AccessTokens for EngineAccess {
    fn access_token<'a>(
        &'a self,
        identity: &'a str,
        of: AccessOf,
        scopes: &'a str,
    ) -> AccessFuture<'a> {
        Box::pin(async move {
            let engine = |message: String| SourceError::Unavailable {
                upstream: "the broker's token cache".into(),
                message,
                retry_after: None,
            };
            let Some(inner) = self.0.upgrade() else {
                return Err(engine("the broker is stopping".into()));
            };
            let cache = TokenCache { inner };
            let key = CacheKey::access(identity, of, scopes).map_err(engine)?;
            match cache.access_lookup(&key, Duration::ZERO, false).await {
                Ok(lookup) => Ok(lookup.token),
                Err(CacheError::Upstream(err)) => Err(err),
                Err(err) => Err(engine(err.to_string())),
            }
        })
    }

    fn invalidate(&self, identity: &str, of: AccessOf, scopes: &str, refused: &AccessToken) {
        let (Some(inner), Ok(key)) = (self.0.upgrade(), CacheKey::access(identity, of, scopes))
        else {
            return;
        };
        TokenCache { inner }.invalidate(&key, refused);
    }
}
