//! Loading and validation, tested through files and env maps.

use std::{collections::HashMap, io::Write, path::Path, time::Duration};

use super::*;
use crate::domain::SourceKind;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn load(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let f = file(text);
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load(Some(f.path()), &env, &Overrides::default())
}

#[test]
fn defaults_apply_without_a_file() {
    let s = Settings::load(None, &HashMap::new(), &Overrides::default()).unwrap();
    assert_eq!(s, Settings::default());
    s.validate().unwrap();
    assert_eq!(s.socket_mode(), 0o660);
}

#[test]
fn file_then_env_then_flag() {
    let text =
        "[server]\nsocket_path = \"/file.sock\"\n[refresh]\njitter = \"30s\"\nmax_entries = 5\n";
    let s = load(text, &[]).unwrap();
    assert_eq!(s.refresh.jitter, Duration::from_secs(30));
    assert_eq!(s.refresh.max_entries, 5);
    let s = load(
        text,
        &[
            ("TOKEN_BROKER__SERVER__SOCKET_PATH", "/env.sock"),
            ("TOKEN_BROKER__REFRESH__MAX_ENTRIES", "7"),
            ("TOKEN_BROKER__SERVER__SOCKET_MODE", "0600"),
        ],
    )
    .unwrap();
    assert_eq!(
        s.server.socket_path.as_deref(),
        Some(Path::new("/env.sock"))
    );
    assert_eq!(s.refresh.max_entries, 7);
    assert_eq!(s.socket_mode(), 0o600);
    let f = file(text);
    let flagged = Settings::load(
        Some(f.path()),
        &HashMap::from([(
            "TOKEN_BROKER__SERVER__SOCKET_PATH".into(),
            "/env.sock".into(),
        )]),
        &Overrides {
            socket_path: Some("/flag.sock".into()),
        },
    )
    .unwrap();
    assert_eq!(
        flagged.server.socket_path.as_deref(),
        Some(Path::new("/flag.sock"))
    );
    let s = load(text, &[(SOCKET_ENV, "/socket-env.sock")]).unwrap();
    assert_eq!(
        s.server.socket_path.as_deref(),
        Some(Path::new("/socket-env.sock"))
    );
}

