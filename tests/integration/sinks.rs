//! Token files (`[[sinks]]`, issue 15 point 3): always a complete token
//! while a reader loops on the file through a thousand refreshes, the hook
//! once per refresh, mode and ownership as configured, removal when the
//! token expires during an outage, and `[[sinks]]` applied by a reload.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use token_broker::{
    cache::TokenCache,
    clock::Clock,
    config::{IdentitySettings, RefreshSettings, SinkSettings},
    domain::SourceKind,
    emulator::{Emulator, Faults},
    sink::SinkSet,
    source::build_source,
};

use crate::support::{self, Broker};

const AUDIENCE: &str = "https://files.example.com";

async fn cache_with(emulator: &Emulator, clock: &Clock, refresh: RefreshSettings) -> TokenCache {
    let identity = IdentitySettings {
        metadata_host: Some(emulator.metadata_host()),
        ..IdentitySettings::new("default", SourceKind::Metadata)
    };
    let source = build_source(0, &identity, &HashMap::new(), clock).expect("source");
    TokenCache::new([("default".to_owned(), source)], refresh, clock.clone())
}

fn sink(path: &Path, extra: &str) -> SinkSettings {
    toml::from_str(&format!(
        "audience = \"{AUDIENCE}\"\npath = \"{}\"\n{extra}",
        path.display()
    ))
    .expect("sink settings")
}

/// The claims of a compact JWT, or why the text is not one.
fn claims(text: &str) -> Result<serde_json::Value, String> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!("not three segments: {} bytes", text.len()));
    }
    let json = URL_SAFE_NO_PAD
        .decode(parts[1])
        .map_err(|e| format!("claims: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("claims: {e}"))
}

async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..2000 {
        if let Some(value) = check() {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within the bound");
}

/// A thousand refreshes in simulated time while a real thread reads the file
/// as fast as it can: every read is a whole token for the audience.
#[tokio::test(start_paused = true)]
async fn the_file_is_a_whole_token_through_a_thousand_refreshes() {
    const REFRESHES: u64 = 1000;
    let (clock, emulator) = crate::support::emulator_on_tokio_clock().await;
    let refresh = RefreshSettings {
        refresh_before_expiry: Duration::from_secs(45 * 60),
        jitter: Duration::from_secs(60),
        ..RefreshSettings::default()
    };
    let cache = cache_with(&emulator, &clock, refresh.clone()).await;
    let dir = support::workdir();
    let path = dir.path().join("token.jwt");

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, path) = (stop.clone(), reads.clone(), path.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut seen_one = false;
            while !stop.load(Ordering::Relaxed) {
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let claims = claims(&text)?;
                        if claims["aud"] != AUDIENCE {
                            return Err(format!("aud {}", claims["aud"]));
                        }
                        seen_one = true;
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !seen_one => {}
                    Err(e) => return Err(format!("the file went missing: {e}")),
                }
            }
            Ok(())
        })
    };

    let sinks = SinkSet::start(cache.clone(), clock.clone(), &refresh, &[sink(&path, "")]);
    let mut minutes = 0;
    while emulator.stats().identity.total < REFRESHES + 1 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        minutes += 1;
        assert!(minutes < 1_000_000, "refreshes stalled");
    }
    // Let the last write land before comparing.
    let last = cache
        .get(
            &token_broker::cache::CacheKey::new("default", AUDIENCE).unwrap(),
            Duration::ZERO,
        )
        .await
        .unwrap()
        .token;
    wait_for("the last token in the file", || {
        (std::fs::read_to_string(&path).ok()? == last.expose()).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .unwrap()
        .expect("every read was a whole token");
    let reads = reads.load(Ordering::Relaxed);
    eprintln!(
        "{} upstream calls over {} simulated hours; the reader read the file {reads} times",
        emulator.stats().identity.total,
        minutes / 60
    );
    assert!(
        reads > REFRESHES,
        "the reader raced the writer: {reads} reads"
    );
    drop(sinks);
}

/// During an outage the last file stays while its token is valid, is
/// removed when it expires, and comes back after the upstream recovers.
#[tokio::test(start_paused = true)]
async fn an_outage_keeps_the_file_until_expiry_then_removes_it() {
    let (clock, emulator) = crate::support::emulator_on_tokio_clock().await;
    let refresh = RefreshSettings::default();
    let cache = cache_with(&emulator, &clock, refresh.clone()).await;
    let dir = support::workdir();
    let path = dir.path().join("token.json");
    let _sinks = SinkSet::start(
        cache.clone(),
        clock.clone(),
        &refresh,
        &[sink(
            &path,
            "format = \"json\"\nmode = \"0640\"\nowner = 4001\ngroup = 5001\n",
        )],
    );
    let first: serde_json::Value = wait_for("the first file", || {
        serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()
    })
    .await;
    claims(first["token"].as_str().unwrap()).unwrap();
    assert_eq!(first["audience"], AUDIENCE);
    assert_eq!(first["identity"], "default");
    let expire: std::time::SystemTime =
        humantime::parse_rfc3339(first["expire_time"].as_str().unwrap()).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o640);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((meta.uid(), meta.gid()), (4001, 5001));
    } else {
        eprintln!("skipping the ownership check: not root");
    }

    emulator.set_faults(Faults {
        status: Some(503),
        ..Faults::default()
    });
    // Just before expiry the last token is still there…
    tokio::time::sleep(clock.until(expire) - Duration::from_secs(5)).await;
    assert!(path.exists(), "removed before its token expired");
    // …and just after, it is gone: readers fail closed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for _ in 0..100 {
        if !path.exists() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(!path.exists(), "an expired token was left in the file");

    emulator.clear_faults();
    tokio::time::sleep(refresh.retry_max * 2).await;
    let back: serde_json::Value = wait_for("the file after recovery", || {
        serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()
    })
    .await;
    assert_ne!(back["token"], first["token"]);
}

