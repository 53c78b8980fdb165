//! Issue 13: identities without keys of their own. A base identity (a key,
//! or the metadata server) impersonates service accounts through the
//! emulator's strict IAM Credentials API, over HTTP, from a real broker.

use std::path::Path;

use token_broker::emulator::{Emulator, Permission, DEFAULT_ACCOUNT_EMAIL};
use tonic::Code;

use crate::support::{self, Broker};

const TARGET: &str = "deploy@target-project.iam.gserviceaccount.com";
const HOP: &str = "hop@target-project.iam.gserviceaccount.com";
const BASE_KEY: &str = "base@base-project.iam.gserviceaccount.com";

/// Lets a test ask for many new audiences at once.
const WIDE_LIMITS: &str =
    "[limits]\nnew_audiences_per_minute = 100000\nnew_audience_burst = 100000\n";

fn impersonating(
    name: &str,
    base: &str,
    account: &str,
    emulator: &Emulator,
    extra: &str,
) -> String {
    format!(
        "[[identities]]\nname = \"{name}\"\nsource = \"impersonate\"\nbase = \"{base}\"\nservice_account = \"{account}\"\niam_endpoint = \"{}\"\n{extra}\n",
        emulator.base_url()
    )
}

fn config(socket: &Path, identities: &str) -> String {
    support::config_text(socket, &format!("{WIDE_LIMITS}\n{identities}"))
}

