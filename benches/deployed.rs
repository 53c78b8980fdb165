//! The broker as deployed, out of process (issue 16): the release binary
//! with a default config and default logging appended to a file, against a
//! bare tonic echo server and a bare hyper HTTP server answering the same
//! bytes, each its own process, driven by a separate load-generator process.
//! Rounds alternate A/B/A/B so machine noise hits both sides alike; medians
//! and ratios are printed. Server CPU per request is read from the server
//! process's /proc/PID/stat around each round.
//!
//! Run with `cargo bench --bench deployed`. Sizes come from env variables:
//! `DEPLOYED_ROUNDS` (rounds per side, default 3, so six interleaved),
//! `DEPLOYED_REQUESTS` (requests per round at the high concurrency, default
//! 100000), `DEPLOYED_REQUESTS_LOW` (per round at 1 and 8 in flight, default
//! 20000), `DEPLOYED_LOG` (the broker's `RUST_LOG`, default unset: `info`).
//! Run without `--bench` (as `cargo test --all-targets` does) it makes a
//! tiny smoke run.
//!
//! One executable plays every part: the orchestrator (no role), and, when
//! started with `DEPLOYED_ROLE`, the echo gRPC server, the echo HTTP server
//! or the load generator.

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;

use token_broker::{
    emulator::{Emulator, EmulatorOptions},
    proto::{token_broker_client::TokenBrokerClient, GetIdTokenRequest},
};

mod common;

use common::{
    echo::{echo_client::EchoClient, echo_server::EchoServer, EchoReply, EchoRequest},
    env_usize, free_port, ChildProcess as Process, EchoService,
};

const HOT_AUDIENCE: &str = "https://hot-service-abc123-uc.a.run.app";
const ROLE_ENV: &str = "DEPLOYED_ROLE";

fn main() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("echo-grpc") => echo_grpc(),
        Ok("echo-http") => echo_http(),
        Ok("load") => load(),
        Ok(other) => panic!("unknown {ROLE_ENV}={other}"),
        Err(_) => orchestrate(),
    }
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    common::runtime("deployed", threads)
}

/// The echo servers log nothing, as the broker logs nothing below its
/// filter. Without a global subscriber, tracing (whose `log` feature axum
/// turns on) would hand every h2 and hyper span to the `log` crate, a cost
/// of several µs per request that the broker, which installs one, never
/// pays, and that made echo look slower than it is.
fn no_logging() {
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
}

// ---------------------------------------------------------------------------
// Role: the echo gRPC server, tonic defaults as the broker uses them.

fn echo_grpc() {
    let socket = PathBuf::from(std::env::var("DEPLOYED_SOCKET").expect("DEPLOYED_SOCKET"));
    no_logging();
    runtime(2).block_on(async move {
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind echo socket");
        println!("ready");
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .expect("echo server");
    });
}

// ---------------------------------------------------------------------------
// Role: the bare hyper HTTP/1.1 server answering the broker's bytes.

fn echo_http() {
    use http_body_util::Full;
    use hyper::{body::Bytes, server::conn::http1, service::service_fn};

    let body = Bytes::from(std::env::var("DEPLOYED_BODY").expect("DEPLOYED_BODY"));
    let content_type = std::env::var("DEPLOYED_CONTENT_TYPE").expect("DEPLOYED_CONTENT_TYPE");
    no_logging();
    runtime(2).block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().unwrap());
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let body = body.clone();
            let content_type = content_type.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let response = hyper::Response::builder()
                        .header("metadata-flavor", "Google")
                        .header("content-type", content_type.as_str())
                        .body(Full::new(body.clone()))
                        .expect("response");
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

// ---------------------------------------------------------------------------
// Role: the load generator. Prints one line: `count p50_ns p99_ns wall_ns`.

#[derive(Clone)]
enum Call {
    Broker(TokenBrokerClient<Channel>),
    Echo(EchoClient<Channel>, String, u32),
}

impl Call {
    async fn once(&mut self) {
        match self {
            Call::Broker(client) => {
                let token = client
                    .get_id_token(GetIdTokenRequest {
                        audience: HOT_AUDIENCE.into(),
                        identity: String::new(),
                        min_valid_for: None,
                    })
                    .await
                    .expect("GetIdToken")
                    .into_inner();
                assert!(!token.token.is_empty());
            }
            Call::Echo(client, message, padding) => {
                client
                    .echo(EchoRequest {
                        message: message.clone(),
                        reply_padding: *padding,
                    })
                    .await
                    .expect("echo");
            }
        }
    }
}

