//! The broker's benchmark (issue 4): how close a cached `GetIdToken` comes to
//! the bare cost of gRPC on a Unix socket, how much memory 10,000 cached
//! audiences take, and how long 1,000 concurrent cold requests wait compared
//! with one upstream call. It prints figures and asserts only sanity.
//!
//! Run with `cargo bench --bench broker`. Sizes come from `BENCH_*`
//! environment variables (see [`Sizes::from_env`]).
//!
//! Arrangement, the same for the echo baseline and the broker: both servers
//! run in this process on one multi-thread tokio runtime ("server"), the load
//! comes from a second multi-thread runtime ("client") over real Unix
//! sockets, through the same tonic channels made by
//! `token_broker::client::channel`. The emulator stands in for Google on the
//! server runtime. No tracing subscriber is installed, so neither side logs.
//! The RSS figure is taken from the real `token-broker` binary as a child
//! process.

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;

use token_broker::{
    clock::Clock,
    config::{IdentitySettings, Settings},
    domain::SourceKind,
    emulator::{Emulator, EmulatorOptions},
    proto::{token_broker_client::TokenBrokerClient, GetIdTokenRequest, ListTokensRequest},
    server::{Prepared, Server},
};

mod common;

use common::{
    default_bin,
    echo::{echo_client::EchoClient, echo_server::EchoServer, EchoRequest},
    env_usize, mib, rss_kib, runtime, ChildProcess as ChildBroker, EchoService,
};

/// The audience every hot-path request asks for (pre-warmed).
const HOT_AUDIENCE: &str = "https://hot-service-abc123-uc.a.run.app";

/// Every size the bench uses, each overridable by an env var.
#[derive(Debug, Clone)]
struct Sizes {
    /// `BENCH_REQUESTS`: measured requests per (target, concurrency 64, round).
    requests: usize,
    /// `BENCH_REQUESTS_SERIAL`: measured requests per (target, concurrency 1, round).
    requests_serial: usize,
    /// `BENCH_WARMUP`: unmeasured requests before each measurement.
    warmup: usize,
    /// `BENCH_ROUNDS`: echo and broker are measured alternately this many times.
    rounds: usize,
    /// `BENCH_CONCURRENCY`: the high client concurrency.
    concurrency: usize,
    /// `BENCH_CHANNELS`: connections the high-concurrency tasks share.
    channels: usize,
    /// `BENCH_AUDIENCES`: distinct audiences cached for the RSS figure.
    audiences: usize,
    /// `BENCH_FILL_CONCURRENCY`: concurrent requests while filling them.
    fill_concurrency: usize,
    /// `BENCH_COLD`: concurrent requests for one cold audience.
    cold: usize,
    /// `BENCH_COLD_CHANNELS`: connections those requests share.
    cold_channels: usize,
    /// `BENCH_COLD_TRIALS`: cold measurements, each on a fresh audience.
    cold_trials: usize,
    /// `BENCH_SERVER_THREADS` / `BENCH_CLIENT_THREADS`: runtime workers.
    server_threads: usize,
    client_threads: usize,
    /// `BENCH_BIN`: the broker binary for the RSS figure.
    bin: PathBuf,
}

impl Sizes {
    fn from_env() -> Self {
        let sizes = Self::defaults();
        // `cargo test --all-targets` runs this binary without `--bench`:
        // a quick smoke run that every path still works, not a measurement.
        if std::env::args().any(|a| a == "--bench") {
            sizes
        } else {
            Self {
                requests: 200,
                requests_serial: 100,
                warmup: 20,
                rounds: 1,
                audiences: 200,
                cold: 50,
                cold_trials: 1,
                ..sizes
            }
        }
    }

