//! Issue 15.1: access tokens as a product of their own. `GetAccessToken` on
//! a real broker, against the emulator over HTTP: off until a policy rule
//! grants the scopes, served from the same cache as ID tokens (one upstream
//! call for many askers, whatever order they name the scopes in), audited,
//! and minted by `generateAccessToken` for an impersonated identity.

use std::path::Path;

use token_broker::{
    emulator::{Emulator, Permission, DEFAULT_ACCOUNT_EMAIL},
    proto::{AccessToken, GetAccessTokenRequest},
};
use tonic::Code;

use crate::support::{self, Broker};

const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";
const STORAGE_RO: &str = "https://www.googleapis.com/auth/devstorage.read_only";
const GMAIL: &str = "https://www.googleapis.com/auth/gmail.send";
const TARGET: &str = "deploy@target-project.iam.gserviceaccount.com";

/// A rule letting this test's uid have ID tokens for any audience and
/// access tokens for cloud-platform and any devstorage scope.
fn granting_rule() -> String {
    format!(
        "[[policy]]\nuids = [{}]\nidentities = [\"*\"]\naudiences = [\"*\"]\nscopes = [\"{CLOUD}\", \"https://www.googleapis.com/auth/devstorage.*\"]\n",
        nix::unistd::getuid().as_raw()
    )
}

fn config(socket: &Path, emulator: &Emulator, policy: &str) -> String {
    let identities = format!(
        "{}[[identities]]\nname = \"deployer\"\nsource = \"impersonate\"\nbase = \"default\"\nservice_account = \"{TARGET}\"\niam_endpoint = \"{}\"\n\n{policy}",
        support::metadata_identity("default", emulator),
        emulator.base_url()
    );
    support::config_text(socket, &identities)
}