/// One HTTP/1.1 keep-alive connection making google-auth's identity request.
struct HttpConnection {
    stream: TcpStream,
    request: Arc<Vec<u8>>,
    buffer: Vec<u8>,
}

impl HttpConnection {
    async fn once(&mut self) {
        self.stream.write_all(&self.request).await.expect("write");
        self.buffer.clear();
        let (head_end, length) = loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "server closed the connection");
            self.buffer.extend_from_slice(&chunk[..n]);
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffer[..end]).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .expect("content-length")
                    .trim()
                    .parse()
                    .expect("length");
                break (end + 4, length);
            }
        };
        while self.buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "server closed mid-body");
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

fn load() {
    let target = std::env::var("DEPLOYED_TARGET").expect("DEPLOYED_TARGET");
    let connections = env_usize("DEPLOYED_CONNECTIONS", 1);
    let in_flight = env_usize("DEPLOYED_IN_FLIGHT", 1);
    let total = env_usize("DEPLOYED_TOTAL", 1000);
    let warmup = env_usize("DEPLOYED_WARMUP", 200);
    runtime(2).block_on(async move {
        let per_task = total.div_ceil(in_flight);
        let warm_per_task = warmup.div_ceil(in_flight);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        if target == "http" {
            let addr: SocketAddr = std::env::var("DEPLOYED_ADDR").unwrap().parse().unwrap();
            let request = Arc::new(
                format!(
                    "GET /computeMetadata/v1/instance/service-accounts/default/identity?audience={}&format=full HTTP/1.1\r\n\
                     Host: 127.0.0.1:{}\r\nMetadata-Flavor: Google\r\nUser-Agent: bench\r\n\r\n",
                    url_encode(HOT_AUDIENCE),
                    addr.port()
                )
                .into_bytes(),
            );
            // HTTP/1.1 carries one request at a time: one connection per task.
            for _ in 0..in_flight {
                let request = request.clone();
                tasks.spawn(async move {
                    let mut conn = HttpConnection {
                        stream: TcpStream::connect(addr).await.expect("connect"),
                        request,
                        buffer: Vec::new(),
                    };
                    for _ in 0..warm_per_task {
                        conn.once().await;
                    }
                    let mut out = Vec::with_capacity(per_task);
                    for _ in 0..per_task {
                        let t0 = Instant::now();
                        conn.once().await;
                        out.push(t0.elapsed().as_nanos() as u64);
                    }
                    out
                });
            }
        } else {
            let socket = PathBuf::from(std::env::var("DEPLOYED_SOCKET").unwrap());
            let mut calls = Vec::new();
            for _ in 0..connections {
                let channel = token_broker::client::channel(&socket)
                    .await
                    .expect("connect");
                calls.push(match target.as_str() {
                    "broker" => Call::Broker(TokenBrokerClient::new(channel)),
                    "echo" => Call::Echo(
                        EchoClient::new(channel),
                        std::env::var("DEPLOYED_MESSAGE").unwrap(),
                        env_usize("DEPLOYED_PADDING", 0) as u32,
                    ),
                    other => panic!("unknown target {other}"),
                });
            }
            for task in 0..in_flight {
                let mut call = calls[task % connections].clone();
                tasks.spawn(async move {
                    for _ in 0..warm_per_task {
                        call.once().await;
                    }
                    let mut out = Vec::with_capacity(per_task);
                    for _ in 0..per_task {
                        let t0 = Instant::now();
                        call.once().await;
                        out.push(t0.elapsed().as_nanos() as u64);
                    }
                    out
                });
            }
        }
        let mut latencies = Vec::with_capacity(total);
        while let Some(done) = tasks.join_next().await {
            latencies.extend(done.expect("load task"));
        }
        let wall = started.elapsed().as_nanos();
        latencies.sort_unstable();
        println!(
            "{} {} {} {}",
            latencies.len(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            wall
        );
    });
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn url_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

// ---------------------------------------------------------------------------
// The orchestrator.

/// utime + stime of `pid`, in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the `(comm)`, which may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    ticks * 1_000_000_000 / hz
}

fn self_exe() -> PathBuf {
    std::env::current_exe().expect("current exe")
}

/// Starts this executable in `role`; returns it and its first stdout line.
fn start_role(role: &str, env: &[(&str, String)]) -> (Process, String) {
    let mut cmd = Command::new(self_exe());
    cmd.env(ROLE_ENV, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn role");
    let mut stdout = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).expect("role stdout") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    (Process(child), String::from_utf8(line).unwrap())
}

#[derive(Clone, Copy, Debug, Default)]
struct Round {
    p50_ns: u64,
    p99_ns: u64,
    rps: f64,
    cpu_ns_per_request: f64,
}

fn run_load(server_pid: u32, env: &[(&str, String)]) -> Round {
    let before = cpu_ns(server_pid);
    let mut cmd = Command::new(self_exe());
    cmd.env(ROLE_ENV, "load").stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("load generator");
    assert!(out.status.success(), "load generator failed");
    let after = cpu_ns(server_pid);
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let (count, p50, p99, wall) = (f[0], f[1], f[2], f[3]);
    Round {
        p50_ns: p50,
        p99_ns: p99,
        // Wall time includes warm-up; good enough for a rate next to its twin.
        rps: count as f64 / (wall as f64 / 1e9),
        cpu_ns_per_request: (after - before) as f64 / count as f64,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

struct Comparison {
    label: String,
    echo: Vec<Round>,
    broker: Vec<Round>,
}

impl Comparison {
    fn print(&self) {
        let m = |rounds: &[Round], f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let row = |name: &str, f: fn(&Round) -> f64, unit: &str| {
            let (e, b) = (m(&self.echo, f), m(&self.broker, f));
            println!(
                "  {name:<22} echo {e:>10.1}{unit:<3} broker {b:>10.1}{unit:<3} ratio {:.2}",
                b / e
            );
        };
        println!(
            "{} (median of {} rounds each):",
            self.label,
            self.echo.len()
        );
        row("p50", |r| r.p50_ns as f64 / 1000.0, "µs");
        row("p99", |r| r.p99_ns as f64 / 1000.0, "µs");
        row("throughput", |r| r.rps, "/s");
        row(
            "server CPU per request",
            |r| r.cpu_ns_per_request / 1000.0,
            "µs",
        );
    }
}

fn orchestrate() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = env_usize("DEPLOYED_ROUNDS", if full { 3 } else { 1 });
    let high = env_usize("DEPLOYED_REQUESTS", if full { 100_000 } else { 500 });
    let low = env_usize("DEPLOYED_REQUESTS_LOW", if full { 20_000 } else { 200 });
    let warmup = if full { 2_000 } else { 50 };
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_token-broker"));
    println!(
        "deployed bench: {} binary {}, {rounds} round(s) per side, {high} requests at 64 in flight, {low} at 1 and 8",
        if full { "release" } else { "smoke run of the" },
        bin.display()
    );

    let dir = tempfile::Builder::new()
        .prefix("tb-deployed-")
        .tempdir()
        .expect("temp dir");
    let rt = runtime(1);
    let emulator = rt
        .block_on(Emulator::start(EmulatorOptions::default()))
        .expect("emulator");

    // The broker as a user runs it: default settings, logging on, stderr
    // appended to a file.
    let broker_socket = dir.path().join("broker.sock");
    let metadata_port = free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket_path = \"{}\"\n\n[[identities]]\nname = \"default\"\nsource = \"metadata\"\nmetadata_host = \"{}\"\n\n[metadata_endpoint]\nlisten = \"127.0.0.1:{metadata_port}\"\n",
            broker_socket.display(),
            emulator.metadata_host()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("broker.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log);
    if let Ok(filter) = std::env::var("DEPLOYED_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    let broker = Process(cmd.spawn().expect("start broker"));
    wait_for_socket(&broker_socket);

    // Warm the hot token, and learn the exact sizes of both answers.
    let (grpc_reply_len, http_body) = rt.block_on(async {
        let channel = token_broker::client::channel(&broker_socket)
            .await
            .expect("connect broker");
        let token = TokenBrokerClient::new(channel)
            .get_id_token(GetIdTokenRequest {
                audience: HOT_AUDIENCE.into(),
                identity: String::new(),
                min_valid_for: None,
            })
            .await
            .expect("warm token")
            .into_inner();
        let http = metadata_get(metadata_port).await;
        (prost::Message::encoded_len(&token), http)
    });
    let message = "m".repeat(HOT_AUDIENCE.len());
    let padding = padding_for(&message, grpc_reply_len);

    let echo_socket = dir.path().join("echo.sock");
    let (echo, _) = start_role(
        "echo-grpc",
        &[("DEPLOYED_SOCKET", echo_socket.display().to_string())],
    );
    let (echo_http, echo_http_addr) = start_role(
        "echo-http",
        &[
            ("DEPLOYED_BODY", http_body.clone()),
            ("DEPLOYED_CONTENT_TYPE", "text/html; charset=utf-8".into()),
        ],
    );

    let mut results = Vec::new();
    for (connections, in_flight, total) in [(8, 64, high), (1, 1, low), (8, 8, low)] {
        let mut cmp = Comparison {
            label: format!("gRPC GetIdToken (cached) vs echo, {connections} connection(s) x {in_flight} in flight"),
            echo: Vec::new(),
            broker: Vec::new(),
        };
        let common = |target: &str, socket: &Path| {
            vec![
                ("DEPLOYED_TARGET", target.to_owned()),
                ("DEPLOYED_SOCKET", socket.display().to_string()),
                ("DEPLOYED_CONNECTIONS", connections.to_string()),
                ("DEPLOYED_IN_FLIGHT", in_flight.to_string()),
                ("DEPLOYED_TOTAL", total.to_string()),
                ("DEPLOYED_WARMUP", warmup.to_string()),
                ("DEPLOYED_MESSAGE", message.clone()),
                ("DEPLOYED_PADDING", padding.to_string()),
            ]
        };
        for _ in 0..rounds {
            cmp.echo
                .push(run_load(echo.pid(), &common("echo", &echo_socket)));
            cmp.broker
                .push(run_load(broker.pid(), &common("broker", &broker_socket)));
        }
        results.push(cmp);
    }
    let http_in_flight = 8;
    let mut cmp = Comparison {
        label: format!(
            "metadata endpoint GET .../identity (cached) vs bare hyper, {http_in_flight} connections x 1 in flight"
        ),
        echo: Vec::new(),
        broker: Vec::new(),
    };
    let http_env = |addr: String| {
        vec![
            ("DEPLOYED_TARGET", "http".to_owned()),
            ("DEPLOYED_ADDR", addr),
            ("DEPLOYED_IN_FLIGHT", http_in_flight.to_string()),
            ("DEPLOYED_TOTAL", low.to_string()),
            ("DEPLOYED_WARMUP", warmup.to_string()),
        ]
    };
    for _ in 0..rounds {
        cmp.echo
            .push(run_load(echo_http.pid(), &http_env(echo_http_addr.clone())));
        cmp.broker.push(run_load(
            broker.pid(),
            &http_env(format!("127.0.0.1:{metadata_port}")),
        ));
    }
    results.push(cmp);

    println!();
    for cmp in &results {
        cmp.print();
    }
    let log_bytes = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    println!(
        "\nbroker log: {:.1} MiB written during the run (RUST_LOG {})",
        log_bytes as f64 / (1024.0 * 1024.0),
        std::env::var("DEPLOYED_LOG").unwrap_or_else(|_| "unset: info".into())
    );
    drop((broker, echo, echo_http));
    drop(emulator);
}

fn wait_for_socket(socket: &Path) {
    for _ in 0..400 {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("broker did not come up on {}", socket.display());
}

/// The metadata endpoint's answer body for the hot audience.
async fn metadata_get(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!(
        "GET /computeMetadata/v1/instance/service-accounts/default/identity?audience={}&format=full HTTP/1.1\r\n\
         Host: 127.0.0.1:{port}\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n",
        url_encode(HOT_AUDIENCE)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap()
}

/// Padding that makes the echo reply encode to `target` bytes (or the
/// nearest a varint length allows).
fn padding_for(message: &str, target: usize) -> usize {
    let len = |p: usize| {
        prost::Message::encoded_len(&EchoReply {
            message: message.to_owned(),
            padding: vec![0; p],
        })
    };
    (0..target)
        .min_by_key(|&p| len(p).abs_diff(target))
        .unwrap_or(0)
}
