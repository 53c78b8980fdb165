//! Issue 3 through the service-account key source: a self-signed assertion
//! exchanged at the emulator's token endpoint for a Google-signed ID token,
//! every way that exchange can fail, and a trace-level log free of secrets.

use std::time::Duration;

use token_broker::{
    clock::Clock,
    emulator::{Emulator, EmulatorOptions, Faults, DEFAULT_ACCOUNT_EMAIL},
    proto::{ListTokensRequest, TokenState},
};
use tonic::Code;

use crate::support::{self, Broker};

const ACCOUNT: &str = "deployer@proj.iam.gserviceaccount.com";

/// A broker serving one key identity, `name`, whose key (registered with
/// `emulator` unless `register` is false) is written before the broker starts.
async fn key_broker(
    emulator: &Emulator,
    name: &str,
    register: bool,
) -> (Broker, std::path::PathBuf, tempfile::TempDir) {
    let keys = support::workdir();
    let (path, _) = support::key_file(keys.path(), name, ACCOUNT, emulator, register);
    let identity = support::key_identity(name, &path);
    let broker = Broker::start(
        move |socket| support::config_text(socket, &identity),
        "debug",
    )
    .await;
    (broker, path, keys)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_identity_gets_a_verified_token_for_its_account() {
    let emulator = support::emulator().await;
    let (broker, _key, _keys) = key_broker(&emulator, "deployer", true).await;
    let audience = "https://svc-a.example.com";

    let token = broker.get("deployer", audience).await.unwrap();
    assert_eq!(token.audience, audience);
    assert_eq!(token.identity, "deployer");
    let claims = support::verify(&emulator, &token.token, audience).await;
    assert_eq!(claims["aud"], audience);
    assert_eq!(claims["email"], ACCOUNT);
    assert_eq!(
        claims["exp"].as_i64().unwrap(),
        token.expire_time.unwrap().seconds
    );

    let stats = emulator.stats();
    assert_eq!(stats.token.total, 1);
    assert_eq!(stats.token.by_audience[audience], 1);
    assert_eq!(
        stats.identity.total, 0,
        "a key identity never asks the metadata server"
    );

    // The exchange happened once; the next caller is served from memory.
    let again = broker.get("deployer", audience).await.unwrap();
    assert_eq!(again.token, token.token);
    assert_eq!(emulator.stats().token.total, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_metadata_identity_and_a_key_identity_in_one_config_each_get_their_own_token() {
    let emulator = support::emulator().await;
    let keys = support::workdir();
    let (path, _) = support::key_file(keys.path(), "deployer", ACCOUNT, &emulator, true);
    let identities = format!(
        "{}\n{}",
        support::metadata_identity("default", &emulator),
        support::key_identity("deployer", &path)
    );
    let broker = Broker::start(
        move |socket| support::config_text(socket, &identities),
        "debug",
    )
    .await;

    // The same audience for both: the identity alone decides whose token it is.
    let audience = "https://shared.example.com";
    let from_metadata = broker.get("default", audience).await.unwrap();
    let from_key = broker.get("deployer", audience).await.unwrap();
    assert_ne!(from_metadata.token, from_key.token);

    let claims = support::verify(&emulator, &from_metadata.token, audience).await;
    assert_eq!(claims["email"], DEFAULT_ACCOUNT_EMAIL);
    assert_eq!(from_metadata.identity, "default");
    let claims = support::verify(&emulator, &from_key.token, audience).await;
    assert_eq!(claims["email"], ACCOUNT);
    assert_eq!(from_key.identity, "deployer");

    // A second audience on each, to be sure audiences stay apart too.
    let other = "https://other.example.com";
    let token = broker.get("default", other).await.unwrap();
    assert_eq!(
        support::verify(&emulator, &token.token, other).await["email"],
        DEFAULT_ACCOUNT_EMAIL
    );
    let token = broker.get("deployer", other).await.unwrap();
    assert_eq!(
        support::verify(&emulator, &token.token, other).await["email"],
        ACCOUNT
    );

    let stats = emulator.stats();
    assert_eq!(stats.identity.by_audience[audience], 1);
    assert_eq!(stats.identity.by_audience[other], 1);
    assert_eq!(stats.token.by_audience[audience], 1);
    assert_eq!(stats.token.by_audience[other], 1);
}

/// Asks `broker` once and checks the answer is FAILED_PRECONDITION carrying
/// `description`, after exactly one call to the token endpoint.
async fn assert_rejected_once(
    emulator: &Emulator,
    broker: &Broker,
    identity: &str,
    description: &str,
) {
    let err = broker
        .get(identity, "https://svc.example.com")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "{description}: {}",
        err.message()
    );
    assert!(
        err.message().contains(description),
        "expected {description:?} in {:?}",
        err.message()
    );
    assert!(
        err.message().contains(&emulator.token_uri()),
        "{}",
        err.message()
    );
    assert_eq!(
        emulator.stats().token.total,
        1,
        "{description}: a permanent rejection is not retried"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_id_the_emulator_does_not_hold_is_rejected_with_its_description() {
    let emulator = support::emulator().await;
    let keys = support::workdir();
    let (path, registration) = support::key_file(keys.path(), "deployer", ACCOUNT, &emulator, true);
    // Same account and key pair, but the file names a key id Google never saw.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let other_id = "0123456789abcdef0123456789abcdef01234567";
    assert_ne!(registration.key_id, other_id);
    json["private_key_id"] = other_id.into();
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    support::set_mode(&path, 0o600);
    let identity = support::key_identity("deployer", &path);
    let broker = Broker::start(
        move |socket| support::config_text(socket, &identity),
        "debug",
    )
    .await;

    assert_rejected_once(&emulator, &broker, "deployer", "Invalid JWT Signature.").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_the_emulator_does_not_know_is_rejected_with_its_description() {
    let emulator = support::emulator().await;
    let (broker, _key, _keys) = key_broker(&emulator, "stranger", false).await;
    assert_rejected_once(&emulator, &broker, "stranger", "account not found").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_assertion_expired_by_the_token_endpoints_clock_is_rejected_with_its_description() {
    // Google's clock two hours ahead of ours: our assertion's exp is its past.
    let emulator = Emulator::start(EmulatorOptions {
        clock: Clock::ahead_by(Duration::from_secs(2 * 3600)),
        ..Default::default()
    })
    .await
    .unwrap();
    let (broker, _key, _keys) = key_broker(&emulator, "deployer", true).await;
    assert_rejected_once(
        &emulator,
        &broker,
        "deployer",
        "Token must be a short-lived token",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_503s_are_retried_until_the_exchange_succeeds() {
    let emulator = support::emulator().await;
    let keys = support::workdir();
    let (path, _) = support::key_file(keys.path(), "deployer", ACCOUNT, &emulator, true);
    let identity = support::key_identity("deployer", &path);
    // Default retry settings: the cache's backoff retries for the caller.
    let broker = Broker::start(
        move |socket| support::config_text_default_retries(socket, &identity),
        "debug",
    )
    .await;
    emulator.set_faults(Faults {
        status: Some(503),
        fail_next: Some(2),
        endpoint: Some("token".into()),
        ..Faults::default()
    });
    let audience = "https://flaky.example.com";
    let token = broker.get("deployer", audience).await.unwrap();
    assert_eq!(
        support::verify(&emulator, &token.token, audience).await["email"],
        ACCOUNT
    );
    let stats = emulator.stats();
    assert_eq!(stats.token.total, 3);
    assert_eq!(stats.token.succeeded, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_503s_are_unavailable_after_bounded_retries() {
    let emulator = support::emulator().await;
    let (broker, _key, _keys) = key_broker(&emulator, "deployer", true).await;
    emulator.set_faults(Faults {
        status: Some(503),
        endpoint: Some("token".into()),
        ..Faults::default()
    });
    let err = broker
        .get("deployer", "https://down.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains(&emulator.token_uri()),
        "{}",
        err.message()
    );
    assert!(err.message().contains("503"), "{}", err.message());
    // One call per attempt: the cache's backoff is the only retry layer.
    assert_eq!(
        emulator.stats().token.total,
        1,
        "one call, not a retry loop"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_200_answers_are_unavailable_named_and_not_cached() {
    let cases: [(Faults, &str); 3] = [
        (
            Faults {
                missing_id_token: true,
                ..Faults::default()
            },
            "No ID token in response",
        ),
        (
            Faults {
                non_json: true,
                ..Faults::default()
            },
            "not a JSON object",
        ),
        (
            Faults {
                malformed: true,
                ..Faults::default()
            },
            "not a JWT",
        ),
    ];
    for (faults, expected) in cases {
        let emulator = support::emulator().await;
        let (broker, _key, _keys) = key_broker(&emulator, "deployer", true).await;
        emulator.set_faults(Faults {
            endpoint: Some("token".into()),
            ..faults
        });
        let audience = "https://bad-answers.example.com";
        let err = broker.get("deployer", audience).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unavailable,
            "{expected}: {}",
            err.message()
        );
        assert!(
            err.message().contains(expected),
            "expected {expected:?} in {:?}",
            err.message()
        );
        assert!(
            err.message().contains(&emulator.token_uri()),
            "{}",
            err.message()
        );

        let listed = broker
            .client()
            .await
            .list_tokens(ListTokensRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.tokens.len(), 1, "{expected}");
        let entry = &listed.tokens[0];
        assert_eq!(
            (entry.identity.as_str(), entry.audience.as_str()),
            ("deployer", audience)
        );
        assert!(
            entry.expire_time.is_none(),
            "{expected}: nothing may be cached"
        );
        assert_eq!(entry.state, TokenState::Failed as i32, "{expected}");
        assert!(
            entry.last_error.contains(expected),
            "{expected}: {}",
            entry.last_error
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trace_log_holds_no_key_and_no_token() {
    let emulator = support::emulator().await;
    let keys = support::workdir();
    let (good_key, _) = support::key_file(keys.path(), "deployer", ACCOUNT, &emulator, true);
    let (unknown_key, _) = support::key_file(
        keys.path(),
        "stranger",
        "stranger@proj.iam.gserviceaccount.com",
        &emulator,
        false,
    );
    let identities = format!(
        "{}\n{}\n{}",
        support::metadata_identity("default", &emulator),
        support::key_identity("deployer", &good_key),
        support::key_identity("stranger", &unknown_key),
    );
    let broker = Broker::start(
        move |socket| support::config_text(socket, &identities),
        "trace",
    )
    .await;

    let audiences = [
        "https://log-a.example.com",
        "https://log-b.example.com",
        "https://log-c.example.com",
    ];
    let mut tokens = Vec::new();
    for audience in audiences {
        for identity in ["default", "deployer"] {
            tokens.push(broker.get(identity, audience).await.unwrap().token);
        }
    }
    // Failures carry upstream text into errors and logs: a rejection, and a
    // genuine token for the wrong audience that the broker must refuse.
    let rejected = broker.get("stranger", audiences[0]).await.unwrap_err();
    assert_eq!(
        rejected.code(),
        Code::FailedPrecondition,
        "{}",
        rejected.message()
    );
    emulator.set_faults(Faults {
        wrong_audience: true,
        fail_next: Some(1),
        endpoint: Some("token".into()),
        ..Faults::default()
    });
    let refused_audience = "https://log-refused.example.com";
    let refused = broker.get("deployer", refused_audience).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    assert!(
        !refused.message().contains("eyJ"),
        "an error message carries a JWT"
    );

    let log = broker.log();
    assert!(
        log.lines().count() > 50,
        "the trace log is too short to mean anything:\n{log}"
    );
    for audience in audiences.iter().chain([&refused_audience]) {
        assert!(log.contains(audience), "{audience} is not in the log");
    }
    assert!(
        log.contains("TRACE"),
        "the log was not captured at TRACE level"
    );
    let pem: Vec<String> = support::pem_lines(&good_key)
        .into_iter()
        .chain(support::pem_lines(&unknown_key))
        .collect();
    assert!(!pem.is_empty());
    let mut secrets: Vec<&str> = tokens.iter().map(String::as_str).collect();
    secrets.extend(pem.iter().map(String::as_str));
    support::assert_no_secrets(&log, &secrets);
    // Every JWT (token, refused token, signed assertion) starts with a
    // base64 JSON header, "eyJ": none may appear, whole or in part.
    assert!(!log.contains("eyJ"), "a JWT reached the log");
}
