//! The churn benchmark (issue 12): far more distinct audiences than
//! `refresh.max_entries` (100,000 against 10,000), asked for by 4 concurrent
//! clients, so every request past the first 10,000 admits a key and evicts
//! one. It prints the number of entries sampled throughout (which must
//! never exceed the bound), the broker's RSS before and after, and a hot
//! key's latency while idle and during the churn. It asserts the bound.
//!
//! Run with `cargo bench --bench churn`. Sizes come from `BENCH_CHURN_*`
//! environment variables (see [`Sizes::defaults`]).
//!
//! Arrangement: the real `token-broker serve` binary as a child process
//! (log filter `warn`, metrics on a loopback port), the emulator standing in
//! for Google on its own tokio runtime in this process, and the clients on
//! a second runtime over the real Unix socket. Entries are read from the
//! broker's `token_broker_cache_entries` gauge every 50 ms, and from
//! `ListTokens` at the end.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;
mod common;

use common::{
    default_bin, env_usize, free_port, mib, rss_kib, runtime, ChildProcess as ChildBroker,
};
use tonic::transport::Channel;

use token_broker::{
    emulator::{Emulator, EmulatorOptions},
    proto::{token_broker_client::TokenBrokerClient, GetIdTokenRequest, ListTokensRequest},
};

/// The key a latency-sensitive client keeps asking for throughout.
const HOT_AUDIENCE: &str = "https://hot-service-abc123-uc.a.run.app";
/// How often the entries gauge is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct Sizes {
    /// `BENCH_CHURN_AUDIENCES`: distinct audiences asked for during the churn.
    audiences: usize,
    /// `BENCH_CHURN_MAX_ENTRIES`: the broker's `refresh.max_entries`.
    max_entries: usize,
    /// `BENCH_CHURN_CLIENTS`: concurrent clients asking for them.
    clients: usize,
    /// `BENCH_CHURN_HOT_IDLE`: hot-key requests measured before the churn.
    hot_idle: usize,
    /// `BENCH_BIN`: the broker binary.
    bin: PathBuf,
}

impl Sizes {
    fn from_env() -> Self {
        let sizes = Self::defaults();
        // `cargo test --all-targets` runs this binary without `--bench`: a
        // quick smoke run that every path still works, not a measurement.
        if std::env::args().any(|a| a == "--bench") {
            sizes
        } else {
            Self {
                audiences: 400,
                max_entries: 50,
                hot_idle: 100,
                ..sizes
            }
        }
    }

    fn defaults() -> Self {
        Self {
            audiences: env_usize("BENCH_CHURN_AUDIENCES", 100_000),
            max_entries: env_usize("BENCH_CHURN_MAX_ENTRIES", 10_000).max(1),
            clients: env_usize("BENCH_CHURN_CLIENTS", 4).max(1),
            hot_idle: env_usize("BENCH_CHURN_HOT_IDLE", 20_000).max(1),
            bin: std::env::var_os("BENCH_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(default_bin),
        }
    }
}

fn start_broker(sizes: &Sizes, emulator: &Emulator, dir: &Path, port: u16) -> ChildBroker {
    let config = dir.join("churn.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket_path = \"{}\"\n\n[refresh]\nmax_entries = {}\nupstream_qps = 10000\n\n\
             [limits]\nnew_audience_burst = 1000000\nnew_audiences_per_minute = 1000000\n\n\
             [telemetry]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [log]\nfilter = \"warn\"\n\n[[identities]]\nname = \"default\"\n\
             source = \"metadata\"\nmetadata_host = \"{}\"\n",
            dir.join("churn.sock").display(),
            sizes.max_entries,
            emulator.metadata_host()
        ),
    )
    .expect("write the broker's config");
    let log = std::fs::File::create(dir.join("churn.log")).expect("broker log file");
    let child = Command::new(&sizes.bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); build it with `cargo build --release` or set BENCH_BIN",
                sizes.bin.display()
            )
        });
    ChildBroker(child)
}