#[test]
fn unknown_keys_and_bad_types_name_the_key() {
    let err = load("[server]\nsocket_pth = \"/x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("socket_pth"), "{err}");
    let err = load("[refresh]\njitter = \"soon\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("jitter"), "{err}");
    let err = Settings::load(
        Some(Path::new("/nonexistent.toml")),
        &HashMap::new(),
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/nonexistent.toml") && err.contains("no such file"),
        "{err}"
    );
}

#[test]
fn validation_reports_every_problem_with_its_key() {
    let text = r#"
[server]
socket_mode = "rw-rw----"
[refresh]
refresh_before_expiry = "10s"
retry_initial = "10s"
retry_max = "1s"
[[identities]]
name = "a"
source = "service_account_key"
[[identities]]
name = "a"
source = "metadata"
metadata_host = "http://x/"
[[identities]]
name = "bad name"
source = "metadata"
[log]
filter = "=[["
"#;
    let err = load(text, &[]).unwrap().validate().unwrap_err();
    let ConfigError::Invalid(problems) = err else {
        panic!()
    };
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "server.socket_mode",
        "refresh.refresh_before_expiry",
        "refresh.retry_max",
        "identities[0].key_file",
        "identities[1].name",
        "identities[1].metadata_host",
        "identities[2].name",
        "log.filter",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
}

#[test]
fn more_prefetched_audiences_than_max_entries_is_refused() {
    let text = r#"
[refresh]
max_entries = 2
[[identities]]
name = "default"
source = "metadata"
[[prefetch]]
audiences = ["https://a.example.com", "https://b.example.com"]
"#;
    load(text, &[]).unwrap().validate().unwrap();
    let text = format!("{text}[[prefetch]]\naudiences = [\"https://c.example.com\"]\n");
    let ConfigError::Invalid(problems) = load(&text, &[]).unwrap().validate().unwrap_err() else {
        panic!()
    };
    let problem = problems.iter().find(|p| p.key == "prefetch").unwrap();
    assert!(problem.to_string().contains("3 audiences"), "{problem}");
    assert!(
        problem.to_string().contains("refresh.max_entries = 2"),
        "{problem}"
    );
}

#[test]
fn application_default_credentials() {
    let s = Settings::default();
    let ids = s.effective_identities(&HashMap::new());
    assert_eq!(ids[0].name, "default");
    assert_eq!(ids[0].source, SourceKind::Metadata);
    let env = HashMap::from([(CREDENTIALS_ENV.to_owned(), "/k.json".to_owned())]);
    let ids = s.effective_identities(&env);
    assert_eq!(ids[0].source, SourceKind::ServiceAccountKey);
    assert_eq!(ids[0].key_file.as_deref(), Some(Path::new("/k.json")));
}

#[test]
fn socket_resolution_order() {
    let env = HashMap::from([(SOCKET_ENV.to_owned(), "/env.sock".to_owned())]);
    let flag = Path::new("/flag.sock");
    let conf = Path::new("/conf.sock");
    assert_eq!(resolve_socket_path(Some(flag), &env, Some(conf)), flag);
    assert_eq!(
        resolve_socket_path(None, &env, Some(conf)),
        Path::new("/env.sock")
    );
    assert_eq!(resolve_socket_path(None, &HashMap::new(), Some(conf)), conf);
}

#[test]
fn an_empty_or_comment_only_file_is_refused() {
    for text in ["", "   \n\n", "# only a comment\n# [server]\n"] {
        let err = load(text, &[]).unwrap_err().to_string();
        assert!(
            err.contains("has no settings") && err.contains("atomically"),
            "{text:?}: {err}"
        );
    }
    // One section is enough; a syntax error still names its line.
    load("[server]\n", &[]).unwrap();
    let err = load("[server\n", &[]).unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
}

/// A `Settings` with every optional section present and one element in
/// every list, so that serializing it names every key the types define.
fn every_key_present() -> Settings {
    let mut s = Settings::default();
    s.identities.push(IdentitySettings {
        delegates: vec!["d@p.iam.gserviceaccount.com".into()],
        ..IdentitySettings::new("default", SourceKind::Metadata)
    });
    s.prefetch.push(PrefetchSettings {
        identity: "default".into(),
        audiences: vec!["https://a".into()],
    });
    s.policy.push(RuleSettings::default());
    s.metadata_endpoint = Some(MetadataEndpointSettings {
        listen: "127.0.0.1:8181".parse().unwrap(),
        identity: "default".into(),
        audiences: vec![],
        allow_non_loopback: false,
        max_connections: 256,
        max_connections_per_uid: 64,
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
        project_id: Some("my-project".into()),
        numeric_project_id: Some(123),
        zone: Some("us-central1-a".into()),
        instance_id: Some(456),
        universe_domain: Some("googleapis.com".into()),
    });
    s.telemetry = Some(TelemetrySettings {
        listen: "127.0.0.1:9464".parse().unwrap(),
        allow_non_loopback: false,
        max_connections: 32,
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
    });
    s.sinks
        .push(toml::from_str("audience = \"https://a\"\npath = \"/run/t/a.jwt\"\n").unwrap());
    s.kubernetes = Some(KubernetesSettings {
        kubelet_url: Some("https://node-1:10250".into()),
        ..KubernetesSettings::default()
    });
    s
}

/// Dotted key paths of a serialized config: `section.key`, and `name[].key`
/// for arrays of tables.
fn key_paths(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                let path = format!("{prefix}{key}");
                match child {
                    serde_json::Value::Object(_) => key_paths(child, &format!("{path}."), out),
                    serde_json::Value::Array(items)
                        if items.first().is_some_and(|i| i.is_object()) =>
                    {
                        key_paths(&items[0], &format!("{path}[]."), out)
                    }
                    _ => out.push(path),
                }
            }
        }
        _ => panic!("settings must serialize to a table"),
    }
}

#[test]
fn readme_documents_exactly_the_keys_the_settings_types_define() {
    let value = serde_json::to_value(every_key_present()).unwrap();
    // A new optional section or list must be filled in above, or its keys
    // would go unchecked.
    for (section, v) in value.as_object().unwrap() {
        assert!(
            !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()),
            "fill `{section}` in every_key_present() so its keys are checked"
        );
    }
    let mut keys = Vec::new();
    key_paths(&value, "", &mut keys);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    // Rows of the key table: "| `key` | default | meaning |", up to the
    // blank line that ends it.
    let documented: Vec<String> = readme
        .lines()
        .skip_while(|line| *line != "| key | default | meaning |")
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once("` |").map(|(key, _)| key.to_owned()))
        .collect();
    assert!(!documented.is_empty(), "README.md has no key table");
    let missing: Vec<_> = keys.iter().filter(|k| !documented.contains(k)).collect();
    let unknown: Vec<_> = documented.iter().filter(|k| !keys.contains(k)).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README.md's key table is out of step with the settings types:\n  \
         missing rows: {missing:?}\n  rows for keys that do not exist: {unknown:?}"
    );
}