    fn defaults() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            requests: env_usize("BENCH_REQUESTS", 60_000),
            requests_serial: env_usize("BENCH_REQUESTS_SERIAL", 20_000),
            warmup: env_usize("BENCH_WARMUP", 2_000),
            rounds: env_usize("BENCH_ROUNDS", 5).max(1),
            concurrency: env_usize("BENCH_CONCURRENCY", 64).max(1),
            channels: env_usize("BENCH_CHANNELS", 2).max(1),
            audiences: env_usize("BENCH_AUDIENCES", 10_000),
            fill_concurrency: env_usize("BENCH_FILL_CONCURRENCY", 16).max(1),
            cold: env_usize("BENCH_COLD", 1_000).max(1),
            cold_channels: env_usize("BENCH_COLD_CHANNELS", 8).max(1),
            cold_trials: env_usize("BENCH_COLD_TRIALS", 3).max(1),
            server_threads: env_usize("BENCH_SERVER_THREADS", cores).max(1),
            client_threads: env_usize("BENCH_CLIENT_THREADS", cores).max(1),
            bin: std::env::var_os("BENCH_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(default_bin),
        }
    }
}

// ---------------------------------------------------------------------------
// The echo baseline.

/// Serves the echo service on `socket` until `stop` fires, with the same
/// tonic server defaults the broker uses.
async fn serve_echo(socket: &Path, stop: tokio::sync::oneshot::Receiver<()>) {
    let listener = tokio::net::UnixListener::bind(socket).expect("bind echo socket");
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop.await;
            })
            .await
            .expect("echo server");
    });
}

// ---------------------------------------------------------------------------
// Load generation: the same loop drives both targets.

/// One unary call the load loop can repeat: the echo or a cached GetIdToken.
trait Target: Clone + Send + 'static {
    fn call(&mut self) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
struct EchoTarget {
    client: EchoClient<Channel>,
    message: String,
    reply_padding: u32,
}

impl Target for EchoTarget {
    async fn call(&mut self) {
        let reply = self
            .client
            .echo(EchoRequest {
                message: self.message.clone(),
                reply_padding: self.reply_padding,
            })
            .await
            .expect("echo call")
            .into_inner();
        assert_eq!(reply.message.len(), self.message.len(), "echo answered");
    }
}

#[derive(Clone)]
struct BrokerTarget {
    client: TokenBrokerClient<Channel>,
    audience: String,
}

impl Target for BrokerTarget {
    async fn call(&mut self) {
        let token = self
            .client
            .get_id_token(GetIdTokenRequest {
                audience: self.audience.clone(),
                identity: String::new(),
                min_valid_for: None,
            })
            .await
            .expect("GetIdToken call")
            .into_inner();
        assert!(!token.token.is_empty(), "GetIdToken returned a token");
    }
}

/// Latencies (ns) of `total` calls made by `concurrency` tasks, spread over
/// `targets` (one per channel), and the wall time they took.
struct Run {
    latencies_ns: Vec<u64>,
    elapsed: Duration,
}

async fn drive<T: Target>(targets: &[T], concurrency: usize, total: usize) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut target = targets[i % targets.len()].clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(total / concurrency + 1);
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let sent = Instant::now();
                    target.call().await;
                    latencies.push(sent.elapsed().as_nanos() as u64);
                }
                latencies
            })
        })
        .collect();
    let mut latencies_ns = Vec::with_capacity(total);
    for task in tasks {
        latencies_ns.extend(task.await.expect("load task"));
    }
    Run {
        latencies_ns,
        elapsed: started.elapsed(),
    }
}

/// Every round's runs of one (target, concurrency), pooled.
#[derive(Default)]
struct Pooled {
    latencies_ns: Vec<u64>,
    elapsed: Duration,
    round_rps: Vec<f64>,
}

impl Pooled {
    fn add(&mut self, run: Run) {
        self.round_rps
            .push(run.latencies_ns.len() as f64 / run.elapsed.as_secs_f64());
        self.latencies_ns.extend(run.latencies_ns);
        self.elapsed += run.elapsed;
    }