async fn connect(child: &mut ChildBroker, dir: &Path) -> Channel {
    let socket = dir.join("churn.sock");
    let ready_by = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.0.try_wait().expect("child status") {
            let log = std::fs::read_to_string(dir.join("churn.log")).unwrap_or_default();
            panic!("the broker exited early ({status}):\n{log}");
        }
        if socket.exists() {
            if let Ok(channel) = token_broker::client::channel(&socket).await {
                return channel;
            }
        }
        assert!(Instant::now() < ready_by, "the broker did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn request(audience: &str) -> GetIdTokenRequest {
    GetIdTokenRequest {
        audience: audience.to_owned(),
        identity: String::new(),
        min_valid_for: None,
    }
}

/// One hot-key request; its latency.
async fn hot_request(client: &mut TokenBrokerClient<Channel>) -> Duration {
    let started = Instant::now();
    let token = client
        .get_id_token(request(HOT_AUDIENCE))
        .await
        .unwrap_or_else(|status| panic!("the hot key failed: {status}"))
        .into_inner();
    assert!(!token.token.is_empty());
    started.elapsed()
}

/// The broker's `token_broker_cache_entries` gauge.
async fn entries_gauge(http: &reqwest::Client, port: u16) -> u64 {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix("token_broker_cache_entries "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("token_broker_cache_entries in /metrics") as u64
}

/// How many entries `ListTokens` lists, page by page.
async fn list_all(mut client: TokenBrokerClient<Channel>) -> usize {
    let mut listed = 0;
    let mut page_token = String::new();
    loop {
        let page = client
            .list_tokens(ListTokensRequest {
                page_size: 1000,
                page_token,
            })
            .await
            .expect("ListTokens")
            .into_inner();
        listed += page.tokens.len();
        if page.next_page_token.is_empty() {
            return listed;
        }
        page_token = page.next_page_token;
    }
}

/// p50, p99 and max, in microseconds.
fn percentiles(mut latencies: Vec<Duration>) -> (u128, u128, u128) {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize].as_micros();
    (at(0.50), at(0.99), at(1.0))
}

struct Results {
    idle: Vec<Duration>,
    churn: Vec<Duration>,
    /// (seconds since the churn began, entries).
    samples: Vec<(f64, u64)>,
    rss_before: u64,
    rss_after: u64,
    rss_peak: u64,
    listed: usize,
    served: usize,
    refused: usize,
    upstream: u64,
    churn_secs: f64,
    token_bytes: usize,
}

async fn run(sizes: &Sizes, emulator: &Emulator, dir: &Path) -> Results {
    let port = free_port();
    let mut child = start_broker(sizes, emulator, dir, port);
    let pid = child.0.id();
    let channel = connect(&mut child, dir).await;
    let http = reqwest::Client::new();

    // Idle: the hot key alone.
    let mut hot = TokenBrokerClient::new(channel.clone());
    // The size of the tokens the entries hold (a churn audience is 6 bytes
    // longer than the hot one: 8 more bytes of JWT).
    let token_bytes = hot
        .get_id_token(request(HOT_AUDIENCE))
        .await
        .expect("the hot key")
        .into_inner()
        .token
        .len();
    let mut idle = Vec::with_capacity(sizes.hot_idle);
    for _ in 0..sizes.hot_idle {
        idle.push(hot_request(&mut hot).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, _) = rss_kib(pid);
    let upstream_before = emulator.stats().identity.total;

    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let sampler = {
        let done = done.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let entries = entries_gauge(&http, port).await;
                samples.push((started.elapsed().as_secs_f64(), entries));
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            samples
        })
    };
    let hot_task = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut churn = Vec::new();
            while !done.load(Ordering::Relaxed) {
                churn.push(hot_request(&mut hot).await);
            }
            churn
        })
    };
    // One connection per churning client, as separate programs would have.
    let next = Arc::new(AtomicUsize::new(0));
    let mut churners = Vec::new();
    for _ in 0..sizes.clients {
        let channel = connect(&mut child, dir).await;
        let next = next.clone();
        let total = sizes.audiences;
        churners.push(tokio::spawn(async move {
            let mut client = TokenBrokerClient::new(channel);
            let (mut served, mut refused) = (0, 0);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break (served, refused);
                }
                let audience = format!("https://service-{i:06}-abcdefghij-uc.a.run.app");
                match client.get_id_token(request(&audience)).await {
                    Ok(_) => served += 1,
                    // The cache refuses a key only when every entry it looks
                    // at is in use; counted, not fatal.
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => refused += 1,
                    Err(status) => panic!("GetIdToken({audience}) failed: {status}"),
                }
            }
        }));
    }
    let (mut served, mut refused) = (0, 0);
    for churner in churners {
        let (s, r) = churner.await.expect("churning client");
        served += s;
        refused += r;
    }
    let churn_secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let churn = hot_task.await.expect("hot client");
    let mut samples = sampler.await.expect("sampler");
    samples.push((
        started.elapsed().as_secs_f64(),
        entries_gauge(&http, port).await,
    ));
    let upstream = emulator.stats().identity.total - upstream_before;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_after, rss_peak) = rss_kib(pid);
    let listed = list_all(TokenBrokerClient::new(channel)).await;
    Results {
        idle,
        churn,
        samples,
        rss_before,
        rss_after,
        rss_peak,
        listed,
        served,
        refused,
        upstream,
        churn_secs,
        token_bytes,
    }
}

