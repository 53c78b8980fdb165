//! Access tokens of base credentials (PROTOCOLS.md §4): what an identity
//! built on another one (impersonation) presents to Google as `Authorization:
//! Bearer`. They are never shown to clients.
//!
//! [`AccessTokenCache`] holds one token per scope set with the cache's rules:
//! one upstream fetch at a time per scope set (callers arriving meanwhile
//! share its result), a refresh started in the background once the token
//! enters its last [`REFRESH_BEFORE_EXPIRY`], and after a failure callers get
//! the last error at once until the backoff has passed. A token an upstream
//! refused (HTTP 401) is dropped with [`AccessTokenCache::invalidate`], once,
//! however many callers saw it refused.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::SourceError;
use crate::{clock::Clock, token::Secret};

/// The scope IAM Credentials and STS need; the only one the broker asks for.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// A token with less life than this is stale: served, while a refresh runs.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// A token with less life than this is not handed out (clock skew, latency).
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// An OAuth2 access token. `Debug` shows only its expiry.
#[derive(Clone)]
pub struct AccessToken {
    secret: Arc<Secret>,
    expires_at: SystemTime,
}

impl AccessToken {
    pub fn new(token: String, expires_at: SystemTime) -> Self {
        Self {
            secret: Arc::new(Secret::new(token)),
            expires_at,
        }
    }

    /// The token text, for the one `Authorization` header it goes into.
    pub fn expose(&self) -> &str {
        self.secret.expose()
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at.duration_since(now).unwrap_or_default()
    }

    fn same_as(&self, other: &AccessToken) -> bool {
        self.secret.expose() == other.secret.expose()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The future an [`AccessFetcher`] returns.
pub type AccessFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AccessToken, SourceError>> + Send + 'a>>;

/// Makes the upstream call for one access token (with the source's own
/// bounded retries); [`AccessTokenCache`] decides when.
pub trait AccessFetcher: Send + Sync + 'static {
    /// `scopes` is space-separated.
    fn fetch_access<'a>(&'a self, scopes: &'a str) -> AccessFuture<'a>;
}

/// Access tokens of one credential, keyed by scope set.
pub struct AccessTokenCache {
    fetcher: Arc<dyn AccessFetcher>,
    clock: Clock,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

struct Slot {
    scopes: String,
    /// Held by the task fetching; others queue on it and then find the
    /// result in `state` (generation moved) instead of fetching again.
    flight: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    token: Option<AccessToken>,
    last_error: Option<SourceError>,
    /// Completed upstream attempts.
    generation: u64,
    failures: u32,
    retry_at: Option<Instant>,
    refreshing: bool,
}

impl AccessTokenCache {
    pub fn new(fetcher: Arc<dyn AccessFetcher>, clock: Clock) -> Self {
        Self {
            fetcher,
            clock,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A token for `scopes` (space-separated) with more than
    /// [`EXPIRY_MARGIN`] of life left.
    pub async fn get(&self, scopes: &str) -> Result<AccessToken, SourceError> {
        let slot = self.slot(scopes);
        let seen = {
            let mut state = lock(&slot.state);
            if let Some(token) = self.usable(&state) {
                if token.remaining(self.clock.now()) <= REFRESH_BEFORE_EXPIRY && !state.refreshing {
                    state.refreshing = true;
                    self.refresh_in_background(slot.clone());
                }
                return Ok(token);
            }
            if let (Some(err), Some(at)) = (&state.last_error, state.retry_at) {
                if Instant::now() < at {
                    return Err(err.clone());
                }
            }
            state.generation
        };
        let flight = slot.flight.clone().lock_owned().await;
        {
            let state = lock(&slot.state);
            if state.generation != seen {
                // Someone else's fetch completed while we queued: its answer
                // is ours, good or bad.
                if let Some(token) = self.usable(&state) {
                    return Ok(token);
                }
                if let Some(err) = &state.last_error {
                    return Err(err.clone());
                }
            }
        }
        // The fetch runs in its own task holding the flight, so a caller
        // that gives up (the cache bounds each attempt) does not cancel it:
        // its token is there for the next one.
        let fetcher = self.fetcher.clone();
        let clock = self.clock.clone();
        let task = tokio::spawn(async move {
            let _flight = flight;
            Self::fetch_into(&*fetcher, &slot, &clock).await
        });
        task.await.unwrap_or_else(|e| {
            Err(SourceError::InvalidResponse {
                upstream: "access token fetch".into(),
                message: format!("the fetch task failed: {e}"),
            })
        })
    }

    /// Drops `refused` if it is still the token held for `scopes`, so the
    /// next [`AccessTokenCache::get`] fetches a new one. Callers that saw
    /// the same token refused drop it once between them.
    pub fn invalidate(&self, scopes: &str, refused: &AccessToken) {
        let slot = self.slot(scopes);
        let mut state = lock(&slot.state);
        if state.token.as_ref().is_some_and(|t| t.same_as(refused)) {
            state.token = None;
            tracing::debug!(scopes, "access token refused upstream; dropped");
        }
    }

    /// Every held token is dropped (a reload of something it was built on).
    pub fn clear(&self) {
        lock_map(&self.slots).clear();
    }

    fn usable(&self, state: &State) -> Option<AccessToken> {
        state
            .token
            .as_ref()
            .filter(|t| t.remaining(self.clock.now()) > EXPIRY_MARGIN)
            .cloned()
    }

    fn slot(&self, scopes: &str) -> Arc<Slot> {
        lock_map(&self.slots)
            .entry(scopes.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    scopes: scopes.to_owned(),
                    flight: Arc::new(tokio::sync::Mutex::new(())),
                    state: Mutex::new(State::default()),
                })
            })
            .clone()
    }

