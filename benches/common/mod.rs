//! What the benches share: sizes from the environment, the binary under
//! test, child processes, memory figures, runtimes and the echo baseline.
//! Each bench uses a part of it.

#![allow(dead_code)]

use std::{path::PathBuf, process::Child};

use tonic::{Request, Response, Status};

/// The echo baseline's generated code; compiled by build.rs, used only by
/// the benches.
pub mod echo {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("bench.v1");
}

use echo::{echo_server::Echo, EchoReply, EchoRequest};

/// A whole number from env var `name` (`_` separators allowed), else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Cargo builds the binary alongside benches and names it at compile time;
/// outside cargo, fall back to the release build.
pub fn default_bin() -> PathBuf {
    option_env!("CARGO_BIN_EXE_token-broker")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/token-broker")
        })
}

/// A child process, killed when dropped, so a failed bench leaves nothing
/// behind.
pub struct ChildProcess(pub Child);

impl ChildProcess {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn runtime(name: &str, threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The bare echo service: answers `message`, padded to `reply_padding`
/// bytes so its reply is as large as a `GetIdToken` answer.
pub struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let request = request.into_inner();
        Ok(Response::new(EchoReply {
            padding: vec![0; request.reply_padding as usize],
            message: request.message,
        }))
    }
}
