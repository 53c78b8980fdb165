//! Issue 13: workload identity federation. An external subject token (from
//! a file, a URL or an executable) is exchanged at the emulator's STS,
//! which verifies it against the provider's JWKS, and the federated token
//! asks IAM Credentials for an ID token of the account in the credential
//! file; a real broker, over HTTP.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use token_broker::emulator::{Emulator, Permission, SubjectTokenIssuer, WorkloadProvider};
use tonic::Code;

use crate::support::{self, Broker};

const POOL: &str = "projects/123456/locations/global/workloadIdentityPools/pool";
const ACCOUNT: &str = "federated@target-project.iam.gserviceaccount.com";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const ISSUER: &str = "https://issuer.example.com";

/// The emulator with one OIDC provider, and the issuer its tokens come from.
struct Federation {
    emulator: Emulator,
    issuer: Arc<SubjectTokenIssuer>,
    provider: WorkloadProvider,
    dir: tempfile::TempDir,
}

impl Federation {
    async fn start() -> Self {
        Self::start_with(&format!("//iam.googleapis.com/{POOL}/providers/oidc")).await
    }

    async fn start_with(audience: &str) -> Self {
        let emulator = support::emulator().await;
        let issuer = tokio::task::spawn_blocking(|| SubjectTokenIssuer::generate(ISSUER))
            .await
            .unwrap()
            .unwrap();
        let provider = issuer.provider(audience);
        emulator.add_workload_provider(provider.clone());
        emulator.create_service_account(ACCOUNT);
        Federation {
            emulator,
            issuer: Arc::new(issuer),
            provider,
            dir: support::workdir(),
        }
    }

    /// A subject token for `subject`, valid for an hour, addressed as
    /// Google's default provider audience.
    fn subject_token(&self, subject: &str) -> String {
        let aud = format!(
            "https://iam.googleapis.com/{}",
            self.provider
                .audience
                .trim_start_matches("//iam.googleapis.com/")
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.issuer.sign(subject, &aud, now, 3600).unwrap()
    }

    fn allow(&self, subject: &str) {
        self.emulator.grant(
            &self.provider.principal(subject),
            ACCOUNT,
            Permission::OpenIdToken,
        );
    }

    /// A credential file reading `subject`'s token from a text file, with
    /// `extra` fields, for a subject allowed both ID tokens and access
    /// tokens of [`ACCOUNT`].
    fn access_token_credential_file(&self, subject: &str, extra: serde_json::Value) -> PathBuf {
        self.allow(subject);
        self.emulator.grant(
            &self.provider.principal(subject),
            ACCOUNT,
            Permission::AccessToken,
        );
        let token_file = self.dir.path().join("subject.jwt");
        std::fs::write(&token_file, self.subject_token(subject)).unwrap();
        self.credential_file(
            serde_json::json!({ "file": token_file, "format": { "type": "text" } }),
            extra,
        )
    }

    /// A credential file as `gcloud iam workload-identity-pools
    /// create-cred-config` writes it, with `credential_source` and extra fields.
    fn credential_file(&self, source: serde_json::Value, extra: serde_json::Value) -> PathBuf {
        let mut json = serde_json::json!({
            "universe_domain": "googleapis.com",
            "type": "external_account",
            "audience": self.provider.audience,
            "subject_token_type": JWT,
            "token_url": self.emulator.sts_token_url(),
            "service_account_impersonation_url": format!(
                "{}/v1/projects/-/serviceAccounts/{ACCOUNT}:generateAccessToken",
                self.emulator.base_url()
            ),
            "credential_source": source,
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                json.as_object_mut().unwrap().remove(k);
            } else {
                json[k] = v.clone();
            }
        }
        let path = self.dir.path().join("wif.json");
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        path
    }
}

fn identity(credential_file: &Path) -> String {
    format!(
        "[[identities]]\nname = \"federated\"\nsource = \"external_account\"\ncredential_file = \"{}\"\n",
        credential_file.display()
    )
}

fn check_config(identities: &str) -> (i32, String, String) {
    let dir = support::workdir();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        support::config_text(&dir.path().join("s.sock"), identities),
    )
    .unwrap();
    support::run_cli(&["check-config", "--config", path.to_str().unwrap()])
}

