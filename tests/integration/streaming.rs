//! WatchIdToken streams and readiness after `[[prefetch]]`, against the real
//! daemon on a real socket.

use std::time::{Duration, Instant};

use token_broker::{
    emulator::{Emulator, Faults},
    proto::{GetIdTokenRequest, IdToken},
};
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::support::{self, Broker};

/// Longest any single wait for the daemon may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

fn request(identity: &str, audience: &str) -> GetIdTokenRequest {
    GetIdTokenRequest {
        audience: audience.into(),
        identity: identity.into(),
        min_valid_for: None,
    }
}

/// The next message of a watch stream, failing (not hanging) after [`WAIT`].
async fn next_token(
    stream: &mut tonic::Streaming<IdToken>,
    what: &str,
    broker: &Broker,
) -> IdToken {
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(Some(token))) => token,
        Ok(Ok(None)) => panic!("{what}: the stream ended; log:\n{}", broker.log()),
        Ok(Err(status)) => panic!("{what}: {status:?}; log:\n{}", broker.log()),
        Err(_) => panic!("{what}: nothing within {WAIT:?}; log:\n{}", broker.log()),
    }
}

async fn watch(
    broker: &Broker,
    identity: &str,
    audience: &str,
) -> Result<tonic::Streaming<IdToken>, tonic::Status> {
    let mut client = broker.client().await;
    tokio::time::timeout(WAIT, client.watch_id_token(request(identity, audience)))
        .await
        .expect("WatchIdToken answers")
        .map(tonic::Response::into_inner)
}

