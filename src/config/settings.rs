//! The settings types: what each section and key of the config file means,
//! with its default. Deserialized with `deny_unknown_fields`, so a typo is an
//! error that names the key rather than a silently ignored setting.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::domain::{Principal, SourceKind, DEFAULT_IDENTITY};

/// Everything the daemon runs with.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The Unix socket clients connect to.
    pub server: ServerSettings,
    /// When tokens are refreshed and how upstream failures are retried.
    pub refresh: RefreshSettings,
    /// Named credentials the broker mints tokens with.
    pub identities: Vec<IdentitySettings>,
    /// Audiences fetched at startup and kept fresh.
    pub prefetch: Vec<PrefetchSettings>,
    /// Optional GCE-metadata-compatible HTTP endpoint for unmodified clients.
    pub metadata_endpoint: Option<MetadataEndpointSettings>,
    /// Who may ask for which identity and audience; none = anyone who can
    /// open the socket.
    pub policy: Vec<RuleSettings>,
    /// Bounds on what clients can make the daemon do.
    pub limits: LimitSettings,
    /// Optional Prometheus `/metrics`, `/healthz` and `/readyz` listener.
    pub telemetry: Option<TelemetrySettings>,
    /// Logging format and filter.
    pub log: LogSettings,
    /// Tokens kept in files for programs that can only read a file.
    pub sinks: Vec<SinkSettings>,
    /// Optional: look connecting pods up in the kubelet's pod list, for the
    /// `k8s_*` policy selectors.
    pub kubernetes: Option<KubernetesSettings>,
}

/// `[server]`: the Unix socket.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Socket path; when unset: `/run/token-broker/broker.sock` for root,
    /// else `$XDG_RUNTIME_DIR/token-broker.sock`.
    pub socket_path: Option<PathBuf>,
    /// Permission bits of the socket file, as an octal string.
    pub socket_mode: String,
    /// Group (name or id) given to the socket file, so its members can connect.
    pub socket_group: Option<Principal>,
    /// Report NOT_SERVING on the health service until every `[[prefetch]]`
    /// audience holds a token.
    pub ready_after_prefetch: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            socket_path: None,
            socket_mode: "0660".into(),
            socket_group: None,
            ready_after_prefetch: false,
        }
    }
}

/// A loopback HTTP endpoint answering like the GCE metadata server, so
/// programs using Google's client libraries get tokens from the broker with
/// only `GCE_METADATA_HOST` changed (PROTOCOLS.md §3).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetadataEndpointSettings {
    /// Address to listen on, e.g. "127.0.0.1:8181". Loopback only unless
    /// `allow_non_loopback`.
    pub listen: std::net::SocketAddr,
    /// The identity whose tokens the endpoint serves as `default`.
    #[serde(default = "default_identity_name")]
    pub identity: String,
    /// Audiences the endpoint may serve; empty means any valid audience.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Permit a non-loopback `listen` address (anyone who can reach it gets tokens).
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Most connections open at once; more are closed at accept.
    #[serde(default = "default_endpoint_max_connections")]
    pub max_connections: usize,
    /// Most connections one uid may hold open at once (at most `max_connections`).
    #[serde(default = "default_endpoint_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Longest a client may take to send a request's headers, counted from
    /// when the connection is ready for a request (so also the longest an
    /// idle keep-alive connection stays open).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest a connection may stay open with no request being answered
    /// (a client that stops reading its answer, or trickles a body).
    #[serde(default = "default_http_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// `project/project-id`. Unset: the metadata server's when the served
    /// identity's base is `metadata`, else the key file's `project_id`,
    /// else 404.
    #[serde(default)]
    pub project_id: Option<String>,
    /// `project/numeric-project-id`. Unset: the metadata server's when the
    /// identity's base is `metadata`, else 404.
    #[serde(default)]
    pub numeric_project_id: Option<u64>,
    /// `instance/zone`, a zone name such as `"us-central1-a"`, answered as
    /// `projects/NUMERIC_PROJECT_ID/zones/ZONE` (so it needs
    /// `numeric_project_id`). Unset: the metadata server's, else 404.
    #[serde(default)]
    pub zone: Option<String>,
    /// `instance/id`. Unset: the metadata server's, else 404.
    #[serde(default)]
    pub instance_id: Option<u64>,
    /// `universe/universe-domain`. Unset: the metadata server's, else
    /// `"googleapis.com"`.
    #[serde(default)]
    pub universe_domain: Option<String>,
}