/// Real time, short-lived tokens: the hook runs once for each new token,
/// after the file holds it.
#[tokio::test(flavor = "multi_thread")]
async fn the_hook_runs_once_per_refresh_after_the_write() {
    let clock = Clock::system();
    let emulator = support::emulator().await;
    // 62 s tokens against a 60 s window: a new token every couple of seconds.
    emulator.set_faults(Faults {
        token_lifetime_secs: Some(62),
        ..Faults::default()
    });
    let refresh = RefreshSettings {
        refresh_before_expiry: Duration::from_secs(60),
        jitter: Duration::from_secs(1),
        ..RefreshSettings::default()
    };
    let cache = cache_with(&emulator, &clock, refresh.clone()).await;
    let dir = support::workdir();
    let path = dir.path().join("token.env");
    let hook_log = dir.path().join("hook.log");
    let sinks = SinkSet::start(
        cache,
        clock,
        &refresh,
        &[sink(
            &path,
            &format!(
                "format = \"env\"\nenv_name = \"API_TOKEN\"\non_refresh = [\"/bin/sh\", \"-c\", \"sha256sum < \\\"$TOKEN_BROKER_SINK_PATH\\\" >> {}\"]\n",
                hook_log.display()
            ),
        )],
    );
    let lines = wait_for("three hook runs", || {
        let text = std::fs::read_to_string(&hook_log).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        (lines.len() >= 3).then_some(lines)
    })
    .await;
    drop(sinks);
    let distinct: std::collections::HashSet<_> = lines.iter().collect();
    assert_eq!(
        distinct.len(),
        lines.len(),
        "one run per new token: {lines:?}"
    );
    let content = std::fs::read_to_string(&path).unwrap();
    let token = content
        .strip_prefix("API_TOKEN=")
        .and_then(|t| t.strip_suffix('\n'))
        .expect("NAME=token");
    claims(token).unwrap();
}

fn sink_table(path: &Path, format: &str) -> String {
    format!(
        "[[sinks]]\naudience = \"{AUDIENCE}\"\npath = \"{}\"\nformat = \"{format}\"\n",
        path.display()
    )
}