/// File subject token → STS → generateIdToken: the token verifies with the
/// impersonated account as `email`; three audiences cost one exchange.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_subject_token_becomes_an_id_token_for_the_account() {
    let f = Federation::start().await;
    f.allow("workload-a");
    let token_file = f.dir.path().join("subject.jwt");
    std::fs::write(&token_file, f.subject_token("workload-a")).unwrap();
    let creds = f.credential_file(
        serde_json::json!({ "file": token_file, "format": { "type": "text" } }),
        serde_json::json!({}),
    );
    let identities = identity(&creds);
    let (code, out, err) = check_config(&identities);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("federated: external_account //iam.googleapis.com/projects/123456")
            && out.contains(&format!("impersonating {ACCOUNT}")),
        "{out}"
    );

    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    for n in 0..3 {
        let audience = format!("https://svc-{n}.example.com");
        let token = broker.get("federated", &audience).await.unwrap();
        let claims = support::verify(&f.emulator, &token.token, &audience).await;
        assert_eq!(claims["email"], ACCOUNT);
    }
    let stats = f.emulator.stats();
    assert_eq!((stats.sts.total, stats.sts.succeeded), (1, 1));
    assert_eq!(stats.iam.succeeded, 3);
    // Neither the subject token nor the federated token reached the log.
    let subject = std::fs::read_to_string(&token_file).unwrap();
    let mut secrets = f.emulator.issued_access_tokens();
    secrets.push(subject);
    support::assert_no_secrets(
        &broker.log(),
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        stats.iam_access, 0,
        "the federated token asks for the ID token itself"
    );
}

/// The subject-token file rotates: the next exchange reads the new one.
/// The old subject loses its grant, so only the new token can work.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_subject_token_file_is_used_at_the_next_exchange() {
    let f = Federation::start().await;
    f.allow("before-rotation");
    let token_file = f.dir.path().join("subject.jwt");
    std::fs::write(&token_file, f.subject_token("before-rotation")).unwrap();
    let creds = f.credential_file(
        serde_json::json!({ "file": token_file }),
        serde_json::json!({}),
    );
    let identities = identity(&creds);
    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    broker
        .get("federated", "https://a.example.com")
        .await
        .unwrap();

    // Rotate atomically, as the kubelet does, and move the grant with it.
    let next = f.dir.path().join("subject.jwt.new");
    std::fs::write(&next, f.subject_token("after-rotation")).unwrap();
    std::fs::rename(&next, &token_file).unwrap();
    f.emulator.grant(
        &f.provider.principal("after-rotation"),
        ACCOUNT,
        Permission::OpenIdToken,
    );
    f.emulator.revoke_grant(
        &f.provider.principal("before-rotation"),
        ACCOUNT,
        Permission::OpenIdToken,
    );
    // The federated token is revoked: the next request needs an exchange.
    f.emulator.revoke_access_tokens();
    let token = broker
        .get("federated", "https://b.example.com")
        .await
        .unwrap();
    support::verify(&f.emulator, &token.token, "https://b.example.com").await;
    assert_eq!(f.emulator.stats().sts.succeeded, 2);

    // An expired token in the file is refused by STS, and the error says so.
    let issuer = f.issuer.clone();
    let aud = format!("https://iam.googleapis.com/{POOL}/providers/oidc");
    std::fs::write(
        &token_file,
        issuer.sign("after-rotation", &aud, 1_000_000, 60).unwrap(),
    )
    .unwrap();
    f.emulator.revoke_access_tokens();
    let err = broker
        .get("federated", "https://c.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("STS at") && err.message().contains("invalid_grant"),
        "{}",
        err.message()
    );
}

