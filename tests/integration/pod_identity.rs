//! Issue 14, points 2b and 4: pods reach the metadata endpoint on a node
//! address from their own network namespaces, are told apart by their
//! source IP in the kubelet's pod list, and (per-workload identity) get the
//! tokens of the Google account their Kubernetes service account's
//! annotation names. Every pod here is a real network namespace with a veth
//! pair (`support::pod_network`), the client an unmodified google-auth run
//! inside it, the kubelet and API server a stand-in with a recorded-shape
//! pod list, and Google the emulator, which checks every impersonation
//! grant.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use token_broker::emulator::{Emulator, Permission, DEFAULT_ACCOUNT_EMAIL};

use crate::{
    clients::{examples, python_venv, run},
    support::{
        self,
        kube::{Cluster, PodSpec},
        pod_network::PodNetwork,
        Broker,
    },
};

const AUDIENCE: &str = "https://payments.example.com";
const API_ACCOUNT: &str = "payments-api@apps.iam.gserviceaccount.com";
const WEB_ACCOUNT: &str = "web@apps.iam.gserviceaccount.com";
const UNGRANTED: &str = "ungranted@apps.iam.gserviceaccount.com";

/// Namespaces for `n` pods, or why the kernel refused (the test skips).
fn pod_networks(n: usize) -> Option<Vec<PodNetwork>> {
    let mut made = Vec::new();
    for _ in 0..n {
        match PodNetwork::create() {
            Ok(network) => made.push(network),
            Err(why) => {
                eprintln!(
                    "skipping: cannot create a network namespace with a veth pair here \
                     (needs root with CAP_NET_ADMIN and the `ip` tool): {why}"
                );
                return None;
            }
        }
    }
    Some(made)
}

