//! Issue 6: programs in other languages against a real broker. An
//! UNMODIFIED google-auth through the metadata endpoint, and the Python and
//! Node clients of examples/ over the socket.
//!
//! Their packages are installed by these tests into local folders: Python
//! venvs under `target/tmp/test-venvs/`, Node's into
//! `examples/node/node_modules` (both ignored by git). Each install is
//! skipped when its requirements are already in place, so reruns are fast,
//! and is serialized by a file lock so parallel tests (and parallel
//! `cargo test` runs) do not install into one folder at once. PyPI and the
//! npm registry must be reachable the first time; python3 (with venv),
//! node and npm must be on PATH.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use token_broker::emulator::DEFAULT_ACCOUNT_EMAIL;

use crate::{
    metadata_endpoint::broker_with_endpoint,
    support::{self, Broker},
};

/// Longest one client program may run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

pub(crate) fn venvs() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-venvs")
}

/// Says what the test is doing on the real stderr: the test harness
/// captures `eprintln!`, and an install taking a while should be visible.
pub(crate) fn announce(message: &str) {
    let _ = writeln!(std::io::stderr(), "[clients] {message}");
}

/// Holds an exclusive lock on `path` (created if needed) until dropped.
pub(crate) fn exclusive_lock(path: &Path) -> nix::fcntl::Flock<std::fs::File> {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .expect("install lock")
}

pub(crate) fn run_setup_step(command: &mut Command, what: &str, hint: &str) {
    let status = command
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}. {hint}"));
    assert!(status.success(), "{what} failed ({status}). {hint}");
}