#[test]
fn impersonation_keys_are_checked_with_their_paths() {
    let text = r#"
[[identities]]
name = "base"
source = "metadata"
service_account = "x@p.iam.gserviceaccount.com"

[[identities]]
name = "a"
source = "impersonate"

[[identities]]
name = "b"
source = "impersonate"
base = "b"
service_account = "not an email"
delegates = ["ok@p.iam.gserviceaccount.com", "nope"]
iam_endpoint = "http://iam.example.com/v1"

[[identities]]
name = "c"
source = "impersonate"
base = "missing"
service_account = "c@p.iam.gserviceaccount.com"

[[identities]]
name = "d"
source = "impersonate"
credential_file = "/adc.json"
base = "base"

[[identities]]
name = "e"
source = "external_account"
"#;
    let err = load(text, &[]).unwrap().validate().unwrap_err().to_string();
    for expected in [
        "identities[0].service_account: only for source = \"impersonate\"",
        "identities[1].base: required when source = \"impersonate\"",
        "identities[1].service_account: required",
        "identities[2].base: an identity cannot be its own base",
        "identities[2].service_account: \"not an email\" is not a service account email",
        "identities[2].delegates[1]",
        "identities[2].iam_endpoint",
        "identities[3].base: no identity named \"missing\"",
        "identities[4].base: not with credential_file",
        "identities[5].credential_file: required when source = \"external_account\"",
    ] {
        assert!(err.contains(expected), "{expected:?} missing from:\n{err}");
    }
    // A longer cycle is named hop by hop.
    let cycle = r#"
[[identities]]
name = "x"
source = "impersonate"
base = "y"
service_account = "x@p.iam.gserviceaccount.com"
[[identities]]
name = "y"
source = "impersonate"
base = "z"
service_account = "y@p.iam.gserviceaccount.com"
[[identities]]
name = "z"
source = "impersonate"
base = "x"
service_account = "z@p.iam.gserviceaccount.com"
"#;
    let err = load(cycle, &[])
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("x -> y -> z -> x"), "{err}");
}

#[test]
fn adc_files_are_told_apart_by_their_type() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("external_account", SourceKind::ExternalAccount),
        ("impersonated_service_account", SourceKind::Impersonate),
        ("service_account", SourceKind::ServiceAccountKey),
    ];
    for (kind, expected) in cases {
        let path = dir.path().join(format!("{kind}.json"));
        std::fs::write(&path, format!("{{\"type\": \"{kind}\"}}")).unwrap();
        let env = HashMap::from([(CREDENTIALS_ENV.to_owned(), path.display().to_string())]);
        let ids = Settings::default().effective_identities(&env);
        assert_eq!(ids[0].source, expected, "{kind}");
        let named = ids[0].key_file.as_ref().or(ids[0].credential_file.as_ref());
        assert_eq!(named, Some(&path));
    }
}

#[test]
fn kubernetes_keys_are_checked_with_their_paths() {
    let text = r#"
[kubernetes]
kubelet_url = "http://10.0.0.5:10255"
api_server_url = "https://kubernetes.default.svc/?x=1"
token_file = "token"
min_fetch_interval = "1ms"

[[policy]]
uids = [0]
identities = ["*"]
audiences = ["*"]
k8s_namespaces = ["payments"]
"#;
    let err = load(text, &[]).unwrap().validate().unwrap_err().to_string();
    for expected in [
        "kubernetes.kubelet_url: \"http://10.0.0.5:10255\" must be an https URL (plain http only to loopback",
        "kubernetes.api_server_url: \"https://kubernetes.default.svc/?x=1\" must be a base URL",
        "kubernetes.token_file: \"token\" must be an absolute path",
        "kubernetes.min_fetch_interval: must be between 100ms and 1m",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in {err}");
    }
    let err = load("[kubernetes]\nkubelet = \"x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `kubelet`"), "{err}");
    // k8s selectors without the section.
    let text = "[[policy]]\nuids = [0]\nidentities = [\"*\"]\naudiences = [\"*\"]\nk8s_pod_labels = [\"app=x\"]\n";
    let err = load(text, &[]).unwrap().validate().unwrap_err().to_string();
    assert!(
        err.contains("policy[0].k8s_pod_labels: needs a [kubernetes] section"),
        "{err}"
    );
}

