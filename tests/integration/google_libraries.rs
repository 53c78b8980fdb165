//! Issue 15.2: UNMODIFIED Google client libraries in Python, Node and Java,
//! pointed at a real broker's metadata endpoint by `GCE_METADATA_HOST` (and
//! `GCE_METADATA_IP`) alone, each fetching an access token and an ID token
//! (and the project id, where the library looks it up) as it does on GCE.
//! Every token is checked against the emulator that issued it.
//!
//! What each needs is installed into local folders by these tests: the
//! Python venv of `clients.rs`; `tests/clients/node/node_modules` with
//! `npm ci` from the committed lock file; the Java program is built by
//! Maven OFFLINE against Debian's repository (`/usr/share/maven-repo`, from
//! `.ci/install-java-test-deps`, which the test runs itself as root, and
//! `.ci/run` runs first), with its local repository and build under cargo's
//! target/. Where those packages cannot be installed (not root, no apt) the
//! Java test says so and passes, except under CI (`CI` set), where it
//! fails: CI must not skip it silently.

use std::path::{Path, PathBuf};

use token_broker::emulator::{Emulator, DEFAULT_ACCOUNT_EMAIL};

use crate::{
    clients::{
        announce, clean_command, exclusive_lock, python_venv, run, run_setup_step,
        run_told_the_metadata_host, venvs, which,
    },
    metadata_endpoint::broker_with_endpoint,
    support::{self, Broker},
};

const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";
const STORAGE_RO: &str = "https://www.googleapis.com/auth/devstorage.read_only";

fn clients() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// The `[metadata_endpoint]` addition: a rule granting this uid ID tokens
/// and the scopes the programs ask for (access tokens are off otherwise).
fn granting_rule() -> String {
    format!(
        "\n[[policy]]\nuids = [{}]\nidentities = [\"*\"]\naudiences = [\"*\"]\nscopes = [\"{CLOUD}\", \"{STORAGE_RO}\"]\n",
        nix::unistd::getuid().as_raw()
    )
}

/// The project id the emulated metadata server reports.
async fn emulator_project(emulator: &Emulator) -> String {
    support::metadata_text(&format!(
        "{}/computeMetadata/v1/project/project-id",
        emulator.base_url()
    ))
    .await
}