/// A Python venv named `name` with `requirements` (a file under examples/)
/// installed, whose `imports` import. Returns the venv's python.
pub(crate) fn python_venv(name: &str, requirements: &Path, imports: &str) -> PathBuf {
    let venv = venvs().join(name);
    let _lock = exclusive_lock(&venvs().join(format!("{name}.lock")));
    let python = venv.join("bin/python");
    let stamp = venv.join(".token-broker-requirements");
    let wanted = std::fs::read_to_string(requirements).unwrap();
    let installed = std::fs::read_to_string(&stamp).ok();
    let importable = || {
        Command::new(&python)
            .args(["-c", &format!("import {imports}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if installed.as_deref() == Some(wanted.as_str()) && importable() {
        announce(&format!(
            "python venv {}: requirements from {} already installed",
            venv.display(),
            requirements.display()
        ));
        return python;
    }
    let packages: Vec<&str> = wanted
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    announce(&format!(
        "installing {} into the python venv {} (first run only; needs PyPI)",
        packages.join(" "),
        venv.display()
    ));
    let started = Instant::now();
    if !python.exists() {
        run_setup_step(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "creating the venv",
            "The client tests need python3 with the venv module on PATH.",
        );
    }
    run_setup_step(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(requirements),
        "pip install",
        "PyPI must be reachable (CI needs it too); pip's output is above.",
    );
    assert!(importable(), "installed, but `import {imports}` fails");
    std::fs::write(&stamp, &wanted).unwrap();
    announce(&format!(
        "installed into {} in {:.1}s",
        venv.display(),
        started.elapsed().as_secs_f64()
    ));
    python
}

/// `examples/node/node_modules` installed from the committed lock file.
fn node_modules() -> PathBuf {
    let dir = examples().join("node");
    let _lock = exclusive_lock(&venvs().join("node_modules.lock"));
    let lock_file = std::fs::read_to_string(dir.join("package-lock.json")).unwrap();
    let stamp = dir.join("node_modules/.token-broker-installed");
    let present = dir.join("node_modules/@grpc/grpc-js/package.json").exists()
        && dir
            .join("node_modules/@grpc/proto-loader/package.json")
            .exists();
    if present && std::fs::read_to_string(&stamp).ok().as_deref() == Some(lock_file.as_str()) {
        announce(&format!(
            "{}: already installed from package-lock.json",
            dir.join("node_modules").display()
        ));
        return dir;
    }
    announce(&format!(
        "installing @grpc/grpc-js and @grpc/proto-loader into {} with `npm ci` (first run only; needs the npm registry)",
        dir.join("node_modules").display()
    ));
    let started = Instant::now();
    run_setup_step(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
        "npm ci",
        "The Node client test needs node and npm on PATH and the npm registry reachable.",
    );
    std::fs::write(&stamp, &lock_file).unwrap();
    announce(&format!(
        "installed node_modules in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    dir
}

/// Runs a client program to completion: (exit code, stdout, stderr).
pub(crate) async fn run(mut command: tokio::process::Command) -> (i32, String, String) {
    let shown = format!("{command:?}");
    command.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(RUN_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{shown} ran over {RUN_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A command with an environment holding only what it needs: nothing
/// Google-related leaks in from the developer's shell.
pub(crate) fn clean_command(program: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command.env_clear();
    for key in ["PATH", "HOME", "LANG", "SSL_CERT_FILE"] {
        if let Ok(value) = std::env::var(key) {
            command.env(key, value);
        }
    }
    command
}

/// Runs `command`, an unmodified Google client library's program, told
/// only where the metadata server is (`host`, as `GCE_METADATA_HOST` and
/// `GCE_METADATA_IP`), and asserts that `library` succeeded (showing the
/// broker's log where not): its stdout.
pub(crate) async fn run_told_the_metadata_host(
    mut command: tokio::process::Command,
    host: &str,
    library: &str,
    broker: &Broker,
) -> String {
    command
        .env("GCE_METADATA_HOST", host)
        .env("GCE_METADATA_IP", host);
    let (code, stdout, stderr) = run(command).await;
    assert_eq!(
        code,
        0,
        "{library} failed:\n{stderr}\nbroker log:\n{}",
        broker.log()
    );
    stdout
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

async fn grpc_broker(emulator: &token_broker::emulator::Emulator) -> Broker {
    let identity = support::metadata_identity("default", emulator);
    Broker::start(
        move |socket| support::config_text(socket, &identity),
        "info",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn unmodified_google_auth_gets_a_verified_token_from_the_metadata_endpoint() {
    let python = tokio::task::spawn_blocking(|| {
        python_venv(
            "google-auth",
            &examples().join("python/requirements-google-auth.txt"),
            "google.oauth2.id_token, google.auth.transport.requests",
        )
    })
    .await
    .unwrap();
    let emulator = support::emulator().await;
    let (broker, base) = broker_with_endpoint(&emulator, "").await;
    let host = base.trim_start_matches("http://");
    let audience = "https://unmodified-client.example.com";

    let mut command = clean_command(&python);
    command
        .arg(examples().join("python/metadata_id_token.py"))
        .arg(audience)
        .arg("--certs-url")
        .arg(format!("{}/oauth2/v1/certs", emulator.base_url()));
    // All google-auth is told: where the metadata server is.
    let stdout = run_told_the_metadata_host(command, host, "google-auth", &broker).await;
    let claims: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(claims["aud"], audience);
    assert_eq!(claims["email"], DEFAULT_ACCOUNT_EMAIL);
    assert_eq!(claims["iss"], "https://accounts.google.com");

    // It came from the broker's cache: gRPC gets the very same token.
    let from_grpc = broker.get("default", audience).await.unwrap();
    let from_http = support::metadata_text(&format!(
        "{base}/computeMetadata/v1/instance/service-accounts/default/identity?audience={audience}"
    ))
    .await;
    assert_eq!(from_grpc.token, from_http);
    assert_eq!(emulator.stats().identity.by_audience[audience], 1);
}

/// The Python gRPC venv and the stubs `examples/python/generate_stubs.py`
/// makes: (python, stubs directory).
pub(crate) async fn python_grpc() -> (PathBuf, PathBuf) {
    let python = tokio::task::spawn_blocking(|| {
        python_venv(
            "python-grpc",
            &examples().join("python/requirements.txt"),
            "grpc, grpc_tools",
        )
    })
    .await
    .unwrap();
    let stubs = venvs().join("python-grpc-stubs");
    let mut generate = clean_command(&python);
    generate
        .arg(examples().join("python/generate_stubs.py"))
        .env("TOKEN_BROKER_STUBS_DIR", &stubs);
    let (code, _, stderr) = run(generate).await;
    assert_eq!(code, 0, "stub generation failed: {stderr}");
    (python, stubs)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_client_fetches_watches_and_reports_errors() {
    let (python, stubs) = python_grpc().await;

    let emulator = support::emulator().await;
    let broker = grpc_broker(&emulator).await;
    let example = |args: &[&str]| {
        let mut command = clean_command(&python);
        command
            .arg(examples().join("python/example.py"))
            .args(args)
            .env("TOKEN_BROKER_SOCKET", &broker.socket)
            .env("TOKEN_BROKER_STUBS_DIR", &stubs);
        run(command)
    };

    let audience = "https://python-client.example.com";
    let (code, stdout, stderr) = example(&["fetch", audience]).await;
    assert_eq!(code, 0, "{stderr}");
    let fetched = &json_lines(&stdout)[0];
    assert_eq!(fetched["audience"], audience);
    assert_eq!(fetched["identity"], "default");
    support::verify(&emulator, fetched["token"].as_str().unwrap(), audience).await;

    let (code, stdout, stderr) = example(&["watch", audience, "--count", "1"]).await;
    assert_eq!(code, 0, "{stderr}");
    let watched = json_lines(&stdout);
    assert_eq!(watched.len(), 1);
    assert_eq!(
        watched[0]["token"], fetched["token"],
        "the cached token first"
    );

    let (code, stdout, stderr) = example(&["fetch", "not an audience"]).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "error: INVALID_ARGUMENT: audience contains whitespace or a control character"
        ),
        "{stderr}"
    );
    let (code, _, stderr) = example(&["watch", audience, "--identity", "nobody"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("error: NOT_FOUND: no identity named \"nobody\" is configured"),
        "{stderr}"
    );
    assert_eq!(emulator.stats().identity.by_audience[audience], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_client_fetches_watches_and_reports_errors() {
    let dir = tokio::task::spawn_blocking(node_modules).await.unwrap();
    let node = which("node");
    let emulator = support::emulator().await;
    let broker = grpc_broker(&emulator).await;
    let example = |args: &[&str]| {
        let mut command = clean_command(&node);
        command
            .arg(dir.join("example.js"))
            .args(args)
            .env("TOKEN_BROKER_SOCKET", &broker.socket);
        run(command)
    };

    let audience = "https://node-client.example.com";
    let (code, stdout, stderr) = example(&["fetch", audience]).await;
    assert_eq!(code, 0, "{stderr}");
    let fetched = &json_lines(&stdout)[0];
    assert_eq!(fetched["audience"], audience);
    support::verify(&emulator, fetched["token"].as_str().unwrap(), audience).await;

    let (code, stdout, stderr) = example(&["watch", audience, "--count", "1"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json_lines(&stdout)[0]["token"], fetched["token"]);

    let (code, _, stderr) = example(&["fetch", ""]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("error: INVALID_ARGUMENT (3): audience is empty"),
        "{stderr}"
    );
    let (code, _, stderr) = example(&["fetch", audience, "--identity", "nobody"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("error: NOT_FOUND (5): no identity named \"nobody\" is configured"),
        "{stderr}"
    );
}

/// `program`'s full path from PATH, failing with a clear message.
pub(crate) fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| panic!("{program} is not on PATH; the client tests need it"))
}