    fn summary(mut self) -> Summary {
        self.latencies_ns.sort_unstable();
        let pick = |q: f64| {
            let v = &self.latencies_ns;
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1000.0
        };
        Summary {
            p50_us: pick(0.50),
            p99_us: pick(0.99),
            rps: self.latencies_ns.len() as f64 / self.elapsed.as_secs_f64(),
            rps_min: self.round_rps.iter().copied().fold(f64::INFINITY, f64::min),
            rps_max: self.round_rps.iter().copied().fold(0.0, f64::max),
            count: self.latencies_ns.len(),
        }
    }
}

struct Summary {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    rps_min: f64,
    rps_max: f64,
    count: usize,
}

// ---------------------------------------------------------------------------
// Helpers around the broker and the child process.

fn broker_settings(socket: &Path, emulator: &Emulator) -> Settings {
    let mut settings = Settings::default();
    settings.server.socket_path = Some(socket.to_path_buf());
    // The bench asks for thousands of new audiences on purpose.
    settings.limits.new_audience_burst = 1_000_000;
    settings.limits.new_audiences_per_minute = 1_000_000;
    settings.refresh.upstream_qps = 10_000;
    settings.identities = vec![IdentitySettings {
        metadata_host: Some(emulator.metadata_host()),
        ..IdentitySettings::new("default", SourceKind::Metadata)
    }];
    settings
}

async fn get_token(client: &mut TokenBrokerClient<Channel>, audience: &str) -> String {
    let token = client
        .get_id_token(GetIdTokenRequest {
            audience: audience.to_owned(),
            identity: String::new(),
            min_valid_for: None,
        })
        .await
        .unwrap_or_else(|status| panic!("GetIdToken({audience}) failed: {status}"))
        .into_inner();
    assert!(!token.token.is_empty(), "GetIdToken returned a token");
    assert_eq!(token.audience, audience, "token is for the asked audience");
    token.token
}

async fn channels(socket: &Path, n: usize) -> Vec<Channel> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            token_broker::client::channel(socket)
                .await
                .expect("connect to socket"),
        );
    }
    out
}

fn upstream_calls(emulator: &Emulator, audience: &str) -> u64 {
    emulator
        .stats()
        .identity
        .by_audience
        .get(audience)
        .copied()
        .unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The measurements.

struct HotResults {
    rows: Vec<(usize, Summary, Summary)>,
    reply_bytes: usize,
}

/// (a) and (b): echo vs cached GetIdToken at concurrency 1 and `sizes.concurrency`.
async fn hot_path(sizes: &Sizes, echo_socket: &Path, broker_socket: &Path) -> HotResults {
    let mut broker = TokenBrokerClient::new(channels(broker_socket, 1).await.remove(0));
    let hot = broker
        .get_id_token(GetIdTokenRequest {
            audience: HOT_AUDIENCE.into(),
            identity: String::new(),
            min_valid_for: None,
        })
        .await
        .expect("pre-warm the hot audience")
        .into_inner();
    // The echo reply is padded to the size of a GetIdToken answer, so the
    // two differ by the broker's work and not by bytes on the wire.
    let reply_bytes = prost::Message::encoded_len(&hot);
    let reply_padding = reply_bytes.saturating_sub(HOT_AUDIENCE.len() + 4) as u32;

    let mut rows = Vec::new();
    for concurrency in [1, sizes.concurrency] {
        let (n_channels, total) = if concurrency == 1 {
            (1, sizes.requests_serial)
        } else {
            (sizes.channels, sizes.requests)
        };
        let echo_channels = channels(echo_socket, n_channels).await;
        let broker_channels = channels(broker_socket, n_channels).await;
        let echo_targets: Vec<EchoTarget> = echo_channels
            .into_iter()
            .map(|c| EchoTarget {
                client: EchoClient::new(c),
                message: HOT_AUDIENCE.into(),
                reply_padding,
            })
            .collect();
        let broker_targets: Vec<BrokerTarget> = broker_channels
            .into_iter()
            .map(|c| BrokerTarget {
                client: TokenBrokerClient::new(c),
                audience: HOT_AUDIENCE.into(),
            })
            .collect();
        let mut echo = Pooled::default();
        let mut cached = Pooled::default();
        for round in 0..sizes.rounds {
            // Alternate which goes first, so drift in the machine's load
            // (a compile next door) does not favour one side.
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    drive(&echo_targets, concurrency, sizes.warmup).await;
                    echo.add(drive(&echo_targets, concurrency, total).await);
                } else {
                    drive(&broker_targets, concurrency, sizes.warmup).await;
                    cached.add(drive(&broker_targets, concurrency, total).await);
                }
            }
        }
        rows.push((concurrency, echo.summary(), cached.summary()));
    }
    HotResults { rows, reply_bytes }
}

