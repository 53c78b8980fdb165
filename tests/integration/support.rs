//! Shared setup for the black-box tests: the real emulator over HTTP, the
//! real `token-broker` binary on a real Unix socket, real gRPC clients.
//! No test re-implements any of this.

#![allow(dead_code)]

pub mod kube;
pub mod pod_network;

use std::{
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use token_broker::{
    emulator::{
        write_key_file, Emulator, EmulatorOptions, Permission, ServiceAccountRegistration,
        DEFAULT_ACCOUNT_EMAIL,
    },
    proto::{
        token_broker_client::TokenBrokerClient, AccessToken, GetAccessTokenRequest,
        GetIdTokenRequest,
    },
};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

/// Starts an emulator on a free loopback port.
pub async fn emulator() -> Emulator {
    Emulator::start(EmulatorOptions::default())
        .await
        .expect("emulator starts")
}

/// Starts an emulator holding the service accounts of `grants`, each of
/// which the node's own account (the metadata server's default, what a
/// per-workload identity impersonates from) is granted its permission on.
pub async fn emulator_granting_the_node(grants: &[(&str, Permission)]) -> Emulator {
    let emulator = emulator().await;
    for (account, _) in grants {
        emulator.create_service_account(account);
    }
    for (account, permission) in grants {
        emulator.grant(DEFAULT_ACCOUNT_EMAIL, account, *permission);
    }
    emulator
}

/// An emulator on tokio's clock, and that clock: in a `start_paused` test
/// both the engine and the emulator's token lifetimes follow paused time.
pub async fn emulator_on_tokio_clock() -> (token_broker::clock::Clock, Emulator) {
    let clock = token_broker::clock::Clock::tokio();
    let emulator = Emulator::start(EmulatorOptions {
        clock: clock.clone(),
        ..EmulatorOptions::default()
    })
    .await
    .expect("emulator starts");
    (clock, emulator)
}

/// A temporary directory for one test's files (config, keys, socket, log).
pub fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tb-test-")
        .tempdir()
        .expect("temp dir")
}

/// Writes a fresh key for `email` under `dir` (mode 0600) and registers it
/// with the emulator unless `register` is false.
pub fn key_file(
    dir: &Path,
    name: &str,
    email: &str,
    emulator: &Emulator,
    register: bool,
) -> (PathBuf, ServiceAccountRegistration) {
    let path = dir.join(format!("{name}.json"));
    let registration = write_key_file(&path, email, &emulator.token_uri()).expect("key written");
    if register {
        emulator.register_service_account(registration.clone());
    }
    (path, registration)
}

/// A config file's text with the given identity tables appended. Background
/// retries after a failure wait an hour, so a test's upstream call counts
/// are exactly those its own requests caused. The upstream budget is set
/// out of the way: it is tested on its own (`cache_engine`), and at its
/// default of 20 calls a second it would pace tests that fetch thousands
/// of audiences.
pub fn config_text(socket: &Path, identities: &str) -> String {
    format!(
        r#"[server]
socket_path = "{}"

[refresh]
retry_initial = "1h"
retry_max = "1h"
upstream_qps = 10000

{identities}
"#,
        socket.display()
    )
}

/// A config file's text with the default retry settings (`1s` backing off
/// to `60s`), for tests of the cache's own retries.
pub fn config_text_default_retries(socket: &Path, identities: &str) -> String {
    format!(
        "[server]\nsocket_path = \"{}\"\n\n{identities}\n",
        socket.display()
    )
}

pub fn metadata_identity(name: &str, emulator: &Emulator) -> String {
    format!(
        "[[identities]]\nname = \"{name}\"\nsource = \"metadata\"\nmetadata_host = \"{}\"\n",
        emulator.metadata_host()
    )
}

pub fn key_identity(name: &str, key_file: &Path) -> String {
    format!(
        "[[identities]]\nname = \"{name}\"\nsource = \"service_account_key\"\nkey_file = \"{}\"\n",
        key_file.display()
    )
}

/// A running `token-broker serve` process; SIGKILLed on drop if still alive.
pub struct Broker {
    pub child: Child,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    pub dir: tempfile::TempDir,
    /// Every token `get` returned; on drop the log must hold none of them.
    pub served: std::sync::Mutex<Vec<String>>,
}

