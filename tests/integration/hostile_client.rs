//! Issue 11: a hostile local user against a real broker process. Eve is a
//! second uid on the machine with nothing but what any process has; her
//! gRPC calls come from a relay process running under her uid (so the
//! kernel reports her uid to the broker), and each attack below is one she
//! could make before the fix, with the figure it is held to now.

use std::{
    io::Write,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use token_broker::{
    emulator::{Emulator, Faults},
    proto::{token_broker_client::TokenBrokerClient, GetIdTokenRequest},
};
use tonic::{transport::Channel, Code};

use crate::support::{self, Broker};

/// The hostile user.
const EVE: u32 = 4101;
/// A user the policy grants something, for the revocation attack.
const ALICE: u32 = 4102;

/// Env vars that turn [`relay_process`] into a relay.
const RELAY_LISTEN: &str = "TB_TEST_RELAY_LISTEN";
const RELAY_TARGET: &str = "TB_TEST_RELAY_TARGET";

/// Not a test: the body of the relay process [`Relay::start`] runs, as
/// another uid, from this same test binary. Without its env vars (a plain
/// `cargo test -- --ignored`) it returns at once.
#[test]
#[ignore = "helper process for the hostile-client tests, started by them"]
fn relay_process() {
    use std::os::unix::net::{UnixListener, UnixStream};
    let (Ok(listen), Ok(target)) = (std::env::var(RELAY_LISTEN), std::env::var(RELAY_TARGET))
    else {
        return;
    };
    let listener = UnixListener::bind(&listen).expect("relay binds");
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(upstream) = UnixStream::connect(&target) else {
            continue;
        };
        let (mut from_client, mut to_upstream) =
            (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_upstream);
            let _ = to_upstream.shutdown(std::net::Shutdown::Write);
        });
        std::thread::spawn(move || {
            let (mut to_client, mut from_upstream) = (client, upstream);
            let _ = std::io::copy(&mut from_upstream, &mut to_client);
            let _ = to_client.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// A socket that forwards every connection to the broker from a process
/// running as `uid`: connections through it reach the broker as `uid`'s.
struct Relay {
    child: Child,
    socket: PathBuf,
}

impl Relay {
    async fn start(broker: &Broker, uid: u32) -> Relay {
        let dir = broker.dir.path().join(format!("relay-{uid}"));
        std::fs::create_dir(&dir).unwrap();
        nix::unistd::chown(&dir, Some(uid.into()), Some(uid.into())).unwrap();
        let socket = dir.join("relay.sock");
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "hostile_client::relay_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(RELAY_LISTEN, &socket)
            .env(RELAY_TARGET, &broker.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .gid(uid)
            .uid(uid)
            .spawn()
            .expect("relay starts");
        // Dropping it kills and reaps the process, even if it never binds.
        let relay = Relay { child, socket };
        // Process startup, not a timing assertion.
        for _ in 0..500 {
            if relay.socket.exists() {
                return relay;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the relay as uid {uid} did not come up");
    }

    async fn client(&self) -> TokenBrokerClient<Channel> {
        token_broker::client::connect(&self.socket)
            .await
            .expect("connects through the relay")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this process may act as other uids (the tests run as root, as CI
/// does); says so when it may not, and the calling test then stops.
fn can_become_other_users() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: needs root to run clients as other uids and to chown"
        );
    }
    root
}

fn request(identity: &str, audience: &str) -> GetIdTokenRequest {
    GetIdTokenRequest {
        audience: audience.into(),
        identity: identity.into(),
        min_valid_for: None,
    }
}

/// A broker whose socket anyone may open (so the policy is the only gate):
/// the emulator's `default` identity, then `identities`, with `extra`
/// appended to the config.
async fn broker(emulator: &Emulator, identities: &str, extra: &str, log_filter: &str) -> Broker {
    broker_refreshing(emulator, identities, extra, log_filter, "").await
}

/// [`broker`], with `refresh` added to the `[refresh]` table.
async fn broker_refreshing(
    emulator: &Emulator,
    identities: &str,
    extra: &str,
    log_filter: &str,
    refresh: &str,
) -> Broker {
    let identities = format!(
        "{}{identities}",
        support::metadata_identity("default", emulator)
    );
    let extra = extra.to_owned();
    let refresh = format!("[refresh]\n{refresh}");
    Broker::start(
        move |socket| {
            let dir = socket.parent().unwrap();
            support::set_mode(dir, 0o755);
            format!(
                "{}\n{extra}",
                support::config_text(socket, &identities)
                    .replace("[server]\n", "[server]\nsocket_mode = \"0666\"\n")
                    .replace("[refresh]\n", &refresh)
            )
        },
        log_filter,
    )
    .await
}

fn rule(uid: u32, identities: &str, audiences: &str) -> String {
    format!("[[policy]]\nuids = [{uid}]\nidentities = {identities}\naudiences = {audiences}\n")
}

/// The `key=value` fields of one text-format log line after its message,
/// read as a log parser would: a value is a bare word or a quoted string
/// with backslash escapes (kept as written). A word that is not
/// `key=value` comes back with an empty key.
fn fields(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while chars.peek().is_some() {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let mut word = String::new();
        let mut key = None;
        while let Some(&c) = chars.peek() {
            if c == ' ' {
                break;
            }
            chars.next();
            if c == '=' && key.is_none() {
                key = Some(std::mem::take(&mut word));
                if chars.peek() == Some(&'"') {
                    chars.next();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => {
                                word.push('\\');
                                word.extend(chars.next());
                            }
                            '"' => break,
                            c => word.push(c),
                        }
                    }
                    break;
                }
            } else {
                word.push(c);
            }
        }
        if !word.is_empty() || key.is_some() {
            out.push((key.unwrap_or_default(), word));
        }
    }
    out
}

/// The audit lines of `method` in a text log, each as its fields.
fn audit_lines(log: &str, method: &str) -> Vec<Vec<(String, String)>> {
    let marker = format!(": {method} ");
    log.lines()
        .filter_map(|line| line.split_once(&marker).map(|(_, rest)| fields(rest)))
        .collect()
}

fn field<'a>(line: &'a [(String, String)], key: &str) -> Option<&'a str> {
    line.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Point 3: Alice's open stream after a SIGHUP that removes her grant, and
/// a stream of an identity the reload removes. Before: her stream went on
/// receiving every refreshed token, unlogged, and the removed identity's
/// stream just stopped (or hung).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_revokes_a_grant_ends_the_open_stream() {
    if !can_become_other_users() {
        return;
    }
    let emulator = support::emulator().await;
    // 40 s tokens under a 1 m window: each is refreshed ~5 s after issue,
    // so an unrevoked stream would receive a new token within seconds.
    emulator.set_faults(Faults {
        token_lifetime_secs: Some(40),
        ..Faults::default()
    });
    let second = format!(
        "[[identities]]\nname = \"second\"\nsource = \"metadata\"\nmetadata_host = \"{}\"\n",
        emulator.metadata_host()
    );
    let window = "refresh_before_expiry = \"1m\"\njitter = \"1s\"\n";
    let audience = "https://watched.example.com";
    let rules = |alice: bool| {
        let mut rules = rule(0, "[\"*\"]", "[\"*\"]");
        if alice {
            rules.push_str(&rule(ALICE, "[\"default\"]", &format!("[\"{audience}\"]")));
        }
        rules
    };
    let broker = broker_refreshing(&emulator, &second, &rules(true), "info", window).await;
    let config_path = broker.dir.path().join("config.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();

    let alice = Relay::start(&broker, ALICE).await;
    let mut alices = alice
        .client()
        .await
        .watch_id_token(request("", audience))
        .await
        .expect("Alice may watch")
        .into_inner();
    let first = alices.message().await.unwrap().expect("first token");
    support::verify(&emulator, &first.token, audience).await;
    broker.served.lock().unwrap().push(first.token.clone());
    let mut roots = broker
        .client()
        .await
        .watch_id_token(request("second", "https://second.example.com"))
        .await
        .expect("root may watch `second`")
        .into_inner();
    let root_first = roots.message().await.unwrap().unwrap();
    broker.served.lock().unwrap().push(root_first.token.clone());

    // The operator revokes Alice's grant and removes `second`.
    let without = config
        .replace(&rules(true), &rules(false))
        .replace(&second, "");
    assert_ne!(without, config);
    std::fs::write(&config_path, without).unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);

    let revoked = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(20), alices.message())
        .await
        .expect("Alice's stream ends or delivers within 20 s");
    let ended_after = revoked.elapsed();
    if let Ok(Some(token)) = &next {
        broker.served.lock().unwrap().push(token.token.clone());
    }
    let status = next.expect_err("after revocation: no token, a status");
    eprintln!("Alice's revoked stream ended {ended_after:?} after SIGHUP: {status:?}");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(&format!("uid {ALICE}")),
        "{status:?}"
    );
    assert!(
        ended_after < Duration::from_secs(2),
        "ended at the reload, not at the next refresh: {ended_after:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(20), roots.message())
        .await
        .expect("the removed identity's stream ends within 20 s");
    let status = ended.expect_err("a removed identity's stream ends with a status");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // Each end is an audit line naming the caller.
    let log = broker
        .wait_for_log("the revocation audit line", |log| {
            audit_lines(log, "WatchIdToken").iter().any(|l| {
                field(l, "event") == Some("revoked") && field(l, "peer_uid") == Some("4102")
            })
        })
        .await;
    let lines = audit_lines(&log, "WatchIdToken");
    let revoked_line = lines
        .iter()
        .find(|l| field(l, "event") == Some("revoked") && field(l, "peer_uid") == Some("4102"))
        .unwrap();
    assert_eq!(
        field(revoked_line, "result"),
        Some("PERMISSION_DENIED"),
        "{log}"
    );
    assert_eq!(field(revoked_line, "decision"), Some("denied"), "{log}");
    assert!(
        lines
            .iter()
            .any(|l| field(l, "identity") == Some("second")
                && field(l, "result") == Some("NOT_FOUND")),
        "{log}"
    );
}