/// Key → impersonation: 100 cold audiences cost exactly one base access
/// token (the key's jwt-bearer grant with `scope`) and 100 generateIdToken
/// calls; every token verifies and names the impersonated account.
#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_cold_audiences_cost_one_base_token_and_a_hundred_iam_calls() {
    let emulator = support::emulator().await;
    let dir = support::workdir();
    let (key, _) = support::key_file(dir.path(), "base", BASE_KEY, &emulator, true);
    emulator.create_service_account(TARGET);
    emulator.grant(BASE_KEY, TARGET, Permission::OpenIdToken);
    let identities = format!(
        "{}{}",
        support::key_identity("base", &key),
        impersonating("deployer", "base", TARGET, &emulator, "")
    );
    let broker = std::sync::Arc::new(Broker::start(|s| config(s, &identities), "info").await);

    let tasks: Vec<_> = (0..100)
        .map(|n| {
            let broker = broker.clone();
            tokio::spawn(async move {
                let audience = format!("https://svc-{n}.example.com");
                let token = broker.get("deployer", &audience).await.expect("token");
                (audience, token.token)
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await.unwrap());
    }
    let stats = emulator.stats();
    assert_eq!(stats.token_access, 1, "one base access token for all");
    assert_eq!(stats.token.total, 1, "no ID token came from the key itself");
    assert_eq!(stats.iam.total, 100);
    assert_eq!(stats.iam.succeeded, 100);
    for (audience, token) in tokens.iter().take(5) {
        let claims = support::verify(&emulator, token, audience).await;
        assert_eq!(claims["email"], TARGET);
        assert_eq!(claims["email_verified"], true);
    }
    // Cached now: asking again costs nothing upstream.
    broker
        .get("deployer", "https://svc-7.example.com")
        .await
        .unwrap();
    assert_eq!(emulator.stats().iam.total, 100);
}

/// Metadata → impersonation through a delegate chain: granted hop by hop it
/// works; with one hop's grant missing IAM refuses, and the client sees
/// FAILED_PRECONDITION with Google's text naming the permission and the
/// broker's naming the account.
#[tokio::test(flavor = "multi_thread")]
async fn delegate_chains_need_every_hop_granted() {
    let emulator = support::emulator().await;
    emulator.create_service_account(HOP);
    emulator.create_service_account(TARGET);
    emulator.grant(DEFAULT_ACCOUNT_EMAIL, HOP, Permission::OpenIdToken);
    emulator.grant(HOP, TARGET, Permission::OpenIdToken);
    let identities = format!(
        "{}{}",
        support::metadata_identity("default", &emulator),
        impersonating(
            "deployer",
            "default",
            TARGET,
            &emulator,
            &format!("delegates = [\"{HOP}\"]\ninclude_email = false\n")
        )
    );
    let broker = Broker::start(|s| config(s, &identities), "info").await;
    let token = broker
        .get("deployer", "https://a.example.com")
        .await
        .unwrap();
    let claims = support::verify(&emulator, &token.token, "https://a.example.com").await;
    assert!(claims.get("email").is_none(), "include_email = false");
    assert_eq!(emulator.stats().metadata_token, 1);

    // Take away the second hop's grant: the whole chain is refused.
    emulator.revoke_grant(HOP, TARGET, Permission::OpenIdToken);
    let err = broker
        .get("deployer", "https://b.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let message = err.message();
    assert!(
        message.contains("Permission '")
            && message.contains("denied on resource")
            && message.contains("missing permission: iam.serviceAccounts.getOpenIdToken")
            && message.contains(TARGET)
            && message.contains("IAM Credentials"),
        "{message}"
    );
    // And without the first hop's grant too, whatever the second says.
    emulator.grant(HOP, TARGET, Permission::OpenIdToken);
    emulator.revoke_grant(DEFAULT_ACCOUNT_EMAIL, HOP, Permission::OpenIdToken);
    let err = broker
        .get("deployer", "https://c.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

/// Access tokens revoked mid-run (IAM answers 401 to them): the broker
/// drops the base token once and fetches one new one, however many
/// audiences were in flight.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_base_token_is_refetched_once_not_per_audience() {
    let emulator = support::emulator().await;
    emulator.create_service_account(TARGET);
    emulator.grant(DEFAULT_ACCOUNT_EMAIL, TARGET, Permission::OpenIdToken);
    let identities = format!(
        "{}{}",
        support::metadata_identity("default", &emulator),
        impersonating("deployer", "default", TARGET, &emulator, "")
    );
    let broker = std::sync::Arc::new(Broker::start(|s| config(s, &identities), "info").await);
    for n in 0..10 {
        broker
            .get("deployer", &format!("https://first-{n}.example.com"))
            .await
            .unwrap();
    }
    assert_eq!(emulator.stats().metadata_token, 1);

    emulator.revoke_access_tokens();
    let tasks: Vec<_> = (0..40)
        .map(|n| {
            let broker = broker.clone();
            tokio::spawn(async move {
                broker
                    .get("deployer", &format!("https://second-{n}.example.com"))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("refetched base token works");
    }
    assert_eq!(
        emulator.stats().metadata_token,
        2,
        "one refetch for forty audiences"
    );
    assert!(broker.log().contains("refused the bearer token"));
}

/// Chains of impersonation (an impersonated identity as a base) work end
/// to end, check-config prints each chain, and a cycle is refused.
#[tokio::test(flavor = "multi_thread")]
async fn chains_are_printed_and_cycles_refused() {
    let emulator = support::emulator().await;
    emulator.create_service_account(HOP);
    emulator.create_service_account(TARGET);
    emulator.grant(DEFAULT_ACCOUNT_EMAIL, HOP, Permission::AccessToken);
    emulator.grant(HOP, TARGET, Permission::OpenIdToken);
    let identities = format!(
        "{}{}{}",
        support::metadata_identity("default", &emulator),
        impersonating("hop", "default", HOP, &emulator, ""),
        impersonating("deployer", "hop", TARGET, &emulator, "")
    );
    let dir = support::workdir();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(&dir.path().join("s.sock"), &identities)).unwrap();
    let (code, out, err) = support::run_cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("deployer:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains(&format!(
            "impersonate {TARGET} via hop (impersonate {HOP} via default (metadata server"
        )) && line.contains(&emulator.base_url()),
        "{line}"
    );

    let broker = Broker::start(|s| config(s, &identities), "info").await;
    let token = broker
        .get("deployer", "https://a.example.com")
        .await
        .unwrap();
    let claims = support::verify(&emulator, &token.token, "https://a.example.com").await;
    assert_eq!(claims["email"], TARGET);
    let stats = emulator.stats();
    assert_eq!(
        (stats.metadata_token, stats.iam_access, stats.iam.total),
        (1, 1, 1)
    );

    let cycle = format!(
        "{}{}",
        impersonating("a", "b", HOP, &emulator, ""),
        impersonating("b", "a", TARGET, &emulator, "")
    );
    std::fs::write(&path, config(&dir.path().join("s.sock"), &cycle)).unwrap();
    let (code, _, err) = support::run_cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cycle") && err.contains("a -> b -> a"),
        "{err}"
    );
}

/// A reload that changes a link of a chain drops the tokens of everything
/// built on it, and keeps an unrelated identity's.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changing_a_link_drops_what_is_built_on_it() {
    let emulator = support::emulator().await;
    emulator.create_service_account(TARGET);
    emulator.create_service_account(HOP);
    emulator.grant(DEFAULT_ACCOUNT_EMAIL, TARGET, Permission::OpenIdToken);
    emulator.grant(DEFAULT_ACCOUNT_EMAIL, HOP, Permission::OpenIdToken);
    let dir = support::workdir();
    let (key, _) = support::key_file(dir.path(), "other", BASE_KEY, &emulator, true);
    let identities = |target: &str| {
        format!(
            "{}{}{}",
            support::metadata_identity("default", &emulator),
            impersonating("deployer", "default", target, &emulator, ""),
            support::key_identity("other", &key)
        )
    };
    let first = identities(TARGET);
    let broker = Broker::start(|s| config(s, &first), "info").await;
    broker
        .get("deployer", "https://a.example.com")
        .await
        .unwrap();
    broker.get("other", "https://a.example.com").await.unwrap();
    let before = emulator.stats();

    std::fs::write(
        broker.dir.path().join("config.toml"),
        config(&broker.socket, &identities(HOP)),
    )
    .unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    broker.wait_for_log_text("configuration reloaded", 1).await;
    let token = broker
        .get("deployer", "https://a.example.com")
        .await
        .unwrap();
    let claims = support::verify(&emulator, &token.token, "https://a.example.com").await;
    assert_eq!(claims["email"], HOP, "the changed link is in force");
    broker.get("other", "https://a.example.com").await.unwrap();
    let after = emulator.stats();
    assert_eq!(after.iam.total, before.iam.total + 1, "deployer refetched");
    assert_eq!(after.token.total, before.token.total, "other stayed cached");
}

/// Each upstream hop is counted under its own `source` label.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_label_each_hop() {
    let emulator = support::emulator().await;
    emulator.create_service_account(TARGET);
    emulator.grant(DEFAULT_ACCOUNT_EMAIL, TARGET, Permission::OpenIdToken);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let identities = format!(
        "{}{}[telemetry]\nlisten = \"127.0.0.1:{port}\"\n",
        support::metadata_identity("default", &emulator),
        impersonating("deployer", "default", TARGET, &emulator, "")
    );
    let broker = Broker::start(|s| config(s, &identities), "info").await;
    broker
        .get("deployer", "https://a.example.com")
        .await
        .unwrap();
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "token_broker_upstream_hops_total{identity=\"default\",source=\"metadata\",outcome=\"ok\"} 1",
        "token_broker_upstream_hops_total{identity=\"deployer\",source=\"iam\",outcome=\"ok\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from:\n{metrics}");
    }
}