fn default_endpoint_max_connections() -> usize {
    256
}

fn default_endpoint_max_connections_per_uid() -> usize {
    64
}

fn default_telemetry_max_connections() -> usize {
    32
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_http_idle_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Audiences of one identity to fetch at startup and keep fresh, so the
/// first client after boot never waits on Google.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrefetchSettings {
    /// The identity whose tokens are prefetched.
    #[serde(default = "default_identity_name")]
    pub identity: String,
    /// The audiences to fetch at startup and keep fresh.
    pub audiences: Vec<String>,
}

fn default_identity_name() -> String {
    DEFAULT_IDENTITY.to_owned()
}

/// `[refresh]`: the token lifecycle.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshSettings {
    /// A token with less than this left is stale: served while refreshed.
    #[serde(with = "humantime_serde")]
    pub refresh_before_expiry: Duration,
    /// Spread of refresh times so that many keys do not refresh together.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// First backoff after an upstream failure.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Backoff ceiling; also caps the wait an upstream asks for (`Retry-After`).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Keys nobody asked for this long stop being refreshed and are dropped.
    #[serde(with = "humantime_serde")]
    pub idle_evict_after: Duration,
    /// Most (identity, audience) entries held at once.
    pub max_entries: usize,
    /// Most concurrent upstream calls per identity.
    pub upstream_concurrency: usize,
    /// Most upstream calls per second per identity, shared by prefetch,
    /// refresh and misses (misses go first): a fleet booting together must
    /// not exceed Google's quotas.
    pub upstream_qps: u32,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self {
            refresh_before_expiry: Duration::from_secs(15 * 60),
            jitter: Duration::from_secs(2 * 60),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            idle_evict_after: Duration::from_secs(24 * 3600),
            max_entries: 10_000,
            upstream_concurrency: 8,
            upstream_qps: 20,
        }
    }
}

/// Where to serve metrics and HTTP health probes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// e.g. "127.0.0.1:9464". Loopback only unless `allow_non_loopback`.
    /// Metrics name identities and counts; they carry no secrets, but
    /// describe what runs here to anyone who can reach them.
    pub listen: std::net::SocketAddr,
    /// Permit a non-loopback `listen` address (for a scraper on another host).
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Most connections open at once; more are closed at accept.
    #[serde(default = "default_telemetry_max_connections")]
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers (also the
    /// longest an idle keep-alive connection stays open).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest a connection may stay open with no request being answered.
    #[serde(default = "default_http_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

/// Limits on what clients can make the daemon do. Each has a safe default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// New audiences (requests that would cause an upstream fetch for a key
    /// not in the cache) each uid may ask for per minute, on average.
    /// Requests whose `min_valid_for` forces a new token for a held key
    /// spend from the same budget.
    pub new_audiences_per_minute: u32,
    /// How many new audiences a uid may ask for at once before the rate applies.
    pub new_audience_burst: u32,
    /// Most client connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Most `WatchIdToken` streams open at once.
    pub max_streams: usize,
    /// Most client connections one uid may hold open at once (at most
    /// `max_connections`), so no user can take them all.
    pub max_connections_per_uid: usize,
    /// Most `WatchIdToken` streams one uid may hold open at once (at most
    /// `max_streams`).
    pub max_streams_per_uid: usize,
    /// A connection with no call open this long is closed (clients
    /// reconnect on their next call).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_request_bytes: 64 * 1024,
            new_audiences_per_minute: 60,
            new_audience_burst: 30,
            max_connections: 1024,
            max_streams: 1024,
            max_connections_per_uid: 256,
            max_streams_per_uid: 256,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// One `[[identities]]` table: a named credential.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// What requests call this identity.
    pub name: String,
    /// Where its tokens come from.
    pub source: SourceKind,
    /// The key file (`service_account_key` only).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// host[:port] of the metadata server (`metadata` only); defaults to
    /// `$GCE_METADATA_HOST`, else `metadata.google.internal`.
    #[serde(default)]
    pub metadata_host: Option<String>,
    /// Accept a key file readable by group or others (logged as a warning).
    #[serde(default)]
    pub allow_insecure_key_permissions: bool,
    /// The identity whose credential impersonates `service_account`
    /// (`impersonate` without `credential_file`); any other identity,
    /// chains allowed.
    #[serde(default)]
    pub base: Option<String>,
    /// The account to mint ID tokens for (`impersonate` only).
    #[serde(default)]
    pub service_account: Option<String>,
    /// Instead of `service_account`: mint as an account each caller names
    /// (`impersonate` only). `"k8s_service_account_annotation"`: the
    /// calling pod's Kubernetes service account's
    /// `iam.gke.io/gcp-service-account` annotation (needs `[kubernetes]`).
    #[serde(default)]
    pub service_account_from: Option<AccountFrom>,
    /// Accounts between the base and `service_account`, in order from the
    /// base's side; each needs the token-creator grant on the next
    /// (`impersonate` only).
    #[serde(default)]
    pub delegates: Vec<String>,
    /// Whether impersonated ID tokens carry `email` and `email_verified`
    /// (`impersonate` only).
    #[serde(default = "default_true")]
    pub include_email: bool,
    /// Base URL of the IAM Credentials API (`impersonate`, `external_account`);
    /// default `https://iamcredentials.googleapis.com`, or for
    /// `external_account` the origin of `service_account_impersonation_url`.
    #[serde(default)]
    pub iam_endpoint: Option<String>,
    /// `external_account`: the workload identity federation credential
    /// file, as written by `gcloud iam workload-identity-pools
    /// create-cred-config`. `impersonate`: an `impersonated_service_account`
    /// file, which names the source credential, the account and the
    /// delegates itself.
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
}

