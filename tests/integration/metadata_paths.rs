//! Issue 15.2: the metadata surface libraries expect beyond ID tokens, on a
//! real broker's metadata endpoint backed by the emulator: access tokens
//! under the policy's `scopes` (audited, never logged), the account's
//! `scopes` and `aliases`, project, instance and universe values passed
//! through from the metadata server (a fixed set of paths, fetched once),
//! from the key file or config, 404 with Google's page when unknown, and
//! `?recursive=true`, `?alt=`, `?wait_for_change=` as Google's server.

use reqwest::StatusCode;
use serde_json::json;
use token_broker::emulator::{Emulator, DEFAULT_ACCOUNT_EMAIL};

use crate::{
    metadata_endpoint::{content_type, free_port, get},
    support::{self, Broker},
};

const SA: &str = "/computeMetadata/v1/instance/service-accounts";
const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";
const STORAGE_RO: &str = "https://www.googleapis.com/auth/devstorage.read_only";
const GMAIL: &str = "https://www.googleapis.com/auth/gmail.send";
const VALUE_PATHS: [&str; 5] = [
    "/computeMetadata/v1/project/project-id",
    "/computeMetadata/v1/project/numeric-project-id",
    "/computeMetadata/v1/instance/zone",
    "/computeMetadata/v1/instance/id",
    "/computeMetadata/v1/universe/universe-domain",
];

/// A rule letting this test's uid have any ID token and access tokens for
/// cloud-platform and devstorage scopes.
fn granting_rule() -> String {
    format!(
        "[[policy]]\nuids = [{}]\nidentities = [\"*\"]\naudiences = [\"*\"]\nscopes = [\"{CLOUD}\", \"https://www.googleapis.com/auth/devstorage.*\"]\n",
        nix::unistd::getuid().as_raw()
    )
}

/// A broker serving `identities` (whose first is the endpoint's) with
/// `[metadata_endpoint]` plus `endpoint_extra`, and `rest` after it.
async fn broker(identities: String, endpoint_extra: &str, rest: &str) -> (Broker, String) {
    let port = free_port();
    let text = format!(
        "{identities}\n[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\n{endpoint_extra}\n\n{rest}"
    );
    let broker = Broker::start(move |socket| support::config_text(socket, &text), "info").await;
    (broker, format!("http://127.0.0.1:{port}"))
}

/// What the emulator's metadata server itself answers for `path`.
async fn upstream_value(emulator: &Emulator, path: &str) -> String {
    support::metadata_text(&format!("{}{path}", emulator.base_url())).await
}