/// `[[sinks]]` through a real broker: written at start, changed and removed
/// by SIGHUP; and every bad key named by check-config.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_adds_changes_and_removes_token_files() {
    let emulator = support::emulator().await;
    let identity = support::metadata_identity("default", &emulator);
    let files = support::workdir();
    let jwt = files.path().join("a.jwt");
    let header = files.path().join("b.header");
    let base = {
        let identity = identity.clone();
        move |socket: &Path| support::config_text(socket, &identity)
    };
    let first = {
        let (base, jwt) = (base.clone(), jwt.clone());
        move |socket: &Path| format!("{}\n{}", base(socket), sink_table(&jwt, "jwt"))
    };
    let broker = Broker::start(first, "").await;
    let token = wait_for("the jwt file", || std::fs::read_to_string(&jwt).ok()).await;
    support::verify(&emulator, &token, AUDIENCE).await;
    broker.served.lock().unwrap().push(token.clone());

    let config = broker.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n{}",
            base(&broker.socket),
            sink_table(&header, "header")
        ),
    )
    .unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    let line = wait_for("the header file", || std::fs::read_to_string(&header).ok()).await;
    assert_eq!(
        line,
        format!("Authorization: Bearer {token}\n"),
        "same cached token"
    );
    wait_for("the removed sink's file gone", || {
        (!jwt.exists()).then_some(())
    })
    .await;

    std::fs::write(&config, base(&broker.socket)).unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    wait_for("every sink file gone", || (!header.exists()).then_some(())).await;
    assert!(!broker.log().contains(&token));
}

#[test]
fn check_config_names_every_bad_sink_key() {
    let dir = support::workdir();
    let config = dir.path().join("c.toml");
    let relative: PathBuf = "relative.jwt".into();
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nidentity = \"nobody\"\naudience = \"has space\"\npath = \"{}\"\nformat = \"env\"\nenv_name = \"1X\"\nmode = \"0666\"\nowner = \"no-such-user-xyz\"\non_refresh = [\"nginx\", \"-s\", \"reload\"]\nsignal = \"SIGNOPE\"\n",
            relative.display()
        ),
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    for key in [
        "sinks[0].audience",
        "sinks[0].path",
        "sinks[0].env_name",
        "sinks[0].mode",
        "sinks[0].owner",
        "sinks[0].on_refresh",
        "sinks[0].pid_file",
    ] {
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}

/// A token file is never written where another user could swap it: a
/// directory others may write (without the sticky bit) is refused until it
/// is fixed, then the file appears at the next retry.
#[tokio::test(flavor = "multi_thread")]
async fn a_directory_others_can_write_gets_no_token_file() {
    use std::os::unix::fs::PermissionsExt;

    let clock = Clock::system();
    let emulator = support::emulator().await;
    let refresh = RefreshSettings::default();
    let cache = cache_with(&emulator, &clock, refresh.clone()).await;
    let dir = support::workdir();
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = open_dir.join("token.jwt");
    let _sinks = SinkSet::start(cache, clock, &refresh, &[sink(&path, "")]);
    // The token is in the cache well within this; the file must not be.
    wait_for("the token fetched", || {
        (emulator.stats().identity.total >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !path.exists(),
        "a token file was written into a world-writable directory"
    );
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let token = wait_for("the file once the directory is safe", || {
        std::fs::read_to_string(&path).ok()
    })
    .await;
    claims(&token).unwrap();
}

const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";
const STORAGE_RO: &str = "https://www.googleapis.com/auth/devstorage.read_only";

/// An access-token sink (`scopes` instead of `audience`).
fn access_sink(path: &Path, extra: &str) -> SinkSettings {
    toml::from_str(&format!(
        "scopes = [\"{STORAGE_RO}\", \"{CLOUD}\"]\npath = \"{}\"\n{extra}",
        path.display()
    ))
    .expect("sink settings")
}

/// Issue 15.3 with `scopes`: an access token in every format, replaced at
/// each refresh, kept through an outage while valid and removed when it
/// expires. The identity is a key file, so its access tokens come from the
/// emulator's token endpoint (jwt-bearer with `scope`), where faults apply.
#[tokio::test(start_paused = true)]
async fn an_access_token_sink_is_written_refreshed_and_removed_at_expiry() {
    let (clock, emulator) = crate::support::emulator_on_tokio_clock().await;
    let keys = support::workdir();
    let email = "files@sink-project.iam.gserviceaccount.com";
    let (key, _) = support::key_file(keys.path(), "files", email, &emulator, true);
    let identity = IdentitySettings {
        key_file: Some(key),
        ..IdentitySettings::new("default", SourceKind::ServiceAccountKey)
    };
    let source = build_source(0, &identity, &HashMap::new(), &clock).expect("source");
    let refresh = RefreshSettings::default();
    let cache = TokenCache::new(
        [("default".to_owned(), source)],
        refresh.clone(),
        clock.clone(),
    );
    let dir = support::workdir();
    let json_path = dir.path().join("access.json");
    let env_path = dir.path().join("access.env");
    let header_path = dir.path().join("access.header");
    let _sinks = SinkSet::start(
        cache.clone(),
        clock.clone(),
        &refresh,
        &[
            access_sink(&json_path, "format = \"json\""),
            access_sink(&env_path, "format = \"env\""),
            access_sink(&header_path, "format = \"header\""),
        ],
    );
    let first: serde_json::Value = wait_for("the json file", || {
        serde_json::from_str(&std::fs::read_to_string(&json_path).ok()?).ok()
    })
    .await;
    let token = first["token"].as_str().unwrap().to_owned();
    let info = support::tokeninfo(&emulator, &token)
        .await
        .expect("a token the emulator issued");
    assert_eq!(info["scope"], format!("{CLOUD} {STORAGE_RO}"));
    assert_eq!(info["email"], email);
    assert_eq!(first["scopes"], serde_json::json!([CLOUD, STORAGE_RO]));
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["identity"], "default");
    assert!(first.get("audience").is_none(), "{first}");
    let expire: std::time::SystemTime =
        humantime::parse_rfc3339(first["expire_time"].as_str().unwrap()).unwrap();
    let life = clock.until(expire).as_secs();
    assert!((3500..=3600).contains(&life), "{life}");
    // One cache entry for the three files: one upstream call.
    let env = wait_for("the env file", || std::fs::read_to_string(&env_path).ok()).await;
    assert_eq!(env, format!("ACCESS_TOKEN={token}\n"), "the default name");
    let header = wait_for("the header file", || {
        std::fs::read_to_string(&header_path).ok()
    })
    .await;
    assert_eq!(header, format!("Authorization: Bearer {token}\n"));
    assert_eq!(emulator.stats().token_access, 1);

    // A refresh replaces the file before expiry…
    tokio::time::sleep(clock.until(expire) - refresh.refresh_before_expiry + refresh.jitter).await;
    let second: serde_json::Value = wait_for("the refreshed file", || {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json_path).ok()?).ok()?;
        (v["token"] != first["token"]).then_some(v)
    })
    .await;
    let expire: std::time::SystemTime =
        humantime::parse_rfc3339(second["expire_time"].as_str().unwrap()).unwrap();

    // …then an outage: the file stays while its token is valid, and is
    // removed when it expires, so readers fail closed.
    emulator.set_faults(Faults {
        status: Some(503),
        endpoint: Some("token".into()),
        ..Faults::default()
    });
    tokio::time::sleep(clock.until(expire) - Duration::from_secs(5)).await;
    assert!(json_path.exists(), "removed before its token expired");
    tokio::time::sleep(Duration::from_secs(10)).await;
    for _ in 0..100 {
        if !json_path.exists() && !env_path.exists() && !header_path.exists() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        !json_path.exists() && !env_path.exists() && !header_path.exists(),
        "an expired access token was left in a file"
    );
}

