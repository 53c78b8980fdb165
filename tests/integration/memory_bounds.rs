//! Issue 12 (5, 6): the daemon's memory is bounded whatever clients and
//! upstreams do, and `min_valid_for` cannot make it mint on every call.
//! Each test runs the real broker binary against the real emulator and
//! reads the broker's own figures: `ListTokens`, the `cache_entries` gauge,
//! `VmRSS` of its process, and the emulator's call counts.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use token_broker::{
    emulator::{Emulator, Faults},
    proto::{token_broker_client::TokenBrokerClient, GetIdTokenRequest, ListTokensRequest},
};
use tonic::{transport::Channel, Code};

use crate::support::{self, Broker};

/// A config with the given `[refresh]` and `[limits]` lines, metrics on
/// `port`, logging warnings only (these tests make tens of thousands of
/// requests), and one metadata identity plus `identities`.
fn config(
    socket: &Path,
    emulator: &Emulator,
    port: u16,
    refresh: &str,
    limits: &str,
    identities: &str,
) -> String {
    format!(
        r#"[server]
socket_path = "{}"

[refresh]
retry_initial = "1h"
retry_max = "1h"
upstream_qps = 10000
{refresh}

[limits]
{limits}

[telemetry]
listen = "127.0.0.1:{port}"

[log]
filter = "warn"

{}
{identities}
"#,
        socket.display(),
        support::metadata_identity("default", emulator),
    )
}

/// A broker serving [`config`] (the same arguments), logging at the
/// default level.
async fn start_broker(
    emulator: &Emulator,
    port: u16,
    refresh: &str,
    limits: &str,
    identities: &str,
) -> Broker {
    Broker::start(
        |socket| config(socket, emulator, port, refresh, limits, identities),
        "",
    )
    .await
}

fn request(audience: &str, min_valid_for: Option<u64>) -> GetIdTokenRequest {
    GetIdTokenRequest {
        audience: audience.into(),
        identity: String::new(),
        min_valid_for: min_valid_for.map(|secs| prost_types::Duration {
            seconds: secs as i64,
            nanos: 0,
        }),
    }
}

async fn entries(client: &mut TokenBrokerClient<Channel>) -> usize {
    client
        .list_tokens(ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens
        .len()
}

async fn cache_entries_gauge(port: u16) -> f64 {
    let (status, metrics) = support::scrape(port, "/metrics").await;
    assert_eq!(status, 200);
    support::sample(&metrics, "token_broker_cache_entries ")
}

fn identity_calls(emulator: &Emulator, audience: &str) -> u64 {
    emulator
        .stats()
        .identity
        .by_audience
        .get(audience)
        .copied()
        .unwrap_or(0)
}

/// Refused requests for new audiences used to leave an entry and its
/// refresher task behind for `idle_evict_after` (~3.7 KB each; 140 k
/// refusals took RSS from 17 MB to 531 MB). 20,000 refusals now leave
/// nothing: one entry, and RSS within 10 MiB of where it was.
#[tokio::test(flavor = "multi_thread")]
async fn refused_new_audiences_leave_nothing_behind() {
    const REFUSALS: usize = 20_000;
    const CLIENTS: usize = 4;
    let emulator = support::emulator().await;
    let port = support::free_port();
    let broker = start_broker(
        &emulator,
        port,
        "",
        "new_audiences_per_minute = 1\nnew_audience_burst = 1",
        "",
    )
    .await;
    broker
        .get("", "https://admitted.example.com")
        .await
        .unwrap();
    let pid = broker.child.id();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(broker.client().await);
    }
    let refuse = |clients: Vec<TokenBrokerClient<Channel>>, round: usize, n: usize| async move {
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(c, mut client)| {
                tokio::spawn(async move {
                    for i in 0..n / CLIENTS {
                        let audience = format!("https://refused-{round}-{c}-{i}.example.com");
                        let status = client
                            .get_id_token(request(&audience, None))
                            .await
                            .unwrap_err();
                        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    }
                    client
                })
            })
            .collect();
        let mut back = Vec::new();
        for task in tasks {
            back.push(task.await.unwrap());
        }
        back
    };
    // Warm-up: connection buffers and allocator arenas reach their working size.
    let clients = refuse(clients, 0, 2_000).await;
    let before = support::vm_rss_kib(pid);
    let mut clients = refuse(clients, 1, REFUSALS).await;
    let after = support::vm_rss_kib(pid);

    assert_eq!(
        entries(&mut clients[0]).await,
        1,
        "only the admitted audience is held"
    );
    assert_eq!(cache_entries_gauge(port).await, 1.0);
    assert_eq!(
        emulator.stats().identity.total,
        1,
        "refusals never reach upstream"
    );
    let growth = after.saturating_sub(before);
    println!("RSS {before} KiB -> {after} KiB over {REFUSALS} refusals (+{growth} KiB)");
    // The leak was ~3.7 KB per refusal: 20,000 of them would be ~72 MiB.
    assert!(
        growth < 10 * 1024,
        "RSS grew {growth} KiB over {REFUSALS} refused requests ({before} -> {after} KiB)"
    );
}