/// An unmodified google-auth `impersonated_credentials.IDTokenCredentials`
/// (source: a service-account key; one delegate) against the emulator: the
/// strict IAM emulator accepts exactly what Google's library sends, and
/// its token verifies with the impersonated account as `email`. The only
/// thing the script changes is where IAM Credentials lives.
#[tokio::test(flavor = "multi_thread")]
async fn unmodified_google_auth_impersonated_id_token_credentials_work_against_the_emulator() {
    use crate::clients::{clean_command, examples, python_venv, run};
    let python = tokio::task::spawn_blocking(|| {
        python_venv(
            "google-auth",
            &examples().join("python/requirements-google-auth.txt"),
            "google.auth.impersonated_credentials, google.auth.transport.requests",
        )
    })
    .await
    .unwrap();
    let emulator = support::emulator().await;
    let dir = support::workdir();
    let (key, _) = support::key_file(dir.path(), "source", BASE_KEY, &emulator, true);
    emulator.create_service_account(HOP);
    emulator.create_service_account(TARGET);
    emulator.grant(BASE_KEY, HOP, Permission::OpenIdToken);
    emulator.grant(HOP, TARGET, Permission::OpenIdToken);
    let script = r#"
import sys
from google.auth import iam, impersonated_credentials
from google.auth.transport.requests import Request
from google.oauth2 import service_account

key_file, target, delegate, audience, iam_base = sys.argv[1:6]
iam._IAM_IDTOKEN_ENDPOINT = iam_base + "/v1/projects/-/serviceAccounts/{}:generateIdToken"
source = service_account.Credentials.from_service_account_file(
    key_file, scopes=["https://www.googleapis.com/auth/cloud-platform"])
target_credentials = impersonated_credentials.Credentials(
    source_credentials=source,
    target_principal=target,
    target_scopes=["https://www.googleapis.com/auth/cloud-platform"],
    delegates=["projects/-/serviceAccounts/" + delegate])
credentials = impersonated_credentials.IDTokenCredentials(
    target_credentials, target_audience=audience, include_email=True)
credentials.refresh(Request())
print(credentials.token)
"#;
    let audience = "https://impersonated-by-google-auth.example.com";
    let mut command = clean_command(&python);
    command
        .args(["-c", script])
        .arg(&key)
        .args([TARGET, HOP, audience])
        .arg(emulator.base_url());
    let (code, stdout, stderr) = run(command).await;
    assert_eq!(code, 0, "google-auth failed:\n{stderr}");
    let claims = support::verify(&emulator, stdout.trim(), audience).await;
    assert_eq!(claims["email"], TARGET);
    let stats = emulator.stats();
    assert_eq!(
        (stats.token_access, stats.iam.total, stats.iam.succeeded),
        (1, 1, 1)
    );

    // The same library, refused: Google's error body reaches it intact.
    emulator.revoke_grant(HOP, TARGET, Permission::OpenIdToken);
    let mut command = clean_command(&python);
    command
        .args(["-c", script])
        .arg(&key)
        .args([TARGET, HOP, audience])
        .arg(emulator.base_url());
    let (code, _, stderr) = run(command).await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("iam.serviceAccounts.getOpenIdToken")
            && stderr.contains("PERMISSION_DENIED"),
        "{stderr}"
    );
}

