//! Issue 5: the peer-credential policy, enforced against real client
//! processes running under other uids and gids (the test harness runs as
//! root, as CI does, and drops to them in the child before exec).

use std::{os::unix::process::CommandExt, time::Duration};

use tonic::Code;

use crate::support::{self, Broker};

const ALLOWED: u32 = 4001;
const STRANGER: u32 = 4002;
const TEAM_MEMBER: u32 = 4003;
const TEAM_GROUP: u32 = 5001;

/// A broker whose socket anyone may open, so the policy is the only gate.
async fn guarded(emulator: &token_broker::emulator::Emulator, extra: &str) -> Broker {
    let identity = support::metadata_identity("default", emulator);
    let extra = extra.to_owned();
    let broker = Broker::start(
        move |socket| {
            // Let other uids reach the socket inside the test's directory.
            support::set_mode(socket.parent().unwrap(), 0o755);
            format!(
                r#"{}
[limits]
new_audience_burst = 3
new_audiences_per_minute = 60

[[policy]]
uids = [0]
identities = ["*"]
audiences = ["*"]

[[policy]]
uids = [{ALLOWED}]
identities = ["default"]
audiences = ["https://*.a.run.app", "https://api.example.com"]

[[policy]]
gids = [{TEAM_GROUP}]
identities = ["default"]
audiences = ["https://team.example.com"]
{extra}"#,
                support::config_text(socket, &identity)
                    .replace("[server]\n", "[server]\nsocket_mode = \"0666\"\n"),
            )
        },
        "info",
    )
    .await;
    broker
}

