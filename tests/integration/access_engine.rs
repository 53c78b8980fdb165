//! Issue 13.1: access tokens (the bearers of identities built on others) are
//! held by the same cache engine as ID tokens, keyed by (identity, scope
//! set): one fetch shared by every asker, a refusal dropping a token once,
//! background refresh before they turn stale, backoff after a failure, and
//! a caller that gives up not cancelling the fetch. Paused time; the
//! upstream is the emulator's token endpoint over real HTTP (the
//! service-account key's jwt-bearer grant with a `scope`).

use std::{sync::Arc, time::Duration};

use token_broker::{
    cache::{CacheKey, CacheOutcome, TokenCache},
    config::RefreshSettings,
    emulator::{Emulator, Faults},
    source::{
        access::{AccessOf, AccessTokens, CLOUD_PLATFORM_SCOPE},
        IdTokenSource, ServiceAccountKey, ServiceAccountSource, SourceError,
    },
};

struct Engine {
    emulator: Emulator,
    cache: TokenCache,
    _dir: tempfile::TempDir,
}

async fn engine() -> Engine {
    let (clock, emulator) = crate::support::emulator_on_tokio_clock().await;
    let dir = crate::support::workdir();
    let email = "sa@proj.iam.gserviceaccount.com";
    let (path, _) = crate::support::key_file(dir.path(), "sa", email, &emulator, true);
    let key = ServiceAccountKey::load(&path, false).unwrap();
    let source = ServiceAccountSource::new(key, clock.clone()).unwrap();
    let cache = TokenCache::new(
        [("sa".to_owned(), Arc::new(source) as Arc<dyn IdTokenSource>)],
        RefreshSettings::default(),
        clock,
    );
    Engine {
        emulator,
        cache,
        _dir: dir,
    }
}

fn access_key() -> CacheKey {
    CacheKey::access("sa", AccessOf::Identity, CLOUD_PLATFORM_SCOPE).unwrap()
}

/// Lets the refresher and fetch tasks run at the current instant.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Access tokens the token endpoint issued.
fn fetches(e: &Engine) -> u64 {
    e.emulator.stats().token_access
}

/// Every call the token endpoint answered, failures included.
fn calls(e: &Engine) -> u64 {
    e.emulator.stats().token.total
}