/// Issue 16 (4): a cached audience costs at most 1.5 KB of the broker's
/// memory beyond its token. The old engine kept a task, a timer and three
/// watch channels per entry (one holding a second copy of the token), about
/// 2.9 KB beyond the token; 4,000 audiences over 4 clients must now add at
/// most token + 1,536 B each to the broker's RSS.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_audience_costs_at_most_one_and_a_half_kb_beyond_its_token() {
    const WARM: usize = 400;
    const FILL: usize = 4_000;
    const CLIENTS: usize = 4;
    let emulator = support::emulator().await;
    let port = support::free_port();
    let broker = start_broker(
        &emulator,
        port,
        "",
        "new_audiences_per_minute = 1000000\nnew_audience_burst = 1000000",
        "",
    )
    .await;
    let pid = broker.child.id();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(broker.client().await);
    }
    // Each client fills `n` new audiences; the token bytes it was served.
    let fill = |clients: Vec<TokenBrokerClient<Channel>>, round: &'static str, n: usize| async move {
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(c, mut client)| {
                tokio::spawn(async move {
                    let mut bytes = 0;
                    for i in 0..n / CLIENTS {
                        let audience =
                            format!("https://{round}-{c}-{i:05}-abcdefghij-uc.a.run.app");
                        let token = client
                            .get_id_token(request(&audience, None))
                            .await
                            .unwrap()
                            .into_inner();
                        bytes += token.token.len();
                    }
                    (client, bytes)
                })
            })
            .collect();
        let mut back = Vec::new();
        let mut bytes = 0;
        for task in tasks {
            let (client, b) = task.await.unwrap();
            back.push(client);
            bytes += b;
        }
        (back, bytes)
    };
    // Warm-up: connection buffers and allocator arenas reach their working size.
    let (clients, _) = fill(clients, "warm", WARM).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = support::vm_rss_kib(pid);
    let (_clients, token_bytes) = fill(clients, "fill", FILL).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = support::vm_rss_kib(pid);

    assert_eq!(cache_entries_gauge(port).await as usize, WARM + FILL);
    assert_eq!(emulator.stats().identity.total as usize, WARM + FILL);
    let per_entry = after.saturating_sub(before) as f64 * 1024.0 / FILL as f64;
    let token = token_bytes as f64 / FILL as f64;
    println!(
        "RSS {before} KiB -> {after} KiB over {FILL} audiences: {per_entry:.0} B each, \
         {token:.0} B of it the token, {:.0} B beyond",
        per_entry - token
    );
    assert!(
        per_entry - token <= 1536.0,
        "each cached audience took {per_entry:.0} B of RSS, {:.0} B beyond its {token:.0}-byte token \
         ({before} -> {after} KiB over {FILL} audiences)",
        per_entry - token
    );
}