/// The lines of the log about `path` on the metadata endpoint, once at
/// least `count` are there: the log is written off the request path, so a
/// line can land a moment after its answer (waits up to 10 s).
async fn log_lines_for(broker: &Broker, path: &str, count: usize) -> Vec<String> {
    let lines = || -> Vec<String> {
        broker
            .log()
            .lines()
            .filter(|l| l.contains("metadata endpoint") && l.contains(path))
            .map(str::to_owned)
            .collect()
    };
    for _ in 0..200 {
        let found = lines();
        if found.len() >= count {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    lines()
}

#[tokio::test(flavor = "multi_thread")]
async fn access_tokens_are_served_under_the_policy_from_the_shared_cache() {
    let emulator = support::emulator().await;
    let (broker, base) = broker(
        support::metadata_identity("default", &emulator),
        "",
        &granting_rule(),
    )
    .await;

    // No scopes: the identity's default, cloud-platform, as Google's server.
    let (status, headers, body) = get(&base, &format!("{SA}/default/token")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(content_type(&headers), "application/json");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let fields: Vec<&String> = answer.as_object().unwrap().keys().collect();
    assert_eq!(fields, ["access_token", "expires_in", "token_type"]);
    assert_eq!(answer["token_type"], "Bearer");
    let token = answer["access_token"].as_str().unwrap().to_owned();
    let info = broker.served_access_token_info(&emulator, &token).await;
    assert_eq!(info["scope"], CLOUD);
    assert_eq!(info["email"], DEFAULT_ACCOUNT_EMAIL);

    // expires_in counts down to the cached token's own expiry: gRPC gets
    // the very same token, and its expire_time agrees within a second or two.
    let grpc = broker.get_access("default", &[]).await.unwrap();
    assert_eq!(grpc.token, token, "one cache for both doors");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let left = grpc.expire_time.unwrap().seconds - now;
    let expires_in = answer["expires_in"].as_i64().unwrap();
    assert!(
        (left - expires_in).abs() <= 2 && expires_in > 3000 && expires_in <= 3600,
        "expires_in {expires_in} vs {left}s left on the token"
    );

    // ?scopes= is comma-separated; the account's email names it too.
    let (status, _, body) = get(
        &base,
        &format!("{SA}/{DEFAULT_ACCOUNT_EMAIL}/token?scopes={STORAGE_RO},{CLOUD}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let scoped: serde_json::Value = serde_json::from_str(&body).unwrap();
    let scoped_token = scoped["access_token"].as_str().unwrap().to_owned();
    let info = broker
        .served_access_token_info(&emulator, &scoped_token)
        .await;
    assert_eq!(info["scope"], format!("{CLOUD} {STORAGE_RO}"));
    assert_eq!(emulator.stats().metadata_token, 2, "one call per scope set");

    // Asked again: from memory.
    let (_, _, again) = get(&base, &format!("{SA}/default/token")).await;
    assert!(again.contains(&token));
    assert_eq!(emulator.stats().metadata_token, 2);

    // A scope no rule grants: 403, nothing fetched.
    for scopes in [GMAIL.to_owned(), format!("{CLOUD},{GMAIL}")] {
        let (status, _, body) = get(&base, &format!("{SA}/default/token?scopes={scopes}")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{scopes}: {body}");
        assert!(
            body.contains("no [[policy]] rule grants them all"),
            "{body}"
        );
    }
    let (status, _, body) = get(&base, &format!("{SA}/default/token?scopes=a%20b")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("holds whitespace"), "{body}");
    let many: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
    let (status, _, body) = get(
        &base,
        &format!("{SA}/default/token?scopes={}", many.join(",")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("invalid scopes"), "{body}");
    assert_eq!(emulator.stats().metadata_token, 2);

    // Audited like identity requests: scopes, decision, never the token.
    let lines = log_lines_for(&broker, "/token", 7).await;
    assert_eq!(
        lines.len(),
        7,
        "one line per request:\n{}",
        lines.join("\n")
    );
    let denied: Vec<_> = lines.iter().filter(|l| l.contains(GMAIL)).collect();
    assert_eq!(denied.len(), 2);
    assert!(denied
        .iter()
        .all(|l| l.contains("denied") && l.contains("403")));
    assert!(lines
        .iter()
        .any(|l| l.contains(&format!("scopes=\"{STORAGE_RO} {CLOUD}\""))
            && l.contains("decision=\"allowed\"")));
}

#[tokio::test(flavor = "multi_thread")]
async fn access_tokens_are_off_without_a_rule_granting_scopes() {
    let emulator = support::emulator().await;
    let (broker, base) = broker(support::metadata_identity("default", &emulator), "", "").await;
    // ID tokens are open with no [[policy]]; access tokens are not.
    let (status, _, token) = get(&base, &format!("{SA}/default/identity?audience=x")).await;
    assert_eq!(status, StatusCode::OK);
    broker.served.lock().unwrap().push(token);
    let (status, _, body) = get(&base, &format!("{SA}/default/token")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("access tokens are off until"), "{body}");
    assert_eq!(emulator.stats().metadata_token, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn values_pass_through_from_the_metadata_server_once() {
    let emulator = support::emulator().await;
    let (_broker, base) = broker(support::metadata_identity("default", &emulator), "", "").await;
    let mut served = Vec::new();
    for path in VALUE_PATHS {
        let (status, headers, body) = get(&base, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(content_type(&headers), "application/text", "{path}");
        // Asked again: not fetched again.
        assert_eq!(get(&base, path).await.2, body);
        served.push(body);
    }
    let stats = emulator.stats();
    for path in VALUE_PATHS {
        assert_eq!(stats.instance_values[path], 1, "{path}: {stats:?}");
    }
    for (path, body) in VALUE_PATHS.iter().zip(&served) {
        assert_eq!(*body, upstream_value(&emulator, path).await, "{path}");
    }
    let project = &served[0];
    let number: u64 = served[1].parse().unwrap();
    assert_eq!(
        served[2],
        format!("projects/{number}/zones/us-central1-a"),
        "Google's zone form"
    );
    assert_eq!(served[4], "googleapis.com");

    // alt=json: strings quoted, numbers bare.
    let (_, headers, body) = get(&base, &format!("{}?alt=json", VALUE_PATHS[0])).await;
    assert_eq!(content_type(&headers), "application/json");
    assert_eq!(body, format!("\"{project}\""));
    let (_, _, body) = get(&base, &format!("{}?alt=json", VALUE_PATHS[1])).await;
    assert_eq!(body, number.to_string());

    // Directories: listed, or everything with recursive=true.
    let (status, headers, body) = get(&base, "/computeMetadata/v1/project/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type(&headers), "application/text");
    assert_eq!(body, "numeric-project-id\nproject-id\n");
    let (_, headers, body) = get(&base, "/computeMetadata/v1/project/?recursive=true").await;
    assert_eq!(content_type(&headers), "application/json");
    let tree: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        tree,
        json!({"numericProjectId": number, "projectId": project})
    );
    let (_, headers, body) = get(
        &base,
        "/computeMetadata/v1/project/?recursive=true&alt=text",
    )
    .await;
    assert_eq!(content_type(&headers), "application/text");
    assert_eq!(
        body,
        format!("numeric-project-id {number}\nproject-id {project}\n")
    );
    let (_, _, body) = get(&base, "/computeMetadata/v1/?recursive=true").await;
    let all: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all["project"]["projectId"], project.as_str());
    assert_eq!(all["universe"]["universeDomain"], "googleapis.com");
    assert_eq!(all["instance"]["zone"], served[2].as_str());
    assert_eq!(
        all["instance"]["serviceAccounts"]["default"],
        json!({"aliases": ["default"], "email": DEFAULT_ACCOUNT_EMAIL, "scopes": [CLOUD]})
    );
    let (_, _, body) = get(&base, "/computeMetadata/v1/instance/").await;
    assert_eq!(body, "id\nservice-accounts/\nzone\n");

    // Still one upstream call per value.
    let stats = emulator.stats();
    for path in VALUE_PATHS {
        assert_eq!(stats.instance_values[path], 2, "{path}: 1 + the test's own");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn account_paths_render_as_google_renders_them() {
    let emulator = support::emulator().await;
    let (_broker, base) = broker(support::metadata_identity("default", &emulator), "", "").await;
    let cases = [
        (
            format!("{SA}/default/scopes"),
            "application/text",
            format!("{CLOUD}\n"),
        ),
        (
            format!("{SA}/default/aliases"),
            "application/text",
            "default\n".to_owned(),
        ),
        (
            format!("{SA}/default/scopes?alt=json"),
            "application/json",
            format!("[\"{CLOUD}\"]"),
        ),
        (
            format!("{SA}/default/email?alt=json"),
            "application/json",
            format!("\"{DEFAULT_ACCOUNT_EMAIL}\""),
        ),
        (
            format!("{SA}/default/"),
            "application/text",
            "aliases\nemail\nidentity\nscopes\ntoken\n".to_owned(),
        ),
        (
            format!("{SA}/default/?recursive=true&alt=text"),
            "application/text",
            format!("aliases/0 default\nemail {DEFAULT_ACCOUNT_EMAIL}\nscopes/0 {CLOUD}\n"),
        ),
        (
            format!("{SA}/"),
            "application/text",
            format!("default/\n{DEFAULT_ACCOUNT_EMAIL}/\n"),
        ),
    ];
    for (path, expected_type, expected_body) in cases {
        let (status, headers, body) = get(&base, &path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(content_type(&headers), expected_type, "{path}");
        assert_eq!(body, expected_body, "{path}");
    }
    let (_, headers, body) = get(&base, &format!("{SA}/?recursive=true")).await;
    assert_eq!(content_type(&headers), "application/json");
    let accounts: serde_json::Value = serde_json::from_str(&body).unwrap();
    let account =
        json!({"aliases": ["default"], "email": DEFAULT_ACCOUNT_EMAIL, "scopes": [CLOUD]});
    assert_eq!(accounts["default"], account);
    assert_eq!(accounts[DEFAULT_ACCOUNT_EMAIL], account);

    // wait_for_change: 400 at once, saying why; a bad alt: 400.
    for path in [
        format!("{SA}/default/email?wait_for_change=true"),
        "/computeMetadata/v1/project/project-id?wait_for_change=true&timeout_sec=60".to_owned(),
    ] {
        let (status, headers, body) = get(&base, &path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(content_type(&headers).starts_with("text/plain"));
        assert!(
            body.contains("wait_for_change is not supported by token-broker"),
            "{body}"
        );
    }
    let (status, _, body) = get(&base, &format!("{SA}/default/email?alt=xml")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("use alt=json or alt=text"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn key_file_and_config_supply_values_and_unknown_ones_are_404() {
    let emulator = support::emulator().await;
    let dir = support::workdir();
    let email = "deployer@keyed-project.iam.gserviceaccount.com";
    let (key, _) = support::key_file(dir.path(), "deployer", email, &emulator, true);
    // The key names the project; config names the number and zone.
    let (broker, base) = broker(
        support::key_identity("deployer", &key),
        "identity = \"deployer\"\nnumeric_project_id = 4242\nzone = \"europe-west1-b\"",
        "",
    )
    .await;
    for (path, expected) in [
        (VALUE_PATHS[0], "keyed-project"),
        (VALUE_PATHS[1], "4242"),
        (VALUE_PATHS[2], "projects/4242/zones/europe-west1-b"),
        (VALUE_PATHS[4], "googleapis.com"),
    ] {
        let (status, _, body) = get(&base, path).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, expected),
            "{path}"
        );
    }
    // instance/id: nothing knows it. Google's 404 page; the log says why.
    let (status, headers, body) = get(&base, VALUE_PATHS[3]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type(&headers), "text/html; charset=UTF-8");
    assert!(
        body.contains("<title>Error 404 (Not Found)!!1</title>"),
        "{body}"
    );
    assert!(
        body.contains("<code>/computeMetadata/v1/instance/id</code>"),
        "{body}"
    );
    let why = log_lines_for(&broker, "/computeMetadata/v1/instance/id", 1).await;
    assert!(
        why.iter()
            .any(|l| l.contains("404") && l.contains("metadata_endpoint.instance_id is not set")),
        "{why:?}"
    );
    // Recursive listings leave the unknown value out.
    let (_, _, body) = get(&base, "/computeMetadata/v1/instance/?recursive=true").await;
    let instance: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(instance["zone"], "projects/4242/zones/europe-west1-b");
    assert!(instance.get("id").is_none(), "{instance}");
    // Nothing went to the metadata server.
    assert!(emulator.stats().metadata_paths.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn config_values_win_over_the_metadata_server() {
    let emulator = support::emulator().await;
    let (_broker, base) = broker(
        support::metadata_identity("default", &emulator),
        "project_id = \"configured-project\"\ninstance_id = 77\nuniverse_domain = \"example-universe.com\"",
        "",
    )
    .await;
    for (path, expected) in [
        (VALUE_PATHS[0], "configured-project"),
        (VALUE_PATHS[3], "77"),
        (VALUE_PATHS[4], "example-universe.com"),
    ] {
        let (status, _, body) = get(&base, path).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, expected),
            "{path}"
        );
    }
    assert!(
        emulator.stats().instance_values.is_empty(),
        "configured values are not fetched"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_cannot_make_the_broker_fetch_other_metadata_paths() {
    let emulator = support::emulator().await;
    let (_broker, base) = broker(support::metadata_identity("default", &emulator), "", "").await;
    // Paths an attacker would like fetched with the broker's standing: other
    // metadata (attributes hold startup scripts and keys), traversal in
    // every spelling, a value path with extra segments or queries.
    let attempts = [
        "/computeMetadata/v1/project/attributes/ssh-keys",
        "/computeMetadata/v1/instance/attributes/",
        "/computeMetadata/v1/instance/attributes/kube-env",
        "/computeMetadata/v1/project/project-id/../attributes/ssh-keys",
        "/computeMetadata/v1/project/project-id/%2e%2e/attributes/ssh-keys",
        "/computeMetadata/v1/project/project-id%2f..%2fattributes%2fssh-keys",
        "/computeMetadata/v1/instance/zone/extra",
        "/computeMetadata/v1/project/project-id?recursive=true&path=/computeMetadata/v1/project/attributes/",
        "/computeMetadata/v1beta1/project/project-id",
        "//computeMetadata/v1/project/attributes/ssh-keys",
    ];
    for path in attempts {
        let (status, _, body) = get(&base, path).await;
        assert!(
            status == StatusCode::NOT_FOUND
                || (status == StatusCode::OK && path.contains("project-id?")),
            "{path}: {status} {body}"
        );
    }
    let seen = emulator.stats().metadata_paths;
    let unexpected: Vec<&String> = seen
        .keys()
        .filter(|path| !VALUE_PATHS.contains(&path.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the broker fetched paths outside the fixed set: {unexpected:?} (all: {seen:?})"
    );
    assert_eq!(seen.get(VALUE_PATHS[0]), Some(&1), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_metadata_server_is_503_for_values_and_not_hammered() {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A metadata server that answers every request 503 and counts them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nMetadata-Flavor: Google\r\n\
                      Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n",
                )
                .await;
        }
    });
    let identity = format!(
        "[[identities]]\nname = \"default\"\nsource = \"metadata\"\nmetadata_host = \"{upstream}\"\n"
    );
    let (broker, base) = broker(identity, "", "").await;
    for _ in 0..3 {
        let (status, _, body) = get(&base, VALUE_PATHS[0]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains(
                "cannot read /computeMetadata/v1/project/project-id from the metadata server"
            ),
            "{body}"
        );
    }
    // The failure is held a few seconds: three answers, one upstream call.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(log_lines_for(&broker, VALUE_PATHS[0], 3).await.len(), 3);
    server.abort();
}

#[test]
fn check_config_names_every_bad_instance_value() {
    let dir = support::workdir();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[metadata_endpoint]\nlisten = \"127.0.0.1:8181\"\nproject_id = \"My Project\"\nzone = \"us-central1-a\"\ninstance_id = 0\nuniverse_domain = \"nodots\"\n",
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    for expected in [
        "metadata_endpoint.project_id: \"My Project\" is not a Google Cloud project id",
        "metadata_endpoint.zone: needs metadata_endpoint.numeric_project_id",
        "metadata_endpoint.instance_id: must be a positive number",
        "metadata_endpoint.universe_domain: \"nodots\" is not a domain name",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}

/// An identity built on the metadata server (impersonation) runs where its
/// base does: its project and instance values are the metadata server's.
#[tokio::test(flavor = "multi_thread")]
async fn an_identity_impersonated_from_the_metadata_server_passes_its_values_through() {
    let emulator = support::emulator().await;
    let identities = format!(
        "{}[[identities]]\nname = \"deployer\"\nsource = \"impersonate\"\nbase = \"default\"\nservice_account = \"deploy@target-project.iam.gserviceaccount.com\"\niam_endpoint = \"{}\"\n",
        support::metadata_identity("default", &emulator),
        emulator.base_url()
    );
    let (_broker, base) = broker(identities, "identity = \"deployer\"", "").await;
    let (status, _, body) = get(&base, VALUE_PATHS[0]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, upstream_value(&emulator, VALUE_PATHS[0]).await);
    let (status, _, body) = get(&base, VALUE_PATHS[3]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, upstream_value(&emulator, VALUE_PATHS[3]).await);
}