impl Broker {
    /// Writes `config` into a fresh directory and serves it, logging at
    /// `log_filter` to a file. Waits until the socket answers.
    pub async fn start(config: impl FnOnce(&Path) -> String, log_filter: &str) -> Broker {
        let dir = workdir();
        let socket = dir.path().join("broker.sock");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config(&socket)).unwrap();
        let broker = Self::spawn(
            dir,
            socket,
            &["serve", "--config", config_path.to_str().unwrap()],
            log_filter,
        );
        broker.wait_ready().await;
        broker
    }

    /// [`Broker::start`], with `customize` applied to the command first
    /// (resource limits, for example).
    pub async fn start_with(
        config: impl FnOnce(&Path) -> String,
        log_filter: &str,
        customize: impl FnOnce(&mut Command),
    ) -> Broker {
        let dir = workdir();
        let socket = dir.path().join("broker.sock");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config(&socket)).unwrap();
        let broker = Self::spawn_with(
            dir,
            socket,
            &["serve", "--config", config_path.to_str().unwrap()],
            log_filter,
            customize,
        );
        broker.wait_ready().await;
        broker
    }

    /// Spawns the binary with `args` and a clean environment.
    pub fn spawn(
        dir: tempfile::TempDir,
        socket: PathBuf,
        args: &[&str],
        log_filter: &str,
    ) -> Broker {
        Self::spawn_with(dir, socket, args, log_filter, |_| {})
    }

    /// [`Broker::spawn`] with `env` added to the clean environment.
    pub fn spawn_with_env(
        dir: tempfile::TempDir,
        socket: PathBuf,
        args: &[&str],
        log_filter: &str,
        env: &[(&str, &str)],
    ) -> Broker {
        Self::spawn_with(dir, socket, args, log_filter, |command| {
            command.envs(env.iter().copied());
        })
    }

    fn spawn_with(
        dir: tempfile::TempDir,
        socket: PathBuf,
        args: &[&str],
        log_filter: &str,
        customize: impl FnOnce(&mut Command),
    ) -> Broker {
        let log_path = dir.path().join("broker.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = base_command(args);
        customize(&mut command);
        // An empty filter leaves the config's log.filter in charge. Otherwise
        // the broker's own code logs at TRACE in every test, so the secret
        // check on drop covers the whole suite at the most verbose level.
        if !log_filter.is_empty() {
            command.env("RUST_LOG", format!("{log_filter},token_broker=trace"));
        }
        let child = command
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("token-broker starts");
        Broker {
            child,
            socket,
            log_path,
            dir,
            served: Default::default(),
        }
    }

    /// Polls until the socket accepts a gRPC connection (process startup,
    /// not a timing assertion), failing with the log if the process dies.
    pub async fn wait_ready(&self) {
        for _ in 0..500 {
            if self.socket.exists() && token_broker::client::channel(&self.socket).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("broker did not come up; log:\n{}", self.log());
    }

    pub async fn client(&self) -> TokenBrokerClient<Channel> {
        token_broker::client::connect(&self.socket)
            .await
            .expect("connects")
    }

    /// GetIdToken for (identity, audience).
    pub async fn get(
        &self,
        identity: &str,
        audience: &str,
    ) -> Result<token_broker::proto::IdToken, tonic::Status> {
        self.client()
            .await
            .get_id_token(GetIdTokenRequest {
                audience: audience.into(),
                identity: identity.into(),
                min_valid_for: None,
            })
            .await
            .map(tonic::Response::into_inner)
            .inspect(|token| self.served.lock().unwrap().push(token.token.clone()))
    }

    /// `GetAccessToken` for `identity` and `scopes` on a new connection;
    /// every token it returns is recorded as served.
    pub async fn get_access(
        &self,
        identity: &str,
        scopes: &[&str],
    ) -> Result<AccessToken, tonic::Status> {
        self.client()
            .await
            .get_access_token(GetAccessTokenRequest {
                identity: identity.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                min_valid_for: None,
            })
            .await
            .map(tonic::Response::into_inner)
            .inspect(|token| self.served.lock().unwrap().push(token.token.clone()))
    }

    /// The emulator's tokeninfo for `token`, an access token this broker
    /// served another way than [`Broker::get`] (the CLI, the metadata
    /// endpoint, a sink); recorded as served, so the drop check proves it
    /// never reached the log. Panics unless the emulator issued it.
    pub async fn served_access_token_info(
        &self,
        emulator: &Emulator,
        token: &str,
    ) -> serde_json::Value {
        self.served.lock().unwrap().push(token.to_owned());
        tokeninfo(emulator, token)
            .await
            .unwrap_or_else(|| panic!("not an access token the emulator issued"))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        // The daemon writes its log from a thread behind a queue, so a line
        // logged just before this call may land a moment later: read once
        // the file has stopped growing for 20 ms (at most 1 s).
        let mut last = None;
        for _ in 0..50 {
            let len = std::fs::metadata(&self.log_path).map(|m| m.len()).ok();
            if len.is_some() && len == last {
                break;
            }
            last = len;
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls the daemon's log until `found` holds for it, and returns it;
    /// panics naming `what` after 10 s (process output, not a timing
    /// assertion: the log is written from a thread behind a queue).
    pub async fn wait_for_log(&self, what: &str, found: impl Fn(&str) -> bool) -> String {
        for _ in 0..400 {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            if found(&log) {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("never logged: {what}; log:\n{}", self.log());
    }

    /// [`Broker::wait_for_log`] until `text` appears `count` times.
    pub async fn wait_for_log_text(&self, text: &str, count: usize) -> String {
        self.wait_for_log(&format!("{text:?} {count} time(s)"), |log| {
            log.matches(text).count() >= count
        })
        .await
    }

    /// Sends SIGTERM and waits for exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(&self.child, nix::sys::signal::Signal::SIGTERM);
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..1500 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("broker did not exit; log:\n{}", self.log());
    }

    /// Whatever the process printed on stdout (after it exited).
    pub fn stdout(&mut self) -> String {
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            return;
        }
        let log = self.log();
        for token in self.served.lock().unwrap().iter() {
            assert!(
                !log.contains(token.as_str()),
                "a served token reached the daemon's log"
            );
            // The signature alone would be enough to replay nothing, but no part belongs in a log.
            if let Some(signature) = token.rsplit('.').next().filter(|s| s.len() > 20) {
                assert!(
                    !log.contains(signature),
                    "a token signature reached the daemon's log"
                );
            }
        }
    }
}

pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
        .expect("signal sent");
}

/// The binary with an environment free of anything that would change its
/// behaviour behind the test's back.
pub fn base_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("GCE_METADATA_HOST")
        .env_remove("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES")
        .env_remove("TOKEN_BROKER_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("TOKEN_BROKER__") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs the CLI to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = base_command(args).output().expect("cli runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Verifies `token`'s RS256 signature against the emulator's JWKS, fetched
/// over HTTP, and its audience; returns the claims.
pub async fn verify(emulator: &Emulator, token: &str, audience: &str) -> serde_json::Value {
    let jwks: JwkSet = reqwest::get(format!("{}/oauth2/v3/certs", emulator.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(token).expect("JWT header");
    let kid = header.kid.expect("kid");
    let jwk = jwks.find(&kid).expect("kid is in the JWKS");
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["https://accounts.google.com"]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .expect("token verifies against the emulator's JWKS")
        .claims
}

/// The body of a GET of `url` with `Metadata-Flavor: Google`, as a
/// metadata client asks it (of the broker's endpoint or the emulator's
/// metadata server), whatever the status.
pub async fn metadata_text(url: &str) -> String {
    reqwest::Client::new()
        .get(url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Introspects an access token at the emulator's tokeninfo endpoint over
/// HTTP: its claims (`email`, `scope`, `expires_in`), or `None` when the
/// emulator says it is no valid token of its own.
pub async fn tokeninfo(emulator: &Emulator, token: &str) -> Option<serde_json::Value> {
    let url = reqwest::Url::parse_with_params(
        &format!("{}/oauth2/v3/tokeninfo", emulator.base_url()),
        [("access_token", token)],
    )
    .unwrap();
    let response = reqwest::get(url).await.unwrap();
    if response.status() != reqwest::StatusCode::OK {
        return None;
    }
    Some(response.json().await.unwrap())
}

/// Asserts the log holds none of `secrets`.
pub fn assert_no_secrets(log: &str, secrets: &[&str]) {
    assert!(!log.is_empty(), "the log is empty: nothing was checked");
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(!log.contains(secret), "a secret reached the log");
    }
}

/// The body of a PEM private key, line by line (any one line in a log is a leak).
pub fn pem_lines(key_file: &Path) -> Vec<String> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(key_file).unwrap()).unwrap();
    json["private_key"]
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
        .map(str::to_owned)
        .collect()
}

pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A loopback TCP port free at the time of asking (for `telemetry.listen`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from the telemetry listener: (status, body).
pub async fn scrape(port: u16, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The sum of the metric samples whose line starts with `prefix` (name and labels).
pub fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Resident memory of process `pid` (`VmRSS` in /proc/PID/status), in KiB.
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}
