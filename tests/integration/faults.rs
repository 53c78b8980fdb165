//! Issue 12: the standing fault suite. A hostile upstream (the emulator's
//! fault injection) against the production source and cache, under tokio's
//! paused clock where timing matters (hours run in seconds; upstream calls
//! still go over real HTTP), and against a real broker process where the
//! answer a client sees is the point. Each test asserts the figure recorded
//! in RELIABILITY.md: upstream calls per minute per key, requests failed
//! while a valid token was cached, how long a cold caller waits.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::json;
use token_broker::{
    cache::{CacheError, CacheKey, TokenCache, EXPIRY_MARGIN},
    clock::Clock,
    config::{IdentitySettings, RefreshSettings},
    domain::SourceKind,
    emulator::{Emulator, Faults},
    source::{build_source, FetchFuture, IdTokenSource},
};
use tokio::time::Instant;
use tonic::Code;

use crate::support::{self, Broker};

const MIN: Duration = Duration::from_secs(60);
/// How long a gRPC request waits when the client sets no deadline.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

struct Engine {
    emulator: Emulator,
    cache: TokenCache,
    clock: Clock,
}

/// The emulator and a cache over the production metadata source, built as
/// `serve` builds it, sharing one paused-time clock.
async fn engine(settings: RefreshSettings) -> Engine {
    engine_with(settings, |source| source).await
}