/// Point 5, text format: an audience with spaces and quotes, sent by Eve,
/// forged whole audit fields (`decision="allowed" peer_uid=0`).
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_audience_stays_one_quoted_field() {
    if !can_become_other_users() {
        return;
    }
    let emulator = support::emulator().await;
    let broker = broker(&emulator, "", &rule(0, "[\"*\"]", "[\"*\"]"), "info").await;
    let eve = Relay::start(&broker, EVE).await;
    let forged = "https://x.example.com\" decision=\"allowed\" rule=\"policy[0]\" peer_uid=0 \
                  result=\"OK\"\n2026-01-01T00:00:00.000000Z  INFO token_broker::server::grpc: \
                  GetIdToken peer_uid=0 \u{1b}[2K\\";
    assert!(forged.len() < 256, "not cut: {}", forged.len());
    for identity in ["", "default"] {
        let status = eve
            .client()
            .await
            .get_id_token(request(identity, forged))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let log = broker
        .wait_for_log("Eve's two audit lines", |log| {
            audit_lines(log, "GetIdToken").len() >= 2
        })
        .await;
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00.000000Z")),
        "a forged line:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "a raw escape sequence:\n{log}");
    for line in audit_lines(&log, "GetIdToken") {
        let mut keys: Vec<&str> = line.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        let count = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), count, "a key twice: {line:?}\n{log}");
        assert!(!keys.contains(&""), "a word outside any field: {line:?}");
        assert_eq!(field(&line, "peer_uid"), Some("4101"), "{line:?}");
        assert_eq!(field(&line, "result"), Some("INVALID_ARGUMENT"));
        assert_eq!(
            field(&line, "decision"),
            None,
            "refused before any decision"
        );
        let escaped = format!("{forged:?}");
        assert_eq!(
            field(&line, "audience"),
            Some(&escaped[1..escaped.len() - 1]),
            "the audience, whole and escaped"
        );
    }
}

