//! Issue 7: operating the daemon — metrics and HTTP probes scraped during a
//! real run, SIGHUP reload (in place, and refused when broken), graceful
//! stop of watch streams, and systemd readiness.

use std::{os::unix::net::UnixDatagram, time::Duration};

use token_broker::{emulator::Faults, proto::GetIdTokenRequest};
use tonic::Code;

use crate::support::{self, free_port, sample, scrape, Broker};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_change_as_requests_are_made() {
    let emulator = support::emulator().await;
    let port = free_port();
    let identity = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        move |socket| {
            format!(
                "{}\n[telemetry]\nlisten = \"127.0.0.1:{port}\"\n",
                support::config_text(socket, &identity)
            )
        },
        "info",
    )
    .await;
    let (status, before) = scrape(port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        before.contains("token_broker_connected_clients"),
        "{before}"
    );
    let miss = r#"token_broker_requests_total{method="GetIdToken",identity="default",result="OK",cache="miss"}"#;
    let hit = r#"token_broker_requests_total{method="GetIdToken",identity="default",result="OK",cache="hit"}"#;
    assert_eq!(sample(&before, miss), 0.0);

    broker
        .get("default", "https://m.example.com")
        .await
        .unwrap();
    broker
        .get("default", "https://m.example.com")
        .await
        .unwrap();
    broker
        .get("default", "https://m.example.com")
        .await
        .unwrap();
    let _ = broker
        .get("ghost", "https://m.example.com")
        .await
        .unwrap_err();
    let (_, after) = scrape(port, "/metrics").await;
    assert_eq!(sample(&after, miss), 1.0, "{after}");
    assert_eq!(sample(&after, hit), 2.0, "{after}");
    // Unknown identities are counted without growing the label set.
    assert_eq!(
        sample(
            &after,
            r#"token_broker_requests_total{method="GetIdToken",identity="unknown",result="NOT_FOUND""#
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"token_broker_upstream_requests_total{identity="default",source="metadata",outcome="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            r#"token_broker_upstream_request_duration_seconds_count{identity="default",source="metadata"}"#
        ),
        1.0
    );
    assert_eq!(sample(&after, "token_broker_cache_entries"), 1.0);
    let ttl = sample(&after, "token_broker_token_min_time_to_expiry_seconds");
    assert!((3500.0..=3600.0).contains(&ttl), "{ttl}");
    assert!(!after.contains("eyJ"), "no token text in metrics");

    let (status, body) = scrape(port, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _) = scrape(port, "/readyz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_flips_when_prefetch_completes() {
    let emulator = support::emulator().await;
    emulator.set_faults(Faults {
        delay_ms: Some(1500),
        ..Faults::default()
    });
    let port = free_port();
    let identity = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        move |socket| {
            format!(
                "{}\n[telemetry]\nlisten = \"127.0.0.1:{port}\"\n\n[[prefetch]]\naudiences = [\"https://boot.example.com\"]\n",
                support::config_text(socket, &identity)
            )
        },
        "info",
    )
    .await;
    let (status, body) = scrape(port, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("prefetch"), "{body}");
    let mut ready = false;
    for _ in 0..100 {
        if scrape(port, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/readyz never turned ready");
    assert_eq!(
        emulator.stats().identity.by_audience["https://boot.example.com"],
        1
    );
    drop(broker);
}

fn policy_for(uid: u32, audience: &str) -> String {
    format!("[[policy]]\nuids = [{uid}]\nidentities = [\"*\"]\naudiences = [\"{audience}\"]\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_new_policy_and_log_filter_without_dropping_tokens() {
    let emulator = support::emulator().await;
    let identity = support::metadata_identity("default", &emulator);
    let base = {
        let identity = identity.clone();
        move |socket: &std::path::Path| support::config_text(socket, &identity)
    };
    let first = {
        let base = base.clone();
        move |socket: &std::path::Path| {
            format!(
                "{}\n{}\n[log]\nfilter = \"info\"\n",
                base(socket),
                policy_for(0, "https://a.example.com")
            )
        }
    };
    let broker = Broker::start(first, "").await;
    broker
        .get("default", "https://a.example.com")
        .await
        .unwrap();
    let err = broker
        .get("default", "https://b.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let calls = emulator.stats().identity.total;
    assert!(!broker.log().contains("DEBUG"));

    // Grant b instead of a, and turn on debug logging.
    let config = broker.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n{}\n[log]\nfilter = \"debug\"\n",
            base(&broker.socket),
            policy_for(0, "https://*.example.com")
        ),
    )
    .unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    broker.wait_for_log_text("configuration reloaded", 1).await;

    let a = broker
        .get("default", "https://a.example.com")
        .await
        .unwrap();
    support::verify(&emulator, &a.token, "https://a.example.com").await;
    assert_eq!(
        emulator.stats().identity.total,
        calls,
        "the unchanged identity's token stayed cached"
    );
    broker
        .get("default", "https://b.example.com")
        .await
        .unwrap();
    broker.wait_for_log_text("DEBUG", 1).await;

    // A broken config is refused; the old one keeps serving.
    std::fs::write(&config, "[refresh]\njitter = \"forever\"\n").unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    broker.wait_for_log_text("reload rejected", 1).await;
    assert!(
        broker.log().contains("refresh.jitter") || broker.log().contains("jitter"),
        "the error names the key"
    );
    broker
        .get("default", "https://b.example.com")
        .await
        .unwrap();
    assert_eq!(emulator.stats().identity.total, calls + 1);
}

/// `: > config.toml; kill -HUP` used to load an empty config: every cached
/// token dropped and the policy opened to everyone. Now the reload is
/// rejected and the running config, policy included, stays in force.
#[tokio::test(flavor = "multi_thread")]
async fn an_emptied_config_is_rejected_on_reload_and_the_policy_stays_closed() {
    let emulator = support::emulator().await;
    let identity = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        move |socket: &std::path::Path| {
            format!(
                "{}\n{}",
                support::config_text(socket, &identity),
                policy_for(0, "https://a.example.com")
            )
        },
        "",
    )
    .await;
    broker
        .get("default", "https://a.example.com")
        .await
        .unwrap();
    let calls = emulator.stats().identity.total;
    let config = broker.dir.path().join("config.toml");
    for (round, text) in ["", "# truncated mid-write\n"].into_iter().enumerate() {
        std::fs::write(&config, text).unwrap();
        support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
        broker.wait_for_log_text("reload rejected", round + 1).await;
        assert!(broker.log().contains("has no settings"), "{}", broker.log());
        let err = broker
            .get("default", "https://b.example.com")
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "the policy stayed closed"
        );
        broker
            .get("default", "https://a.example.com")
            .await
            .unwrap();
        assert_eq!(emulator.stats().identity.total, calls, "the cache was kept");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_drops_removed_and_changed_identities_only() {
    let emulator = support::emulator().await;
    let dir = support::workdir();
    let (key_a, _) = support::key_file(
        dir.path(),
        "a",
        "a@p.iam.gserviceaccount.com",
        &emulator,
        true,
    );
    let (key_b, _) = support::key_file(
        dir.path(),
        "b",
        "b@p.iam.gserviceaccount.com",
        &emulator,
        true,
    );
    let metadata = support::metadata_identity("default", &emulator);
    let config_with = |keyed: &std::path::Path, socket: &std::path::Path| {
        support::config_text(
            socket,
            &format!("{metadata}\n{}", support::key_identity("deployer", keyed)),
        )
    };
    let broker = Broker::start(|socket| config_with(&key_a, socket), "info").await;
    broker
        .get("default", "https://x.example.com")
        .await
        .unwrap();
    broker
        .get("deployer", "https://x.example.com")
        .await
        .unwrap();
    let (identity_calls, token_calls) = (
        emulator.stats().identity.total,
        emulator.stats().token.total,
    );

    // "deployer" now uses another key: its tokens go; "default" keeps its own.
    std::fs::write(
        broker.dir.path().join("config.toml"),
        config_with(&key_b, &broker.socket),
    )
    .unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    broker.wait_for_log_text("configuration reloaded", 1).await;
    broker
        .get("default", "https://x.example.com")
        .await
        .unwrap();
    let token = broker
        .get("deployer", "https://x.example.com")
        .await
        .unwrap();
    let claims = support::verify(&emulator, &token.token, "https://x.example.com").await;
    assert_eq!(claims["email"], "b@p.iam.gserviceaccount.com");
    assert_eq!(emulator.stats().identity.total, identity_calls);
    assert_eq!(emulator.stats().token.total, token_calls + 1);

    // Removing "deployer" makes it unknown.
    std::fs::write(
        broker.dir.path().join("config.toml"),
        support::config_text(&broker.socket, &metadata),
    )
    .unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    broker.wait_for_log_text("configuration reloaded", 2).await;
    assert_eq!(
        broker
            .get("deployer", "https://x.example.com")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_watch_streams_with_unavailable_and_notifies_systemd() {
    let emulator = support::emulator().await;
    let dir = support::workdir();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket = dir.path().join("broker.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        support::config_text(&socket, &support::metadata_identity("default", &emulator)),
    )
    .unwrap();
    let log_path = dir.path().join("broker.log");
    let child = support::base_command(&["serve", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 arrives");
    assert_eq!(&buf[..n], b"READY=1");

    let mut client = token_broker::client::connect(&socket).await.unwrap();
    let mut stream = client
        .watch_id_token(GetIdTokenRequest {
            audience: "https://watch.example.com".into(),
            identity: String::new(),
            min_valid_for: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    support::verify(&emulator, &first.token, "https://watch.example.com").await;
    support::signal(&child, nix::sys::signal::Signal::SIGTERM);
    let n = notify.recv(&mut buf).expect("STOPPING=1 arrives");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends promptly");
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"));
    let mut broker = Broker {
        child,
        socket: socket.clone(),
        log_path,
        dir,
        served: std::sync::Mutex::new(vec![first.token.clone()]),
    };
    let exit = tokio::task::spawn_blocking(move || (broker.wait_exit(), broker))
        .await
        .unwrap();
    assert!(exit.0.success());
    assert!(!socket.exists());
}