async fn engine_with(
    settings: RefreshSettings,
    wrap: impl FnOnce(Arc<dyn IdTokenSource>) -> Arc<dyn IdTokenSource>,
) -> Engine {
    let (clock, emulator) = crate::support::emulator_on_tokio_clock().await;
    let identity = IdentitySettings {
        metadata_host: Some(emulator.metadata_host()),
        ..IdentitySettings::new("default", SourceKind::Metadata)
    };
    let source = build_source(0, &identity, &HashMap::new(), &clock).unwrap();
    let cache = TokenCache::new(
        [("default".to_owned(), wrap(source))],
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

fn claims(pairs: serde_json::Value) -> Option<serde_json::Map<String, serde_json::Value>> {
    pairs.as_object().cloned()
}

impl Engine {
    fn calls(&self) -> u64 {
        self.emulator.stats().identity.total
    }

    /// Whether the cache holds a token for `k` with more than the margin left.
    fn holds_valid_token(&self, k: &CacheKey) -> bool {
        let now = self.clock.now();
        self.cache.list().iter().any(|info| {
            &info.key == k
                && info
                    .expires_at
                    .and_then(|at| at.duration_since(now).ok())
                    .is_some_and(|left| left > EXPIRY_MARGIN)
        })
    }

    /// One client request, bounded as the gRPC layer bounds it.
    async fn ask(&self, k: &CacheKey) -> Result<token_broker::token::IdToken, String> {
        match tokio::time::timeout(DEFAULT_WAIT, self.cache.get(k, Duration::ZERO)).await {
            Ok(Ok(lookup)) => Ok(lookup.token),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("DEADLINE_EXCEEDED: no answer within the default wait".into()),
        }
    }

    /// A client asking for `k` every `every` for `duration`.
    async fn client(&self, k: &CacheKey, every: Duration, duration: Duration) -> Run {
        let start = Instant::now();
        let mut run = Run::default();
        let mut minute_start = (start, self.calls());
        while start.elapsed() < duration {
            let valid_before = self.holds_valid_token(k);
            match self.ask(k).await {
                Ok(token) => {
                    run.served += 1;
                    run.tokens.insert(token.expose().to_owned());
                }
                Err(err) => {
                    run.failed += 1;
                    if valid_before {
                        run.failed_while_valid += 1;
                    }
                    run.errors.insert(err);
                }
            }
            if minute_start.0.elapsed() >= MIN {
                run.calls_per_minute.push(self.calls() - minute_start.1);
                minute_start = (Instant::now(), self.calls());
            }
            tokio::time::sleep(every).await;
        }
        run
    }
}

#[derive(Debug, Default)]
struct Run {
    served: u64,
    failed: u64,
    failed_while_valid: u64,
    calls_per_minute: Vec<u64>,
    tokens: BTreeSet<String>,
    errors: BTreeSet<String>,
}

impl Run {
    fn busiest_minute(&self) -> u64 {
        self.calls_per_minute.iter().copied().max().unwrap_or(0)
    }
}

// --- 1. A panic cannot wedge a key ------------------------------------------

#[tokio::test(start_paused = true)]
async fn overflowing_claims_get_a_clear_error_and_never_wedge_a_key() {
    let e = engine(RefreshSettings::default()).await;
    let cases = [
        ("exp", json!(9.3e18)),
        ("exp", json!(u64::MAX)),
        ("iat", json!(9_300_000_000_000_000_000u64)),
        ("exp", json!(-1)),
        ("exp", json!(1_800_000_000.5)),
        ("exp", json!("tomorrow")),
    ];
    for (n, (claim, value)) in cases.into_iter().enumerate() {
        let k = key(&format!("https://overflow-{n}.example.com"));
        e.emulator.set_faults(Faults {
            override_claims: claims(json!({ claim: value })),
            ..Faults::default()
        });
        let err = e.ask(&k).await.unwrap_err();
        assert!(
            err.contains(&format!("`{claim}` claim")),
            "{claim}={value}: {err}"
        );
        // The upstream recovers: the key is not wedged, and having never held
        // a token it asks again within seconds.
        e.emulator.clear_faults();
        let recovered = Instant::now();
        while e.ask(&k).await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(
                recovered.elapsed() <= Duration::from_secs(61),
                "{claim}={value}: key still failing a minute after recovery"
            );
        }
    }
}

/// A source whose first fetches panic, as a bug anywhere under a fetch would.
struct PanicsOnce {
    inner: Arc<dyn IdTokenSource>,
    calls: AtomicU32,
    /// How many fetches panic before the inner source is used.
    panics: u32,
}

impl IdTokenSource for PanicsOnce {
    fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.panics {
            Box::pin(async { panic!("injected bug inside a fetch") })
        } else {
            self.inner.fetch(audience)
        }
    }

    fn kind(&self) -> SourceKind {
        self.inner.kind()
    }

    fn upstream(&self) -> &str {
        self.inner.upstream()
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_inside_a_fetch_cannot_wedge_its_key() {
    // Every fetch panics: callers get an error naming it, in time.
    let e = engine_with(RefreshSettings::default(), |inner| {
        Arc::new(PanicsOnce {
            inner,
            calls: AtomicU32::new(0),
            panics: u32::MAX,
        })
    })
    .await;
    let k = key("https://panic.example.com");
    let err = e.ask(&k).await.unwrap_err();
    assert!(err.contains("ended without an answer"), "{err}");
    assert!(!err.contains("DEADLINE_EXCEEDED"), "{err}");
    // One fetch panics: the cold caller rides the key's retry and gets a
    // token; the key was never left marked as fetching.
    let e = engine_with(RefreshSettings::default(), |inner| {
        Arc::new(PanicsOnce {
            inner,
            calls: AtomicU32::new(0),
            panics: 1,
        })
    })
    .await;
    let started = Instant::now();
    e.ask(&k).await.expect("the key works after the panic");
    assert!(started.elapsed() <= Duration::from_secs(15));
    assert_eq!(
        e.calls(),
        1,
        "one real upstream call after the panicking one"
    );
}

// --- 2. Implausible tokens are refused ---------------------------------------

#[tokio::test(start_paused = true)]
async fn implausible_tokens_are_refused_not_cached() {
    let e = engine(RefreshSettings::default()).await;
    let now = e.clock.unix_seconds();
    let cases = [
        (
            Faults {
                token_lifetime_secs: Some(10 * 365 * 86_400),
                ..Faults::default()
            },
            "a lifetime of 315360000s",
        ),
        (
            Faults {
                override_claims: claims(json!({"iat": now + 86_400, "exp": now + 86_400 + 3600})),
                ..Faults::default()
            },
            "s in the future; at most 300s",
        ),
    ];
    for (n, (faults, expected)) in cases.into_iter().enumerate() {
        let k = key(&format!("https://implausible-{n}.example.com"));
        e.emulator.set_faults(faults);
        let err = e.ask(&k).await.unwrap_err();
        assert!(err.contains(expected), "{err}");
        let info = e.cache.list().into_iter().find(|i| i.key == k).unwrap();
        assert_eq!(info.expires_at, None, "nothing cached");
    }
}

// --- 3. Near expiry ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn near_expiry_a_looping_client_does_not_drive_a_caching_metadata_server() {
    let e = engine(RefreshSettings::default()).await;
    // The metadata server hands out its cached token until 10 s before expiry.
    e.emulator.set_faults(Faults {
        metadata_cache_secs: Some(10),
        ..Faults::default()
    });
    let k = key("https://near-expiry.example.com");
    let run = e
        .client(&k, Duration::from_millis(100), 2 * 60 * MIN + 10 * MIN)
        .await;
    let busiest = run.busiest_minute();
    println!(
        "near expiry, GCE-style cache: busiest minute {busiest} upstream calls, {} total, {} requests failed ({} while a valid token was cached)",
        e.calls(),
        run.failed,
        run.failed_while_valid
    );
    assert!(
        busiest <= 30,
        "{busiest} upstream calls in one minute: {run:?}"
    );
    assert_eq!(run.failed_while_valid, 0, "{:?}", run.errors);
    assert!(run.tokens.len() >= 3, "new tokens were still obtained");
    for err in &run.errors {
        assert!(!err.contains("min_valid_for"), "{err}");
        assert!(err.contains("the token it already gave"), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn tokens_shorter_lived_than_the_margin_back_off_and_idle_keys_are_evicted() {
    let e = engine(RefreshSettings {
        idle_evict_after: 10 * MIN,
        ..RefreshSettings::default()
    })
    .await;
    e.emulator.set_faults(Faults {
        token_lifetime_secs: Some(25),
        ..Faults::default()
    });
    let k = key("https://short-lived.example.com");
    let run = e.client(&k, Duration::from_secs(1), 5 * MIN).await;
    // Backing off to retry_max (60 s, full jitter: 30 s on average): about
    // two calls a minute once the backoff is capped.
    let late: u64 = run.calls_per_minute[2..].iter().sum();
    println!(
        "25 s tokens: calls per minute while asked {:?}",
        run.calls_per_minute
    );
    assert!(late <= 15, "{:?}", run.calls_per_minute);
    assert_eq!(run.served, 0);
    for err in &run.errors {
        assert!(
            err.contains("s of life; the broker serves a token only while more than 30s"),
            "{err}"
        );
    }
    // Nobody asks any more: the key is dropped after idle_evict_after and
    // upstream hears no more of it.
    tokio::time::sleep(11 * MIN).await;
    assert!(e.cache.is_empty(), "idle key still held");
    let calls = e.calls();
    tokio::time::sleep(60 * MIN).await;
    assert_eq!(e.calls(), calls, "an evicted key is not polled");
}

// --- 4. One retry layer, honest budgets ----------------------------------------

#[tokio::test(start_paused = true)]
async fn an_outage_costs_what_the_retry_settings_promise() {
    let e = engine(RefreshSettings::default()).await;
    e.emulator.set_faults(Faults {
        status: Some(503),
        ..Faults::default()
    });
    let keys: Vec<_> = (0..5)
        .map(|i| key(&format!("https://outage-{i}.example.com")))
        .collect();
    for k in &keys {
        assert!(e.ask(k).await.is_err());
    }
    tokio::time::sleep(5 * MIN).await;
    let stats = e.emulator.stats();
    let per_key: Vec<u64> = keys
        .iter()
        .map(|k| stats.identity.by_audience[k.audience()])
        .collect();
    println!("5-minute outage, 5 keys: upstream calls per key {per_key:?}");
    // Backoff 1 s doubling to 60 s with jitter: about 15 attempts per key in
    // 5 minutes, one call each.
    for calls in per_key {
        assert!(calls <= 25, "{calls} calls for one key in 5 minutes");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_429_and_503_is_honoured_up_to_retry_max() {
    for status in [429u16, 503] {
        let e = engine(RefreshSettings::default()).await;
        e.emulator.set_faults(Faults {
            status: Some(status),
            retry_after_secs: Some(30),
            ..Faults::default()
        });
        let k = key("https://retry-after.example.com");
        let run = e
            .client(&k, Duration::from_secs(1), Duration::from_secs(52))
            .await;
        let calls = e.calls();
        println!("HTTP {status} with Retry-After: 30: {calls} upstream calls in 52 s");
        assert!(calls <= 2, "HTTP {status}: {calls} calls in 52 s");
        assert_eq!(run.served, 0);
        assert!(
            run.errors
                .iter()
                .all(|e| e.contains("asked to retry after 30s")),
            "{:?}",
            run.errors
        );
        // Nothing before the 30 s the upstream asked for, whoever asks.
        let e2 = engine(RefreshSettings::default()).await;
        e2.emulator.set_faults(Faults {
            status: Some(status),
            retry_after_secs: Some(30),
            ..Faults::default()
        });
        let started = Instant::now();
        let mut second_call = None;
        while started.elapsed() < Duration::from_secs(40) {
            let k = k.clone();
            let cache = e2.cache.clone();
            // Callers that do not wait on each other, one per second.
            tokio::spawn(async move { cache.get(&k, Duration::ZERO).await });
            tokio::time::sleep(Duration::from_secs(1)).await;
            if e2.calls() >= 2 && second_call.is_none() {
                second_call = Some(started.elapsed());
            }
        }
        let second_call = second_call.expect("retried after Retry-After");
        assert!(
            second_call >= Duration::from_secs(30),
            "HTTP {status}: retried after {second_call:?}, before Retry-After"
        );
        // An hour asked for is capped at retry_max (60 s).
        e2.emulator.set_faults(Faults {
            status: Some(status),
            retry_after_secs: Some(3600),
            ..Faults::default()
        });
        let before = e2.calls();
        tokio::time::sleep(Duration::from_secs(95)).await;
        let after = e2.calls() - before;
        assert!(
            (1..=2).contains(&after),
            "HTTP {status}: {after} calls in 95 s"
        );
    }
}

/// Each of these upstreams never finishes an answer; a cold caller must get
/// UNAVAILABLE naming the upstream well inside the 30 s default wait.
#[tokio::test(start_paused = true)]
async fn a_cold_caller_behind_a_hung_stalled_or_trickling_upstream_gets_unavailable_in_time() {
    let cases = [
        (
            "hang",
            Faults {
                hang: true,
                ..Faults::default()
            },
        ),
        (
            "headers then stall",
            Faults {
                stall_after_headers: true,
                ..Faults::default()
            },
        ),
        (
            "1 byte/s trickle",
            Faults {
                trickle_bytes_per_sec: Some(1),
                ..Faults::default()
            },
        ),
    ];
    for (name, faults) in cases {
        let e = engine(RefreshSettings::default()).await;
        e.emulator.set_faults(faults);
        let k = key("https://hung.example.com");
        let started = Instant::now();
        let err = match tokio::time::timeout(DEFAULT_WAIT, e.cache.get(&k, Duration::ZERO)).await {
            Ok(Err(err @ CacheError::Upstream(_))) => err.to_string(),
            Ok(other) => panic!("{name}: {other:?}"),
            Err(_) => panic!("{name}: DEADLINE_EXCEEDED, no answer within the 30 s wait"),
        };
        let waited = started.elapsed();
        assert!(err.contains(&e.emulator.metadata_host()), "{name}: {err}");
        assert!(
            err.contains("timed out") || err.contains("no answer within 10s"),
            "{name}: {err}"
        );
        assert!(
            waited <= Duration::from_secs(20),
            "{name}: answered after {waited:?}"
        );
        // A looping client costs one 10 s attempt per backoff step.
        let run = e.client(&k, Duration::from_secs(1), 5 * MIN).await;
        println!(
            "{name}: cold caller answered after {waited:?}; calls per minute {:?}",
            run.calls_per_minute
        );
        assert!(
            run.calls_per_minute[2..].iter().all(|&n| n <= 6),
            "{name}: {:?}",
            run.calls_per_minute
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_flapping_upstream_fails_no_request_while_a_valid_token_is_cached() {
    let e = engine(RefreshSettings::default()).await;
    let k = key("https://flapping.example.com");
    e.ask(&k).await.unwrap();
    // Down 20 s, up 20 s, for three hours.
    e.emulator.set_faults(Faults {
        status: Some(503),
        flap_secs: Some(20),
        ..Faults::default()
    });
    let run = e.client(&k, Duration::from_secs(1), 3 * 60 * MIN).await;
    println!(
        "flapping: {} requests failed while a valid token was cached, busiest minute {} calls, {} tokens",
        run.failed_while_valid,
        run.busiest_minute(),
        run.tokens.len()
    );
    assert_eq!(run.failed, 0, "{:?}", run.errors);
    assert!(run.tokens.len() >= 3, "refreshes still succeed");
    assert!(run.busiest_minute() <= 10, "{:?}", run.calls_per_minute);
}

#[tokio::test(start_paused = true)]
async fn after_an_outage_a_key_that_never_held_a_token_recovers_within_seconds() {
    let e = engine(RefreshSettings {
        retry_max: 10 * MIN,
        ..RefreshSettings::default()
    })
    .await;
    e.emulator.set_faults(Faults {
        status: Some(503),
        ..Faults::default()
    });
    let k = key("https://recovering.example.com");
    let outage = e.client(&k, Duration::from_secs(1), 15 * MIN).await;
    assert_eq!(outage.served, 0);
    e.emulator.clear_faults();
    let recovered = Instant::now();
    let mut errors_after_recovery = 0;
    while e.ask(&k).await.is_err() {
        errors_after_recovery += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let waited = recovered.elapsed();
    println!(
        "recovery: first token {waited:?} after the upstream recovered ({errors_after_recovery} errors); outage calls per minute {:?}",
        outage.calls_per_minute
    );
    assert!(waited <= Duration::from_secs(6), "{waited:?}");
    // The cost: at most one attempt per 5 s while a client keeps asking
    // (a few more in the first minute, while the backoff is under 5 s).
    assert!(
        outage.busiest_minute() <= 24,
        "{:?}",
        outage.calls_per_minute
    );
    assert!(
        outage.calls_per_minute[1..].iter().all(|&n| n <= 15),
        "{:?}",
        outage.calls_per_minute
    );
}

// --- The same faults against a real broker process ---------------------------

async fn broker_for(emulator: &Emulator) -> Broker {
    let host = support::metadata_identity("default", emulator);
    Broker::start(
        move |socket| support::config_text_default_retries(socket, &host),
        "debug",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_broker_behind_a_hung_upstream_answers_unavailable_not_deadline_exceeded() {
    let emulator = support::emulator().await;
    let broker = broker_for(&emulator).await;
    emulator.set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let started = std::time::Instant::now();
    // No client deadline: the broker's default 30 s wait applies.
    let err = broker
        .get("default", "https://hung.example.com")
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains(&emulator.metadata_host()),
        "{}",
        err.message()
    );
    assert!(waited < Duration::from_secs(25), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_broker_refuses_overflowing_and_implausible_tokens_and_recovers() {
    let emulator = support::emulator().await;
    let broker = broker_for(&emulator).await;
    let now = token_broker::clock::Clock::system().unix_seconds();
    let cases = [
        (claims(json!({"exp": 9.3e18})), "`exp` claim"),
        (claims(json!({"iat": 9.3e18})), "`iat` claim"),
        (claims(json!({"exp": now + 10 * 365 * 86_400})), "lifetime"),
        (claims(json!({"iat": now + 86_400})), "in the future"),
    ];
    for (n, (override_claims, expected)) in cases.into_iter().enumerate() {
        let audience = format!("https://hostile-{n}.example.com");
        emulator.set_faults(Faults {
            override_claims,
            ..Faults::default()
        });
        let mut request = tonic::Request::new(token_broker::proto::GetIdTokenRequest {
            audience: audience.clone(),
            identity: "default".into(),
            min_valid_for: None,
        });
        request.set_timeout(Duration::from_secs(10));
        let err = broker
            .client()
            .await
            .get_id_token(request)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
        assert!(err.message().contains(expected), "{}", err.message());
        // No CLI output path panics on what the broker holds.
        let socket = broker.socket.to_str().unwrap().to_owned();
        for args in [
            vec!["status", "--socket", &socket],
            vec!["status", "--json", "--socket", &socket],
        ] {
            let (code, out, stderr) = support::run_cli(&args);
            assert_eq!(code, 0, "{args:?}: {out}{stderr}");
        }
        // The upstream recovers: the key works again within seconds.
        emulator.clear_faults();
        let started = std::time::Instant::now();
        loop {
            match broker.get("default", &audience).await {
                Ok(_) => break,
                Err(err) => assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "still failing after recovery: {}",
                    err.message()
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

// --- CLI output never panics on any protocol timestamp -----------------------

mod extreme_timestamps {
    use std::pin::Pin;

    use prost_types::Timestamp;
    use token_broker::proto::{self, token_broker_server::TokenBroker};
    use tokio_stream::Stream;
    use tonic::{Request, Response, Status};

    /// A broker that answers every call with `expire_time`/`issue_time` set
    /// to one extreme timestamp.
    struct Extreme(Timestamp);

    #[tonic::async_trait]
    impl TokenBroker for Extreme {
        async fn get_id_token(
            &self,
            request: Request<proto::GetIdTokenRequest>,
        ) -> Result<Response<proto::IdToken>, Status> {
            let req = request.into_inner();
            Ok(Response::new(proto::IdToken {
                token: "header.claims.signature".into(),
                expire_time: Some(self.0),
                issue_time: Some(self.0),
                identity: req.identity,
                audience: req.audience,
            }))
        }

        async fn get_access_token(
            &self,
            request: Request<proto::GetAccessTokenRequest>,
        ) -> Result<Response<proto::AccessToken>, Status> {
            let req = request.into_inner();
            Ok(Response::new(proto::AccessToken {
                token: "opaque-access-token".into(),
                expire_time: Some(self.0),
                scopes: req.scopes,
                identity: req.identity,
            }))
        }

        type WatchAccessTokenStream =
            Pin<Box<dyn Stream<Item = Result<proto::AccessToken, Status>> + Send>>;

        async fn watch_access_token(
            &self,
            _request: Request<proto::GetAccessTokenRequest>,
        ) -> Result<Response<Self::WatchAccessTokenStream>, Status> {
            Err(Status::unimplemented("not needed"))
        }

        type WatchIdTokenStream =
            Pin<Box<dyn Stream<Item = Result<proto::IdToken, Status>> + Send>>;

        async fn watch_id_token(
            &self,
            _request: Request<proto::GetIdTokenRequest>,
        ) -> Result<Response<Self::WatchIdTokenStream>, Status> {
            Err(Status::unimplemented("not needed"))
        }

        async fn list_tokens(
            &self,
            _request: Request<proto::ListTokensRequest>,
        ) -> Result<Response<proto::ListTokensResponse>, Status> {
            // Built from the default so fields added to the message later
            // (paging) keep their defaults here.
            let mut response = proto::ListTokensResponse::default();
            response.tokens.push(proto::TokenInfo {
                identity: "default".into(),
                audience: "https://a.example.com".into(),
                expire_time: Some(self.0),
                issue_time: Some(self.0),
                state: proto::TokenState::Fresh as i32,
                last_error: String::new(),
                scopes: Vec::new(),
            });
            Ok(Response::new(response))
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn status_and_token_json_print_any_timestamp_without_panicking() {
        let extremes = [
            (i64::MAX, 999_999_999),
            (i64::MIN, -999_999_999),
            (i64::MAX, i32::MAX),
            (i64::MIN, i32::MIN),
            (253_402_300_800, 0),
            (-1, 0),
        ];
        for (seconds, nanos) in extremes {
            let dir = crate::support::workdir();
            let socket = dir.path().join("extreme.sock");
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(proto::token_broker_server::TokenBrokerServer::new(Extreme(
                        Timestamp { seconds, nanos },
                    )))
                    .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
            );
            let socket = socket.to_str().unwrap().to_owned();
            for args in [
                vec!["status", "--socket", &socket],
                vec!["status", "--json", "--socket", &socket],
                vec![
                    "token",
                    "--json",
                    "--socket",
                    &socket,
                    "--audience",
                    "https://a.example.com",
                ],
                vec!["token", "--access", "--json", "--socket", &socket],
            ] {
                let cli = tokio::task::spawn_blocking({
                    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
                    move || {
                        let args: Vec<&str> = args.iter().map(String::as_str).collect();
                        crate::support::run_cli(&args)
                    }
                })
                .await
                .unwrap();
                let (code, stdout, stderr) = cli;
                assert_eq!(
                    code, 0,
                    "{args:?} at {seconds}s/{nanos}ns: {stdout}{stderr}"
                );
                assert!(!stderr.contains("panicked"), "{stderr}");
            }
            server.abort();
        }
    }
}