/// `max_entries` used to be checked before an unlocked insert: concurrent
/// new audiences passed it (26,255 of 10,000), and evicted entries lived on
/// until their next refresh. With max_entries = 100 and 8 clients asking for
/// 2,000 new audiences each, `ListTokens` and the `cache_entries` gauge,
/// sampled throughout, never see more than 100, and RSS stays flat.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_new_audiences_never_exceed_max_entries() {
    const MAX: usize = 100;
    const CLIENTS: usize = 8;
    const AUDIENCES: usize = 2_000;
    let emulator = support::emulator().await;
    let port = support::free_port();
    let broker = start_broker(
        &emulator,
        port,
        &format!("max_entries = {MAX}"),
        "new_audiences_per_minute = 1000000\nnew_audience_burst = 1000000",
        "",
    )
    .await;
    // Fill the cache past its bound once, so the RSS baseline holds a full
    // cache and every later admission evicts.
    let mut client = broker.client().await;
    for i in 0..2 * MAX {
        let audience = format!("https://fill-{i}.example.com");
        client.get_id_token(request(&audience, None)).await.unwrap();
    }
    let pid = broker.child.id();
    let rss_before = support::vm_rss_kib(pid);
    let done = Arc::new(AtomicBool::new(false));
    let mut sampler_client = broker.client().await;
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                samples.push(entries(&mut sampler_client).await as f64);
                samples.push(cache_entries_gauge(port).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        })
    };
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = broker.client().await;
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..AUDIENCES {
                let audience = format!("https://churn-{c}-{i}.example.com");
                match client.get_id_token(request(&audience, None)).await {
                    Ok(_) => ok += 1,
                    // The only refusal allowed: every entry busy at that instant.
                    Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
                }
            }
            ok
        }));
    }
    let mut served = 0;
    for task in tasks {
        served += task.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut samples = sampler.await.unwrap();
    let rss_after = support::vm_rss_kib(pid);
    samples.push(entries(&mut client).await as f64);
    samples.push(cache_entries_gauge(port).await);
    let most = samples.iter().copied().fold(0.0, f64::max);
    println!(
        "{served} of {} served; {} samples, most entries seen {most}",
        CLIENTS * AUDIENCES,
        samples.len()
    );
    assert!(samples.len() >= 10, "too few samples: {}", samples.len());
    assert!(
        most <= MAX as f64,
        "{most} entries seen with max_entries = {MAX}"
    );
    // Refusals only when all entries are in use, which 8 clients cannot make.
    assert!(served >= CLIENTS * AUDIENCES * 99 / 100, "{served} served");
    // The cache ends full, not emptied by eviction.
    assert_eq!(*samples.last().unwrap(), MAX as f64);
    // Evicted entries are freed at once, their refresher tasks included (they
    // used to sleep until the token's refresh time, ~45 minutes, holding it):
    // 16,000 evictions at ~3 KB each would be ~47 MiB.
    let growth = rss_after.saturating_sub(rss_before);
    println!("RSS {rss_before} KiB -> {rss_after} KiB over the churn (+{growth} KiB)");
    assert!(growth < 16 * 1024, "RSS grew {growth} KiB while evicting");
}