struct ColdResults {
    /// One cold request, alone, per trial (ms).
    single_ms: Vec<f64>,
    /// All `sizes.cold` concurrent cold requests answered, per trial (ms).
    fanin_ms: Vec<f64>,
    /// Upstream calls made for each fan-in audience.
    fanin_upstream: Vec<u64>,
    /// The same fan-in for an already cached audience (ms): the floor.
    cached_fanin_ms: Vec<f64>,
}

/// `n` concurrent GetIdToken calls for `audience` over `chans`, released
/// together; time from release until the last answer.
async fn fan_in(chans: &[Channel], n: usize, audience: &str) -> Duration {
    let gate = Arc::new(tokio::sync::Barrier::new(n + 1));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut client = TokenBrokerClient::new(chans[i % chans.len()].clone());
            let gate = gate.clone();
            let audience = audience.to_owned();
            tokio::spawn(async move {
                gate.wait().await;
                get_token(&mut client, &audience).await;
                Instant::now()
            })
        })
        .collect();
    gate.wait().await;
    let released = Instant::now();
    let mut last = released;
    for task in tasks {
        last = last.max(task.await.expect("fan-in task"));
    }
    last - released
}

/// (d): 1,000 concurrent cold requests for one audience vs one cold request.
async fn cold_fan_in(sizes: &Sizes, broker_socket: &Path, emulator: &Emulator) -> ColdResults {
    let mut single = TokenBrokerClient::new(channels(broker_socket, 1).await.remove(0));
    let chans = channels(broker_socket, sizes.cold_channels).await;
    let mut out = ColdResults {
        single_ms: Vec::new(),
        fanin_ms: Vec::new(),
        fanin_upstream: Vec::new(),
        cached_fanin_ms: Vec::new(),
    };
    for trial in 0..sizes.cold_trials {
        let reference = format!("https://cold-reference-{trial}.bench.example");
        let sent = Instant::now();
        get_token(&mut single, &reference).await;
        out.single_ms.push(sent.elapsed().as_secs_f64() * 1e3);
        assert_eq!(upstream_calls(emulator, &reference), 1, "one upstream call");

        let audience = format!("https://cold-fanin-{trial}.bench.example");
        let took = fan_in(&chans, sizes.cold, &audience).await;
        out.fanin_ms.push(took.as_secs_f64() * 1e3);
        out.fanin_upstream.push(upstream_calls(emulator, &audience));

        let took = fan_in(&chans, sizes.cold, &audience).await;
        out.cached_fanin_ms.push(took.as_secs_f64() * 1e3);
    }
    out
}

struct RssResults {
    baseline_kib: u64,
    filled_kib: u64,
    peak_kib: u64,
    entries: usize,
    upstream: u64,
    fill_secs: f64,
}