/// A metadata server that answers every request with `status` and `body`.
async fn hostile_upstream(status: u16, body: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} Nope\r\nContent-Type: text/plain\r\nMetadata-Flavor: Google\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// Point 5, upstream: error text with newlines forged whole log lines, and
/// a token an upstream echoed back was redacted only if it began `eyJ`.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_error_text_cannot_forge_lines_or_leak_a_token() {
    let emulator = support::emulator().await;
    // A JWS whose header has a space before its first key: `eyAi...`.
    let echoed =
        "eyAiYWxnIjogIlJTMjU2IiB9.eyAic3ViIjogIjEwMDAiIH0.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU";
    let body = format!(
        "denied for {echoed}\n2026-01-01T00:00:00.000000Z  INFO token_broker::server::grpc: \
         GetIdToken peer_uid=0 decision=\"allowed\" result=\"OK\"\n\u{1b}]0;owned\u{7}"
    );
    let upstream = hostile_upstream(403, body).await;
    let hostile = format!(
        "[[identities]]\nname = \"hostile\"\nsource = \"metadata\"\nmetadata_host = \"{upstream}\"\n"
    );
    let port = crate::metadata_endpoint::free_port();
    let endpoint =
        format!("[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\nidentity = \"hostile\"\n");
    let broker = broker(&emulator, &hostile, &endpoint, "info").await;

    let status = broker
        .get("hostile", "https://a.example.com")
        .await
        .expect_err("upstream refuses");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(!status.message().contains(echoed), "{status:?}");
    assert!(!status.message().contains('\n'), "{status:?}");
    assert!(status.message().contains("[redacted-jws]"), "{status:?}");

    // The metadata endpoint's error body: one line, quoted upstream text.
    let response = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{port}/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://b.example.com"
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body = response.text().await.unwrap();
    assert!(!body.contains(echoed), "{body}");
    assert_eq!(body.trim_end().lines().count(), 1, "one line: {body:?}");
    assert!(
        !body.contains('\u{1b}') && !body.contains('\u{7}'),
        "{body:?}"
    );
    assert!(
        body.contains(r#"\n2026-01-01T00:00:00.000000Z  INFO"#),
        "the upstream text, escaped: {body}"
    );

    let log = broker
        .wait_for_log("both requests", |log| {
            log.contains("GetIdToken") && log.contains("metadata endpoint")
        })
        .await;
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00.000000Z")),
        "a forged line:\n{log}"
    );
    assert!(!log.contains(echoed), "an echoed token reached the log");
    assert!(!log.contains('\u{1b}') && !log.contains('\u{7}'), "{log}");
}