/// Runs the CLI as `uid`:`gid`: (exit code, stdout, stderr).
fn cli_as(uid: u32, gid: u32, args: &[&str]) -> (i32, String, String) {
    let out = support::base_command(args)
        .gid(gid)
        .uid(uid)
        .output()
        .expect("client runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn token_as(broker: &Broker, uid: u32, gid: u32, audience: &str) -> (i32, String, String) {
    cli_as(
        uid,
        gid,
        &[
            "token",
            "--socket",
            broker.socket.to_str().unwrap(),
            "--audience",
            audience,
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn uids_get_exactly_what_their_rules_grant() {
    let emulator = support::emulator().await;
    let broker = guarded(&emulator, "").await;

    let (code, token, stderr) = token_as(&broker, ALLOWED, ALLOWED, "https://svc-x.a.run.app");
    assert_eq!(code, 0, "{stderr}");
    support::verify(&emulator, token.trim(), "https://svc-x.a.run.app").await;

    // Same uid, an audience outside its patterns (another label depth, another domain).
    for audience in [
        "https://a.b.a.run.app",
        "https://other.example.com",
        "https://team.example.com",
    ] {
        let (code, _, stderr) = token_as(&broker, ALLOWED, ALLOWED, audience);
        assert_eq!(code, 1, "{audience}");
        assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
        assert!(
            stderr.contains(&format!("uid {ALLOWED}")) && stderr.contains(audience),
            "{stderr}"
        );
        assert!(
            !stderr.contains("policy[") && !stderr.contains("a.run.app\", "),
            "nothing about the rules: {stderr}"
        );
    }

    // Another uid: denied everything.
    for audience in ["https://svc-x.a.run.app", "https://api.example.com"] {
        let (code, _, stderr) = token_as(&broker, STRANGER, STRANGER, audience);
        assert_eq!(code, 1);
        assert!(
            stderr.contains("PERMISSION_DENIED") && stderr.contains(&format!("uid {STRANGER}")),
            "{stderr}"
        );
    }

    // A group rule works by the peer's gid, and only for that gid.
    let (code, token, stderr) =
        token_as(&broker, TEAM_MEMBER, TEAM_GROUP, "https://team.example.com");
    assert_eq!(code, 0, "{stderr}");
    support::verify(&emulator, token.trim(), "https://team.example.com").await;
    let (code, _, _) = token_as(
        &broker,
        TEAM_MEMBER,
        TEAM_MEMBER,
        "https://team.example.com",
    );
    assert_eq!(code, 1);

    // Each decision is one audit line with the peer, the rule and the result.
    let log = broker.log();
    assert!(
        log.contains(&format!("peer_uid={ALLOWED}")) && log.contains("decision=\"denied\""),
        "{log}"
    );
    assert!(
        log.contains("rule=\"policy[1]\"") && log.contains("rule=\"policy[2]\""),
        "{log}"
    );
    assert!(log.contains("peer_exe="), "{log}");
    assert!(!log.contains(token.trim()), "token text in the audit log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_token_is_never_served_to_a_peer_who_may_not_have_it() {
    let emulator = support::emulator().await;
    let broker = guarded(&emulator, "").await;
    // Root (policy[0]) fetches it; now it is a cache hit.
    broker
        .get("default", "https://root-only.example.com")
        .await
        .unwrap();
    broker
        .get("default", "https://svc-y.a.run.app")
        .await
        .unwrap();
    let (code, _, stderr) = token_as(&broker, ALLOWED, ALLOWED, "https://root-only.example.com");
    assert_eq!(code, 1);
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    assert_eq!(
        emulator.stats().identity.by_audience["https://root-only.example.com"],
        1
    );

    // status shows each caller only what it may read.
    let socket = broker.socket.to_str().unwrap();
    let (code, stdout, _) = cli_as(ALLOWED, ALLOWED, &["status", "--json", "--socket", socket]);
    assert_eq!(code, 0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let audiences: Vec<_> = rows
        .iter()
        .map(|r| r["audience"].as_str().unwrap())
        .collect();
    assert_eq!(audiences, ["https://svc-y.a.run.app"]);
    let (_, stdout, _) = cli_as(
        STRANGER,
        STRANGER,
        &["status", "--json", "--socket", socket],
    );
    assert_eq!(stdout.trim(), "[]");
    let (_, stdout, _) = support::run_cli(&["status", "--json", "--socket", socket]);
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&stdout)
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn new_audiences_are_rate_limited_per_uid_and_recover() {
    let emulator = support::emulator().await;
    let broker = guarded(&emulator, "").await;
    for i in 0..3 {
        let (code, _, stderr) = token_as(
            &broker,
            ALLOWED,
            ALLOWED,
            &format!("https://burst-{i}.a.run.app"),
        );
        assert_eq!(code, 0, "{stderr}");
    }
    let (code, _, stderr) = token_as(&broker, ALLOWED, ALLOWED, "https://burst-3.a.run.app");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("RESOURCE_EXHAUSTED") && stderr.contains("new audiences"),
        "{stderr}"
    );
    assert!(!emulator
        .stats()
        .identity
        .by_audience
        .contains_key("https://burst-3.a.run.app"));
    // Cached audiences are not limited; other uids have their own bucket.
    let (code, _, _) = token_as(&broker, ALLOWED, ALLOWED, "https://burst-0.a.run.app");
    assert_eq!(code, 0);
    broker
        .get("default", "https://root-new.example.com")
        .await
        .unwrap();
    // A herd asking for ONE new audience at once spends one token, not fifty.
    let herd: Vec<_> = (0..50)
        .map(|_| {
            let socket = broker.socket.clone();
            tokio::spawn(async move {
                token_broker::client::connect(&socket)
                    .await
                    .unwrap()
                    .get_id_token(token_broker::proto::GetIdTokenRequest {
                        audience: "https://herd.example.com".into(),
                        identity: String::new(),
                        min_valid_for: None,
                    })
                    .await
            })
        })
        .collect();
    for call in herd {
        call.await
            .unwrap()
            .expect("every member of the herd is served");
    }
    // One new audience per second refills (60 per minute).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, _, stderr) = token_as(&broker, ALLOWED, ALLOWED, "https://burst-3.a.run.app");
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_malformed_requests_do_not_affect_other_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emulator = support::emulator().await;
    let broker = guarded(&emulator, "").await;
    let huge = format!("https://{}.example.com", "a".repeat(70 * 1024));
    let err = broker.get("default", &huge).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{err:?}"
    );
    // Garbage on a raw connection: closed by the server, nothing else happens.
    let mut raw = tokio::net::UnixStream::connect(&broker.socket)
        .await
        .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\x01\x02garbage")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    let mut raw2 = tokio::net::UnixStream::connect(&broker.socket)
        .await
        .unwrap();
    raw2.write_all(&[0u8; 4096]).await.unwrap();
    drop(raw2);
    let token = broker
        .get("default", "https://after-garbage.example.com")
        .await
        .unwrap();
    support::verify(&emulator, &token.token, "https://after-garbage.example.com").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_lines_are_json_when_logging_is_json_and_the_socket_gets_its_group() {
    let emulator = support::emulator().await;
    let broker = guarded(&emulator, "[log]\nformat = \"json\"\n").await;
    let _ = std::fs::metadata(&broker.socket).unwrap();
    broker
        .get("default", "https://json.example.com")
        .await
        .unwrap();
    let (code, _, _) = token_as(&broker, STRANGER, STRANGER, "https://json.example.com");
    assert_eq!(code, 1);
    let lines: Vec<serde_json::Value> = broker
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let audits: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "GetIdToken")
        .collect();
    assert_eq!(audits.len(), 2, "{lines:?}");
    let denied = audits.iter().find(|l| l["decision"] == "denied").unwrap();
    assert_eq!(denied["peer_uid"], STRANGER);
    assert_eq!(denied["audience"], "https://json.example.com");
    assert_eq!(denied["result"], "PERMISSION_DENIED");
    for field in [
        "peer_gid",
        "peer_pid",
        "identity",
        "latency_us",
        "rule",
        "timestamp",
    ] {
        assert!(!denied[field].is_null(), "{field} missing: {denied}");
    }
    let allowed = audits.iter().find(|l| l["decision"] == "allowed").unwrap();
    assert_eq!(allowed["cache"], "miss");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_policy_startup_warns_and_the_socket_group_is_set() {
    let emulator = support::emulator().await;
    let identity = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        move |socket| {
            support::config_text(socket, &identity).replace(
                "[server]\n",
                &format!("[server]\nsocket_group = {TEAM_GROUP}\n"),
            )
        },
        "info",
    )
    .await;
    assert!(
        broker.log().contains("no [[policy]] configured"),
        "{}",
        broker.log()
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&broker.socket).unwrap().gid(), TEAM_GROUP);
    let (code, _, stderr) = support::run_cli(&[
        "check-config",
        "--config",
        broker.dir.path().join("config.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn unknown_user_and_group_names_are_config_errors() {
    let dir = support::workdir();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[policy]]\nuids = [\"no-such-user-tb\"]\nidentities = [\"default\"]\naudiences = [\"https://**.x\"]\n[server]\nsocket_group = \"no-such-group-tb\"\n",
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    for key in [
        "policy[0].uids[0]",
        "policy[0].audiences[0]",
        "server.socket_group",
    ] {
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    assert!(stderr.contains("no-such-user-tb"));
}

/// Issue 15.1: access tokens need a rule granting their scopes to that
/// caller; a rule granting every audience grants no access token, and
/// `status` shows an access entry only to callers its scopes are granted to.
#[tokio::test(flavor = "multi_thread")]
async fn access_tokens_go_only_to_uids_whose_rules_grant_their_scopes() {
    const STORAGE_RO: &str = "https://www.googleapis.com/auth/devstorage.read_only";
    let emulator = support::emulator().await;
    let broker = guarded(
        &emulator,
        &format!(
            "\n[[policy]]\nuids = [{ALLOWED}]\nidentities = [\"default\"]\nscopes = [\"https://www.googleapis.com/auth/devstorage.*\"]\n"
        ),
    )
    .await;
    let socket = broker.socket.to_str().unwrap().to_owned();
    let access_as = |uid: u32, scopes: &str| {
        cli_as(
            uid,
            uid,
            &["token", "--access", "--scopes", scopes, "--socket", &socket],
        )
    };

    let (code, token, stderr) = access_as(ALLOWED, STORAGE_RO);
    assert_eq!(code, 0, "{stderr}");
    let token = token.trim().to_owned();
    broker.served.lock().unwrap().push(token.clone());
    let (principal, scopes) = emulator.access_token_info(&token).expect("issued");
    assert_eq!(principal, token_broker::emulator::DEFAULT_ACCOUNT_EMAIL);
    assert_eq!(scopes, [STORAGE_RO]);

    // Not granted: another uid, another scope, and root, whose rule grants
    // every identity and audience but no scope.
    for (uid, scopes) in [
        (STRANGER, STORAGE_RO),
        (ALLOWED, "https://www.googleapis.com/auth/cloud-platform"),
        (0, STORAGE_RO),
    ] {
        let (code, stdout, stderr) = access_as(uid, scopes);
        assert_ne!(code, 0, "uid {uid} {scopes}: {stdout}");
        assert!(
            stderr.contains(&format!("uid {uid} may not have access tokens")),
            "{stderr}"
        );
        assert!(!stdout.contains(&token) && !stderr.contains(&token));
    }
    assert_eq!(emulator.stats().metadata_token, 1, "refusals cost no call");

    // The cached entry is listed to ALLOWED only.
    let listed = |uid: u32| {
        let (code, stdout, stderr) = cli_as(uid, uid, &["status", "--json", "--socket", &socket]);
        assert_eq!(code, 0, "{stderr}");
        assert!(!stdout.contains(&token));
        stdout.contains(STORAGE_RO)
    };
    assert!(listed(ALLOWED));
    assert!(!listed(STRANGER));
    assert!(
        !listed(0),
        "root's audience rule does not show access tokens"
    );
}