fn main() {
    let sizes = Sizes::from_env();
    println!("token-broker churn bench: {sizes:?}");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let upstream_rt = runtime("churn-upstream", cores);
    let client_rt = runtime("churn-client", cores);
    let dir = tempfile::Builder::new()
        .prefix("tb-churn-")
        .tempdir()
        .expect("temp dir");
    let emulator = upstream_rt
        .block_on(Emulator::start(EmulatorOptions::default()))
        .expect("emulator starts");
    let results = client_rt.block_on(run(&sizes, &emulator, dir.path()));
    report(&sizes, &results);
    drop(emulator);
}

fn report(sizes: &Sizes, r: &Results) {
    let most = r.samples.iter().map(|(_, n)| *n).max().unwrap_or(0);
    println!(
        "\nchurn: {} distinct audiences, {} clients, max_entries = {}: {:.1}s, {:.0} req/s, \
         {} served, {} refused (cache full), {} upstream calls",
        sizes.audiences,
        sizes.clients,
        sizes.max_entries,
        r.churn_secs,
        sizes.audiences as f64 / r.churn_secs,
        r.served,
        r.refused,
        r.upstream
    );
    println!(
        "entries: {} samples every {}ms, most {most}, at the end {} (ListTokens {})",
        r.samples.len(),
        SAMPLE_EVERY.as_millis(),
        r.samples.last().map_or(0, |(_, n)| *n),
        r.listed
    );
    let step = (r.samples.len() / 10).max(1);
    let timeline: Vec<String> = r
        .samples
        .iter()
        .step_by(step)
        .map(|(t, n)| format!("{t:.1}s:{n}"))
        .collect();
    println!("entries over time: {}", timeline.join(" "));
    println!(
        "RSS: {:.1} MiB before the churn, {:.1} MiB after (peak {:.1} MiB)",
        mib(r.rss_before),
        mib(r.rss_after),
        mib(r.rss_peak)
    );
    // Without churn (audiences <= max_entries: the cache only fills) this
    // is what an entry costs in the real broker (issue 16).
    if sizes.audiences <= sizes.max_entries {
        let held = r.listed.max(1) as f64;
        let per_entry = (r.rss_after as f64 - r.rss_before as f64) * 1024.0 / held;
        println!(
            "per entry held: {per_entry:.0} B of RSS, {} B of it the token, {:.0} B beyond",
            r.token_bytes,
            per_entry - r.token_bytes as f64
        );
    }
    let (idle50, idle99, idle_max) = percentiles(r.idle.clone());
    let (churn50, churn99, churn_max) = percentiles(r.churn.clone());
    println!("hot key, serial GetIdToken (µs):   p50    p99    max      n");
    println!(
        "  idle                            {idle50:>5} {idle99:>6} {idle_max:>6} {:>6}",
        r.idle.len()
    );
    println!(
        "  during churn                    {churn50:>5} {churn99:>6} {churn_max:>6} {:>6}",
        r.churn.len()
    );
    assert!(
        most <= sizes.max_entries as u64 && r.listed <= sizes.max_entries,
        "the cache held {most} entries (ListTokens {}) with max_entries = {}",
        r.listed,
        sizes.max_entries
    );
    assert_eq!(r.served + r.refused, sizes.audiences);
}
