//! Issue 4: the cache engine under controlled time. The cache and the
//! emulator share one `Clock::tokio()` in a paused-time runtime, so hours of
//! token lifecycle run in milliseconds with no sleeps on the wall clock;
//! upstream calls still go over real HTTP to the emulator.

use std::{sync::Arc, time::Duration};

use rand::{Rng, SeedableRng};
use token_broker::{
    cache::{CacheError, CacheKey, CacheOutcome, TokenCache},
    clock::Clock,
    config::RefreshSettings,
    emulator::{Emulator, Faults},
    source::{IdTokenSource, MetadataSource, ServiceAccountKey, ServiceAccountSource},
};

const MIN: Duration = Duration::from_secs(60);

struct Engine {
    emulator: Emulator,
    cache: TokenCache,
    clock: Clock,
}

async fn engine(settings: RefreshSettings) -> Engine {
    let (clock, emulator) = crate::support::emulator_on_tokio_clock().await;
    let source = MetadataSource::new(&emulator.metadata_host(), clock.clone()).unwrap();
    let cache = TokenCache::new(
        [(
            "default".to_owned(),
            Arc::new(source) as Arc<dyn IdTokenSource>,
        )],
        settings,
        clock.clone(),
    );
    Engine {
        emulator,
        cache,
        clock,
    }
}

fn key(audience: &str) -> CacheKey {
    CacheKey::new("default", audience).unwrap()
}

/// Lets the refresher and fetch tasks run at the current instant.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_cold_requests_make_one_upstream_call() {
    let e = engine(RefreshSettings::default()).await;
    let k = key("https://cold.example.com");
    let calls: Vec<_> = (0..1000)
        .map(|_| {
            let cache = e.cache.clone();
            let k = k.clone();
            tokio::spawn(async move { cache.get(&k, Duration::ZERO).await })
        })
        .collect();
    let mut outcomes = std::collections::HashMap::new();
    let mut tokens = std::collections::HashSet::new();
    for call in calls {
        let lookup = call.await.unwrap().unwrap();
        tokens.insert(lookup.token.expose().to_owned());
        *outcomes.entry(lookup.outcome).or_insert(0) += 1;
    }
    assert_eq!(e.emulator.stats().identity.total, 1);
    assert_eq!(tokens.len(), 1, "everyone got the one token");
    assert_eq!(outcomes.get(&CacheOutcome::Miss), Some(&1), "{outcomes:?}");
}

