//! The command line as a user runs it: `token`, `status`, `check-config`,
//! and the demo.

use std::io::{BufRead, BufReader};

use crate::support::{self, Broker};

#[tokio::test(flavor = "multi_thread")]
async fn token_prints_the_token_or_json_and_fails_with_the_servers_message() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(|socket| support::config_text(socket, &host), "info").await;
    let socket = broker.socket.to_str().unwrap().to_owned();

    let (code, stdout, _) = support::run_cli(&[
        "token",
        "--socket",
        &socket,
        "--audience",
        "https://cli.example.com",
    ]);
    assert_eq!(code, 0);
    support::verify(&emulator, stdout.trim(), "https://cli.example.com").await;

    let (code, stdout, _) = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || {
            let mut cmd = support::base_command(&[
                "token",
                "--json",
                "--audience",
                "https://cli.example.com",
            ]);
            // Socket from the environment this time.
            let out = cmd.env("TOKEN_BROKER_SOCKET", &socket).output().unwrap();
            (
                out.status.code().unwrap(),
                String::from_utf8(out.stdout).unwrap(),
                (),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["audience"], "https://cli.example.com");
    assert_eq!(json["identity"], "default");
    assert!(json["expire_time"].as_str().unwrap().ends_with('Z'));
    support::verify(
        &emulator,
        json["token"].as_str().unwrap(),
        "https://cli.example.com",
    )
    .await;

    let (code, stdout, stderr) =
        support::run_cli(&["token", "--socket", &socket, "--audience", "bad audience"]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("whitespace"),
        "{stderr}"
    );

    let (code, _, stderr) = support::run_cli(&[
        "token",
        "--socket",
        &socket,
        "--audience",
        "https://a",
        "--identity",
        "ghost",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("NOT_FOUND"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_lists_entries_without_token_text() {
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(|socket| support::config_text(socket, &host), "info").await;
    let socket = broker.socket.to_str().unwrap().to_owned();
    let (code, stdout, _) = support::run_cli(&["status", "--socket", &socket]);
    assert_eq!((code, stdout.trim()), (0, "no cached tokens"));

    let a = broker
        .get("default", "https://status-a.example.com")
        .await
        .unwrap();
    let b = broker
        .get("default", "https://status-b.example.com")
        .await
        .unwrap();
    let (code, stdout, _) = support::run_cli(&["status", "--socket", &socket]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("https://status-a.example.com")
            && stdout.contains("https://status-b.example.com"),
        "{stdout}"
    );
    assert!(stdout.contains("fresh"), "{stdout}");
    assert!(!stdout.contains(&a.token) && !stdout.contains(&b.token));
    assert!(!stdout.contains("eyJ"), "no token text at all: {stdout}");

    let (code, stdout, _) = support::run_cli(&["status", "--json", "--socket", &socket]);
    assert_eq!(code, 0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r["state"] == "fresh" && r["identity"] == "default"));
}

/// At 100,000 entries one ListTokens reply was 7.4 MB, over gRPC's 4 MiB
/// decode limit, and `status` failed. Replies now come in pages that
/// `status` walks; 1,201 entries take three default pages.
#[tokio::test(flavor = "multi_thread")]
async fn list_tokens_pages_and_status_walks_every_page() {
    use token_broker::proto::{GetIdTokenRequest, ListTokensRequest};

    const ENTRIES: usize = 1201;
    let emulator = support::emulator().await;
    let host = support::metadata_identity("default", &emulator);
    let broker = Broker::start(
        |socket| {
            format!(
                "{}\n[limits]\nnew_audience_burst = 5000\nnew_audiences_per_minute = 5000\n",
                support::config_text(socket, &host)
            )
        },
        "warn",
    )
    .await;
    let client = broker.client().await;
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..8 {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut tokens = Vec::new();
            for i in (chunk..ENTRIES).step_by(8) {
                let token = client
                    .get_id_token(GetIdTokenRequest {
                        audience: format!("https://svc-{i:04}.example.com"),
                        identity: String::new(),
                        min_valid_for: None,
                    })
                    .await
                    .expect("token")
                    .into_inner();
                tokens.push(token.token);
            }
            tokens
        });
    }
    while let Some(tokens) = tasks.join_next().await {
        broker.served.lock().unwrap().extend(tokens.unwrap());
    }

    // gRPC pages of 500: ordered, disjoint, complete.
    let mut client = client.clone();
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let reply = client
            .list_tokens(ListTokensRequest {
                page_size: 500,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(reply.tokens.len() <= 500);
        seen.extend(reply.tokens.into_iter().map(|t| t.audience));
        if reply.next_page_token.is_empty() {
            break;
        }
        page_token = reply.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<_> = (0..ENTRIES)
        .map(|i| format!("https://svc-{i:04}.example.com"))
        .collect();
    expected.sort();
    assert_eq!(seen, expected, "every entry once, in order");

    for (page_size, page_token, what) in [
        (-1, String::new(), "page_size"),
        (0, "not-a-token!".to_owned(), "page_token"),
    ] {
        let err = client
            .list_tokens(ListTokensRequest {
                page_size,
                page_token,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(what), "{}", err.message());
    }

    let socket = broker.socket.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = support::run_cli(&["status", "--json", "--socket", &socket]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows.len(), ENTRIES);
}

#[test]
fn check_config_prints_what_it_would_run_and_names_bad_keys() {
    let dir = support::workdir();
    let config = dir.path().join("ok.toml");
    std::fs::write(
        &config,
        "[server]\nsocket_path = \"/run/x/broker.sock\"\n[[identities]]\nname = \"default\"\nsource = \"metadata\"\nmetadata_host = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let (code, stdout, _) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("/run/x/broker.sock")
            && stdout.contains("default: metadata via metadata server at http://127.0.0.1:9"),
        "{stdout}"
    );
    assert!(stdout.contains("configuration OK"));

    std::fs::write(
        &config,
        "[refresh]\njitter = \"20m\"\nmax_entries = 0\n[server]\nsocket_mode = \"999\"\n",
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    for key in [
        "refresh.jitter",
        "refresh.max_entries",
        "server.socket_mode",
    ] {
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    std::fs::write(&config, "[server]\nsoket_path = \"/x\"\n").unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("soket_path"), "{stderr}");
}

#[test]
fn check_config_refuses_an_empty_file_and_reports_config_and_policy_problems_together() {
    let dir = support::workdir();
    let config = dir.path().join("empty.toml");
    std::fs::write(&config, "# nothing but a comment\n").unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("empty.toml") && stderr.contains("has no settings"),
        "{stderr}"
    );

    std::fs::write(
        &config,
        "[refresh]\nmax_entries = 0\n[[policy]]\nuids = [\"no-such-user-xyz\"]\nidentities = [\"*\"]\naudiences = [\"https://**.x\"]\n",
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    for key in [
        "refresh.max_entries",
        "policy[0].uids[0]",
        "policy[0].audiences[0]",
    ] {
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}

#[test]
fn without_a_config_the_metadata_server_is_the_default_identity() {
    let (code, stdout, _) = support::run_cli(&["check-config"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("default: metadata via metadata server at http://metadata.google.internal"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_serves_tokens_with_the_printed_command() {
    let dir = support::workdir();
    let socket = dir.path().join("demo.sock");
    let mut broker = Broker::spawn(
        dir,
        socket.clone(),
        &["serve", "--demo", "--socket", socket.to_str().unwrap()],
        "info",
    );
    let stdout = broker.child.stdout.take().unwrap();
    // Read the announcement; it names the command to run.
    let command = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut command = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.trim_start().contains(" token --socket ") {
                command = Some(line.trim().to_owned());
                break;
            }
        }
        command
    })
    .await
    .unwrap()
    .expect("the demo prints a token command");
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let (code, token, stderr) = support::run_cli(&args);
    assert_eq!(code, 0, "{stderr}");
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token.trim())
        .unwrap()
        .claims;
    assert_eq!(claims["aud"], token_broker::demo::DEMO_AUDIENCE);
    assert_eq!(claims["email"], token_broker::demo::DEMO_ACCOUNT);
    let status = broker.terminate();
    assert!(status.success());
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_emulator_command_writes_keys_and_verifies_them_for_a_real_broker() {
    use std::os::unix::fs::PermissionsExt;
    let dir = support::workdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let key = dir.path().join("sa.json");
    let listen = format!("127.0.0.1:{port}");
    let (code, stdout, stderr) = support::run_cli(&[
        "emulator",
        "--listen",
        &listen,
        "--write-key",
        key.to_str().unwrap(),
        "--client-email",
        "cli@proj.iam.gserviceaccount.com",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("cli@proj.iam.gserviceaccount.com"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&key).unwrap()).unwrap();
    assert_eq!(json["token_uri"], format!("http://{listen}/token"));
    assert!(!stdout.contains("PRIVATE KEY"), "the key is not printed");

    // The emulator as its own process, with that key registered.
    let mut emulator = support::base_command(&[
        "emulator",
        "--listen",
        &listen,
        "--service-account-key",
        key.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let stdout = emulator.stdout.take().unwrap();
    // Read the whole banner (it ends with the certs line) and keep the pipe
    // open, as a terminal would.
    let _stdout = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while !line.contains("certs:") {
            line.clear();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "the emulator announces itself"
            );
        }
        reader
    })
    .await
    .unwrap();
    let identity = support::key_identity("default", &key);
    let broker = Broker::start(
        move |socket| support::config_text(socket, &identity),
        "info",
    )
    .await;
    let token = broker
        .get("default", "https://emulator-cli.example.com")
        .await
        .unwrap();
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&token.token)
        .unwrap()
        .claims;
    assert_eq!(claims["email"], "cli@proj.iam.gserviceaccount.com");
    assert_eq!(claims["aud"], "https://emulator-cli.example.com");
    let stats: serde_json::Value = reqwest::get(format!("http://{listen}/emulator/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["token"]["total"], 1);
    support::signal(&emulator, nix::sys::signal::Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || emulator.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
}