/// An `impersonated_service_account` file as gcloud writes it: user
/// credentials (refresh token) impersonating an account through a delegate.
fn impersonated_file(
    dir: &Path,
    emulator: &Emulator,
    source: serde_json::Value,
) -> std::path::PathBuf {
    let path = dir.join("application_default_credentials.json");
    let json = serde_json::json!({
        "type": "impersonated_service_account",
        "service_account_impersonation_url": format!(
            "{}/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken",
            emulator.base_url()
        ),
        "delegates": [format!("projects/-/serviceAccounts/{HOP}")],
        "source_credentials": source,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    support::set_mode(&path, 0o600);
    path
}

async fn adc_broker(path: &Path) -> Broker {
    let dir = support::workdir();
    let socket = dir.path().join("broker.sock");
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config(&socket, "")).unwrap();
    let broker = Broker::spawn_with_env(
        dir,
        socket,
        &["serve", "--config", config_path.to_str().unwrap()],
        "info",
        &[("GOOGLE_APPLICATION_CREDENTIALS", path.to_str().unwrap())],
    );
    broker.wait_ready().await;
    broker
}

/// GOOGLE_APPLICATION_CREDENTIALS naming an impersonated_service_account
/// file (user credentials as the source, as `gcloud auth
/// application-default login --impersonate-service-account` writes it)
/// works like a key file does: the `default` identity mints ID tokens for
/// the impersonated account, through the file's delegate.
#[tokio::test(flavor = "multi_thread")]
async fn adc_naming_an_impersonated_service_account_file_works() {
    const USER: &str = "someone@example.com";
    let emulator = support::emulator().await;
    emulator.create_service_account(HOP);
    emulator.create_service_account(TARGET);
    emulator.grant(USER, HOP, Permission::OpenIdToken);
    emulator.grant(HOP, TARGET, Permission::OpenIdToken);
    let refresh_token = emulator.register_authorized_user(USER, "client-1.apps", "client-secret-1");
    let dir = support::workdir();
    let path = impersonated_file(
        dir.path(),
        &emulator,
        serde_json::json!({
            "type": "authorized_user",
            "client_id": "client-1.apps",
            "client_secret": "client-secret-1",
            "refresh_token": refresh_token,
            "token_uri": emulator.token_uri(),
        }),
    );
    let broker = adc_broker(&path).await;
    let token = broker
        .get("default", "https://adc.example.com")
        .await
        .unwrap();
    let claims = support::verify(&emulator, &token.token, "https://adc.example.com").await;
    assert_eq!(claims["email"], TARGET);
    assert_eq!(emulator.stats().token_access, 1, "one refresh-token grant");
    assert!(
        !broker.log().contains(&refresh_token) && !broker.log().contains("client-secret-1"),
        "user secrets stay out of the log"
    );

    // The same file, readable by others, is refused like a key file.
    support::set_mode(&path, 0o644);
    let (code, _, err) = {
        let dir = support::workdir();
        let config_path = dir.path().join("config.toml");
        std::fs::write(
            &config_path,
            config(
                &dir.path().join("s.sock"),
                &format!(
                    "[[identities]]\nname = \"me\"\nsource = \"impersonate\"\ncredential_file = \"{}\"\n",
                    path.display()
                ),
            ),
        )
        .unwrap();
        support::run_cli(&["check-config", "--config", config_path.to_str().unwrap()])
    };
    assert_ne!(code, 0);
    assert!(err.contains("readable by group or others"), "{err}");
}

/// The same with a service-account key as the source credential, and as a
/// configured identity (`source = "impersonate"`, `credential_file`).
#[tokio::test(flavor = "multi_thread")]
async fn an_impersonated_service_account_file_with_a_key_source_works() {
    let emulator = support::emulator().await;
    let dir = support::workdir();
    let (key, _) = support::key_file(dir.path(), "source-key", BASE_KEY, &emulator, true);
    emulator.create_service_account(HOP);
    emulator.create_service_account(TARGET);
    emulator.grant(BASE_KEY, HOP, Permission::OpenIdToken);
    emulator.grant(HOP, TARGET, Permission::OpenIdToken);
    let key_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&key).unwrap()).unwrap();
    let path = impersonated_file(dir.path(), &emulator, key_json);
    let identities = format!(
        "[[identities]]\nname = \"me\"\nsource = \"impersonate\"\ncredential_file = \"{}\"\n",
        path.display()
    );
    let broker = Broker::start(|s| config(s, &identities), "info").await;
    let token = broker.get("me", "https://file.example.com").await.unwrap();
    let claims = support::verify(&emulator, &token.token, "https://file.example.com").await;
    assert_eq!(claims["email"], TARGET);
    for line in support::pem_lines(&key) {
        assert!(!broker.log().contains(&line), "key material in the log");
    }
}