#[tokio::test(flavor = "multi_thread")]
async fn access_tokens_are_off_until_a_rule_grants_their_scopes() {
    let emulator = support::emulator().await;
    // No [[policy]] at all: ID tokens are open, access tokens are not.
    let broker = Broker::start(|s| config(s, &emulator, ""), "info").await;
    broker
        .get("default", "https://a.example.com")
        .await
        .unwrap();
    let denied = broker.get_access("default", &[]).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("access tokens are off until"),
        "{}",
        denied.message()
    );
    assert_eq!(emulator.stats().metadata_token, 0, "nothing was fetched");

    // A rule for ID tokens only grants no access token either.
    let only_id = format!(
        "[[policy]]\nuids = [{}]\nidentities = [\"*\"]\naudiences = [\"*\"]\n",
        nix::unistd::getuid().as_raw()
    );
    let broker = Broker::start(|s| config(s, &emulator, &only_id), "info").await;
    broker
        .get("default", "https://a.example.com")
        .await
        .unwrap();
    let denied = broker.get_access("default", &[CLOUD]).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(emulator.stats().metadata_token, 0);
    let log = broker.log();
    assert!(
        log.contains("GetAccessToken") && log.contains("denied"),
        "the refusal is audited:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_granted_access_token_is_cached_per_scope_set_and_audited() {
    let emulator = support::emulator().await;
    let broker = std::sync::Arc::new(
        Broker::start(|s| config(s, &emulator, &granting_rule()), "info").await,
    );

    broker
        .get("default", "https://a.example.com")
        .await
        .unwrap();
    // Twenty askers, naming the same set in different orders, with a
    // duplicate: one metadata-server call.
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let broker = broker.clone();
            tokio::spawn(async move {
                let scopes: &[&str] = if n % 2 == 0 {
                    &[STORAGE_RO, CLOUD, CLOUD]
                } else {
                    &[CLOUD, STORAGE_RO]
                };
                broker.get_access("default", scopes).await.unwrap()
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await.unwrap());
    }
    assert_eq!(emulator.stats().metadata_token, 1, "one upstream call");
    let first = &tokens[0];
    assert!(tokens.iter().all(|t| t.token == first.token));
    assert_eq!(
        first.scopes,
        [CLOUD, STORAGE_RO],
        "sorted, without duplicates"
    );
    assert_eq!(first.identity, "default");
    let expires = first.expire_time.as_ref().unwrap().seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        expires > now + 3000,
        "about an hour of life: {expires} vs {now}"
    );
    let info = support::tokeninfo(&emulator, &first.token)
        .await
        .expect("a valid token the emulator issued");
    assert_eq!(info["email"], DEFAULT_ACCOUNT_EMAIL);
    assert_eq!(info["scope"], format!("{CLOUD} {STORAGE_RO}"));
    assert!(support::tokeninfo(&emulator, "ya29.forged").await.is_none());

    // Empty scopes mean cloud-platform: another key, another call.
    let cloud = broker.get_access("default", &[]).await.unwrap();
    assert_eq!(cloud.scopes, [CLOUD]);
    assert_ne!(cloud.token, first.token);
    assert_eq!(emulator.stats().metadata_token, 2);

    // A scope no rule grants, alone or beside granted ones: refused, no call.
    for scopes in [&[GMAIL][..], &[CLOUD, GMAIL][..]] {
        let denied = broker.get_access("default", scopes).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{scopes:?}");
    }
    // Malformed scopes are INVALID_ARGUMENT.
    for scopes in [&[""][..], &["a b"][..]] {
        let bad = broker.get_access("default", scopes).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{scopes:?}: {bad:?}");
    }
    let unknown = broker.get_access("nobody", &[CLOUD]).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(emulator.stats().metadata_token, 2);

    // Each request is one audit line naming the scopes, never the token
    // (the broker's drop checks every served token against its log).
    let log = broker.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("GetAccessToken") && l.contains(STORAGE_RO))
        .collect();
    assert!(lines.len() >= 20, "{log}");
    assert!(lines.iter().any(|l| l.contains("allowed")), "{log}");
    // The CLI: `token --access --scopes`.
    let socket = broker.socket.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        support::run_cli(&[
            "token",
            "--access",
            "--scopes",
            &format!("{STORAGE_RO},{CLOUD}"),
            "--socket",
            &socket,
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), first.token, "the cached token");
    // `status` shows both kinds, never token text.
    let socket = broker.socket.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        support::run_cli(&["status", "--json", "--socket", &socket])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains(&first.token) && !stdout.contains(&cloud.token));
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let kinds: Vec<(String, serde_json::Value)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["kind"].as_str().unwrap().to_owned(), r["scopes"].clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("access_token".to_owned(), serde_json::json!([CLOUD])),
            (
                "access_token".to_owned(),
                serde_json::json!([CLOUD, STORAGE_RO])
            ),
            ("id_token".to_owned(), serde_json::json!([])),
        ],
        "{stdout}"
    );
    let socket = broker.socket.to_str().unwrap().to_owned();
    let (code, table, _) =
        tokio::task::spawn_blocking(move || support::run_cli(&["status", "--socket", &socket]))
            .await
            .unwrap();
    assert_eq!(code, 0);
    assert!(
        table.contains(&format!("access token: {CLOUD} {STORAGE_RO}")),
        "{table}"
    );
    assert!(!table.contains(&first.token));

    let (code, _, stderr) = support::run_cli(&["token", "--access", "--audience", "x"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--audience"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_impersonated_identity_mints_access_tokens_with_generate_access_token() {
    let emulator = support::emulator().await;
    emulator.create_service_account(TARGET);
    let broker = Broker::start(|s| config(s, &emulator, &granting_rule()), "info").await;

    // Without the grant, Google's refusal is FAILED_PRECONDITION naming the
    // missing permission.
    let refused = broker.get_access("deployer", &[CLOUD]).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("iam.serviceAccounts.getAccessToken"),
        "{}",
        refused.message()
    );

    emulator.grant(DEFAULT_ACCOUNT_EMAIL, TARGET, Permission::AccessToken);
    // The refusal backs the key off; a new scope set is a new key.
    let token = broker.get_access("deployer", &[STORAGE_RO]).await.unwrap();
    let (principal, scopes) = emulator.access_token_info(&token.token).unwrap();
    assert_eq!(principal, TARGET, "the impersonated account's token");
    assert_eq!(scopes, [STORAGE_RO]);
    let stats = emulator.stats();
    assert_eq!(stats.iam_access, 2, "one refused, one granted");
    assert_eq!(stats.metadata_token, 1, "one base token for both");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_sends_each_refreshed_access_token_until_its_grant_is_revoked() {
    let emulator = support::emulator().await;
    // Access tokens living 36 s: usable for 6 s past the 30 s margin, so
    // the broker refreshes them about 3 s after each is issued.
    emulator.set_faults(token_broker::emulator::Faults {
        access_token_lifetime_secs: Some(36),
        ..Default::default()
    });
    let broker = Broker::start(|s| config(s, &emulator, &granting_rule()), "info").await;
    let request = || GetAccessTokenRequest {
        identity: "default".into(),
        scopes: vec![STORAGE_RO.into()],
        min_valid_for: None,
    };
    let denied = broker
        .client()
        .await
        .watch_access_token(GetAccessTokenRequest {
            scopes: vec![GMAIL.into()],
            ..request()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let mut stream = broker
        .client()
        .await
        .watch_access_token(request())
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<AccessToken> = Vec::new();
    while seen.len() < 3 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message())
            .await
            .expect("a refreshed token within 30 s")
            .unwrap()
            .expect("the stream stays open");
        broker.served.lock().unwrap().push(next.token.clone());
        seen.push(next);
    }
    for pair in seen.windows(2) {
        assert_ne!(pair[0].token, pair[1].token, "each message is a new token");
    }
    for token in &seen {
        assert_eq!(token.scopes, [STORAGE_RO]);
        let (principal, scopes) = emulator
            .access_token_info(&token.token)
            .expect("issued by the emulator");
        assert_eq!(principal, DEFAULT_ACCOUNT_EMAIL);
        assert_eq!(scopes, [STORAGE_RO]);
    }
    // A reload that stops granting the scopes ends the stream with the
    // status a new request would get.
    let no_scopes = format!(
        "[[policy]]\nuids = [{}]\nidentities = [\"*\"]\naudiences = [\"*\"]\n",
        nix::unistd::getuid().as_raw()
    );
    std::fs::write(
        broker.dir.path().join("config.toml"),
        config(&broker.socket, &emulator, &no_scopes),
    )
    .unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    let ended = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), stream.message())
            .await
            .expect("the stream ends within 30 s of the reload")
        {
            Ok(Some(token)) => broker.served.lock().unwrap().push(token.token),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    let log = broker.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WatchAccessToken") && l.contains("refresh")),
        "refreshes are audited:\n{log}"
    );
}