/// URL subject token with headers and the json format: the broker sends the
/// headers and reads the named field, at every exchange.
#[tokio::test(flavor = "multi_thread")]
async fn a_url_subject_token_is_fetched_with_its_headers() {
    let f = Federation::start().await;
    f.allow("from-url");
    let token = f.subject_token("from-url");
    let served = Arc::new(AtomicU32::new(0));
    let app = {
        let served = served.clone();
        axum::Router::new().route(
            "/token",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let served = served.clone();
                let token = token.clone();
                async move {
                    if headers.get("metadata").map(|v| v.as_bytes()) != Some(b"True") {
                        return (
                            axum::http::StatusCode::BAD_REQUEST,
                            "no Metadata header".to_owned(),
                        );
                    }
                    served.fetch_add(1, Ordering::SeqCst);
                    (
                        axum::http::StatusCode::OK,
                        serde_json::json!({ "access_token": token, "expires_on": "0" }).to_string(),
                    )
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let creds = f.credential_file(
        serde_json::json!({
            "url": format!("http://{addr}/token"),
            "headers": { "Metadata": "True" },
            "format": { "type": "json", "subject_token_field_name": "access_token" },
        }),
        serde_json::json!({}),
    );
    let identities = identity(&creds);
    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    let token = broker
        .get("federated", "https://a.example.com")
        .await
        .unwrap();
    let claims = support::verify(&f.emulator, &token.token, "https://a.example.com").await;
    assert_eq!(claims["email"], ACCOUNT);
    assert_eq!(served.load(Ordering::SeqCst), 1);
    f.emulator.revoke_access_tokens();
    broker
        .get("federated", "https://b.example.com")
        .await
        .unwrap();
    assert_eq!(
        served.load(Ordering::SeqCst),
        2,
        "fetched again for the new exchange"
    );
}

/// A broker serving `identities` with executable subject-token sources
/// allowed (`GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1`, as google-auth's
/// gate), ready.
async fn broker_allowing_executables(identities: &str) -> Broker {
    let dir = support::workdir();
    let socket = dir.path().join("broker.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, support::config_text(&socket, identities)).unwrap();
    let broker = Broker::spawn_with_env(
        dir,
        socket,
        &["serve", "--config", config.to_str().unwrap()],
        "info",
        &[("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES", "1")],
    );
    broker.wait_ready().await;
    broker
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    support::set_mode(path, 0o755);
}

fn executable_response(token: &str, expires: u64) -> String {
    serde_json::json!({
        "version": 1,
        "success": true,
        "token_type": JWT,
        "id_token": token,
        "expiration_time": expires,
    })
    .to_string()
}

/// Executable subject token, with the gate open: the command gets Google's
/// environment variables and its answer is exchanged; a still-valid
/// response in `output_file` is used without running it.
#[tokio::test(flavor = "multi_thread")]
async fn an_executable_subject_token_works_behind_the_gate() {
    let f = Federation::start().await;
    f.allow("from-exe");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let response = f.dir.path().join("response.json");
    std::fs::write(
        &response,
        executable_response(&f.subject_token("from-exe"), now + 3600),
    )
    .unwrap();
    let runs = f.dir.path().join("runs");
    let script = f.dir.path().join("token-helper.sh");
    write_script(
        &script,
        &format!(
            "echo run >> {runs}\n[ \"$GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE\" = \"{aud}\" ] || {{ echo wrong audience; exit 3; }}\n[ \"$GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL\" = \"{ACCOUNT}\" ] || exit 4\n[ \"$GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE\" = 0 ] || exit 5\ncat {response}",
            runs = runs.display(),
            aud = f.provider.audience,
            response = response.display()
        ),
    );
    let creds = f.credential_file(
        serde_json::json!({ "executable": { "command": format!("{} --flag", script.display()), "timeout_millis": 10000 } }),
        serde_json::json!({}),
    );
    let identities = identity(&creds);
    let broker = broker_allowing_executables(&identities).await;
    let token = broker
        .get("federated", "https://a.example.com")
        .await
        .unwrap();
    let claims = support::verify(&f.emulator, &token.token, "https://a.example.com").await;
    assert_eq!(claims["email"], ACCOUNT);
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1);
    drop(broker);

    // With an output file holding a valid response, the command is not run
    // (it would fail now); an expired one makes it run again.
    let cached = f.dir.path().join("cached.json");
    std::fs::write(
        &cached,
        executable_response(&f.subject_token("from-exe"), now + 3600),
    )
    .unwrap();
    write_script(&script, &format!("echo run >> {}\nexit 9", runs.display()));
    let creds = f.credential_file(
        serde_json::json!({ "executable": { "command": script, "output_file": cached } }),
        serde_json::json!({}),
    );
    let identities = identity(&creds);
    let broker = broker_allowing_executables(&identities).await;
    broker
        .get("federated", "https://b.example.com")
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        1,
        "served from output_file"
    );
    std::fs::write(
        &cached,
        executable_response(&f.subject_token("from-exe"), now - 10),
    )
    .unwrap();
    f.emulator.revoke_access_tokens();
    let err = broker
        .get("federated", "https://c.example.com")
        .await
        .unwrap_err();
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        2,
        "expired: run again"
    );
    assert!(
        err.message().contains("non-zero return code 9"),
        "{}",
        err.message()
    );
}

/// An executable that hangs is killed at `timeout_millis` (5 s here, the
/// least Google allows), and the error says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_executable_is_killed_at_its_timeout() {
    let f = Federation::start().await;
    let script = f.dir.path().join("hang.sh");
    write_script(&script, "exec sleep 60");
    let creds = f.credential_file(
        serde_json::json!({ "executable": { "command": script, "timeout_millis": 5000 } }),
        serde_json::json!({}),
    );
    let identities = identity(&creds);
    let broker = broker_allowing_executables(&identities).await;
    let started = std::time::Instant::now();
    let err = broker
        .get("federated", "https://a.example.com")
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        err.message().contains("did not finish within 5s"),
        "{}",
        err.message()
    );
    // Generous bounds: killed at 5 s, not left to run its 60.
    assert!(
        took >= std::time::Duration::from_secs(5) && took < std::time::Duration::from_secs(30),
        "{took:?}"
    );
    assert_eq!(f.emulator.stats().sts.total, 0, "nothing to exchange");
}