/// (c): the real binary's RSS before and after caching `sizes.audiences`.
async fn rss(sizes: &Sizes, emulator: &Emulator, dir: &Path) -> RssResults {
    let socket = dir.join("child.sock");
    let config = dir.join("child.toml");
    let max_entries = sizes.audiences.max(Settings::default().refresh.max_entries);
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket_path = \"{}\"\n\n[refresh]\nmax_entries = {max_entries}\nupstream_qps = 10000\n\n\
             [limits]\nnew_audience_burst = 1000000\nnew_audiences_per_minute = 1000000\n\n\
             [log]\nfilter = \"warn\"\n\n[[identities]]\nname = \"default\"\n\
             source = \"metadata\"\nmetadata_host = \"{}\"\n",
            socket.display(),
            emulator.metadata_host()
        ),
    )
    .expect("write child config");
    let log = std::fs::File::create(dir.join("child.log")).expect("child log file");
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
    let mut child = ChildBroker(child);
    let pid = child.0.id();

    let ready_by = Instant::now() + Duration::from_secs(20);
    let channel = loop {
        if let Some(status) = child.0.try_wait().expect("child status") {
            let log = std::fs::read_to_string(dir.join("child.log")).unwrap_or_default();
            panic!("the broker exited early ({status}):\n{log}");
        }
        if socket.exists() {
            if let Ok(channel) = token_broker::client::channel(&socket).await {
                break channel;
            }
        }
        assert!(Instant::now() < ready_by, "the broker did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (baseline_kib, _) = rss_kib(pid);

    let before = emulator.stats().identity.total;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let total = sizes.audiences;
    let tasks: Vec<_> = (0..sizes.fill_concurrency)
        .map(|_| {
            let mut client = TokenBrokerClient::new(channel.clone());
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    // Realistic lengths: a Cloud Run URL is ~40-60 bytes.
                    let audience = format!("https://service-{i:05}-abcdefghij-uc.a.run.app");
                    get_token(&mut client, &audience).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("fill task");
    }
    let fill_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (filled_kib, peak_kib) = rss_kib(pid);
    let upstream = emulator.stats().identity.total - before;
    // Listed only after RSS was read: the listing allocates in the child.
    let entries = TokenBrokerClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .list_tokens(ListTokensRequest::default())
        .await
        .expect("ListTokens")
        .into_inner()
        .tokens
        .len();
    drop(child);
    RssResults {
        baseline_kib,
        filled_kib,
        peak_kib,
        entries,
        upstream,
        fill_secs,
    }
}

// ---------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let sizes = Sizes::from_env();
    println!("token-broker bench: {sizes:?}");
    // Another build on this small machine shows here first.
    println!("load average at start: {}", load_average());
    let server_rt = runtime("bench-server", sizes.server_threads);
    let client_rt = runtime("bench-client", sizes.client_threads);
    let dir = tempfile::Builder::new()
        .prefix("tb-bench-")
        .tempdir()
        .expect("temp dir");
    let echo_socket = dir.path().join("echo.sock");
    let broker_socket = dir.path().join("broker.sock");

    let emulator = server_rt
        .block_on(Emulator::start(EmulatorOptions::default()))
        .expect("emulator starts");
    let (echo_stop, echo_stop_rx) = tokio::sync::oneshot::channel();
    server_rt.block_on(serve_echo(&echo_socket, echo_stop_rx));
    let prepared = Prepared::new(
        broker_settings(&broker_socket, &emulator),
        &HashMap::new(),
        Clock::system(),
    )
    .expect("broker settings");
    let (broker_stop, broker_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server_rt
        .block_on(async { Server::bind(prepared) })
        .expect("broker binds");
    let serving = server_rt.spawn(server.run(async {
        let _ = broker_stop_rx.await;
    }));

    let t0 = Instant::now();
    let hot = client_rt.block_on(hot_path(&sizes, &echo_socket, &broker_socket));
    let hot_secs = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let cold = client_rt.block_on(cold_fan_in(&sizes, &broker_socket, &emulator));
    let cold_secs = t0.elapsed().as_secs_f64();

    let _ = echo_stop.send(());
    let _ = broker_stop.send(());
    let _ = server_rt.block_on(serving);

    let t0 = Instant::now();
    let rss = client_rt.block_on(rss(&sizes, &emulator, dir.path()));
    let rss_secs = t0.elapsed().as_secs_f64();

    println!("load average at end: {}\n", load_average());
    report(&sizes, &hot, &cold, &rss);
    println!("\n(sections took {hot_secs:.1}s, {cold_secs:.1}s and {rss_secs:.1}s)");
    drop(emulator);
}

fn report(sizes: &Sizes, hot: &HotResults, cold: &ColdResults, rss: &RssResults) {
    println!(
        "(a) echo vs (b) cached GetIdToken, unary over a Unix socket, {} round(s), \
         reply {} bytes both",
        sizes.rounds, hot.reply_bytes
    );
    println!(
        "{:<8} {:>5} {:>8} {:>9} {:>9} {:>10} {:>19}",
        "target", "conc", "calls", "p50 µs", "p99 µs", "req/s", "req/s per round"
    );
    for (concurrency, echo, cached) in &hot.rows {
        for (name, s) in [("echo", echo), ("cached", cached)] {
            println!(
                "{:<8} {:>5} {:>8} {:>9.1} {:>9.1} {:>10.0} {:>9.0}..{:<9.0}",
                name, concurrency, s.count, s.p50_us, s.p99_us, s.rps, s.rps_min, s.rps_max
            );
        }
    }
    println!("\nratios cached/echo (targets: p50 ≤ 1.20, throughput ≥ 0.85)");
    println!(
        "{:>5} {:>10} {:>10} {:>12}",
        "conc", "p50", "p99", "throughput"
    );
    for (concurrency, echo, cached) in &hot.rows {
        let p50 = cached.p50_us / echo.p50_us;
        let rps = cached.rps / echo.rps;
        println!(
            "{:>5} {:>9.2}{} {:>10.2} {:>11.2}{}",
            concurrency,
            p50,
            if p50 <= 1.2 { " " } else { "!" },
            cached.p99_us / echo.p99_us,
            rps,
            if rps >= 0.85 { " " } else { "!" },
        );
    }

    println!(
        "\n(c) RSS of the token-broker binary ({}), {} audiences cached",
        sizes.bin.display(),
        sizes.audiences
    );
    println!(
        "    after start: {:.1} MiB; after filling: {:.1} MiB (peak {:.1} MiB); \
         {:.0} bytes per entry; target ≤ 64 MiB",
        mib(rss.baseline_kib),
        mib(rss.filled_kib),
        mib(rss.peak_kib),
        (rss.filled_kib.saturating_sub(rss.baseline_kib) * 1024) as f64
            / sizes.audiences.max(1) as f64
    );
    println!(
        "    entries listed: {}; upstream calls: {}; filled in {:.1}s at concurrency {}",
        rss.entries, rss.upstream, rss.fill_secs, sizes.fill_concurrency
    );

    println!(
        "\n(d) {} concurrent cold requests for one audience ({} connections)",
        sizes.cold, sizes.cold_channels
    );
    println!(
        "{:>5} {:>9} {:>9} {:>7} {:>9} {:>10} {:>12} {:>9}",
        "trial", "1 cold ms", "all ms", "ratio", "upstream", "cached ms", "all−cached", "ratio"
    );
    // "cached ms": the same fan-in again once the token is cached, i.e. what
    // answering that many calls costs at all; "all−cached" is the part the
    // cold start adds, compared with one upstream call in the last column.
    for t in 0..cold.single_ms.len() {
        let excess = cold.fanin_ms[t] - cold.cached_fanin_ms[t];
        println!(
            "{:>5} {:>9.2} {:>9.2} {:>7.2} {:>9} {:>10.2} {:>12.2} {:>9.2}",
            t,
            cold.single_ms[t],
            cold.fanin_ms[t],
            cold.fanin_ms[t] / cold.single_ms[t],
            cold.fanin_upstream[t],
            cold.cached_fanin_ms[t],
            excess,
            excess / cold.single_ms[t],
        );
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median: one cold call {:.2} ms, {} cold answered in {:.2} ms = {:.2}× one upstream call",
        med(&cold.single_ms),
        sizes.cold,
        med(&cold.fanin_ms),
        med(&cold.fanin_ms) / med(&cold.single_ms)
    );
}