#[tokio::test(start_paused = true)]
async fn fifty_cold_askers_share_one_fetch_and_fifty_refusals_drop_it_once() {
    let e = engine().await;
    let tokens: Arc<dyn AccessTokens> = e.cache.access_tokens();
    let ask = || {
        let tokens = tokens.clone();
        tokio::spawn(async move {
            tokens
                .access_token("sa", AccessOf::Identity, CLOUD_PLATFORM_SCOPE)
                .await
        })
    };
    let first: Vec<_> = (0..50).map(|_| ask()).collect();
    let mut seen = Vec::new();
    for task in first {
        seen.push(task.await.unwrap().unwrap());
    }
    assert_eq!(fetches(&e), 1, "one upstream call for fifty cold askers");
    assert!(seen.iter().all(|t| t.same_token_as(&seen[0])));

    // Fifty bearers saw the same token refused (HTTP 401): dropped once,
    // fetched once.
    for token in &seen {
        tokens.invalidate("sa", AccessOf::Identity, CLOUD_PLATFORM_SCOPE, token);
    }
    let second: Vec<_> = (0..50).map(|_| ask()).collect();
    let mut renewed = Vec::new();
    for task in second {
        renewed.push(task.await.unwrap().unwrap());
    }
    assert_eq!(fetches(&e), 2, "one refetch, not one per refusal");
    assert!(renewed.iter().all(|t| t.same_token_as(&renewed[0])));
    assert!(!renewed[0].same_token_as(&seen[0]), "a new token");

    // Refusing the old token again (a late 401) drops nothing.
    tokens.invalidate("sa", AccessOf::Identity, CLOUD_PLATFORM_SCOPE, &seen[0]);
    let again = e
        .cache
        .get_access(&access_key(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(again.outcome, CacheOutcome::Hit);
    assert!(again.token.same_token_as(&renewed[0]));
    assert_eq!(fetches(&e), 2);
}

#[tokio::test(start_paused = true)]
async fn scope_sets_in_any_order_are_one_entry_and_other_sets_another() {
    let e = engine().await;
    let a = CacheKey::access("sa", AccessOf::Identity, "scope-b scope-a").unwrap();
    let b = CacheKey::access("sa", AccessOf::Identity, "scope-a scope-b scope-a").unwrap();
    let t1 = e.cache.get_access(&a, Duration::ZERO).await.unwrap();
    let t2 = e.cache.get_access(&b, Duration::ZERO).await.unwrap();
    assert_eq!(t1.outcome, CacheOutcome::Miss);
    assert_eq!(t2.outcome, CacheOutcome::Hit);
    assert!(t1.token.same_token_as(&t2.token));
    assert_eq!(fetches(&e), 1);
    let other = e
        .cache
        .get_access(&access_key(), Duration::ZERO)
        .await
        .unwrap();
    assert!(!other.token.same_token_as(&t1.token));
    assert_eq!(fetches(&e), 2);
}

#[tokio::test(start_paused = true)]
async fn access_tokens_are_refreshed_in_the_background_before_they_turn_stale() {
    let e = engine().await;
    let first = e
        .cache
        .get_access(&access_key(), Duration::ZERO)
        .await
        .unwrap();
    // The emulator's access tokens live 3599 s; the refresh is planned
    // 15 min (+ up to 2 min jitter) before expiry. Past that point, with
    // nobody asking, the refresher has fetched a new one.
    tokio::time::advance(Duration::from_secs(3599 - 15 * 60 + 1)).await;
    settle().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fetches(&e), 2, "one background refresh");
    let later = e
        .cache
        .get_access(&access_key(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(later.outcome, CacheOutcome::Hit);
    assert!(!later.token.same_token_as(&first.token));
}

#[tokio::test(start_paused = true)]
async fn a_failed_fetch_backs_off_and_answers_its_error_at_once() {
    let e = engine().await;
    e.emulator.set_faults(Faults {
        status: Some(503),
        endpoint: Some("token".into()),
        ..Faults::default()
    });
    let tokens = e.cache.access_tokens();
    let err = tokens
        .access_token("sa", AccessOf::Identity, CLOUD_PLATFORM_SCOPE)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SourceError::Unavailable { upstream, .. } if upstream.contains("token endpoint")),
        "{err}"
    );
    assert_eq!(calls(&e), 1);
    // Backing off: the last error at once, no second call.
    let again = tokens
        .access_token("sa", AccessOf::Identity, CLOUD_PLATFORM_SCOPE)
        .await
        .unwrap_err();
    assert_eq!(again, err);
    assert_eq!(calls(&e), 1, "no call while backing off");

    e.emulator.clear_faults();
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    let token = tokens
        .access_token("sa", AccessOf::Identity, CLOUD_PLATFORM_SCOPE)
        .await;
    assert!(token.is_ok(), "{token:?}");
    assert_eq!(calls(&e), 2, "one retry after the backoff");
}

#[tokio::test(start_paused = true)]
async fn a_caller_giving_up_does_not_cancel_the_fetch() {
    let e = engine().await;
    e.emulator.set_faults(Faults {
        delay_ms: Some(5_000),
        endpoint: Some("token".into()),
        ..Faults::default()
    });
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        e.cache.get_access(&access_key(), Duration::ZERO),
    )
    .await;
    assert!(gave_up.is_err(), "the caller timed out");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lookup = e
        .cache
        .get_access(&access_key(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        lookup.outcome,
        CacheOutcome::Hit,
        "the first fetch finished"
    );
    assert_eq!(fetches(&e), 1);
}

#[tokio::test(start_paused = true)]
async fn access_entries_share_the_bounds_and_leave_with_their_identity() {
    let e = engine().await;
    let id = CacheKey::new("sa", "https://svc.example.com").unwrap();
    let base = CacheKey::access("sa", AccessOf::Base, CLOUD_PLATFORM_SCOPE).unwrap();
    e.cache.get(&id, Duration::ZERO).await.unwrap();
    e.cache
        .get_access(&access_key(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(e.cache.len(), 2, "both kinds count against max_entries");
    // A key source has no credential under it: nothing to fetch.
    assert!(e.cache.get_access(&base, Duration::ZERO).await.is_err());
    assert_eq!(e.cache.len(), 3);
    let listed: Vec<CacheKey> = e.cache.list().into_iter().map(|i| i.key).collect();
    assert_eq!(
        listed,
        [id.clone(), access_key()],
        "internal base entries are not shown"
    );
    // An ID-token key and an access-token key never answer for each other.
    assert!(e.cache.get_access(&id, Duration::ZERO).await.is_err());
    assert!(e.cache.get(&access_key(), Duration::ZERO).await.is_err());
    e.cache.remove_identity("sa");
    assert_eq!(e.cache.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn idle_access_tokens_are_evicted_like_id_tokens() {
    let e = engine().await;
    e.cache
        .get_access(&access_key(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(e.cache.len(), 1);
    // idle_evict_after is 24 h by default; the refresher keeps renewing the
    // token meanwhile, then drops the entry nobody asked for.
    for _ in 0..25 {
        tokio::time::advance(Duration::from_secs(3600)).await;
        settle().await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(e.cache.len(), 0);
}