/// Without GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1 an executable source
/// is refused before anything runs, naming the variable.
#[tokio::test(flavor = "multi_thread")]
async fn the_executable_source_is_refused_without_the_gate() {
    let f = Federation::start().await;
    let ran = f.dir.path().join("ran");
    let script = f.dir.path().join("helper.sh");
    write_script(&script, &format!("touch {}", ran.display()));
    let creds = f.credential_file(
        serde_json::json!({ "executable": { "command": script } }),
        serde_json::json!({}),
    );
    let (code, _, err) = check_config(&identity(&creds));
    assert_ne!(code, 0);
    assert!(
        err.contains("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1")
            && err.contains("credential_file"),
        "{err}"
    );
    let dir = support::workdir();
    let socket = dir.path().join("broker.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, support::config_text(&socket, &identity(&creds))).unwrap();
    let mut broker = Broker::spawn(
        dir,
        socket,
        &["serve", "--config", config.to_str().unwrap()],
        "info",
    );
    let status = broker.wait_exit();
    assert!(!status.success());
    assert!(broker
        .log()
        .contains("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES"));
    assert!(!ran.exists(), "the command never ran");
}

/// What check-config says about files that cannot give ID tokens, or ask
/// for what the broker does not do.
#[tokio::test(flavor = "multi_thread")]
async fn check_config_explains_unusable_credential_files() {
    let f = Federation::start().await;
    let token_file = f.dir.path().join("subject.jwt");
    std::fs::write(&token_file, "x").unwrap();
    let source = serde_json::json!({ "file": token_file });
    let cases = [
        (
            serde_json::json!({ "service_account_impersonation_url": null }),
            "ID token needs an account to impersonate",
        ),
        (
            serde_json::json!({ "workforce_pool_user_project": "123" }),
            "not a workforce pool",
        ),
        (
            serde_json::json!({ "universe_domain": "example-universe.com" }),
            "only in googleapis.com",
        ),
        (
            serde_json::json!({ "type": "service_account" }),
            "needs \"external_account\"",
        ),
        (
            serde_json::json!({ "token_url": "http://sts.example.com/v1/token" }),
            "must be an https URL",
        ),
        (
            serde_json::json!({ "credential_source": { "environment_id": "aws1" } }),
            "regional_cred_verification_url is missing",
        ),
        (
            serde_json::json!({ "credential_source": { "environment_id": "aws2" } }),
            "aws version \"2\" is not supported",
        ),
        (
            serde_json::json!({ "service_account_impersonation": { "token_lifetime_seconds": 0 } }),
            "`service_account_impersonation.token_lifetime_seconds` must be a whole number of seconds from 1 to 43200",
        ),
        (
            serde_json::json!({ "service_account_impersonation": { "token_lifetime_seconds": "1h" } }),
            "`service_account_impersonation.token_lifetime_seconds` must be",
        ),
        (
            serde_json::json!({ "service_account_impersonation": 3600 }),
            "`service_account_impersonation` is not an object",
        ),
    ];
    for (extra, expected) in cases {
        let creds = f.credential_file(source.clone(), extra.clone());
        let (code, _, err) = check_config(&identity(&creds));
        assert_ne!(code, 0, "{extra}");
        assert!(err.contains(expected), "{extra}: {err}");
    }
}

/// Workforce pools: `workforce_pool_user_project` is sent as STS's
/// `options.userProject` (the emulator, like Google, requires it).
#[tokio::test(flavor = "multi_thread")]
async fn workforce_pool_user_project_is_sent() {
    let f = Federation::start_with(
        "//iam.googleapis.com/locations/global/workforcePools/wf/providers/p",
    )
    .await;
    f.allow("user-1");
    let token_file = f.dir.path().join("subject.jwt");
    std::fs::write(&token_file, f.subject_token("user-1")).unwrap();
    let without = f.credential_file(
        serde_json::json!({ "file": token_file }),
        serde_json::json!({}),
    );
    let identities = identity(&without);
    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    let err = broker
        .get("federated", "https://a.example.com")
        .await
        .unwrap_err();
    assert!(err.message().contains("user project"), "{}", err.message());
    drop(broker);

    let with = f.credential_file(
        serde_json::json!({ "file": token_file }),
        serde_json::json!({ "workforce_pool_user_project": "project-123" }),
    );
    let identities = identity(&with);
    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    let token = broker
        .get("federated", "https://a.example.com")
        .await
        .unwrap();
    support::verify(&f.emulator, &token.token, "https://a.example.com").await;
}

/// GOOGLE_APPLICATION_CREDENTIALS naming an external_account file, with no
/// identities configured: the `default` identity federates.
#[tokio::test(flavor = "multi_thread")]
async fn adc_naming_an_external_account_file_works() {
    let f = Federation::start().await;
    f.allow("adc-workload");
    let token_file = f.dir.path().join("subject.jwt");
    std::fs::write(&token_file, f.subject_token("adc-workload")).unwrap();
    let creds = f.credential_file(
        serde_json::json!({ "file": token_file }),
        serde_json::json!({}),
    );
    let dir = support::workdir();
    let socket = dir.path().join("broker.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, support::config_text(&socket, "")).unwrap();
    let broker = Broker::spawn_with_env(
        dir,
        socket,
        &["serve", "--config", config.to_str().unwrap()],
        "info",
        &[("GOOGLE_APPLICATION_CREDENTIALS", creds.to_str().unwrap())],
    );
    broker.wait_ready().await;
    let token = broker
        .get("default", "https://adc.example.com")
        .await
        .unwrap();
    let claims = support::verify(&f.emulator, &token.token, "https://adc.example.com").await;
    assert_eq!(claims["email"], ACCOUNT);
    assert_eq!(f.emulator.stats().sts.succeeded, 1);
}

/// AWS (`environment_id = "aws1"`): IMDSv2 session, region and role
/// credentials from the emulated instance metadata service, a SigV4-signed
/// GetCallerIdentity as the subject token (the emulated STS recomputes the
/// signature with the role's secret), then the ID token. The serialized
/// subject token is byte-for-byte what an unmodified google-auth produces
/// for the same credentials and time.
#[tokio::test(flavor = "multi_thread")]
async fn aws_subject_tokens_are_signed_as_google_auth_signs_them() {
    use crate::clients::{clean_command, examples, python_venv, run};
    let emulator = support::emulator().await;
    let audience = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/aws-pool/providers/aws";
    let provider = WorkloadProvider::aws(audience);
    emulator.add_workload_provider(provider.clone());
    emulator.create_service_account(ACCOUNT);
    emulator.grant(
        &provider.principal(&emulator.aws_role_arn()),
        ACCOUNT,
        Permission::OpenIdToken,
    );
    let dir = support::workdir();
    let base = emulator.base_url();
    let creds = dir.path().join("aws.json");
    std::fs::write(
        &creds,
        serde_json::json!({
            "type": "external_account",
            "audience": audience,
            "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
            "token_url": emulator.sts_token_url(),
            "service_account_impersonation_url": format!(
                "{base}/v1/projects/-/serviceAccounts/{ACCOUNT}:generateAccessToken"
            ),
            "credential_source": {
                "environment_id": "aws1",
                "region_url": format!("{base}/latest/meta-data/placement/availability-zone"),
                "url": format!("{base}/latest/meta-data/iam/security-credentials"),
                "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
                "imdsv2_session_token_url": format!("{base}/latest/api/token"),
            },
        })
        .to_string(),
    )
    .unwrap();
    let identities = identity(&creds);
    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    let token = broker
        .get("federated", "https://aws.example.com")
        .await
        .unwrap();
    let claims = support::verify(&emulator, &token.token, "https://aws.example.com").await;
    assert_eq!(claims["email"], ACCOUNT);
    let stats = emulator.stats();
    assert_eq!(stats.sts.succeeded, 1);
    assert_eq!(
        stats.aws_metadata, 4,
        "IMDSv2 session, zone, role name, role credentials"
    );
    let (_, secret, session_token) = emulator.aws_credentials();
    assert!(!broker.log().contains(&secret) && !broker.log().contains(&session_token));

    // google-auth, given the same credentials, region and time, serializes
    // the very same subject token.
    let ours = emulator
        .last_aws_subject_token()
        .expect("STS saw a subject token");
    let decoded: serde_json::Value = serde_json::from_str(
        &url::form_urlencoded::parse(format!("t={ours}").as_bytes())
            .next()
            .unwrap()
            .1,
    )
    .unwrap();
    let amz_date = decoded["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["key"] == "x-amz-date")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let python = tokio::task::spawn_blocking(|| {
        python_venv(
            "google-auth",
            &examples().join("python/requirements-google-auth.txt"),
            "google.auth.aws",
        )
    })
    .await
    .unwrap();
    let script = r#"
import datetime, sys
from google.auth import aws

audience, key_id, secret, token, amz_date = sys.argv[1:6]
fixed = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
aws._helpers.utcnow = lambda: fixed

class Supplier(aws.AwsSecurityCredentialsSupplier):
    def get_aws_security_credentials(self, context, request):
        return aws.AwsSecurityCredentials(key_id, secret, token)
    def get_aws_region(self, context, request):
        return "us-east-2"

credentials = aws.Credentials(
    audience=audience,
    subject_token_type="urn:ietf:params:aws:token-type:aws4_request",
    aws_security_credentials_supplier=Supplier(),
)
print(credentials.retrieve_subject_token(None))
"#;
    let (key_id, secret, session_token) = emulator.aws_credentials();
    let mut command = clean_command(&python);
    command.args([
        "-c",
        script,
        audience,
        &key_id,
        &secret,
        &session_token,
        &amz_date,
    ]);
    let (code, stdout, stderr) = run(command).await;
    assert_eq!(code, 0, "google-auth failed:\n{stderr}");
    assert_eq!(
        stdout.trim(),
        ours,
        "the broker's subject token differs from google-auth's"
    );
}

/// AWS credentials and region from the environment: no metadata calls. A
/// wrong secret is caught by the signature check, and the error says so.
#[tokio::test(flavor = "multi_thread")]
async fn aws_credentials_from_the_environment_and_a_bad_signature() {
    let emulator = support::emulator().await;
    let audience = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/aws-pool/providers/aws";
    let provider = WorkloadProvider::aws(audience);
    emulator.add_workload_provider(provider.clone());
    emulator.create_service_account(ACCOUNT);
    emulator.grant(
        &provider.principal(&emulator.aws_role_arn()),
        ACCOUNT,
        Permission::OpenIdToken,
    );
    let dir = support::workdir();
    let creds = dir.path().join("aws.json");
    std::fs::write(
        &creds,
        serde_json::json!({
            "type": "external_account",
            "audience": audience,
            "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
            "token_url": emulator.sts_token_url(),
            "service_account_impersonation_url": format!(
                "{}/v1/projects/-/serviceAccounts/{ACCOUNT}:generateAccessToken",
                emulator.base_url()
            ),
            "credential_source": {
                "environment_id": "aws1",
                "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
            },
        })
        .to_string(),
    )
    .unwrap();
    let (key_id, secret, session_token) = emulator.aws_credentials();
    let start = |secret: String| {
        let dir = support::workdir();
        let socket = dir.path().join("broker.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, support::config_text(&socket, &identity(&creds))).unwrap();
        let env = [
            ("AWS_REGION", "us-east-2".to_owned()),
            ("AWS_ACCESS_KEY_ID", key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_SESSION_TOKEN", session_token.clone()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Broker::spawn_with_env(
            dir,
            socket,
            &["serve", "--config", config.to_str().unwrap()],
            "info",
            &env,
        )
    };
    let broker = start(secret.clone());
    broker.wait_ready().await;
    let token = broker
        .get("federated", "https://aws.example.com")
        .await
        .unwrap();
    support::verify(&emulator, &token.token, "https://aws.example.com").await;
    assert_eq!(emulator.stats().aws_metadata, 0);
    drop(broker);

    let broker = start(format!("{secret}x"));
    broker.wait_ready().await;
    let err = broker
        .get("federated", "https://aws.example.com")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("signature we calculated does not match"),
        "{}",
        err.message()
    );
}

/// An unmodified google-auth `identity_pool.Credentials`, given the same
/// kind of credential file, against the emulator: its STS form (a workforce
/// pool, so `options` carries the user project) and its impersonation call
/// are accepted as they are, so the emulator checks what Google's library
/// really sends.
#[tokio::test(flavor = "multi_thread")]
async fn unmodified_google_auth_identity_pool_credentials_work_against_the_emulator() {
    use crate::clients::{clean_command, examples, python_venv, run};
    let python = tokio::task::spawn_blocking(|| {
        python_venv(
            "google-auth",
            &examples().join("python/requirements-google-auth.txt"),
            "google.auth.identity_pool",
        )
    })
    .await
    .unwrap();
    let f = Federation::start_with(
        "//iam.googleapis.com/locations/global/workforcePools/wf/providers/p",
    )
    .await;
    f.emulator.grant(
        &f.provider.principal("user-1"),
        ACCOUNT,
        Permission::AccessToken,
    );
    let token_file = f.dir.path().join("subject.jwt");
    std::fs::write(&token_file, f.subject_token("user-1")).unwrap();
    let creds = f.credential_file(
        serde_json::json!({ "file": token_file, "format": { "type": "text" } }),
        serde_json::json!({ "workforce_pool_user_project": "project-123" }),
    );
    let script = r#"
import json, sys
from google.auth import identity_pool
from google.auth.transport.requests import Request

credentials = identity_pool.Credentials.from_info(
    json.load(open(sys.argv[1])),
    scopes=["https://www.googleapis.com/auth/cloud-platform"])
credentials.refresh(Request())
print("refreshed" if credentials.token else "no token")
"#;
    let mut command = clean_command(&python);
    command.args(["-c", script]).arg(&creds);
    let (code, stdout, stderr) = run(command).await;
    assert_eq!(code, 0, "google-auth failed:\n{stderr}");
    assert_eq!(stdout.trim(), "refreshed");
    let stats = f.emulator.stats();
    assert_eq!((stats.sts.succeeded, stats.iam_access), (1, 1));
}

/// A credential file or executable others could change is refused: whoever
/// could edit it could send the subject token elsewhere or run commands as
/// the broker.
#[tokio::test(flavor = "multi_thread")]
async fn credential_files_and_executables_others_can_change_are_refused() {
    let f = Federation::start().await;
    let token_file = f.dir.path().join("subject.jwt");
    std::fs::write(&token_file, "x").unwrap();
    let creds = f.credential_file(
        serde_json::json!({ "file": token_file }),
        serde_json::json!({}),
    );
    support::set_mode(&creds, 0o666);
    let (code, _, err) = check_config(&identity(&creds));
    assert_ne!(code, 0);
    assert!(err.contains("writable by group or others"), "{err}");
    support::set_mode(&creds, 0o644);

    let script = f.dir.path().join("helper.sh");
    write_script(&script, "exit 0");
    support::set_mode(&script, 0o777);
    let creds = f.credential_file(
        serde_json::json!({ "executable": { "command": script } }),
        serde_json::json!({}),
    );
    let dir = support::workdir();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        support::config_text(&dir.path().join("s.sock"), &identity(&creds)),
    )
    .unwrap();
    let out = support::base_command(&["check-config", "--config", config.to_str().unwrap()])
        .env("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("executable.command") && err.contains("writable by group or others"),
        "{err}"
    );

    // A subject-token file anyone may rewrite: the exchange is refused,
    // naming the file, and nothing is sent to STS.
    f.allow("workload-a");
    std::fs::write(&token_file, f.subject_token("workload-a")).unwrap();
    support::set_mode(&token_file, 0o666);
    let creds = f.credential_file(
        serde_json::json!({ "file": token_file, "format": { "type": "text" } }),
        serde_json::json!({}),
    );
    let identities = identity(&creds);
    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    let status = broker
        .get("federated", "https://svc.example.com")
        .await
        .expect_err("a subject token others can write was used");
    assert!(
        status.message().contains("subject token file")
            && status.message().contains("writable by group or others"),
        "{status:?}"
    );
    assert_eq!(f.emulator.stats().sts.total, 0, "nothing reached STS");
}

/// Issue 15.1: an external_account identity's access token is the
/// impersonated account's, from STS then generateAccessToken; the federated
/// token is the bearer of both kinds, exchanged once, and never listed.
#[tokio::test(flavor = "multi_thread")]
async fn an_external_account_serves_the_accounts_access_token() {
    const STORAGE_RO: &str = "https://www.googleapis.com/auth/devstorage.read_only";
    let f = Federation::start().await;
    let creds = f.access_token_credential_file("workload-a", serde_json::json!({}));
    let identities = format!(
        "{}\n[[policy]]\nuids = [{}]\nidentities = [\"federated\"]\naudiences = [\"*\"]\nscopes = [\"{STORAGE_RO}\"]\n",
        identity(&creds),
        nix::unistd::getuid().as_raw()
    );
    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    broker
        .get("federated", "https://svc.example.com")
        .await
        .unwrap();
    let access = broker.get_access("federated", &[STORAGE_RO]).await.unwrap();
    let (principal, scopes) = f.emulator.access_token_info(&access.token).unwrap();
    assert_eq!(principal, ACCOUNT, "the impersonated account's token");
    assert_eq!(scopes, [STORAGE_RO]);
    let stats = f.emulator.stats();
    assert_eq!(
        stats.sts.total, 1,
        "one exchange for the ID and the access token"
    );
    assert_eq!(stats.iam_access, 1);
    // Only the ID token and the account's access token are listed.
    let (code, stdout, stderr) = support::run_cli(&[
        "status",
        "--json",
        "--socket",
        broker.socket.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2, "{stdout}");
    assert!(
        !stdout.contains("cloud-platform"),
        "the federated token is internal: {stdout}"
    );
}

/// `service_account_impersonation.token_lifetime_seconds` (what `gcloud ...
/// create-cred-config --service-account-token-lifetime-seconds` writes) is
/// the lifetime asked of generateAccessToken, as google-auth asks it: the
/// account's access tokens live 30 minutes here, not the default hour.
#[tokio::test(flavor = "multi_thread")]
async fn the_files_token_lifetime_is_asked_of_generate_access_token() {
    let f = Federation::start().await;
    let creds = f.access_token_credential_file(
        "workload-a",
        serde_json::json!({ "service_account_impersonation": { "token_lifetime_seconds": 1800 } }),
    );
    let identities = format!(
        "{}\n[[policy]]\nuids = [{}]\nidentities = [\"federated\"]\naudiences = [\"*\"]\nscopes = [\"*\"]\n",
        identity(&creds),
        nix::unistd::getuid().as_raw()
    );
    let broker = Broker::start(|s| support::config_text(s, &identities), "info").await;
    let access = broker.get_access("federated", &[]).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let lives = access.expire_time.expect("expire_time").seconds - now;
    assert!(
        (1700..=1800).contains(&lives),
        "the access token lives {lives}s, not the file's 1800s"
    );
    let (principal, _) = f.emulator.access_token_info(&access.token).unwrap();
    assert_eq!(principal, ACCOUNT);
}
