//! Issue 2 through the metadata-server source: tokens, caching, isolation
//! of audiences, and every error the wire contract promises.

use token_broker::{emulator::Faults, proto::ListTokensRequest};
use tonic::Code;

use crate::support::{self, Broker};

async fn broker_for(emulator: &token_broker::emulator::Emulator) -> Broker {
    let host = support::metadata_identity("default", emulator);
    Broker::start(move |socket| support::config_text(socket, &host), "debug").await
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_a_token_that_verifies_for_the_audience_asked() {
    let emulator = support::emulator().await;
    let broker = broker_for(&emulator).await;
    let token = broker.get("", "https://svc-a.example.com").await.unwrap();
    assert_eq!(token.audience, "https://svc-a.example.com");
    assert_eq!(token.identity, "default");
    let claims = support::verify(&emulator, &token.token, "https://svc-a.example.com").await;
    // format=full: IAP needs the email claim.
    assert!(claims["email"].as_str().unwrap().contains('@'));
    assert_eq!(
        claims["exp"].as_i64().unwrap(),
        token.expire_time.unwrap().seconds
    );
    assert_eq!(
        claims["iat"].as_i64().unwrap(),
        token.issue_time.unwrap().seconds
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_second_request_is_served_from_memory() {
    let emulator = support::emulator().await;
    let broker = broker_for(&emulator).await;
    let first = broker
        .get("default", "https://cached.example.com")
        .await
        .unwrap();
    let second = broker
        .get("default", "https://cached.example.com")
        .await
        .unwrap();
    assert_eq!(first.token, second.token);
    assert_eq!(
        emulator.stats().identity.by_audience["https://cached.example.com"],
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audiences_never_get_each_others_token() {
    let emulator = support::emulator().await;
    let broker = broker_for(&emulator).await;
    let audiences: Vec<String> = (0..8)
        .map(|i| format!("https://svc-{i}.example.com"))
        .collect();
    let mut calls = Vec::new();
    for round in 0..3 {
        for audience in &audiences {
            let audience = audience.clone();
            let client = broker.client().await;
            calls.push(tokio::spawn(async move {
                let mut client = client;
                let token = client
                    .get_id_token(token_broker::proto::GetIdTokenRequest {
                        audience: audience.clone(),
                        identity: String::new(),
                        min_valid_for: None,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (round, audience, token)
            }));
        }
    }
    for call in calls {
        let (_, audience, token) = call.await.unwrap();
        assert_eq!(token.audience, audience);
        support::verify(&emulator, &token.token, &audience).await;
    }
    let stats = emulator.stats();
    for audience in &audiences {
        assert_eq!(stats.identity.by_audience[audience], 1, "{audience}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_before_any_upstream_call() {
    let emulator = support::emulator().await;
    let broker = broker_for(&emulator).await;
    let long = format!("https://{}", "a".repeat(2049));
    for (audience, what) in [
        ("", "empty"),
        (long.as_str(), "2048"),
        ("https://a b", "whitespace"),
        ("https://a\u{7}b", "control"),
        ("https://a\tb", "whitespace"),
    ] {
        let err = broker.get("default", audience).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{audience:?}");
        assert!(
            err.message().contains(what),
            "{audience:?}: {}",
            err.message()
        );
    }
    let err = broker.get("nobody", "https://a").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nobody"));
    assert_eq!(emulator.stats().identity.total, 0);
    // The daemon is still serving after all that.
    broker
        .get("default", "https://still-up.example.com")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_is_unavailable_and_named() {
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = Broker::start(
        |socket| {
            support::config_text(
                socket,
                &format!("[[identities]]\nname = \"default\"\nsource = \"metadata\"\nmetadata_host = \"127.0.0.1:{port}\"\n"),
            )
        },
        "debug",
    )
    .await;
    let err = broker
        .get("default", "https://a.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message()
            .contains(&format!("metadata server at http://127.0.0.1:{port}")),
        "{}",
        err.message()
    );
    assert!(err.message().contains("connect"), "{}", err.message());
}

/// A broker with the default retry settings: the cache's backoff is the
/// only retry layer, and a cold caller rides its retries.
async fn broker_with_default_retries(emulator: &token_broker::emulator::Emulator) -> Broker {
    let host = support::metadata_identity("default", emulator);
    Broker::start(
        move |socket| support::config_text_default_retries(socket, &host),
        "debug",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_5xx_is_unavailable_after_bounded_retries() {
    let emulator = support::emulator().await;
    let broker = broker_with_default_retries(&emulator).await;
    emulator.set_faults(Faults {
        status: Some(503),
        ..Faults::default()
    });
    let err = broker
        .get("default", "https://a.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("503"), "{}", err.message());
    assert!(
        err.message().contains(&emulator.metadata_host()),
        "{}",
        err.message()
    );
    // The cache's backoff (1 s, then up to 2 s, 4 s, capped at 5 s for a
    // key that never held a token) inside the 15 s a cold caller rides it.
    let calls = emulator.stats().identity.total;
    assert!((2..=6).contains(&calls), "{calls} calls: bounded retries");
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_5xx_is_retried_until_it_succeeds() {
    let emulator = support::emulator().await;
    let broker = broker_with_default_retries(&emulator).await;
    emulator.set_faults(Faults {
        status: Some(500),
        fail_next: Some(2),
        ..Faults::default()
    });
    let token = broker
        .get("default", "https://a.example.com")
        .await
        .unwrap();
    support::verify(&emulator, &token.token, "https://a.example.com").await;
    assert_eq!(emulator.stats().identity.total, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_403_and_404_are_failed_precondition_with_their_text_and_not_retried() {
    for status in [403u16, 404] {
        let emulator = support::emulator().await;
        let broker = broker_for(&emulator).await;
        emulator.set_faults(Faults {
            status: Some(status),
            ..Faults::default()
        });
        let err = broker
            .get("default", "https://a.example.com")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{status}");
        assert!(
            err.message().contains(&format!("HTTP {status}")),
            "{}",
            err.message()
        );
        assert_eq!(
            emulator.stats().identity.total,
            1,
            "{status} is not retried"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_expired_or_misaddressed_tokens_are_refused_and_not_cached() {
    let cases: [(Faults, &str); 3] = [
        (
            Faults {
                malformed: true,
                ..Faults::default()
            },
            "not a JWT",
        ),
        (
            Faults {
                expired: true,
                ..Faults::default()
            },
            "expired",
        ),
        (
            Faults {
                wrong_audience: true,
                ..Faults::default()
            },
            "not the audience asked for",
        ),
    ];
    for (faults, expected) in cases {
        let emulator = support::emulator().await;
        let broker = broker_for(&emulator).await;
        emulator.set_faults(faults);
        let audience = "https://bad-answers.example.com";
        let err = broker.get("default", audience).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{expected}");
        assert!(
            err.message().contains(expected),
            "{expected}: {}",
            err.message()
        );
        // Nothing was cached: the entry shows a failure and no expiry.
        let listed = broker
            .client()
            .await
            .list_tokens(ListTokensRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.tokens.len(), 1);
        assert!(listed.tokens[0].expire_time.is_none());
        assert!(listed.tokens[0].last_error.contains(expected));
        assert_eq!(
            listed.tokens[0].state,
            token_broker::proto::TokenState::Failed as i32
        );
        // Asking again is answered with the remembered error, not the bad
        // token, and does not go upstream again inside the backoff.
        let again = broker.get("default", audience).await.unwrap_err();
        assert!(again.message().contains(expected), "{}", again.message());
        assert_eq!(emulator.stats().identity.total, 1);
    }
}