/// Point 5, flood: 3,000 requests with a 16 KB identity grew the log by
/// 504 MiB. Now the identity is refused before it is logged, and what is
/// logged of it is cut at 256 bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_huge_identity_cannot_flood_the_log() {
    if !can_become_other_users() {
        return;
    }
    let emulator = support::emulator().await;
    // The configured filter (info), not the test default of trace.
    let port = crate::metadata_endpoint::free_port();
    let endpoint = format!("[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\n");
    let rules = rule(0, "[\"*\"]", "[\"*\"]");
    let broker = broker(&emulator, "", &format!("{rules}{endpoint}"), "").await;
    let eve = Relay::start(&broker, EVE).await;
    let mut client = eve.client().await;
    let identity = "i".repeat(16 * 1024);
    // One request first, so the log's fixed startup lines are behind us.
    client
        .get_id_token(request(&identity, "https://a.example.com"))
        .await
        .expect_err("refused");
    let before = broker
        .wait_for_log("the first audit line", |log| log.contains("GetIdToken"))
        .await
        .len();
    const REQUESTS: usize = 300;
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..REQUESTS {
        statuses.push(
            client
                .get_id_token(request(&identity, "https://a.example.com"))
                .await
                .expect_err("refused"),
        );
    }
    let elapsed = started.elapsed();
    let log = broker
        .wait_for_log("every audit line", |log| {
            log.matches(": GetIdToken ").count() > REQUESTS
        })
        .await;
    let per_request = (log.len() - before) / REQUESTS;
    eprintln!(
        "{REQUESTS} requests with a 16 KB identity in {elapsed:?}: the log grew {} bytes, \
         {per_request} per request",
        log.len() - before
    );
    assert!(
        per_request < 1024,
        "{per_request} log bytes per request; a line must not carry the identity whole"
    );
    for status in statuses {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .contains("identity is 16384 bytes; the limit is 128"),
            "{status:?}"
        );
    }
    let line = audit_lines(&log, "GetIdToken").pop().unwrap();
    assert_eq!(
        field(&line, "identity"),
        Some(format!("{}…[16128 more bytes cut]", "i".repeat(256)).as_str())
    );

    // The metadata endpoint: a 16 KB account name in the path.
    let response = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{port}/computeMetadata/v1/instance/service-accounts/{identity}/identity?audience=https://a.example.com"
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body = response.text().await.unwrap();
    assert!(
        body.contains("identity is 16384 bytes; the limit is 128"),
        "{body}"
    );
    assert!(body.len() < 1024, "{} bytes of body", body.len());
    let is_the_line = |l: &&str| l.contains(": metadata endpoint ") && l.contains(" status=400");
    let log = broker
        .wait_for_log("the endpoint's line", |log| {
            log.lines().any(|l| is_the_line(&l))
        })
        .await;
    let line = log.lines().find(is_the_line).unwrap();
    assert!(line.len() < 1024, "{} bytes: {line}", line.len());
}