#[tokio::test(start_paused = true)]
async fn three_hours_of_requests_every_second_always_get_a_fresh_token() {
    let settings = RefreshSettings::default();
    let (window, jitter) = (settings.refresh_before_expiry, settings.jitter);
    let e = engine(settings).await;
    let k = key("https://steady.example.com");
    let mut least = Duration::MAX;
    for _ in 0..3 * 3600 {
        let lookup = e.cache.get(&k, Duration::ZERO).await.unwrap();
        least = least.min(lookup.token.remaining(e.clock.now()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        least >= window - jitter,
        "a client got a token with only {least:?} left"
    );
    // One call at the start, then one per (lifetime - window - jitter share).
    let calls = e.emulator.stats().identity.total as i64;
    let expected = (3 * 60 / (60 - 15)) as i64;
    assert!(
        (calls - expected).abs() <= 1,
        "{calls} upstream calls, expected {expected}±1"
    );
}

#[tokio::test(start_paused = true)]
async fn a_two_hour_outage_serves_the_cached_token_until_expiry_then_recovers() {
    let settings = RefreshSettings::default();
    let (initial, max) = (settings.retry_initial, settings.retry_max);
    let e = engine(settings).await;
    let k = key("https://outage.example.com");
    let token = e.cache.get(&k, Duration::ZERO).await.unwrap().token;
    e.emulator.set_faults(Faults {
        status: Some(503),
        ..Faults::default()
    });
    let outage = 2 * 3600;
    let mut served_until = None;
    let mut first_unavailable = None;
    for second in 0..outage {
        match e.cache.get(&k, Duration::ZERO).await {
            Ok(lookup) => {
                assert!(lookup.token.same_token_as(&token));
                assert!(first_unavailable.is_none(), "served again after refusing");
                served_until = Some(second);
            }
            Err(CacheError::Upstream(err)) => {
                assert!(err.to_string().contains("503"), "{err}");
                first_unavailable.get_or_insert(second);
            }
            Err(other) => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Served until under 30 s were left, then UNAVAILABLE with the last error.
    let served_until = served_until.unwrap() as u64;
    assert!(
        (3600 - 31..3600 - 29).contains(&served_until),
        "served until {served_until}s"
    );
    assert_eq!(first_unavailable.unwrap() as u64, served_until + 1);
    // Attempts follow the backoff: from the first stale refresh at about 45m
    // to the end, each wait is at least retry_initial and grows to retry_max.
    let attempts = e.emulator.stats().identity.total - 1;
    let failing_for = outage as u64 - (45 * 60 - 2 * 60);
    assert!(
        attempts >= failing_for / max.as_secs(),
        "too few attempts: {attempts}"
    );
    assert!(
        attempts <= failing_for / 10 + 10,
        "backoff not respected: {attempts} attempts in {failing_for}s"
    );
    assert!(initial <= max);
    // Recovery: the next attempt after the outage succeeds within retry_max.
    e.emulator.clear_faults();
    let mut waited = Duration::ZERO;
    loop {
        if e.cache.get(&k, Duration::ZERO).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += Duration::from_secs(1);
        assert!(
            waited <= max + Duration::from_secs(1),
            "no recovery within retry_max"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_same_token_from_the_metadata_servers_own_cache_causes_no_spin() {
    let e = engine(RefreshSettings::default()).await;
    // GCE answers its cached token until 5 minutes before expiry.
    e.emulator.set_faults(Faults {
        metadata_cache_secs: Some(300),
        ..Faults::default()
    });
    let k = key("https://same-token.example.com");
    let mut distinct = std::collections::HashSet::new();
    for _ in 0..3 * 3600 {
        let lookup = e.cache.get(&k, Duration::ZERO).await.unwrap();
        assert!(lookup.token.remaining(e.clock.now()) > Duration::from_secs(30));
        distinct.insert(lookup.token.expose().to_owned());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let calls = e.emulator.stats().identity.total;
    // Per token: one early refresh that gets the same token, halving waits
    // until the server has a new one: a handful of calls per hour, not a loop.
    assert!(calls <= 4 * 4, "{calls} upstream calls in 3h: spinning");
    assert!(
        distinct.len() >= 3,
        "new tokens were still obtained: {}",
        distinct.len()
    );
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_dropped_and_max_entries_evicts_least_recently_used() {
    let e = engine(RefreshSettings {
        idle_evict_after: Duration::from_secs(3600),
        max_entries: 3,
        ..RefreshSettings::default()
    })
    .await;
    for i in 0..5 {
        e.cache
            .get(
                &key(&format!("https://lru-{i}.example.com")),
                Duration::ZERO,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let held: Vec<String> = e
        .cache
        .list()
        .into_iter()
        .map(|i| i.key.audience().to_owned())
        .collect();
    assert_eq!(
        held,
        [
            "https://lru-2.example.com",
            "https://lru-3.example.com",
            "https://lru-4.example.com"
        ]
    );
    // Nobody asks for an hour: every entry goes, and refreshing stops.
    tokio::time::sleep(61 * MIN).await;
    settle().await;
    assert!(e.cache.is_empty(), "{:?}", e.cache.list().len());
    let calls = e.emulator.stats().identity.total;
    tokio::time::sleep(180 * MIN).await;
    assert_eq!(
        e.emulator.stats().identity.total,
        calls,
        "no refresh of dropped keys"
    );
}

#[tokio::test(start_paused = true)]
async fn prefetched_audiences_are_served_without_waiting_and_kept_fresh() {
    let e = engine(RefreshSettings {
        idle_evict_after: Duration::from_secs(3600),
        ..RefreshSettings::default()
    })
    .await;
    let keys: Vec<_> = (0..5)
        .map(|i| key(&format!("https://pre-{i}.example.com")))
        .collect();
    e.cache.prefetch(keys.clone()).await;
    assert_eq!(e.emulator.stats().identity.total, 5);
    for k in &keys {
        let lookup = e.cache.get(k, Duration::ZERO).await.unwrap();
        assert_eq!(lookup.outcome, CacheOutcome::Hit);
    }
    // Pinned: kept fresh past idle_evict_after with nobody asking.
    tokio::time::sleep(3 * 60 * MIN).await;
    for k in &keys {
        let lookup = e.cache.get(k, Duration::ZERO).await.unwrap();
        assert_eq!(lookup.outcome, CacheOutcome::Hit);
        assert!(lookup.token.remaining(e.clock.now()) > 13 * MIN);
    }
    // Kept fresh by the refresher alone: about four refreshes each in 3h.
    let calls = e.emulator.stats().identity.total;
    assert!(
        (5 + 5 * 3..=5 + 5 * 4).contains(&calls),
        "{calls} upstream calls"
    );
}

#[tokio::test(start_paused = true)]
async fn a_watch_sees_each_refresh_and_keeps_its_key_until_released() {
    let e = engine(RefreshSettings {
        idle_evict_after: Duration::from_secs(3600),
        ..RefreshSettings::default()
    })
    .await;
    let k = key("https://watched.example.com");
    let (first, mut updates) = e.cache.watch(&k, Duration::ZERO).await.unwrap();
    for _ in 0..3 {
        updates.changed().await.unwrap();
        let next = updates.borrow_and_update().clone().unwrap();
        assert!(!next.same_token_as(&first.token));
        assert!(next.expires_at() > first.token.expires_at());
        assert_eq!(next.audience(), "https://watched.example.com");
    }
    // Three refreshes in, far past idle_evict_after: the watch kept it alive.
    assert_eq!(e.cache.len(), 1);
    drop(updates);
    tokio::time::sleep(61 * MIN).await;
    settle().await;
    assert!(e.cache.is_empty(), "released after the watcher left");
}

/// The watch channel exists only while someone watches (issue 16: an entry
/// holds its token once). A watcher that comes after the first one left,
/// and after a refresh nobody watched, still sees every refresh, as does a
/// second watcher beside it.
#[tokio::test(start_paused = true)]
async fn a_watch_after_the_last_watcher_left_sees_each_refresh() {
    let e = engine(RefreshSettings::default()).await;
    let k = key("https://rewatched.example.com");
    let (_, first) = e.cache.watch(&k, Duration::ZERO).await.unwrap();
    drop(first);
    // A refresh (at 43-45 minutes) with nobody watching.
    tokio::time::sleep(50 * MIN).await;
    settle().await;
    assert_eq!(e.emulator.stats().identity.total, 2);
    let (now, mut updates) = e.cache.watch(&k, Duration::ZERO).await.unwrap();
    let (_, mut beside) = e.cache.watch(&k, Duration::ZERO).await.unwrap();
    assert_eq!(now.outcome, CacheOutcome::Hit);
    let mut last = now.token;
    for _ in 0..2 {
        updates.changed().await.unwrap();
        beside.changed().await.unwrap();
        let next = updates.borrow_and_update().clone().unwrap();
        let also = beside.borrow_and_update().clone().unwrap();
        assert!(
            next.same_token_as(&also),
            "both watchers see the same token"
        );
        assert!(!next.same_token_as(&last));
        assert!(next.expires_at() > last.expires_at());
        last = next;
    }
}

/// Issue 16, point 4 (memory per entry): the engine keeps no task per
/// entry. 1,000 cached audiences leave the runtime's live tasks where they
/// were, give or take the HTTP connections to the emulator, and the
/// engine's one background task still refreshes every one of them before
/// it turns stale, with nobody asking. The old engine kept a refresher
/// task per entry: 1,000 more.
#[tokio::test(start_paused = true)]
async fn a_thousand_entries_keep_no_task_each_and_are_all_refreshed() {
    let e = engine(RefreshSettings {
        upstream_qps: 10_000,
        ..RefreshSettings::default()
    })
    .await;
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    settle().await;
    let before = alive();
    let keys: Vec<_> = (0..1000)
        .map(|i| key(&format!("https://mem-{i}.example.com")))
        .collect();
    for k in &keys {
        e.cache.get(k, Duration::ZERO).await.unwrap();
    }
    settle().await;
    let filled = alive();
    assert!(
        filled <= before + 40,
        "1,000 entries took the runtime from {before} to {filled} live tasks"
    );
    assert_eq!(e.emulator.stats().identity.total, 1000);
    // Past every key's refresh time (45 minutes at the latest).
    for _ in 0..50 {
        tokio::time::sleep(MIN).await;
    }
    settle().await;
    assert_eq!(
        e.emulator.stats().identity.total,
        2000,
        "each refreshed once"
    );
    for k in &keys {
        let lookup = e.cache.get(k, Duration::ZERO).await.unwrap();
        assert_eq!(lookup.outcome, CacheOutcome::Hit);
        assert!(lookup.token.remaining(e.clock.now()) > 50 * MIN);
    }
    let refreshed = alive();
    assert!(
        refreshed <= before + 40,
        "after the refreshes: {refreshed} live tasks, from {before}"
    );
}

#[tokio::test(start_paused = true)]
async fn min_valid_for_forces_a_fetch_and_expiring_tokens_are_not_served() {
    let e = engine(RefreshSettings::default()).await;
    let k = key("https://min-valid.example.com");
    e.cache.get(&k, Duration::ZERO).await.unwrap();
    tokio::time::sleep(10 * MIN).await;
    // 50 minutes left: fresh, but not enough for a caller needing 55.
    let hit = e.cache.get(&k, Duration::ZERO).await.unwrap();
    assert_eq!(hit.outcome, CacheOutcome::Hit);
    let forced = e.cache.get(&k, 55 * MIN).await.unwrap();
    assert_eq!(forced.outcome, CacheOutcome::Miss);
    assert!(forced.token.remaining(e.clock.now()) >= 55 * MIN);
    assert_eq!(e.emulator.stats().identity.total, 2);
    // A token minted with under 30 s of life counts as expired, and the
    // error says so without blaming a min_valid_for nobody sent.
    e.emulator.set_faults(Faults {
        token_lifetime_secs: Some(20),
        ..Faults::default()
    });
    let err = e
        .cache
        .get(&key("https://short.example.com"), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Upstream(_)), "{err}");
    assert!(
        err.to_string()
            .contains("s of life; the broker serves a token only while more than 30s"),
        "{err}"
    );
    assert!(!err.to_string().contains("min_valid_for"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn upstream_calls_per_identity_are_bounded() {
    let e = engine(RefreshSettings {
        upstream_concurrency: 2,
        ..RefreshSettings::default()
    })
    .await;
    e.emulator.set_faults(Faults {
        delay_ms: Some(1000),
        ..Faults::default()
    });
    let started = tokio::time::Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let cache = e.cache.clone();
            tokio::spawn(async move {
                cache
                    .get(&key(&format!("https://c{i}.example.com")), Duration::ZERO)
                    .await
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // Ten 1-second upstream calls, two at a time: at least five seconds.
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn random_concurrent_requests_never_get_another_keys_token() {
    let (clock, emulator) = crate::support::emulator_on_tokio_clock().await;
    let dir = crate::support::workdir();
    let mut sources: Vec<(String, Arc<dyn IdTokenSource>)> = vec![(
        "default".into(),
        Arc::new(MetadataSource::new(&emulator.metadata_host(), clock.clone()).unwrap()),
    )];
    let mut emails = std::collections::HashMap::from([(
        "default".to_owned(),
        token_broker::emulator::DEFAULT_ACCOUNT_EMAIL.to_owned(),
    )]);
    for name in ["alpha", "beta"] {
        let email = format!("{name}@proj.iam.gserviceaccount.com");
        let (path, _) = crate::support::key_file(dir.path(), name, &email, &emulator, true);
        let key = ServiceAccountKey::load(&path, false).unwrap();
        sources.push((
            name.into(),
            Arc::new(ServiceAccountSource::new(key, clock.clone()).unwrap()),
        ));
        emails.insert(name.into(), email);
    }
    let cache = TokenCache::new(sources, RefreshSettings::default(), clock.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x70_6b_65_6e);
    let identities = ["default", "alpha", "beta"];
    let calls: Vec<_> = (0..2000)
        .map(|_| {
            let identity = identities[rng.random_range(0..3)];
            let audience = format!("https://svc-{}.example.com", rng.random_range(0..40));
            let cache = cache.clone();
            tokio::spawn(async move {
                let k = CacheKey::new(identity, &audience).unwrap();
                (
                    identity,
                    audience,
                    cache.get(&k, Duration::ZERO).await.unwrap(),
                )
            })
        })
        .collect();
    let mut checked = 0;
    for call in calls {
        let (identity, audience, lookup) = call.await.unwrap();
        let claims =
            jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(lookup.token.expose())
                .unwrap()
                .claims;
        assert_eq!(claims["aud"], audience.as_str());
        assert_eq!(claims["email"], emails[identity].as_str(), "{identity}");
        assert_eq!(lookup.token.audience(), audience);
        checked += 1;
    }
    assert_eq!(checked, 2000);
    let stats = emulator.stats();
    assert!(
        stats.identity.total + stats.token.total <= 3 * 40,
        "at most one fetch per key"
    );
}

/// Issue 16: a fleet booting together must not exceed Google's quotas. 2,000
/// prefetched audiences at `upstream_qps = 20` take at least 99 s of
/// upstream calls (20 at once, then 20 a second), while a cached key answers
/// at once and a client's miss goes ahead of the whole backlog.
#[tokio::test(start_paused = true)]
async fn a_prefetch_of_two_thousand_audiences_keeps_to_the_upstream_budget() {
    let e = engine(RefreshSettings {
        upstream_qps: 20,
        max_entries: 5_000,
        ..RefreshSettings::default()
    })
    .await;
    let hot = key("https://hot.example.com");
    e.cache.get(&hot, Duration::ZERO).await.unwrap();
    let keys: Vec<_> = (0..2000)
        .map(|i| key(&format!("https://prefetched-{i}.example.com")))
        .collect();
    let started = tokio::time::Instant::now();
    let prefetching = {
        let cache = e.cache.clone();
        tokio::spawn(async move { cache.prefetch(keys).await })
    };
    tokio::time::sleep(Duration::from_secs(30)).await;
    let calls_at_30s = e.emulator.stats().identity.total;
    // 1 for the hot key, 20 at once, then 20 a second (and one in flight).
    assert!(
        calls_at_30s <= 1 + 20 + 30 * 20 + 1,
        "{calls_at_30s} calls in 30 s"
    );

    let t0 = tokio::time::Instant::now();
    let hit = e.cache.get(&hot, Duration::ZERO).await.unwrap();
    assert_eq!(hit.outcome, CacheOutcome::Hit);
    assert!(
        t0.elapsed() <= Duration::from_millis(10),
        "{:?}",
        t0.elapsed()
    );

    // About 1,380 prefetches are still queued (69 s of budget); the miss
    // waits for a token or two.
    let t0 = tokio::time::Instant::now();
    let miss = e
        .cache
        .get(&key("https://a-new-client.example.com"), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(miss.outcome, CacheOutcome::Miss);
    assert!(
        t0.elapsed() <= Duration::from_secs(5),
        "the miss waited {:?}",
        t0.elapsed()
    );

    prefetching.await.unwrap();
    let took = started.elapsed();
    eprintln!(
        "2,000 prefetched audiences at 20/s took {took:?} of simulated time; {calls_at_30s} upstream calls in the first 30 s"
    );
    assert!(took >= Duration::from_secs(99), "{took:?}");
    assert_eq!(e.emulator.stats().identity.total, 2000 + 2);
}