/// The program's one JSON line (other output, e.g. Maven's, is skipped).
fn result_line(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| l.find("{\"").map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no JSON line in:\n{stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// Checks the access token and ID token a library printed against the
/// emulator, and records them so the broker's log is proven free of them.
async fn check_tokens(
    broker: &Broker,
    emulator: &Emulator,
    result: &serde_json::Value,
    scope: &str,
    audience: &str,
) {
    let access = result["access_token"].as_str().expect("an access token");
    let id_token = result["id_token"].as_str().expect("an ID token");
    broker
        .served
        .lock()
        .unwrap()
        .extend([access.to_owned(), id_token.to_owned()]);
    let info = support::tokeninfo(emulator, access)
        .await
        .unwrap_or_else(|| panic!("the access token is not one the emulator issued: {result}"));
    assert_eq!(info["scope"], scope, "{info}");
    assert_eq!(info["email"], DEFAULT_ACCOUNT_EMAIL);
    let claims = support::verify(emulator, id_token, audience).await;
    assert_eq!(claims["email"], DEFAULT_ACCOUNT_EMAIL);
    // The same tokens the broker's cache holds: gRPC gets the ID token too.
    let from_grpc = broker.get("default", audience).await.unwrap();
    assert_eq!(from_grpc.token, id_token);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_google_auth_gets_project_access_and_id_tokens() {
    let python = tokio::task::spawn_blocking(|| {
        python_venv(
            "google-auth",
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/python/requirements-google-auth.txt"),
            "google.oauth2.id_token, google.auth.transport.requests",
        )
    })
    .await
    .unwrap();
    let emulator = support::emulator().await;
    let (broker, base) = broker_with_endpoint(&emulator, &granting_rule()).await;
    let host = base.trim_start_matches("http://");
    let audience = "https://python-google-auth.example.com";
    let mut command = clean_command(&python);
    command
        .arg(clients().join("python/google_auth_client.py"))
        .args([audience, STORAGE_RO]);
    let stdout = run_told_the_metadata_host(command, host, "google-auth", &broker).await;
    let result = result_line(&stdout);
    assert_eq!(
        result["credentials"],
        "google.auth.compute_engine.credentials.Credentials"
    );
    assert_eq!(result["project_id"], emulator_project(&emulator).await);
    assert_eq!(result["service_account_email"], DEFAULT_ACCOUNT_EMAIL);
    assert_eq!(result["universe_domain"], "googleapis.com");
    check_tokens(&broker, &emulator, &result, STORAGE_RO, audience).await;
}

/// `tests/clients/node/node_modules` installed from the committed lock file.
fn google_auth_node() -> PathBuf {
    let dir = clients().join("node");
    let _lock = exclusive_lock(&venvs().join("google-auth-node.lock"));
    let lock_file = std::fs::read_to_string(dir.join("package-lock.json")).unwrap();
    let stamp = dir.join("node_modules/.token-broker-installed");
    let present = dir
        .join("node_modules/google-auth-library/package.json")
        .exists();
    if present && std::fs::read_to_string(&stamp).ok().as_deref() == Some(lock_file.as_str()) {
        return dir;
    }
    announce(&format!(
        "installing google-auth-library into {} with `npm ci` (first run only; needs the npm registry)",
        dir.join("node_modules").display()
    ));
    run_setup_step(
        std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
        "npm ci",
        "The Node google-auth-library test needs node and npm on PATH and the npm registry reachable.",
    );
    std::fs::write(&stamp, &lock_file).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn node_google_auth_library_gets_project_access_and_id_tokens() {
    let dir = tokio::task::spawn_blocking(google_auth_node).await.unwrap();
    let node = which("node");
    let emulator = support::emulator().await;
    let (broker, base) = broker_with_endpoint(&emulator, &granting_rule()).await;
    let host = base.trim_start_matches("http://");
    let audience = "https://node-google-auth.example.com";
    let mut command = clean_command(&node);
    command.arg(dir.join("google_auth_client.js")).arg(audience);
    let stdout = run_told_the_metadata_host(command, host, "google-auth-library", &broker).await;
    let result = result_line(&stdout);
    assert_eq!(result["client"], "Compute");
    // Node asks project/project-id before anything else.
    assert_eq!(result["project_id"], emulator_project(&emulator).await);
    assert_eq!(result["universe_domain"], "googleapis.com");
    check_tokens(&broker, &emulator, &result, CLOUD, audience).await;
}

/// What the Java test needs from Debian, present or not.
fn debian_maven_missing() -> Option<String> {
    let repo = Path::new("/usr/share/maven-repo");
    let needed = [
        "com/google/auth/google-auth-library-oauth2-http/0.18.0",
        "org/apache/maven/plugins/maven-compiler-plugin/3.10.1",
        "org/apache/maven/plugins/maven-resources-plugin/3.3.0",
        "org/codehaus/mojo/exec-maven-plugin/3.1.0",
        "org/junit/junit-bom",
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|path| !repo.join(path).exists())
        .copied()
        .collect();
    let has_mvn = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("mvn").is_file()));
    match (has_mvn, missing.is_empty()) {
        (true, true) => None,
        _ => Some(format!(
            "mvn on PATH: {has_mvn}; missing from {}: {missing:?}. Install them with \
             `bash .ci/install-java-test-deps` as root",
            repo.display()
        )),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn java_google_auth_library_gets_access_and_id_tokens() {
    if debian_maven_missing().is_some() && nix::unistd::geteuid().is_root() {
        let _lock = exclusive_lock(&venvs().join("java-apt.lock"));
        if debian_maven_missing().is_some() {
            announce("installing Maven and google-auth-library-java from Debian's packages");
            run_setup_step(
                std::process::Command::new("bash")
                    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/install-java-test-deps")),
                ".ci/install-java-test-deps",
                "The Java google-auth-library test needs Debian's apt and its package mirror.",
            );
        }
    }
    if let Some(missing) = debian_maven_missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Java google-auth-library test cannot run under CI: {missing}"
        );
        announce(&format!(
            "SKIPPED java_google_auth_library_gets_access_and_id_tokens: {missing}"
        ));
        return;
    }
    let emulator = support::emulator().await;
    let (broker, base) = broker_with_endpoint(&emulator, &granting_rule()).await;
    let host = base.trim_start_matches("http://");
    let audience = "https://java-google-auth.example.com";
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/java");
    let build = Path::new(env!("CARGO_TARGET_TMPDIR")).join("java-build");
    let local_repo = Path::new(env!("CARGO_TARGET_TMPDIR")).join("java-m2");
    let mut command = clean_command(&which("mvn"));
    command
        .current_dir(&project)
        .args(["-B", "-q", "-s"])
        .arg(project.join("settings.xml"))
        .arg(format!("-Dmaven.repo.local={}", local_repo.display()))
        .arg(format!("-Dbuild.root={}", build.display()))
        .args(["compile", "exec:java"])
        .arg(format!("-Dexec.args={audience}"))
        .env("GCE_METADATA_HOST", host);
    if let Some(java_home) = std::env::var_os("JAVA_HOME") {
        command.env("JAVA_HOME", java_home);
    }
    // One Maven at a time: they would share the local repository.
    let lock = exclusive_lock(&venvs().join("java-m2.lock"));
    let (code, stdout, stderr) = run(command).await;
    drop(lock);
    assert_eq!(
        code,
        0,
        "google-auth-library-java failed:\n{stdout}\n{stderr}\nbroker log:\n{}",
        broker.log()
    );
    let result = result_line(&stdout);
    // Application Default Credentials chose the metadata server.
    assert_eq!(
        result["credentials"],
        "com.google.auth.oauth2.ComputeEngineCredentials"
    );
    assert_eq!(result["account"], DEFAULT_ACCOUNT_EMAIL);
    check_tokens(&broker, &emulator, &result, CLOUD, audience).await;
}
