//! The daemon as a process: socket handling, health, reflection, and a
//! graceful stop that lets in-flight calls finish.

use std::os::unix::fs::PermissionsExt;

use token_broker::emulator::Faults;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::support::{self, Broker};

#[tokio::test(flavor = "multi_thread")]
async fn socket_has_the_configured_mode_and_is_removed_on_sigterm() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let mut broker = Broker::start(
        move |socket| {
            support::config_text(socket, &host)
                .replace("[server]\n", "[server]\nsocket_mode = \"0600\"\n")
        },
        "info",
    )
    .await;
    let mode = std::fs::metadata(&broker.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let status = broker.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!broker.socket.exists(), "socket file removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn default_socket_mode_is_0660() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(move |socket| support::config_text(socket, &host), "info").await;
    let mode = std::fs::metadata(&broker.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_socket_is_replaced() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        move |socket| {
            // A socket file left behind by a process that is gone.
            drop(std::os::unix::net::UnixListener::bind(socket).unwrap());
            assert!(socket.exists());
            support::config_text(socket, &host)
        },
        "info",
    )
    .await;
    broker
        .get("default", "https://a.example.com")
        .await
        .unwrap();
    assert!(broker.log().contains("stale socket"), "{}", broker.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_socket_or_a_non_socket_path_stops_startup() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let first = Broker::start(|socket| support::config_text(socket, &host), "info").await;
    let config = first.dir.path().join("second.toml");
    std::fs::write(&config, support::config_text(&first.socket, &host)).unwrap();
    let (code, _, stderr) = support::run_cli(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("another process is already serving"),
        "{stderr}"
    );
    // The first daemon is untouched.
    first.get("default", "https://a.example.com").await.unwrap();

    let plain = first.dir.path().join("not-a-socket");
    std::fs::write(&plain, "x").unwrap();
    std::fs::write(&config, support::config_text(&plain, &host)).unwrap();
    let (code, _, stderr) = support::run_cli(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&plain).unwrap(),
        "x",
        "the file is left alone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_serving_and_reflection_lists_the_services() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(|socket| support::config_text(socket, &host), "info").await;
    let channel = token_broker::client::channel(&broker.socket).await.unwrap();
    for service in ["", "tokenbroker.v1.TokenBroker"] {
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let (code, stdout, _) =
        support::run_cli(&["health", "--socket", broker.socket.to_str().unwrap()]);
    assert_eq!((code, stdout.trim()), (0, "SERVING"));

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list of services");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tokenbroker.v1.TokenBroker"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_fails_when_nothing_serves() {
    let dir = support::workdir();
    let socket = dir.path().join("none.sock");
    let (code, _, stderr) = support::run_cli(&["health", "--socket", socket.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_call_finish() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let mut broker = Broker::start(|socket| support::config_text(socket, &host), "info").await;
    emulator.set_faults(Faults {
        delay_ms: Some(1500),
        ..Faults::default()
    });
    let mut client = broker.client().await;
    let call = tokio::spawn(async move {
        client
            .get_id_token(token_broker::proto::GetIdTokenRequest {
                audience: "https://slow.example.com".into(),
                identity: String::new(),
                min_valid_for: None,
            })
            .await
    });
    // The stop signal goes out only once the upstream call is under way.
    while emulator.stats().identity.total == 0 {
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    support::signal(&broker.child, nix::sys::signal::Signal::SIGTERM);
    let token = call
        .await
        .unwrap()
        .expect("the in-flight call completes")
        .into_inner();
    support::verify(&emulator, &token.token, "https://slow.example.com").await;
    let status = tokio::task::spawn_blocking(move || {
        let status = broker.wait_exit();
        (status, broker.socket.exists(), broker.log())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{:?}\n{}", status.0, status.2);
    assert!(!status.1, "socket removed");
    assert!(status.2.contains("SIGTERM"), "{}", status.2);
}
