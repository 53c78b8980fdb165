//! Issue 16, point 1: the audit trail is written off the request path. A
//! log output that stops taking lines (a wedged journald, a full pipe) used
//! to block every request at its audit line; now served-request lines are
//! dropped and counted, denials wait at most a second, and a warning says
//! how many lines were lost once the output moves again.

use std::{io::Read, process::Stdio, time::Duration};

use token_broker::proto::GetIdTokenRequest;
use tokio::time::Instant;
use tonic::Code;

use crate::support;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wedged_log_output_does_not_stall_requests_and_the_loss_is_reported() {
    const REQUESTS: usize = 24_000;
    let emulator = support::emulator().await;
    let dir = support::workdir();
    let socket = dir.path().join("broker.sock");
    let telemetry = free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[[policy]]\nuids = [0]\nidentities = [\"*\"]\naudiences = [\"https://a.example.com\"]\n\n[telemetry]\nlisten = \"127.0.0.1:{telemetry}\"\n",
            support::config_text(&socket, &support::metadata_identity("default", &emulator))
        ),
    )
    .unwrap();
    // stderr is a pipe nobody reads until the end: after 64 KiB, every
    // write to it blocks.
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    let mut child = support::base_command(&["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(write_end))
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child.id());
    for _ in 0..500 {
        if token_broker::client::channel(&socket).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = token_broker::client::connect(&socket).await.unwrap();
    let request = |audience: &str| GetIdTokenRequest {
        audience: audience.into(),
        identity: String::new(),
        min_valid_for: None,
    };
    client
        .clone()
        .get_id_token(request("https://a.example.com"))
        .await
        .unwrap();

    // Far more served-request lines than the pipe (64 KiB) and the queue
    // (16,384 lines) hold together.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut slowest = Duration::ZERO;
            for _ in 0..REQUESTS / 16 {
                let t0 = Instant::now();
                let mut req = tonic::Request::new(GetIdTokenRequest {
                    audience: "https://a.example.com".into(),
                    identity: String::new(),
                    min_valid_for: None,
                });
                req.set_timeout(Duration::from_secs(5));
                client.get_id_token(req).await.expect("cached token");
                slowest = slowest.max(t0.elapsed());
            }
            slowest
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(done) = tasks.join_next().await {
        slowest = slowest.max(done.unwrap());
    }
    eprintln!(
        "{REQUESTS} cached requests with a wedged log in {:?}, slowest {slowest:?}",
        started.elapsed()
    );
    assert!(slowest < Duration::from_secs(1), "slowest {slowest:?}");

    // A denial waits for room in the log (at most a second), then answers.
    let t0 = Instant::now();
    let err = client
        .clone()
        .get_id_token(request("https://b.example.com"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    let metrics = reqwest::get(format!("http://127.0.0.1:{telemetry}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("token_broker_log_lines_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(dropped >= 1000.0, "dropped {dropped}: {metrics}");

    // Unwedge the output: the writer catches up and reports the loss.
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::from(read_end);
        let mut seen = Vec::new();
        let mut chunk = [0u8; 65536];
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let n = file.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&seen).contains("log line(s) dropped") {
                break;
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let log = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert!(log.contains("log line(s) dropped"), "{log}");
    let _ = child.kill();
    let _ = child.wait();
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