/// 5xx and 429 from IAM are transient: UNAVAILABLE naming IAM, one call
/// (the cache is the one retry layer and backs off); 404 (no such account)
/// is permanent: FAILED_PRECONDITION naming the account.
#[tokio::test(flavor = "multi_thread")]
async fn iam_5xx_is_transient_and_404_is_permanent() {
    let emulator = support::emulator().await;
    emulator.create_service_account(TARGET);
    emulator.grant(DEFAULT_ACCOUNT_EMAIL, TARGET, Permission::OpenIdToken);
    let identities = format!(
        "{}{}{}",
        support::metadata_identity("default", &emulator),
        impersonating("deployer", "default", TARGET, &emulator, ""),
        impersonating(
            "ghost",
            "default",
            "ghost@target-project.iam.gserviceaccount.com",
            &emulator,
            ""
        )
    );
    let broker = Broker::start(|s| config(s, &identities), "info").await;
    emulator.set_faults(token_broker::emulator::Faults {
        status: Some(503),
        endpoint: Some("iam".into()),
        fail_next: Some(1),
        ..Default::default()
    });
    let err = broker
        .get("deployer", "https://a.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("IAM Credentials at") && err.message().contains("503"),
        "{}",
        err.message()
    );
    assert_eq!(
        emulator.stats().iam.total,
        1,
        "one call: the cache retries, later"
    );
    let err = broker
        .get("ghost", "https://a.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("ghost@target-project.iam.gserviceaccount.com"),
        "{}",
        err.message()
    );
    assert_eq!(emulator.stats().iam.total, 2);
}

/// A reload where only the base changes (its key rotated at the same path):
/// the impersonating identity built on it drops its tokens too, an
/// unrelated identity keeps its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changing_the_base_drops_the_identities_built_on_it() {
    let emulator = support::emulator().await;
    emulator.create_service_account(TARGET);
    emulator.grant(BASE_KEY, TARGET, Permission::OpenIdToken);
    let dir = support::workdir();
    let (key, _) = support::key_file(dir.path(), "ci", BASE_KEY, &emulator, true);
    let identities = format!(
        "{}{}{}",
        support::key_identity("ci", &key),
        impersonating("deployer", "ci", TARGET, &emulator, ""),
        support::metadata_identity("other", &emulator)
    );
    let broker = Broker::start(|s| config(s, &identities), "info").await;
    broker
        .get("deployer", "https://a.example.com")
        .await
        .unwrap();
    broker.get("other", "https://a.example.com").await.unwrap();
    let before = emulator.stats();

    // Same path, same account, new key: only the base's fingerprint changes.
    support::key_file(dir.path(), "ci", BASE_KEY, &emulator, true);
    std::fs::write(
        broker.dir.path().join("config.toml"),
        config(&broker.socket, &identities),
    )
    .unwrap();
    support::signal(&broker.child, nix::sys::signal::Signal::SIGHUP);
    broker.wait_for_log_text("configuration reloaded", 1).await;
    assert!(
        broker
            .log()
            .contains("added_or_changed=[\"ci\", \"deployer\"]"),
        "{}",
        broker.log()
    );
    broker
        .get("deployer", "https://a.example.com")
        .await
        .unwrap();
    broker.get("other", "https://a.example.com").await.unwrap();
    let after = emulator.stats();
    assert_eq!(
        after.iam.total,
        before.iam.total + 1,
        "built on the changed base: refetched"
    );
    assert_eq!(
        after.token_access,
        before.token_access + 1,
        "with the new key's access token"
    );
    assert_eq!(
        after.identity.total, before.identity.total,
        "unrelated: still cached"
    );
}
