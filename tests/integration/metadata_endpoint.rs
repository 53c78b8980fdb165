//! Issue 6: the metadata-compatible HTTP endpoint of a real broker process,
//! asked with plain HTTP as Google's client libraries ask the metadata
//! server, backed by the emulator.

use std::net::SocketAddr;

use reqwest::{header::HeaderMap, StatusCode};
use token_broker::emulator::{Emulator, Faults, DEFAULT_ACCOUNT_EMAIL};

use crate::support::{self, Broker};

const SA: &str = "/computeMetadata/v1/instance/service-accounts";

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker whose `default` identity is the emulator's metadata server,
/// with the metadata endpoint on a free loopback port; `extra` is added to
/// the `[metadata_endpoint]` table. Returns the broker and the endpoint's
/// base URL.
pub async fn broker_with_endpoint(emulator: &Emulator, extra: &str) -> (Broker, String) {
    let port = free_port();
    let identity = support::metadata_identity("default", emulator);
    let table = format!("[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n");
    let broker = Broker::start(
        move |socket| support::config_text(socket, &format!("{identity}\n{table}")),
        "info",
    )
    .await;
    (broker, format!("http://127.0.0.1:{port}"))
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// GET `path` with `Metadata-Flavor: Google`: (status, headers, body).
pub(crate) async fn get(base: &str, path: &str) -> (StatusCode, HeaderMap, String) {
    send(
        http()
            .get(format!("{base}{path}"))
            .header("Metadata-Flavor", "Google"),
    )
    .await
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, String) {
    let response = request.send().await.expect("endpoint answers");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap();
    assert_eq!(
        headers.get("metadata-flavor").map(|v| v.as_bytes()),
        Some(&b"Google"[..]),
        "every answer carries Metadata-Flavor: Google ({status}: {body})"
    );
    (status, headers, body)
}

pub(crate) fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get("content-type")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

fn identity_path(audience: &str, format: &str) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("audience", audience)
        .append_pair("format", format)
        .finish();
    format!("{SA}/default/identity?{query}")
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_the_routes_unmodified_clients_use() {
    let emulator = support::emulator().await;
    let (broker, base) = broker_with_endpoint(&emulator, "").await;

    // The ping: no Metadata-Flavor needed to ask (Go's probe sends none).
    let (status, _, body) = send(http().get(format!("{base}/"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "computeMetadata/\n");

    // Account info before any token: the email is learned with one probe.
    let (status, headers, body) = get(&base, &format!("{SA}/default/?recursive=true")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(content_type(&headers), "application/json");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["email"], DEFAULT_ACCOUNT_EMAIL);
    assert_eq!(info["aliases"], serde_json::json!(["default"]));
    assert!(info["scopes"].is_array());

    let (status, headers, body) = get(&base, &format!("{SA}/default/email")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type(&headers), "application/text");
    assert_eq!(body, DEFAULT_ACCOUNT_EMAIL);

    for format in ["full", "standard"] {
        let audience = "https://svc-http.example.com";
        let (status, headers, body) = get(&base, &identity_path(audience, format)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(content_type(&headers), "application/text");
        let claims = support::verify(&emulator, &body, audience).await;
        assert_eq!(claims["email"], DEFAULT_ACCOUNT_EMAIL);
    }
    // No format at all is `standard`, as on Google's server.
    let (status, _, _) = get(&base, &format!("{SA}/default/identity?audience=x")).await;
    assert_eq!(status, StatusCode::OK);

    // The account may be named by its email, `@` encoded or not.
    for account in [
        DEFAULT_ACCOUNT_EMAIL.to_owned(),
        DEFAULT_ACCOUNT_EMAIL.replace('@', "%40"),
    ] {
        let (status, _, body) = get(&base, &format!("{SA}/{account}/email")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, DEFAULT_ACCOUNT_EMAIL)
        );
        let (status, _, body) = get(
            &base,
            &format!("{SA}/{account}/identity?audience=https://by-email.example.com"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, _, body) = get(&base, &format!("{SA}/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("default/\n{DEFAULT_ACCOUNT_EMAIL}/\n"));

    // One probe for the email, ever; two audiences asked through the cache.
    let stats = emulator.stats();
    assert_eq!(
        stats.identity.by_audience["token-broker-account-probe"], 1,
        "{stats:?}"
    );
    assert_eq!(
        stats.identity.by_audience["https://svc-http.example.com"],
        1
    );

    let log = broker.log();
    assert!(
        log.lines()
            .filter(|l| l.contains("metadata endpoint"))
            .count()
            >= 10,
        "one log line per request:\n{log}"
    );
    let (_, _, token) = get(
        &base,
        &identity_path("https://svc-http.example.com", "full"),
    )
    .await;
    support::assert_no_secrets(&broker.log(), &[&token]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_endpoint_and_grpc_share_one_cached_token() {
    let emulator = support::emulator().await;
    let (broker, base) = broker_with_endpoint(&emulator, "").await;
    let audience = "https://shared.example.com";

    let (status, _, from_http) = get(&base, &identity_path(audience, "full")).await;
    assert_eq!(status, StatusCode::OK);
    let from_grpc = broker.get("default", audience).await.unwrap();
    assert_eq!(from_grpc.token, from_http);
    let (_, _, again) = get(&base, &identity_path(audience, "standard")).await;
    assert_eq!(again, from_http);

    // The email comes from the served token's claim: no probe needed.
    let (status, _, email) = get(&base, &format!("{SA}/default/email")).await;
    assert_eq!(
        (status, email.as_str()),
        (StatusCode::OK, DEFAULT_ACCOUNT_EMAIL)
    );
    let stats = emulator.stats();
    assert_eq!(
        stats.identity.total, 1,
        "one upstream call in all: {stats:?}"
    );
    assert_eq!(stats.identity.by_audience[audience], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_what_the_metadata_server_refuses() {
    let emulator = support::emulator().await;
    let (broker, base) = broker_with_endpoint(&emulator, "").await;
    let client = http();
    let good = identity_path("https://a.example.com", "full");

    // 403: the header is missing or wrong.
    for flavor in [None, Some("google"), Some("Google, Google")] {
        let mut request = client.get(format!("{base}{good}"));
        if let Some(value) = flavor {
            request = request.header("Metadata-Flavor", value);
        }
        let (status, headers, body) = send(request).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{flavor:?}");
        assert!(body.contains("Metadata-Flavor: Google"), "{body}");
        assert!(content_type(&headers).starts_with("text/plain"));
    }
    // 403: proxied, on any path.
    for path in [good.as_str(), "/"] {
        let (status, _, body) = send(
            client
                .get(format!("{base}{path}"))
                .header("Metadata-Flavor", "Google")
                .header("X-Forwarded-For", "203.0.113.7"),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("X-Forwarded-For"), "{body}");
    }

    // 400: no audience, an empty one, a bad one, a bad format.
    for (path, expected) in [
        (format!("{SA}/default/identity"), "non-empty audience"),
        (
            format!("{SA}/default/identity?audience="),
            "non-empty audience",
        ),
        (
            format!("{SA}/default/identity?audience=a%20b"),
            "invalid audience: audience contains whitespace",
        ),
        (
            format!("{SA}/default/identity?audience={}", "a".repeat(2049)),
            "invalid audience: audience is 2049 bytes",
        ),
        (
            format!("{SA}/default/identity?audience=x&format=jwt"),
            "format must be",
        ),
    ] {
        let (status, _, body) = get(&base, &path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body.contains(expected), "{path}: {body}");
    }

    // 404: other accounts, paths not served.
    let (status, _, body) = get(
        &base,
        &format!("{SA}/other@x.iam.gserviceaccount.com/email"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("is not available on this endpoint"), "{body}");
    // Paths not served get Google's 404 page; the log says why.
    for path in [
        "/computeMetadata/v1/project/attributes/ssh-keys".to_owned(),
        format!("{SA}/default/identity/extra"),
        "/latest/meta-data/".to_owned(),
    ] {
        let (status, headers, body) = get(&base, &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(content_type(&headers), "text/html; charset=UTF-8");
        assert!(
            body.contains(&format!(
                "The requested URL <code>{path}</code> was not found on this server."
            )),
            "{body}"
        );
    }
    // The log says why (written off the request path: allow it a moment).
    let mut logged = false;
    for _ in 0..200 {
        logged = broker
            .log()
            .contains("is not served by token-broker's metadata endpoint");
        if logged {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(logged, "the log says why");

    // 405: only GET.
    let (status, _, _) = send(
        client
            .post(format!("{base}{good}"))
            .header("Metadata-Flavor", "Google"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // No token went upstream; only the probe that learned the email to
    // compare the other account with.
    let stats = emulator.stats();
    assert_eq!(stats.identity.total, 1, "{stats:?}");
    assert_eq!(stats.identity.by_audience["token-broker-account-probe"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allow_list_limits_the_audiences_served() {
    let emulator = support::emulator().await;
    let (_broker, base) =
        broker_with_endpoint(&emulator, "audiences = [\"https://allowed.example.com\"]").await;
    let (status, _, body) = get(&base, &identity_path("https://allowed.example.com", "full")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = get(&base, &identity_path("https://other.example.com", "full")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.contains("\"https://other.example.com\" is not on this endpoint's allow-list")
            && body.contains("metadata_endpoint.audiences"),
        "{body}"
    );
    let stats = emulator.stats();
    assert_eq!(stats.identity.total, 1);
    assert!(!stats
        .identity
        .by_audience
        .contains_key("https://other.example.com"));
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failures_become_statuses_clients_act_on() {
    let emulator = support::emulator().await;
    let (_broker, base) = broker_with_endpoint(&emulator, "").await;

    // Rejected: 502 with Google's text, not retried by google-auth.
    emulator.set_faults(Faults {
        status: Some(403),
        endpoint: Some("identity".into()),
        ..Faults::default()
    });
    let (status, _, body) = get(
        &base,
        &identity_path("https://rejected.example.com", "full"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("rejected the request (HTTP 403)"), "{body}");

    // Unavailable: 503, which clients retry.
    emulator.set_faults(Faults {
        status: Some(503),
        endpoint: Some("identity".into()),
        ..Faults::default()
    });
    let (status, _, body) = get(&base, &identity_path("https://down.example.com", "full")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("is unavailable; last error: HTTP 503"),
        "{body}"
    );
    // The email probe fails the same way while upstream is down.
    let (status, _, body) = get(&base, &format!("{SA}/default/email")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("cannot learn the identity's email"), "{body}");

    // And recovers once upstream does.
    emulator.clear_faults();
    let (status, _, body) = get(&base, &format!("{SA}/default/email")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, DEFAULT_ACCOUNT_EMAIL)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_identity_is_served_under_its_own_email() {
    let emulator = support::emulator().await;
    let dir = support::workdir();
    let email = "deployer@proj.iam.gserviceaccount.com";
    let (key, _) = support::key_file(dir.path(), "deployer", email, &emulator, true);
    let port = free_port();
    let identity = support::key_identity("deployer", &key);
    let _broker = Broker::start(
        move |socket| {
            support::config_text(
                socket,
                &format!(
                    "{identity}\n[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\nidentity = \"deployer\"\n"
                ),
            )
        },
        "info",
    )
    .await;
    let base = format!("http://127.0.0.1:{port}");
    let (status, _, body) = get(&base, &format!("{SA}/default/email")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, email));
    let (status, _, token) = get(&base, &identity_path("https://k.example.com", "full")).await;
    assert_eq!(status, StatusCode::OK, "{token}");
    support::verify(&emulator, &token, "https://k.example.com").await;
    // The key names the account: nothing went upstream but the one token.
    assert_eq!(emulator.stats().token.total, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_port_fails_startup_and_a_stop_frees_it() {
    let emulator = support::emulator().await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = support::workdir();
    let socket = dir.path().join("broker.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        support::config_text(
            &socket,
            &format!(
                "{}\n[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\n",
                support::metadata_identity("default", &emulator)
            ),
        ),
    )
    .unwrap();
    let mut broker = Broker::spawn(
        dir,
        socket.clone(),
        &["serve", "--config", config.to_str().unwrap()],
        "info",
    );
    let status = broker.wait_exit();
    assert!(!status.success());
    let log = broker.log();
    assert!(
        log.contains(&format!(
            "metadata_endpoint.listen: cannot listen on 127.0.0.1:{port}"
        )),
        "{log}"
    );
    assert!(!socket.exists(), "the socket is removed when startup fails");

    // Freed, the same config serves; SIGTERM stops both listeners.
    drop(busy);
    let dir = support::workdir();
    let socket = dir.path().join("broker.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        support::config_text(
            &socket,
            &format!(
                "{}\n[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\n",
                support::metadata_identity("default", &emulator)
            ),
        ),
    )
    .unwrap();
    let mut broker = Broker::spawn(
        dir,
        socket,
        &["serve", "--config", config.to_str().unwrap()],
        "info",
    );
    broker.wait_ready().await;
    let base = format!("http://127.0.0.1:{port}");
    let (status, _, _) = get(&base, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(broker.terminate().success(), "{}", broker.log());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the endpoint stopped listening"
    );
}

#[test]
fn check_config_refuses_a_non_loopback_listen_unless_allowed() {
    let dir = support::workdir();
    let config = dir.path().join("config.toml");
    let identity =
        "[[identities]]\nname = \"default\"\nsource = \"metadata\"\nmetadata_host = \"127.0.0.1:9\"\n";
    std::fs::write(
        &config,
        format!("{identity}[metadata_endpoint]\nlisten = \"0.0.0.0:8181\"\n"),
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("metadata_endpoint.listen") && stderr.contains("not a loopback address"),
        "{stderr}"
    );

    std::fs::write(
        &config,
        format!(
            "{identity}[metadata_endpoint]\nlisten = \"0.0.0.0:8181\"\nallow_non_loopback = true\n"
        ),
    )
    .unwrap();
    let (code, stdout, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    std::fs::write(
        &config,
        format!(
            "{identity}[metadata_endpoint]\nlisten = \"127.0.0.1:8181\"\nidentity = \"nobody\"\n"
        ),
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("metadata_endpoint.identity"), "{stderr}");
}