fn default_true() -> bool {
    true
}

/// Where a per-workload identity learns the account it mints as.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccountFrom {
    /// The `iam.gke.io/gcp-service-account` annotation of the calling pod's
    /// Kubernetes service account, as GKE Workload Identity reads it.
    K8sServiceAccountAnnotation,
}

impl AccountFrom {
    /// The annotation (or other place) named, for messages.
    pub fn annotation(self) -> &'static str {
        match self {
            AccountFrom::K8sServiceAccountAnnotation => "iam.gke.io/gcp-service-account",
        }
    }
}

impl IdentitySettings {
    /// An identity with every optional key at its default.
    pub fn new(name: &str, source: SourceKind) -> Self {
        Self {
            name: name.to_owned(),
            source,
            key_file: None,
            metadata_host: None,
            allow_insecure_key_permissions: false,
            base: None,
            service_account: None,
            service_account_from: None,
            delegates: Vec::new(),
            include_email: true,
            iam_endpoint: None,
            credential_file: None,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One `key=value` line per event, for people.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// `[log]`: format and filter.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// `RUST_LOG` syntax; the `RUST_LOG` env var wins when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// One `[[policy]]` table as written. Every selector given (`uids`,
/// `gids`, `exe`, `systemd_units`, `k8s_namespaces`,
/// `k8s_service_accounts`, `k8s_pod_labels`) must match the caller; rules
/// are alternatives.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    /// Users (ids or names) this rule applies to.
    #[serde(default)]
    pub uids: Vec<Principal>,
    /// Groups (ids or names); matched against every gid the caller holds:
    /// the primary gid the kernel recorded at connect and, when the
    /// workload is attested, its supplementary groups.
    #[serde(default)]
    pub gids: Vec<Principal>,
    /// Executables (absolute paths, as `/proc/PID/exe` names them); an
    /// attested workload running one of them matches.
    #[serde(default)]
    pub exe: Vec<String>,
    /// systemd units (`nginx.service`, `session-3.scope`); an attested
    /// workload whose cgroup lies in one of them matches.
    #[serde(default)]
    pub systemd_units: Vec<String>,
    /// Kubernetes namespaces (exact names); an attested pod in one of them
    /// matches. Needs `[kubernetes]`.
    #[serde(default)]
    pub k8s_namespaces: Vec<String>,
    /// Kubernetes service accounts as `namespace/name`; an attested pod
    /// running as one of them matches. Needs `[kubernetes]`.
    #[serde(default)]
    pub k8s_service_accounts: Vec<String>,
    /// Pod labels as `key=value`; an attested pod carrying EVERY label
    /// listed matches. Needs `[kubernetes]`.
    #[serde(default)]
    pub k8s_pod_labels: Vec<String>,
    /// Identities granted; `"*"` grants all.
    pub identities: Vec<String>,
    /// Audiences granted: exact strings, or patterns where `*` matches
    /// within one DNS label (`https://*.a.run.app`); `"*"` alone grants any.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// OAuth2 scopes of access tokens granted (`GetAccessToken`): exact
    /// scopes, or a prefix ending in `*`; `"*"` alone grants any. Default
    /// none: access tokens are off until a rule grants them.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// What a sink file holds.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// The bare token, no newline.
    #[default]
    Jwt,
    /// `{"token", "expire_time", "issue_time", "identity", "audience"}`.
    Json,
    /// `NAME=token`, for systemd's `EnvironmentFile=`.
    Env,
    /// `Authorization: Bearer token`.
    Header,
}

/// One `[[sinks]]` table: an ID token kept fresh in a file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// The identity whose token is written.
    #[serde(default = "default_identity_name")]
    pub identity: String,
    /// The audience of the ID token written; exactly one of `audience` and
    /// `scopes`.
    #[serde(default)]
    pub audience: Option<String>,
    /// The scopes of the access token written instead of an ID token
    /// (the identity's own, as `GetAccessToken` serves it).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The file, written atomically (a temporary file in the same directory,
    /// then a rename) at every refresh. Absolute.
    pub path: PathBuf,
    /// `jwt`, `json`, `env` or `header`.
    #[serde(default)]
    pub format: SinkFormat,
    /// The variable name for `format = "env"`; unset: `ID_TOKEN`, or
    /// `ACCESS_TOKEN` for a `scopes` sink.
    #[serde(default)]
    pub env_name: Option<String>,
    /// The file's owner (name or id); unset: the daemon's user.
    #[serde(default)]
    pub owner: Option<Principal>,
    /// The file's group (name or id); unset: the daemon's group.
    #[serde(default)]
    pub group: Option<Principal>,
    /// Permission bits as an octal string.
    #[serde(default = "default_sink_mode")]
    pub mode: String,
    /// A command run after each write: an argv array, no shell, the program
    /// as an absolute path.
    #[serde(default)]
    pub on_refresh: Vec<String>,
    /// Longest `on_refresh` may run before it is killed.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub on_refresh_timeout: Duration,
    /// A signal (e.g. `"SIGHUP"`) sent after each write to the process whose
    /// pid is in `pid_file`; instead of `on_refresh`.
    #[serde(default)]
    pub signal: Option<String>,
    /// The pid file read for `signal`.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
}

fn default_sink_mode() -> String {
    "0600".into()
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[kubernetes]`: where the node's pod list and the cluster's service
/// accounts are read, so a connection from a pod is known by its namespace,
/// service account and labels.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSettings {
    /// The kubelet's base URL; `/pods` is appended. Unset:
    /// `https://$NODE_NAME:10250` (NODE_NAME from the downward API). An
    /// `http://` URL (the read-only port, loopback only) is read without
    /// token or CA.
    pub kubelet_url: Option<String>,
    /// The bearer token sent to the kubelet and the API server; re-read
    /// at every fetch, so a rotated projected token is picked up.
    pub token_file: PathBuf,
    /// The CA bundle (PEM) the kubelet's and the API server's certificates
    /// must chain to; nothing else is trusted.
    pub ca_file: PathBuf,
    /// The API server's base URL, read only for service-account annotations.
    pub api_server_url: String,
    /// Where the host's `/proc` is mounted: `/proc` unless the broker runs
    /// in a pod without `hostPID` (then mount the host's at e.g. `/host/proc`).
    pub proc_root: PathBuf,
    /// A pod list younger than this answers lookups without a new fetch.
    #[serde(with = "humantime_serde")]
    pub pod_cache_ttl: Duration,
    /// Least time between two pod-list fetches, however many lookups miss.
    #[serde(with = "humantime_serde")]
    pub min_fetch_interval: Duration,
    /// How long a lookup keeps refetching for a pod (or container) the
    /// kubelet does not list yet: the container-start race.
    #[serde(with = "humantime_serde")]
    pub start_race_budget: Duration,
    /// How long a service account's annotations are kept.
    #[serde(with = "humantime_serde")]
    pub annotations_ttl: Duration,
    /// Longest one call to the kubelet or the API server may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// The service-account token and CA every pod gets.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl Default for KubernetesSettings {
    fn default() -> Self {
        Self {
            kubelet_url: None,
            token_file: PathBuf::from(format!("{SERVICE_ACCOUNT_DIR}/token")),
            ca_file: PathBuf::from(format!("{SERVICE_ACCOUNT_DIR}/ca.crt")),
            api_server_url: "https://kubernetes.default.svc".into(),
            proc_root: PathBuf::from("/proc"),
            pod_cache_ttl: Duration::from_secs(30),
            min_fetch_interval: Duration::from_millis(500),
            start_race_budget: Duration::from_secs(2),
            annotations_ttl: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
        }
    }
}