/// An upstream answering a 10 MB "ID token" (validly signed) used to have it
/// cached (RSS +21 MB per audience) and then fail to send. Both upstream
/// kinds now refuse an answer over 64 KiB with an error naming the upstream,
/// cache nothing, and the broker's RSS does not grow by the bodies' size.
#[tokio::test(flavor = "multi_thread")]
async fn a_huge_upstream_answer_is_refused_and_not_cached() {
    let emulator = support::emulator().await;
    let port = support::free_port();
    let dir = support::workdir();
    let (key, _) = support::key_file(
        dir.path(),
        "sa",
        "huge@huge-project.iam.gserviceaccount.com",
        &emulator,
        true,
    );
    let broker = start_broker(
        &emulator,
        port,
        "",
        "",
        &support::key_identity("keyed", &key),
    )
    .await;
    // Warm up the connection paths with normal answers first.
    broker.get("", "https://normal.example.com").await.unwrap();
    broker
        .get("keyed", "https://normal.example.com")
        .await
        .unwrap();
    let pid = broker.child.id();
    let before = support::vm_rss_kib(pid);
    emulator.set_faults(Faults {
        huge_body_bytes: Some(10 * 1024 * 1024),
        ..Faults::default()
    });
    let mut client = broker.client().await;
    for (identity, upstream) in [
        (
            "",
            format!("metadata server at http://{}", emulator.metadata_host()),
        ),
        ("keyed", format!("token endpoint {}", emulator.token_uri())),
    ] {
        for i in 0..3 {
            let audience = format!("https://huge-{i}.example.com");
            let status = client
                .get_id_token(GetIdTokenRequest {
                    identity: identity.into(),
                    ..request(&audience, None)
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            let message = status.message();
            assert!(
                message.contains(&upstream) && message.contains("64 KiB"),
                "{message}"
            );
        }
    }
    let after = support::vm_rss_kib(pid);
    let calls = emulator.stats();
    assert_eq!(
        calls.identity.total,
        1 + 3,
        "one call per huge answer: {calls:?}"
    );
    assert_eq!(
        calls.token.total,
        1 + 3,
        "one call per huge answer: {calls:?}"
    );
    let tokens = client
        .list_tokens(ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let huge: Vec<_> = tokens
        .iter()
        .filter(|t| t.audience.starts_with("https://huge-"))
        .collect();
    assert_eq!(huge.len(), 6);
    for entry in huge {
        assert!(
            entry.expire_time.is_none(),
            "a huge token was cached: {entry:?}"
        );
        assert!(entry.last_error.contains("64 KiB"), "{entry:?}");
    }
    let growth = after.saturating_sub(before);
    println!("RSS {before} KiB -> {after} KiB over six 10 MiB answers (+{growth} KiB)");
    assert!(growth < 16 * 1024, "RSS grew {growth} KiB");
}

/// `min_valid_for = 3600s` used to make every call mint (741 mints in 9 s).
/// Now: above a fresh token's usable life (1 h less the 15 min refresh
/// window) is INVALID_ARGUMENT with no upstream call; a value no token from
/// this upstream could meet fails at once without minting; and calls that
/// force a new token while the held one serves everybody else spend from
/// the uid's new-audience budget.
#[tokio::test(flavor = "multi_thread")]
async fn min_valid_for_cannot_force_a_mint_per_call() {
    const BURST: u64 = 10;
    let emulator = support::emulator().await;
    let port = support::free_port();
    let broker = start_broker(
        &emulator,
        port,
        "",
        &format!("new_audiences_per_minute = 1\nnew_audience_burst = {BURST}"),
        "",
    )
    .await;
    let mut client = broker.client().await;

    // 1. Over the cap: refused before anything is looked up.
    let capped = "https://capped.example.com";
    for _ in 0..50 {
        let status = client
            .get_id_token(request(capped, Some(3600)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("2700s")
                && status.message().contains("refresh.refresh_before_expiry"),
            "{status:?}"
        );
    }
    assert_eq!(identity_calls(&emulator, capped), 0);
    // The cap itself is accepted.
    client
        .get_id_token(request(capped, Some(2700)))
        .await
        .unwrap();
    assert_eq!(identity_calls(&emulator, capped), 1);

    // 2. Tokens that live 20 minutes can never have 45 left: after the one
    // fetch that shows it, no more upstream calls.
    emulator.set_faults(Faults {
        token_lifetime_secs: Some(1200),
        ..Faults::default()
    });
    let short = "https://short-lived.example.com";
    for _ in 0..50 {
        let status = client
            .get_id_token(request(short, Some(2700)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    }
    assert_eq!(identity_calls(&emulator, short), 1);

    // 3. A metadata server that answers its cached token again (as GCE's
    // does): each call asking for more than the held token has left makes
    // an upstream call and gets the same token. Those forced calls are
    // charged to the uid; once its burst is spent they are refused without
    // an upstream call.
    emulator.set_faults(Faults {
        token_lifetime_secs: Some(1000),
        metadata_cache_secs: Some(100),
        ..Faults::default()
    });
    let forced = "https://forced.example.com";
    client.get_id_token(request(forced, None)).await.unwrap();
    // Tokens carry whole seconds: wait until the held one has less than
    // 999 s left while any new one would have more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut refused = 0;
    for _ in 0..50 {
        let status = client
            .get_id_token(request(forced, Some(999)))
            .await
            .unwrap_err();
        match status.code() {
            Code::FailedPrecondition => {}
            Code::ResourceExhausted => {
                assert!(status.message().contains("min_valid_for"), "{status:?}");
                refused += 1;
            }
            _ => panic!("{status:?}"),
        }
    }
    let calls = identity_calls(&emulator, forced);
    println!("forced: {calls} upstream calls, {refused} of 50 refused");
    // The first fetch, then at most the rest of the burst (three new
    // audiences spent three) plus a token or two refilled meanwhile.
    assert!(
        calls <= 1 + BURST - 3 + 2,
        "{calls} upstream calls for 50 forced requests"
    );
    assert!(
        refused >= 50 - (BURST - 3 + 2),
        "only {refused} of 50 were refused"
    );
}