/// Through a real broker: `[[sinks]]` with `scopes` writes the identity's
/// access token; check-config names a sink with both or neither.
#[tokio::test(flavor = "multi_thread")]
async fn a_configured_scopes_sink_holds_an_access_token() {
    let emulator = support::emulator().await;
    let identity = support::metadata_identity("default", &emulator);
    let files = support::workdir();
    let path = files.path().join("gcs.token");
    let table = format!(
        "[[sinks]]\nscopes = [\"{STORAGE_RO}\"]\npath = \"{}\"\n",
        path.display()
    );
    let broker = Broker::start(
        move |socket| format!("{}\n{table}", support::config_text(socket, &identity)),
        "",
    )
    .await;
    let token = wait_for("the token file", || std::fs::read_to_string(&path).ok()).await;
    let info = broker.served_access_token_info(&emulator, &token).await;
    assert_eq!(info["scope"], STORAGE_RO);
    assert!(!broker.log().contains(&token));
}

#[test]
fn a_sink_holds_an_audience_or_scopes_exactly() {
    let dir = support::workdir();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\naudience = \"https://a\"\nscopes = [\"{CLOUD}\"]\npath = \"/run/t/both\"\n\n\
             [[sinks]]\npath = \"/run/t/neither\"\n\n\
             [[sinks]]\nscopes = [\"has space\", \"\"]\npath = \"/run/t/bad\"\n"
        ),
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    for expected in [
        "sinks[0].scopes: set either audience (the file holds an ID token) or scopes",
        "sinks[1].audience: required: set audience for an ID token, or scopes for an access token",
        "sinks[2].scopes[0]: \"has space\" is not a scope",
        "sinks[2].scopes[1]",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}