async fn health(broker: &Broker, service: &str) -> ServingStatus {
    let channel = token_broker::client::channel(&broker.socket).await.unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

fn health_cli(broker: &Broker) -> (i32, String) {
    let (code, stdout, _) =
        support::run_cli(&["health", "--socket", broker.socket.to_str().unwrap()]);
    (code, stdout.trim().to_owned())
}

fn seconds(token: &IdToken) -> (i64, i64) {
    (
        token.issue_time.as_ref().expect("issue_time").seconds,
        token.expire_time.as_ref().expect("expire_time").seconds,
    )
}

const PREFETCHED: [&str; 2] = ["https://pre-a.example.com", "https://pre-b.example.com"];

fn prefetch_table() -> String {
    format!(
        "[[prefetch]]\nidentity = \"default\"\naudiences = [\"{}\", \"{}\"]\n",
        PREFETCHED[0], PREFETCHED[1]
    )
}

/// The prefetched tokens are served from the cache: each verifies, and the
/// emulator sees no further call.
async fn prefetched_tokens_come_from_the_cache(broker: &Broker, emulator: &Emulator) {
    let before = emulator.stats();
    for audience in PREFETCHED {
        assert_eq!(
            before.identity.by_audience.get(audience),
            Some(&1),
            "exactly one upstream call per prefetched audience: {before:?}"
        );
    }
    assert_eq!(before.identity.total, 2, "{before:?}");
    assert_eq!(before.identity.succeeded, 2, "{before:?}");
    for audience in PREFETCHED {
        let token = broker.get("", audience).await.expect("prefetched token");
        assert_eq!(token.audience, audience);
        support::verify(emulator, &token.token, audience).await;
    }
    assert_eq!(emulator.stats(), before, "GetIdToken went upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_sends_the_current_token_at_once_then_each_refresh() {
    let emulator = support::emulator().await;
    // 40 s tokens under a 1 m refresh window: shorter-lived than the window,
    // so each is refreshed halfway through its usable life (40 s minus the
    // 30 s expiry margin), i.e. about 5 s after it was issued.
    emulator.set_faults(Faults {
        token_lifetime_secs: Some(40),
        ..Faults::default()
    });
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        move |socket| {
            support::config_text(socket, &host).replace(
                "[refresh]\n",
                "[refresh]\nrefresh_before_expiry = \"1m\"\njitter = \"1s\"\n",
            )
        },
        "info",
    )
    .await;
    let audience = "https://watched.example.com";

    let started = Instant::now();
    let mut stream = watch(&broker, "", audience).await.expect("watch opens");
    let first = next_token(&mut stream, "first message", &broker).await;
    let first_after = started.elapsed();
    assert_eq!(first.audience, audience);
    assert_eq!(first.identity, "default");
    support::verify(&emulator, &first.token, audience).await;
    let (issued, expires) = seconds(&first);
    assert_eq!(
        expires - issued,
        40,
        "the emulator's short lifetime applies"
    );
    assert_eq!(
        emulator.stats().identity.by_audience.get(audience),
        Some(&1)
    );

    let second = next_token(&mut stream, "second message", &broker).await;
    let second_after = started.elapsed();
    eprintln!("first message after {first_after:?}, second after {second_after:?}");
    assert_ne!(second.token, first.token, "the refresh sent a new token");
    assert!(
        seconds(&second).1 > seconds(&first).1,
        "the new token expires later: {:?} then {:?}",
        first.expire_time,
        second.expire_time
    );
    assert_eq!(second.audience, audience);
    assert_eq!(second.identity, "default");
    support::verify(&emulator, &second.token, audience).await;
    // One upstream call per message: the refresher neither spins nor skips.
    assert_eq!(
        emulator.stats().identity.by_audience.get(audience),
        Some(&2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_releases_its_stream() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    // One stream at a time, so a stream that is never released shows.
    let broker = Broker::start(
        move |socket| {
            format!(
                "{}\n[limits]\nmax_streams = 1\n",
                support::config_text(socket, &host)
            )
        },
        "info",
    )
    .await;

    // Refused requests are answered with their status, not a stream.
    let invalid = watch(&broker, "", "has whitespace")
        .await
        .expect_err("an audience with a space is refused");
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    let empty = watch(&broker, "", "")
        .await
        .expect_err("an empty audience is refused");
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
    let unknown = watch(&broker, "nobody", "https://a.example.com")
        .await
        .expect_err("an unknown identity is refused");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert_eq!(emulator.stats().identity.total, 0, "nothing went upstream");

    let first_audience = "https://first.example.com";
    let second_audience = "https://second.example.com";
    let mut held = watch(&broker, "", first_audience)
        .await
        .expect("watch opens");
    let token = next_token(&mut held, "first stream", &broker).await;
    support::verify(&emulator, &token.token, first_audience).await;

    // While it is open, it holds the only place.
    let refused = watch(&broker, "", second_audience)
        .await
        .expect_err("a second stream exceeds max_streams = 1");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // The client goes away (stream and connection); the daemon notices
    // asynchronously, so poll (bounded) for its place to come free.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reopened = loop {
        match watch(&broker, "", second_audience).await {
            Ok(stream) => break stream,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    Instant::now() < deadline,
                    "the dropped stream still holds its place: {status:?}; log:\n{}",
                    broker.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    let token = next_token(&mut reopened, "reopened stream", &broker).await;
    support::verify(&emulator, &token.token, second_audience).await;
    drop(reopened);

    // The daemon still serves: unary calls and the CLI's status.
    let token = broker.get("", first_audience).await.expect("GetIdToken");
    support::verify(&emulator, &token.token, first_audience).await;
    let (code, stdout, stderr) =
        support::run_cli(&["status", "--socket", broker.socket.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains(first_audience), "{stdout}");
    assert!(stdout.contains(second_audience), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_for_prefetch() {
    let emulator = support::emulator().await;
    emulator.set_faults(Faults {
        delay_ms: Some(1500),
        ..Faults::default()
    });
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        move |socket| {
            let text = support::config_text(socket, &host)
                .replace("[server]\n", "[server]\nready_after_prefetch = true\n");
            format!("{text}\n{}", prefetch_table())
        },
        "info",
    )
    .await;
    let started = Instant::now();

    // The socket answers, but the prefetch (1.5 s upstream) is still running.
    for service in ["", "tokenbroker.v1.TokenBroker"] {
        assert_eq!(
            health(&broker, service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    assert_eq!(health_cli(&broker), (1, "NOT_SERVING".to_owned()));
    assert_eq!(
        emulator.stats().identity.succeeded,
        0,
        "NOT_SERVING was seen while the prefetch was still running"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match health_cli(&broker) {
            (0, stdout) => {
                assert_eq!(stdout, "SERVING");
                break;
            }
            (1, stdout) => assert_eq!(stdout, "NOT_SERVING"),
            other => panic!("health: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "not ready within 10 s; log:\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("ready {:?} after the socket answered", started.elapsed());
    for service in ["", "tokenbroker.v1.TokenBroker"] {
        assert_eq!(
            health(&broker, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    assert!(
        broker.log().contains("prefetch complete"),
        "{}",
        broker.log()
    );

    // Ready means every prefetched audience holds a token: the first client
    // after boot waits for nothing.
    prefetched_tokens_come_from_the_cache(&broker, &emulator).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_without_readiness_serves_at_once_then_from_the_cache() {
    let emulator = support::emulator().await;
    emulator.set_faults(Faults {
        delay_ms: Some(1500),
        ..Faults::default()
    });
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        move |socket| {
            format!(
                "{}\n{}",
                support::config_text(socket, &host),
                prefetch_table()
            )
        },
        "info",
    )
    .await;

    assert_eq!(health_cli(&broker), (0, "SERVING".to_owned()));
    for service in ["", "tokenbroker.v1.TokenBroker"] {
        assert_eq!(
            health(&broker, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    assert_eq!(
        emulator.stats().identity.succeeded,
        0,
        "SERVING was seen while the prefetch was still running"
    );
    assert!(!broker.log().contains("prefetch complete"));

    broker.wait_for_log_text("prefetch complete", 1).await;
    prefetched_tokens_come_from_the_cache(&broker, &emulator).await;
}