    fn refresh_in_background(&self, slot: Arc<Slot>) {
        let fetcher = self.fetcher.clone();
        let clock = self.clock.clone();
        tokio::spawn(async move {
            let _flight = slot.flight.clone().lock_owned().await;
            let due = {
                let state = lock(&slot.state);
                state
                    .token
                    .as_ref()
                    .is_none_or(|t| t.remaining(clock.now()) <= REFRESH_BEFORE_EXPIRY)
            };
            if due {
                let _ = Self::fetch_into(&*fetcher, &slot, &clock).await;
            }
            lock(&slot.state).refreshing = false;
        });
    }

    /// One upstream attempt; the caller holds the slot's flight lock.
    async fn fetch_into(
        fetcher: &dyn AccessFetcher,
        slot: &Slot,
        clock: &Clock,
    ) -> Result<AccessToken, SourceError> {
        let result = fetcher.fetch_access(&slot.scopes).await;
        let mut state = lock(&slot.state);
        state.generation += 1;
        match &result {
            Ok(token) => {
                state.token = Some(token.clone());
                state.last_error = None;
                state.failures = 0;
                state.retry_at = None;
                if token.remaining(clock.now()) <= EXPIRY_MARGIN {
                    // Nothing usable came back; say so instead of looping.
                    return Err(SourceError::InvalidResponse {
                        upstream: "access token".into(),
                        message: "the access token expires within a minute of being issued".into(),
                    });
                }
            }
            Err(err) => {
                state.failures = state.failures.saturating_add(1);
                let wait = if err.is_permanent() {
                    BACKOFF_MAX
                } else {
                    BACKOFF_INITIAL
                        .saturating_mul(2u32.saturating_pow(state.failures.min(16) - 1))
                        .min(BACKOFF_MAX)
                };
                state.retry_at = Some(Instant::now() + wait);
                state.last_error = Some(err.clone());
            }
        }
        result
    }
}

fn lock(mutex: &Mutex<State>) -> MutexGuard<'_, State> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_map(
    mutex: &Mutex<HashMap<String, Arc<Slot>>>,
) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a `{"access_token", "expires_in"}` answer (metadata server, OAuth
/// token endpoint, STS).
pub(crate) fn parse_oauth_access_token(
    body: &[u8],
    now: SystemTime,
) -> Result<AccessToken, String> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
        return Err("the answer is not a JSON object".into());
    };
    let token = fields
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("no `access_token` in the answer")?;
    let expires_in = fields
        .get("expires_in")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .ok_or("no numeric `expires_in` in the answer")?;
    Ok(AccessToken::new(
        token.to_owned(),
        now + Duration::from_secs(expires_in),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    struct Counting {
        calls: AtomicU32,
        lifetime: Duration,
        fail: Mutex<Option<SourceError>>,
        clock: Clock,
    }

    impl AccessFetcher for Counting {
        fn fetch_access<'a>(&'a self, _scopes: &'a str) -> AccessFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(err) = self.fail.lock().unwrap().clone() {
                    return Err(err);
                }
                Ok(AccessToken::new(
                    format!("token-{n}"),
                    self.clock.now() + self.lifetime,
                ))
            })
        }
    }

    fn setup() -> (Arc<Counting>, Arc<AccessTokenCache>) {
        let clock = Clock::tokio();
        let fetcher = Arc::new(Counting {
            calls: AtomicU32::new(0),
            lifetime: Duration::from_secs(3600),
            fail: Mutex::new(None),
            clock: clock.clone(),
        });
        let cache = Arc::new(AccessTokenCache::new(fetcher.clone(), clock));
        (fetcher, cache)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch_and_a_refusal_drops_it_once() {
        let (fetcher, cache) = setup();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(CLOUD_PLATFORM_SCOPE).await })
            })
            .collect();
        let mut tokens = Vec::new();
        for task in tasks {
            tokens.push(task.await.unwrap().unwrap());
        }
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 1);
        assert!(tokens.iter().all(|t| t.expose() == "token-1"));

        // Fifty callers saw token-1 refused: it is dropped once, fetched once.
        for token in &tokens {
            cache.invalidate(CLOUD_PLATFORM_SCOPE, token);
        }
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(CLOUD_PLATFORM_SCOPE).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().expose(), "token-2");
        }
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_tokens_are_served_while_one_background_refresh_runs() {
        let (fetcher, cache) = setup();
        assert_eq!(cache.get("s").await.unwrap().expose(), "token-1");
        tokio::time::advance(Duration::from_secs(3600 - 200)).await;
        // Inside the refresh window: still token-1, and a refresh starts.
        assert_eq!(cache.get("s").await.unwrap().expose(), "token-1");
        assert_eq!(cache.get("s").await.unwrap().expose(), "token-1");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.get("s").await.unwrap().expose(), "token-2");
        // Other scopes are another key.
        assert_eq!(cache.get("other").await.unwrap().expose(), "token-3");
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_is_refetched_once_for_all_callers() {
        let (fetcher, cache) = setup();
        cache.get("s").await.unwrap();
        // Past the background-refresh window and into the expiry margin
        // without anyone asking: the next askers must wait for a new one.
        tokio::time::advance(Duration::from_secs(3600 - 30)).await;
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get("s").await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().expose(), "token-2");
        }
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_giving_up_does_not_cancel_the_fetch() {
        let (fetcher, cache) = setup();
        // The fetch takes 50 ms; this caller waits 10.
        let gave_up = tokio::time::timeout(Duration::from_millis(10), cache.get("s")).await;
        assert!(gave_up.is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(cache.get("s").await.unwrap().expose(), "token-1");
        assert_eq!(
            fetcher.calls.load(Ordering::SeqCst),
            1,
            "the first fetch finished"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_answer_the_last_error() {
        let (fetcher, cache) = setup();
        *fetcher.fail.lock().unwrap() = Some(SourceError::Unavailable {
            upstream: "up".into(),
            message: "boom".into(),
            retry_after: None,
        });
        assert!(cache.get("s").await.is_err());
        assert!(cache.get("s").await.is_err());
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 1, "backing off");
        *fetcher.fail.lock().unwrap() = None;
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get("s").await.is_ok());
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
    }
}