/// Point 6: a cubic pattern matcher. Eve, granted `https://*-*-*.b.run.app`,
/// sent 2,048-byte audiences that took 18 s of CPU each, stalling everyone;
/// and `https://*.a.run.app` granted an audience URL parsers read as
/// another host.
#[tokio::test(flavor = "multi_thread")]
async fn audience_patterns_are_linear_and_stay_in_one_label() {
    if !can_become_other_users() {
        return;
    }
    let emulator = support::emulator().await;
    let rules = format!(
        "{}{}",
        rule(0, "[\"*\"]", "[\"*\"]"),
        rule(
            EVE,
            "[\"default\"]",
            "[\"https://*-*-*.b.run.app\", \"https://*.a.run.app\"]"
        )
    );
    let broker = broker(&emulator, "", &rules, "info").await;
    let eve = Relay::start(&broker, EVE).await;
    let victim_audience = "https://victim.example.com";
    broker.get("default", victim_audience).await.unwrap();

    // Three hostile requests at once, and a victim's cached hit among them.
    let hostile = format!("https://{}.c.run.app", "-".repeat(2030));
    assert_eq!(hostile.len(), 2048);
    let attacks: Vec<_> = (0..3)
        .map(|_| {
            let hostile = hostile.clone();
            let socket = eve.socket.clone();
            tokio::spawn(async move {
                let mut client = token_broker::client::connect(&socket).await.unwrap();
                let started = Instant::now();
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.get_id_token(request("", &hostile)),
                )
                .await;
                (started.elapsed(), answer)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut victim = broker.client().await;
    let started = Instant::now();
    let hit = tokio::time::timeout(
        Duration::from_secs(10),
        victim.get_id_token(request("default", victim_audience)),
    )
    .await
    .expect("the victim is answered within 10 s")
    .expect("the victim's cached token");
    let victim_latency = started.elapsed();
    broker.served.lock().unwrap().push(hit.into_inner().token);
    for attack in attacks {
        let (took, answer) = attack.await.unwrap();
        let status = answer
            .expect("a hostile audience is decided within 10 s")
            .expect_err("and denied");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        eprintln!("hostile 2,048-byte audience decided in {took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    eprintln!("victim's cached hit during the attack: {victim_latency:?}");
    assert!(
        victim_latency < Duration::from_millis(500),
        "{victim_latency:?}"
    );

    let other_host = r"https://payments%2Eexample%2Ecom\.a.run.app";
    let status = eve
        .client()
        .await
        .get_id_token(request("", other_host))
        .await
        .expect_err("another host is not granted");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(!emulator
        .stats()
        .identity
        .by_audience
        .contains_key(other_host));
    let granted = eve
        .client()
        .await
        .get_id_token(request("", "https://svc-7-uc.a.run.app"))
        .await
        .expect("a one-label host is granted")
        .into_inner();
    broker.served.lock().unwrap().push(granted.token.clone());
}

/// Point 7: a request the client cancels mid-fetch left no audit line.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_cancelled_mid_fetch_is_audited() {
    if !can_become_other_users() {
        return;
    }
    let emulator = support::emulator().await;
    emulator.set_faults(Faults {
        delay_ms: Some(3_000),
        ..Faults::default()
    });
    let port = crate::metadata_endpoint::free_port();
    let endpoint = format!("[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\n");
    let broker = broker(&emulator, "", &endpoint, "info").await;
    let eve = Relay::start(&broker, EVE).await;

    // gRPC: the call is dropped (RST_STREAM) while the fetch waits upstream.
    let mut client = eve.client().await;
    let audience = "https://cancelled.example.com";
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        client.get_id_token(request("", audience)),
    )
    .await;
    assert!(gave_up.is_err(), "the fetch is still waiting upstream");
    let log = broker
        .wait_for_log("the cancelled call's audit line", |log| {
            audit_lines(log, "GetIdToken")
                .iter()
                .any(|l| field(l, "audience") == Some(audience))
        })
        .await;
    let line = audit_lines(&log, "GetIdToken")
        .into_iter()
        .find(|l| field(l, "audience") == Some(audience))
        .unwrap();
    assert_eq!(field(&line, "result"), Some("CANCELLED"), "{line:?}");
    assert_eq!(field(&line, "peer_uid"), Some("4101"), "{line:?}");
    assert_eq!(field(&line, "decision"), Some("allowed"), "{line:?}");

    // The metadata endpoint: the connection closes mid-fetch.
    let http_audience = "https://cancelled-http.example.com";
    {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            conn,
            "GET /computeMetadata/v1/instance/service-accounts/default/identity?audience={http_audience} HTTP/1.1\r\n\
             Host: 127.0.0.1:{port}\r\nMetadata-Flavor: Google\r\n\r\n"
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = broker
        .wait_for_log("the closed request's line", |log| {
            log.lines()
                .any(|l| l.contains("metadata endpoint") && l.contains(http_audience))
        })
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("metadata endpoint") && l.contains(http_audience))
        .unwrap();
    let line = fields(line.split_once(": metadata endpoint ").unwrap().1);
    assert_eq!(field(&line, "status"), Some("499"), "{line:?}");
    assert_eq!(
        field(&line, "error"),
        Some("the client went away before the answer")
    );
}

/// Point 8: paths checked only at their last link or last directory.
#[tokio::test(flavor = "multi_thread")]
async fn paths_are_checked_all_the_way_up() {
    if !can_become_other_users() {
        return;
    }
    let emulator = support::emulator().await;
    let dir = support::workdir();
    support::set_mode(dir.path(), 0o755);
    let eves = dir.path().join("eve");
    std::fs::create_dir(&eves).unwrap();
    nix::unistd::chown(&eves, Some(EVE.into()), Some(EVE.into())).unwrap();

    // A root-owned link to Eve's link to a key file: Eve can re-point hers.
    let (key, _) = support::key_file(
        dir.path(),
        "key",
        "sa@p.iam.gserviceaccount.com",
        &emulator,
        true,
    );
    let evil_link = dir.path().join("eves-link.json");
    std::os::unix::fs::symlink(&key, &evil_link).unwrap();
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        &evil_link,
        Some(EVE.into()),
        Some(EVE.into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let root_link = dir.path().join("root-link.json");
    std::os::unix::fs::symlink(&evil_link, &root_link).unwrap();
    let socket = dir.path().join("broker.sock");
    let config = dir.path().join("key.toml");
    std::fs::write(
        &config,
        support::config_text(&socket, &support::key_identity("default", &root_link)),
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: symlink owned by uid {EVE}",
            evil_link.display()
        )),
        "{stderr}"
    );
    // The same key through root's links only is fine.
    std::fs::remove_file(&root_link).unwrap();
    std::os::unix::fs::symlink(&key, &root_link).unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");

    // A root-owned socket directory inside Eve's: she can move it away and
    // put her own in its place.
    let run = eves.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.join("broker.sock");
    let config = dir.path().join("socket.toml");
    std::fs::write(
        &config,
        support::config_text(&socket, &support::metadata_identity("default", &emulator)),
    )
    .unwrap();
    let out = support::base_command(&["serve", "--config", config.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut out = out;
        loop {
            if let Some(status) = out.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(&mut out.stderr.take().unwrap(), &mut stderr)
                    .unwrap();
                return (status, stderr);
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = out.kill();
                let _ = out.wait();
                return (
                    std::os::unix::process::ExitStatusExt::from_raw(0),
                    "still serving after 10 s".to_owned(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(!exit.0.success(), "serve refused the socket: {}", exit.1);
    assert!(
        exit.1
            .contains(&format!("{}: directory owned by uid {EVE}", eves.display())),
        "{}",
        exit.1
    );
    assert!(!socket.exists());
    let moved = Command::new("mv")
        .arg(&run)
        .arg(eves.join("moved"))
        .uid(EVE)
        .gid(EVE)
        .status()
        .unwrap();
    assert!(
        moved.success(),
        "Eve can move the directory the socket would be in"
    );

    // Telemetry on a non-loopback address needs an explicit yes.
    let telemetry = |extra: &str| {
        let config = dir.path().join("telemetry.toml");
        std::fs::write(
            &config,
            format!(
                "{}\n[telemetry]\nlisten = \"0.0.0.0:9464\"\n{extra}",
                support::config_text(
                    &dir.path().join("t.sock"),
                    &support::metadata_identity("default", &emulator)
                )
            ),
        )
        .unwrap();
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()])
    };
    let (code, _, stderr) = telemetry("");
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("telemetry.listen: 0.0.0.0:9464 is not a loopback address"),
        "{stderr}"
    );
    let (code, _, stderr) = telemetry("allow_non_loopback = true\n");
    assert_eq!(code, 0, "{stderr}");
}