fn free_port_on(address: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((address, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn google_auth() -> PathBuf {
    python_venv(
        "google-auth",
        &examples().join("python/requirements-google-auth.txt"),
        "google.oauth2.id_token, google.auth.transport.requests",
    )
}

/// An unmodified google-auth, told only where the metadata server is:
/// fetches the ID token for `audience` and the account's email, printing
/// JSON (`token`, `email`, or `error`, and `seconds` since start).
const CLIENT: &str = r#"
import json, sys, time
started = time.monotonic()
import google.auth.transport.requests as requests
import google.oauth2.id_token as id_token
from google.auth.compute_engine import _metadata
request = requests.Request()
out = {}
try:
    out["email"] = _metadata.get_service_account_info(request)["email"]
    out["token"] = id_token.fetch_id_token(request, sys.argv[1])
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["seconds"] = time.monotonic() - started
print(json.dumps(out))
"#;

struct ClientRun {
    answer: serde_json::Value,
    /// From spawning `ip netns exec` to the client's exit.
    wall: Duration,
}

/// The token in a client's `answer`, recorded as `broker`'s served (so the
/// drop check proves it never reached the log); panics, showing the answer
/// and the broker's log, where the client got none.
fn served_token(answer: &serde_json::Value, broker: &Broker) -> String {
    let token = answer["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}\n{}", broker.log()))
        .to_owned();
    broker.served.lock().unwrap().push(token.clone());
    token
}

/// Runs [`CLIENT`] inside `pod`'s network namespace against `endpoint`.
async fn google_auth_in(
    pod: &PodNetwork,
    python: &Path,
    endpoint: &str,
    audience: &str,
) -> ClientRun {
    let mut command = pod.command(python);
    command
        .arg("-c")
        .arg(CLIENT)
        .arg(audience)
        .env("GCE_METADATA_HOST", endpoint)
        .env("GCE_METADATA_IP", endpoint);
    let started = Instant::now();
    let (code, stdout, stderr) = run(command).await;
    let wall = started.elapsed();
    assert_eq!(code, 0, "the client crashed:\n{stderr}");
    let answer =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    ClientRun { answer, wall }
}

/// `curl` inside `pod`'s namespace: (HTTP status, body); status 0 when no
/// connection was made. `source` binds the client's address.
async fn curl_in(pod: &PodNetwork, url: &str, source: Option<Ipv4Addr>) -> (u16, String) {
    let mut command = pod.command(Path::new("curl"));
    command.args([
        "-sS",
        "--max-time",
        "4",
        "-H",
        "Metadata-Flavor: Google",
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(source) = source {
        command.args(["--interface", &source.to_string()]);
    }
    command.arg(url);
    let (_, stdout, _) = run(command).await;
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", stdout.trim()));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

fn identity_url(endpoint: &str, audience: &str) -> String {
    format!(
        "http://{endpoint}/computeMetadata/v1/instance/service-accounts/default/identity?audience={audience}"
    )
}

/// The broker's config: the emulator's metadata server as `node`, `extra`
/// identities, the cluster, the endpoint on `listen`, and `policy`.
fn config(
    socket: &Path,
    emulator: &Emulator,
    cluster: &Cluster,
    listen: &str,
    served: &str,
    extra: &str,
) -> String {
    config_with(socket, emulator, cluster, listen, served, extra, "")
}

/// [`config`] with `endpoint` added to `[metadata_endpoint]`.
fn config_with(
    socket: &Path,
    emulator: &Emulator,
    cluster: &Cluster,
    listen: &str,
    served: &str,
    extra: &str,
    endpoint: &str,
) -> String {
    let node = support::metadata_identity("node", emulator);
    support::config_text(
        socket,
        &format!(
            "{node}\n{extra}\n{}\n\
             [metadata_endpoint]\nlisten = \"{listen}\"\nidentity = \"{served}\"\n\
             allow_non_loopback = true\n{endpoint}\n\
             [limits]\nnew_audiences_per_minute = 100000\nnew_audience_burst = 100000\n",
            cluster.config()
        ),
    )
}

/// Point 2b: a pod in its own network namespace, through an unmodified
/// google-auth, gets the token its service account may have, from a node
/// address; asked for an audience it may not have, another pod, a shared
/// (hostNetwork) address, an unknown address and a spoofed source get
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn pods_are_told_apart_by_their_address_on_the_node() {
    let Some(pods) = pod_networks(5) else { return };
    let [api, web, shared, unknown, lone_host] = &pods[..] else {
        unreachable!()
    };
    let python = tokio::task::spawn_blocking(google_auth).await.unwrap();
    let emulator = support::emulator().await;
    let cluster = Cluster::start().await;
    cluster.set_pods(vec![
        PodSpec::new("payments", "api-7f9c8d6b5-x2x4q", "api-sa").ip(api.pod_ip),
        PodSpec::new("web", "web-5d4c-q8r2t", "web-sa").ip(web.pod_ip),
        // Two hostNetwork pods report the same address.
        PodSpec::new("kube-system", "node-exporter-a1", "exporter")
            .ip(shared.pod_ip)
            .host_network(),
        PodSpec::new("kube-system", "fluentbit-b2", "fluentbit")
            .ip(shared.pod_ip)
            .host_network(),
        // One hostNetwork pod alone on an address.
        PodSpec::new("kube-system", "kube-proxy-c3", "kube-proxy")
            .ip(lone_host.pod_ip)
            .host_network(),
    ]);
    let port = free_port_on(api.host_ip);
    let endpoint = format!("{}:{port}", api.host_ip);
    let policy = format!(
        "[[policy]]\nk8s_service_accounts = [\"payments/api-sa\"]\nidentities = [\"node\"]\n\
         audiences = [\"{AUDIENCE}\"]\n\
         [[policy]]\nuids = [0]\nidentities = [\"*\"]\naudiences = [\"*\"]\n"
    );
    let listen = endpoint.clone();
    let broker = Broker::start(
        |socket| config(socket, &emulator, &cluster, &listen, "node", &policy),
        "info",
    )
    .await;

    // The pod's own token, verified against the emulator's keys.
    let first = google_auth_in(api, &python, &endpoint, AUDIENCE).await;
    let token = served_token(&first.answer, &broker);
    let claims = support::verify(&emulator, &token, AUDIENCE).await;
    assert_eq!(claims["email"], DEFAULT_ACCOUNT_EMAIL);
    assert_eq!(first.answer["email"], DEFAULT_ACCOUNT_EMAIL);
    eprintln!(
        "pod client start to token: {:.0} ms wall ({:.0} ms inside google-auth)",
        first.wall.as_secs_f64() * 1e3,
        first.answer["seconds"].as_f64().unwrap() * 1e3
    );
    // Generous: a cold venv import plus the broker's kubelet lookup and
    // the emulator's mint, on a loaded machine.
    assert!(first.wall < Duration::from_secs(20), "{:?}", first.wall);
    let log = broker.log();
    assert!(
        log.contains("k8s=payments/api-sa pod=payments/api-7f9c8d6b5-x2x4q"),
        "the audit line names the pod:\n{log}"
    );

    // An audience its rule does not grant: 403, which google-auth does not
    // retry.
    let other = google_auth_in(api, &python, &endpoint, "https://admin.example.com").await;
    let error = other.answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("403"), "{}", other.answer);
    assert!(other.answer.get("token").is_none());

    // Another pod (another service account) on the same node: denied.
    let (status, body) = curl_in(web, &identity_url(&endpoint, AUDIENCE), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("may not use identity"), "{body}");
    let log = broker.log();
    assert!(
        log.contains("k8s=web/web-sa pod=web/web-5d4c-q8r2t"),
        "the denial names the pod:\n{log}"
    );

    // An address two hostNetwork pods share, and one no pod has.
    let (status, body) = curl_in(shared, &identity_url(&endpoint, AUDIENCE), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("shared by 2 pods (hostNetwork)"), "{body}");
    let (status, body) = curl_in(lone_host, &identity_url(&endpoint, AUDIENCE), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("is a hostNetwork pod's"), "{body}");
    let (status, body) = curl_in(unknown, &identity_url(&endpoint, AUDIENCE), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(&format!("no running pod has IP {}", unknown.pod_ip)),
        "{body}"
    );

    // Refusals by address are audited like any other request.
    let log = broker.log();
    assert!(
        log.lines().any(|l| l.contains("status=403")
            && l.contains(&shared.pod_ip.to_string())
            && l.contains("shared by 2 pods")),
        "no audit line for the shared address:\n{log}"
    );
    // The api pod's own request, relayed as a proxy would (SSRF): refused
    // before its pod is even looked at.
    let mut relayed = api.command(Path::new("curl"));
    relayed.args([
        "-sS",
        "--max-time",
        "4",
        "-H",
        "Metadata-Flavor: Google",
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        "-w",
        "\n%{http_code}",
        &identity_url(&endpoint, AUDIENCE),
    ]);
    let (_, out, _) = run(relayed).await;
    assert!(out.trim_end().ends_with("403"), "{out}");
    assert!(out.contains("X-Forwarded-For"), "{out}");

    // A pod spoofing the api pod's address: it may put the address on its
    // own interface, but the host drops what it sends from it (rp_filter),
    // and no answer would reach it anyway. No connection, no token.
    unknown.add_pod_address(api.pod_ip).unwrap();
    let (status, body) = curl_in(
        unknown,
        &identity_url(&endpoint, AUDIENCE),
        Some(api.pod_ip),
    )
    .await;
    assert_eq!(status, 0, "a spoofed source got an answer: {body}");

    // Exactly one token was minted: the api pod's.
    assert_eq!(emulator.stats().identity.by_audience[AUDIENCE], 1);
    assert!(!emulator
        .stats()
        .identity
        .by_audience
        .contains_key("https://admin.example.com"));
}

/// Per-workload identity at the metadata endpoint: pods in network
/// namespaces of their own (`payments/api-1`, `web/web-1` and
/// `batch/job-1`, whose service accounts' annotations name
/// [`API_ACCOUNT`], [`WEB_ACCOUNT`] and [`UNGRANTED`], then the test's own
/// unannotated pods, in that order), google-auth to run in them, and a
/// broker serving identity `pods` (impersonating, from `node`, the account
/// the annotation names) on the first pod's node address.
struct AnnotatedPods {
    broker: Broker,
    cluster: Cluster,
    emulator: Emulator,
    /// google-auth's interpreter.
    python: PathBuf,
    /// The metadata endpoint's `address:port`.
    endpoint: String,
    pods: Vec<PodNetwork>,
}

impl AnnotatedPods {
    /// The node holds `grants` (and [`UNGRANTED`] exists, granted only what
    /// `grants` says); `policy` is the config's rules for `pods`. `None`
    /// where the kernel will not make the namespaces.
    async fn start(
        unannotated: &[PodSpec],
        grants: &[(&str, Permission)],
        policy: &str,
    ) -> Option<AnnotatedPods> {
        let pods = pod_networks(3 + unannotated.len())?;
        let python = tokio::task::spawn_blocking(google_auth).await.unwrap();
        let emulator = support::emulator_granting_the_node(grants).await;
        emulator.create_service_account(UNGRANTED);
        let cluster = Cluster::start().await;
        let annotated = [
            ("payments", "api-1", "api-sa", API_ACCOUNT),
            ("web", "web-1", "web-sa", WEB_ACCOUNT),
            ("batch", "job-1", "job-sa", UNGRANTED),
        ];
        let specs = annotated
            .iter()
            .map(|(namespace, name, service_account, _)| {
                PodSpec::new(namespace, name, service_account)
            })
            .chain(unannotated.iter().cloned())
            .zip(&pods)
            .map(|(spec, pod)| spec.ip(pod.pod_ip))
            .collect();
        cluster.set_pods(specs);
        for (namespace, _, service_account, account) in annotated {
            cluster.annotate(namespace, service_account, Some(account));
        }
        let port = free_port_on(pods[0].host_ip);
        let endpoint = format!("{}:{port}", pods[0].host_ip);
        let identity = format!(
            "[[identities]]\nname = \"pods\"\nsource = \"impersonate\"\nbase = \"node\"\n\
             service_account_from = \"k8s_service_account_annotation\"\niam_endpoint = \"{}\"\n\
             {policy}",
            emulator.base_url()
        );
        let broker = Broker::start(
            |socket| config(socket, &emulator, &cluster, &endpoint, "pods", &identity),
            "info",
        )
        .await;
        Some(AnnotatedPods {
            broker,
            cluster,
            emulator,
            python,
            endpoint,
            pods,
        })
    }
}

/// Point 4: one per-workload identity mints, for each pod, as the account
/// its service account's annotation names; an account the node may not
/// impersonate is Google's PERMISSION_DENIED, said clearly; no annotation
/// is refused naming it; a changed annotation holds after the TTL.
#[tokio::test(flavor = "multi_thread")]
async fn each_pod_gets_the_account_its_service_account_annotation_names() {
    let Some(AnnotatedPods {
        broker,
        cluster,
        emulator,
        python,
        endpoint,
        pods,
    }) = AnnotatedPods::start(
        &[
            PodSpec::new("tools", "shell-1", "default"),
            PodSpec::new("intruders", "probe-1", "probe-sa"),
        ],
        &[
            (API_ACCOUNT, Permission::OpenIdToken),
            (WEB_ACCOUNT, Permission::OpenIdToken),
        ],
        "[[policy]]\nk8s_namespaces = [\"payments\", \"web\", \"batch\", \"tools\"]\n\
         identities = [\"pods\"]\naudiences = [\"*\"]\n\
         [[policy]]\nuids = [0]\nidentities = [\"*\"]\naudiences = [\"*\"]\n",
    )
    .await
    else {
        return;
    };
    let [api, web, ungranted, bare, intruder] = &pods[..] else {
        unreachable!()
    };

    // A pod no rule lets use the identity asks whose account it would be:
    // refused by the policy before the broker reads any annotation.
    for path in [
        "/computeMetadata/v1/instance/service-accounts/default/email",
        &format!("/computeMetadata/v1/instance/service-accounts/{API_ACCOUNT}/identity?audience={AUDIENCE}"),
    ] {
        let (status, body) = curl_in(intruder, &format!("http://{endpoint}{path}"), None).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("may not use identity"), "{path}: {body}");
    }
    assert_eq!(
        cluster.service_account_calls(),
        0,
        "a denied pod made the broker read the API server"
    );

    // Two pods, two accounts, one audience: two tokens, each its own.
    for (pod, account) in [(api, API_ACCOUNT), (web, WEB_ACCOUNT)] {
        let got = google_auth_in(pod, &python, &endpoint, AUDIENCE).await;
        let token = served_token(&got.answer, &broker);
        let claims = support::verify(&emulator, &token, AUDIENCE).await;
        assert_eq!(claims["email"], account, "{pod_ip}", pod_ip = pod.pod_ip);
        // .../default/email answers the caller's own account.
        assert_eq!(got.answer["email"], account);
    }
    let log = broker.log();
    assert!(
        log.lines()
            .any(|l| l.contains("minted_as") && l.contains(WEB_ACCOUNT)),
        "the request line names the account minted as:\n{log}"
    );
    // The base's access token is one, whatever the accounts; two IAM
    // calls, one per account, each granted.
    let stats = emulator.stats();
    assert_eq!(stats.metadata_token, 1);
    assert_eq!(stats.iam.by_audience[AUDIENCE], 2);
    assert_eq!(stats.iam.succeeded, 2);

    // Annotated with an account the node may not impersonate: Google's
    // refusal, passed on as the credential's (502), naming the permission.
    let (status, body) = curl_in(ungranted, &identity_url(&endpoint, AUDIENCE), None).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("PERMISSION_DENIED") || body.contains("denied"),
        "{body}"
    );
    assert!(body.contains("getOpenIdToken"), "{body}");
    assert_eq!(
        emulator.stats().iam.failed,
        1,
        "the grant was checked upstream"
    );

    // No annotation at all: refused before anything is minted, naming the
    // annotation and the service account.
    let (status, body) = curl_in(bare, &identity_url(&endpoint, AUDIENCE), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("iam.gke.io/gcp-service-account") && body.contains("tools/default"),
        "{body}"
    );

    // The api pod's service account is re-annotated: once the annotation
    // cache (1 s here) has expired, its tokens are the new account's.
    cluster.annotate("payments", "api-sa", Some(WEB_ACCOUNT));
    let mut email = String::new();
    for _ in 0..100 {
        let got = google_auth_in(api, &python, &endpoint, "https://after.example.com").await;
        if let Some(token) = got.answer["token"].as_str() {
            broker.served.lock().unwrap().push(token.to_owned());
            email = support::verify(&emulator, token, "https://after.example.com").await["email"]
                .as_str()
                .unwrap()
                .to_owned();
            if email == WEB_ACCOUNT {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(email, WEB_ACCOUNT, "{}", broker.log());
}

/// An unmodified google-auth's Compute Engine credentials, told only where
/// the metadata server is: `refresh()` (which reads the account's info and
/// then asks `.../service-accounts/EMAIL/token`), printing JSON (`token`,
/// `email`, or `error`).
const ACCESS_CLIENT: &str = r#"
import json
import google.auth.transport.requests as requests
from google.auth import compute_engine
out = {}
try:
    credentials = compute_engine.Credentials()
    credentials.refresh(requests.Request())
    out["token"] = credentials.token
    out["email"] = credentials.service_account_email
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"#;

/// Runs [`ACCESS_CLIENT`] inside `pod`'s network namespace against
/// `endpoint`.
async fn google_auth_access_in(
    pod: &PodNetwork,
    python: &Path,
    endpoint: &str,
) -> serde_json::Value {
    let mut command = pod.command(python);
    command
        .arg("-c")
        .arg(ACCESS_CLIENT)
        .env("GCE_METADATA_HOST", endpoint)
        .env("GCE_METADATA_IP", endpoint);
    let (code, stdout, stderr) = run(command).await;
    assert_eq!(code, 0, "the client crashed:\n{stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

/// Point 4 for access tokens (what GKE Workload Identity is mostly used
/// for): through the metadata endpoint, an unmodified google-auth's
/// `compute_engine.Credentials().refresh()` in each pod gets an access
/// token of the account its service account's annotation names (the
/// emulator's tokeninfo says whose), both minted with the node's one base
/// token; a pod annotated with an account the node may not mint access
/// tokens for gets Google's refusal, naming the permission.
#[tokio::test(flavor = "multi_thread")]
async fn each_pod_gets_an_access_token_of_its_annotated_account() {
    let Some(AnnotatedPods {
        broker,
        cluster: _cluster,
        emulator,
        python,
        endpoint,
        pods,
    }) = AnnotatedPods::start(
        &[],
        &[
            (API_ACCOUNT, Permission::AccessToken),
            (WEB_ACCOUNT, Permission::AccessToken),
            // ID tokens of UNGRANTED, not its access tokens: the grants are apart.
            (UNGRANTED, Permission::OpenIdToken),
        ],
        &format!(
            "[[policy]]\nk8s_namespaces = [\"payments\", \"web\", \"batch\"]\n\
             identities = [\"pods\"]\naudiences = [\"{AUDIENCE}\"]\n\
             scopes = [\"https://www.googleapis.com/auth/cloud-platform\"]\n"
        ),
    )
    .await
    else {
        return;
    };
    let [api, web, ungranted] = &pods[..] else {
        unreachable!()
    };

    let mut tokens = Vec::new();
    for (pod, account) in [(api, API_ACCOUNT), (web, WEB_ACCOUNT)] {
        let got = google_auth_access_in(pod, &python, &endpoint).await;
        let token = served_token(&got, &broker);
        let info = broker.served_access_token_info(&emulator, &token).await;
        assert_eq!(info["email"], account, "{info}");
        assert_eq!(got["email"], account, "{got}");
        tokens.push(token);
    }
    assert_ne!(tokens[0], tokens[1], "two accounts, two tokens");
    let stats = emulator.stats();
    assert_eq!(stats.iam_access, 2, "one generateAccessToken per account");
    assert_eq!(stats.metadata_token, 1, "one base access token for both");
    let log = broker.log();
    assert!(
        log.lines()
            .any(|l| l.contains("/token") && l.contains("minted_as") && l.contains(API_ACCOUNT)),
        "the request line names the account minted as:\n{log}"
    );

    // Google's refusal for an account the node may not impersonate for
    // access tokens: 502, naming the permission, checked upstream.
    let url =
        format!("http://{endpoint}/computeMetadata/v1/instance/service-accounts/default/token");
    let (status, body) = curl_in(ungranted, &url, None).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(UNGRANTED) && body.contains("iam.serviceAccounts.getAccessToken"),
        "{body}"
    );
    assert_eq!(emulator.stats().iam_access, 3);
}

/// A pod floods the endpoint with connections: it keeps its share
/// (`max_connections_per_uid`, counted per source address for pods), its
/// next connection is closed at accept, and another pod is still served.
#[tokio::test(flavor = "multi_thread")]
async fn one_pod_cannot_take_every_endpoint_connection() {
    let Some(pods) = pod_networks(2) else { return };
    let [flood, other] = &pods[..] else {
        unreachable!()
    };
    let emulator = support::emulator().await;
    let cluster = Cluster::start().await;
    cluster.set_pods(vec![
        PodSpec::new("noisy", "flood-1", "flood-sa").ip(flood.pod_ip),
        PodSpec::new("payments", "api-1", "api-sa").ip(other.pod_ip),
    ]);
    let port = free_port_on(flood.host_ip);
    let endpoint = format!("{}:{port}", flood.host_ip);
    let policy = format!(
        "[[policy]]\nk8s_namespaces = [\"payments\", \"noisy\"]\nidentities = [\"node\"]\n\
         audiences = [\"{AUDIENCE}\"]\n"
    );
    let listen = endpoint.clone();
    let broker = Broker::start(
        |socket| {
            config_with(
                socket,
                &emulator,
                &cluster,
                &listen,
                "node",
                &policy,
                "max_connections = 8\nmax_connections_per_uid = 3\nheader_read_timeout = \"60s\"\n",
            )
        },
        "info",
    )
    .await;
    // The flooding pod opens 3 connections and holds them.
    let hold = format!(
        "import socket, sys, time\n\
         held = [socket.create_connection(('{}', {port}), timeout=5) for _ in range(3)]\n\
         print('ready', flush=True)\n\
         time.sleep(60)\n",
        flood.host_ip
    );
    let mut holder = flood.command(Path::new("python3"));
    holder
        .arg("-c")
        .arg(hold)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut holder = holder.spawn().unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(holder.stdout.take().unwrap()));
    let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the holder connects")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));
    // Its 4th is closed at accept; the other pod is served.
    let (status, body) = curl_in(flood, &identity_url(&endpoint, AUDIENCE), None).await;
    assert_eq!(
        status, 0,
        "a connection past the pod's share was served: {body}"
    );
    let (status, body) = curl_in(other, &identity_url(&endpoint, AUDIENCE), None).await;
    assert_eq!(status, 200, "{body}");
    broker.served.lock().unwrap().push(body);
    let log = broker.log();
    assert!(
        log.contains("connections refused: metadata_endpoint.max_connections_per_uid reached")
            && log.contains(&format!("pod address {}", flood.pod_ip)),
        "the refusal names the pod's address:\n{log}"
    );
    // Its connections closed, the pod is served again.
    holder.kill().await.unwrap();
    let mut served = 0;
    for _ in 0..50 {
        let (status, body) = curl_in(flood, &identity_url(&endpoint, AUDIENCE), None).await;
        if status == 200 {
            broker.served.lock().unwrap().push(body);
            served = status;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, 200, "{}", broker.log());
}