#[test]
fn the_kubelet_url_defaults_to_node_name_and_says_so_when_unset() {
    let k = KubernetesSettings::default();
    let err = k.kubelet_pods_url(&HashMap::new()).unwrap_err();
    assert!(
        err.contains("NODE_NAME") && err.contains("spec.nodeName"),
        "{err}"
    );
    let env = HashMap::from([(NODE_NAME_ENV.to_owned(), "gke-pool-1-node-7d2f".to_owned())]);
    assert_eq!(
        k.kubelet_pods_url(&env).unwrap().as_str(),
        "https://gke-pool-1-node-7d2f:10250/pods"
    );
    let bad = HashMap::from([(NODE_NAME_ENV.to_owned(), "a/b@c".to_owned())]);
    assert!(k
        .kubelet_pods_url(&bad)
        .unwrap_err()
        .contains("not a node name"));
    let proxied = KubernetesSettings {
        kubelet_url: Some("https://kubernetes.default.svc/api/v1/nodes/n1/proxy/".into()),
        ..KubernetesSettings::default()
    };
    assert_eq!(
        proxied.kubelet_pods_url(&HashMap::new()).unwrap().as_str(),
        "https://kubernetes.default.svc/api/v1/nodes/n1/proxy/pods"
    );
    let read_only = KubernetesSettings {
        kubelet_url: Some("http://127.0.0.1:10255".into()),
        ..KubernetesSettings::default()
    };
    assert_eq!(
        read_only
            .kubelet_pods_url(&HashMap::new())
            .unwrap()
            .as_str(),
        "http://127.0.0.1:10255/pods"
    );
}

#[test]
fn per_workload_accounts_are_checked_with_their_paths() {
    let text = r#"
[[identities]]
name = "node"
source = "metadata"

[[identities]]
name = "both"
source = "impersonate"
base = "node"
service_account = "x@p.iam.gserviceaccount.com"
service_account_from = "k8s_service_account_annotation"

[[identities]]
name = "no-cluster"
source = "impersonate"
base = "node"
service_account_from = "k8s_service_account_annotation"

[[identities]]
name = "not-impersonate"
source = "metadata"
service_account_from = "k8s_service_account_annotation"

[[identities]]
name = "no-base"
source = "impersonate"
service_account_from = "k8s_service_account_annotation"
"#;
    let err = load(text, &[]).unwrap().validate().unwrap_err().to_string();
    for expected in [
        "identities[1].service_account_from: not with service_account",
        "identities[2].service_account_from: reads the calling pod's service-account annotation \
         iam.gke.io/gcp-service-account, which needs a [kubernetes] section",
        "identities[3].service_account_from: only for source = \"impersonate\"",
        "identities[4].base: required when source = \"impersonate\"",
    ] {
        assert!(err.contains(expected), "{expected:?} missing from:\n{err}");
    }
    assert!(!err.contains("identities[2].service_account:"), "{err}");
    // An unknown place to read the account from names the key.
    let bad = load(
        "[[identities]]\nname = \"x\"\nsource = \"impersonate\"\nbase = \"y\"\n\
         service_account_from = \"pod_label\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        bad.contains("service_account_from") || bad.contains("pod_label"),
        "{bad}"
    );
    // With [kubernetes] and a base, the combination is valid.
    let good = "[kubernetes]\nkubelet_url = \"http://127.0.0.1:10255\"\n\
                [[identities]]\nname = \"node\"\nsource = \"metadata\"\n\
                [[identities]]\nname = \"pods\"\nsource = \"impersonate\"\nbase = \"node\"\n\
                service_account_from = \"k8s_service_account_annotation\"\n";
    let settings = load(good, &[]).unwrap();
    settings.validate().unwrap();
    // ... but it has no token of its own to prefetch or keep in a file.
    let kept = format!(
        "{good}[[prefetch]]\nidentity = \"pods\"\naudiences = [\"https://a\"]\n\
         [[sinks]]\nidentity = \"pods\"\naudience = \"https://a\"\npath = \"/run/t/a.jwt\"\n"
    );
    let kept = format!(
        "{kept}[[identities]]\nname = \"chained\"\nsource = \"impersonate\"\nbase = \"pods\"\n\
         service_account = \"c@p.iam.gserviceaccount.com\"\n"
    );
    let err = load(&kept, &[])
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    for key in [
        "prefetch[0].identity",
        "sinks[0].identity",
        "identities[2].base",
    ] {
        assert!(
            err.contains(&format!(
                "{key}: identity \"pods\" mints as each calling pod"
            )),
            "{key} missing from:\n{err}"
        );
    }
}
