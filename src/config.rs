//! Typed settings, layered: defaults < TOML file < env `TOKEN_BROKER__SECTION__KEY`
//! < command-line flags, read through the `config` crate.
//!
//! Loading only parses; [`Settings::validate`] then reports every semantic
//! problem at once, each with the key path it concerns, so an operator fixes
//! a config in one round. Nothing here touches the network or binds sockets.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Env prefix for overrides: `TOKEN_BROKER__REFRESH__JITTER=30s`.
pub const ENV_PREFIX: &str = "TOKEN_BROKER";
/// Env var naming the socket, for clients and the server alike.
pub const SOCKET_ENV: &str = "TOKEN_BROKER_SOCKET";
/// Google's env var naming a service-account key file (application default credentials).
pub const CREDENTIALS_ENV: &str = "GOOGLE_APPLICATION_CREDENTIALS";
/// Google's env var naming the metadata server's host[:port].
pub const METADATA_HOST_ENV: &str = "GCE_METADATA_HOST";
/// The identity used when a request names none.
pub const DEFAULT_IDENTITY: &str = "default";
/// Audience limit from DESIGN.md: longer is refused before any upstream call.
pub const MAX_AUDIENCE_LEN: usize = 2048;

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
    pub policy: Vec<crate::policy::RuleSettings>,
    /// Bounds on what clients can make the daemon do.
    pub limits: LimitSettings,
    /// Optional Prometheus `/metrics`, `/healthz` and `/readyz` listener.
    pub telemetry: Option<TelemetrySettings>,
    /// Logging format and filter.
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Socket path; when unset: `/run/token-broker/broker.sock` for root,
    /// else `$XDG_RUNTIME_DIR/token-broker.sock`.
    pub socket_path: Option<PathBuf>,
    /// Permission bits of the socket file, as an octal string.
    pub socket_mode: String,
    /// Group (name or id) given to the socket file, so its members can connect.
    pub socket_group: Option<crate::policy::Principal>,
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
    #[serde(default = "default_identity_name")]
    pub identity: String,
    pub audiences: Vec<String>,
}

fn default_identity_name() -> String {
    DEFAULT_IDENTITY.to_owned()
}

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
    /// Backoff ceiling.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Keys nobody asked for this long stop being refreshed and are dropped.
    #[serde(with = "humantime_serde")]
    pub idle_evict_after: Duration,
    /// Most (identity, audience) entries held at once.
    pub max_entries: usize,
    /// Most concurrent upstream calls per identity.
    pub upstream_concurrency: usize,
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
        }
    }
}

/// Where to serve metrics and HTTP health probes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// e.g. "127.0.0.1:9464". Metrics name identities and counts; they
    /// carry no secrets, but keep it off public interfaces.
    pub listen: std::net::SocketAddr,
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

/// Where an identity's tokens come from.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The metadata server of GCE, GKE, Cloud Run, Cloud Functions.
    Metadata,
    /// A service-account JSON key file, exchanged at its `token_uri`.
    ServiceAccountKey,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Metadata => "metadata",
            SourceKind::ServiceAccountKey => "service_account_key",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// What requests call this identity.
    pub name: String,
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
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
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

/// One thing wrong with a config, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    Load { path: String, message: String },
    #[error("invalid configuration: {}", describe_problems(.0))]
    Invalid(Vec<Problem>),
}

/// One problem fits on the error's line; several get a line each.
fn describe_problems(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => many.iter().map(|p| format!("\n  {p}")).collect::<String>(),
    }
}

/// Flag values that override the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub socket_path: Option<PathBuf>,
}

impl Settings {
    /// Reads `file` (if any), then `TOKEN_BROKER__*` variables from `env`,
    /// then `overrides`. `env` is passed in so tests need not touch the
    /// process environment.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Settings, ConfigError> {
        let origin = file.map_or_else(|| "(none)".to_owned(), |p| p.display().to_string());
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Load {
                    path: origin,
                    message: "no such file".into(),
                });
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        let prefixed: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(prefixed)),
        );
        // Socket precedence (DESIGN.md): flag > TOKEN_BROKER_SOCKET > config.
        let socket = overrides
            .socket_path
            .as_ref()
            .map(|p| p.display().to_string())
            .or_else(|| env.get(SOCKET_ENV).filter(|p| !p.is_empty()).cloned());
        if let Some(socket) = socket {
            builder = builder
                .set_override("server.socket_path", socket)
                .map_err(|e| ConfigError::Load {
                    path: origin.clone(),
                    message: e.to_string(),
                })?;
        }
        let load_error = |e: config::ConfigError| ConfigError::Load {
            path: origin.clone(),
            message: e.to_string(),
        };
        builder
            .build()
            .map_err(load_error)?
            .try_deserialize()
            .map_err(load_error)
    }

    /// Every semantic problem, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(message) = parse_mode(&self.server.socket_mode) {
            problems.push(Problem::new("server.socket_mode", message));
        }
        if let Some(path) = &self.server.socket_path {
            if path.as_os_str().is_empty() {
                problems.push(Problem::new("server.socket_path", "must not be empty"));
            } else if path.as_os_str().len() > 100 {
                // sun_path holds 108 bytes; leave room and say so before bind does.
                problems.push(Problem::new(
                    "server.socket_path",
                    "longer than 100 bytes, too long for a Unix socket address",
                ));
            }
        }
        let r = &self.refresh;
        if r.refresh_before_expiry < Duration::from_secs(60) {
            problems.push(Problem::new(
                "refresh.refresh_before_expiry",
                "must be at least 1m (tokens under 30s are treated as expired)",
            ));
        }
        if r.refresh_before_expiry > Duration::from_secs(45 * 60) {
            problems.push(Problem::new(
                "refresh.refresh_before_expiry",
                "must be at most 45m: Google's ID tokens live 1h",
            ));
        }
        if r.jitter >= r.refresh_before_expiry {
            problems.push(Problem::new(
                "refresh.jitter",
                "must be smaller than refresh.refresh_before_expiry",
            ));
        }
        if r.retry_initial.is_zero() {
            problems.push(Problem::new(
                "refresh.retry_initial",
                "must be more than 0s",
            ));
        }
        if r.retry_max < r.retry_initial {
            problems.push(Problem::new(
                "refresh.retry_max",
                "must be at least refresh.retry_initial",
            ));
        }
        if r.idle_evict_after < Duration::from_secs(60) {
            problems.push(Problem::new(
                "refresh.idle_evict_after",
                "must be at least 1m",
            ));
        }
        if r.max_entries == 0 {
            problems.push(Problem::new("refresh.max_entries", "must be at least 1"));
        }
        if r.upstream_concurrency == 0 {
            problems.push(Problem::new(
                "refresh.upstream_concurrency",
                "must be at least 1",
            ));
        }
        let mut names = HashSet::new();
        for (i, identity) in self.identities.iter().enumerate() {
            let key = |field: &str| format!("identities[{i}].{field}");
            if let Err(message) = validate_identity_name(&identity.name) {
                problems.push(Problem::new(key("name"), message));
            } else if !names.insert(identity.name.as_str()) {
                problems.push(Problem::new(
                    key("name"),
                    format!("identity {:?} is defined twice", identity.name),
                ));
            }
            match identity.source {
                SourceKind::Metadata => {
                    if identity.key_file.is_some() {
                        problems.push(Problem::new(
                            key("key_file"),
                            "only for source = \"service_account_key\"",
                        ));
                    }
                    if let Some(host) = &identity.metadata_host {
                        if let Err(message) = validate_host(host) {
                            problems.push(Problem::new(key("metadata_host"), message));
                        }
                    }
                }
                SourceKind::ServiceAccountKey => {
                    if identity.key_file.is_none() {
                        problems.push(Problem::new(
                            key("key_file"),
                            "required when source = \"service_account_key\"",
                        ));
                    }
                    if identity.metadata_host.is_some() {
                        problems.push(Problem::new(
                            key("metadata_host"),
                            "only for source = \"metadata\"",
                        ));
                    }
                }
            }
        }
        for (i, prefetch) in self.prefetch.iter().enumerate() {
            if prefetch.audiences.is_empty() {
                problems.push(Problem::new(
                    format!("prefetch[{i}].audiences"),
                    "must list at least one audience",
                ));
            }
            for (j, audience) in prefetch.audiences.iter().enumerate() {
                if let Err(e) = crate::cache::validate_audience(audience) {
                    problems.push(Problem::new(
                        format!("prefetch[{i}].audiences[{j}]"),
                        e.to_string(),
                    ));
                }
            }
        }
        if let Err(policy_problems) = crate::policy::Policy::compile(&self.policy) {
            problems.extend(policy_problems);
        }
        if let Some(group) = &self.server.socket_group {
            if let Err(message) = resolve_group(group) {
                problems.push(Problem::new("server.socket_group", message));
            }
        }
        let l = &self.limits;
        if !(1024..=16 * 1024 * 1024).contains(&l.max_request_bytes) {
            problems.push(Problem::new(
                "limits.max_request_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if l.new_audiences_per_minute == 0 {
            problems.push(Problem::new(
                "limits.new_audiences_per_minute",
                "must be at least 1",
            ));
        }
        if l.new_audience_burst == 0 {
            problems.push(Problem::new(
                "limits.new_audience_burst",
                "must be at least 1",
            ));
        }
        if l.max_connections == 0 {
            problems.push(Problem::new("limits.max_connections", "must be at least 1"));
        }
        if l.max_streams == 0 {
            problems.push(Problem::new("limits.max_streams", "must be at least 1"));
        }
        share_problems(
            "limits.max_connections_per_uid",
            l.max_connections_per_uid,
            &mut problems,
        );
        share_problems(
            "limits.max_streams_per_uid",
            l.max_streams_per_uid,
            &mut problems,
        );
        timeout_problems("limits.idle_timeout", l.idle_timeout, &mut problems);
        if let Some(telemetry) = &self.telemetry {
            if telemetry.max_connections == 0 {
                problems.push(Problem::new(
                    "telemetry.max_connections",
                    "must be at least 1",
                ));
            }
            timeout_problems(
                "telemetry.header_read_timeout",
                telemetry.header_read_timeout,
                &mut problems,
            );
            timeout_problems(
                "telemetry.idle_timeout",
                telemetry.idle_timeout,
                &mut problems,
            );
        }
        if let Some(endpoint) = &self.metadata_endpoint {
            if !endpoint.listen.ip().is_loopback() && !endpoint.allow_non_loopback {
                problems.push(Problem::new(
                    "metadata_endpoint.listen",
                    format!(
                        "{} is not a loopback address; anyone who can reach it gets tokens. \
                         Use 127.0.0.1, or set metadata_endpoint.allow_non_loopback = true",
                        endpoint.listen
                    ),
                ));
            }
            if endpoint.max_connections == 0 {
                problems.push(Problem::new(
                    "metadata_endpoint.max_connections",
                    "must be at least 1",
                ));
            }
            share_problems(
                "metadata_endpoint.max_connections_per_uid",
                endpoint.max_connections_per_uid,
                &mut problems,
            );
            timeout_problems(
                "metadata_endpoint.header_read_timeout",
                endpoint.header_read_timeout,
                &mut problems,
            );
            timeout_problems(
                "metadata_endpoint.idle_timeout",
                endpoint.idle_timeout,
                &mut problems,
            );
            for (j, audience) in endpoint.audiences.iter().enumerate() {
                if let Err(e) = crate::cache::validate_audience(audience) {
                    problems.push(Problem::new(
                        format!("metadata_endpoint.audiences[{j}]"),
                        e.to_string(),
                    ));
                }
            }
        }
        if self.server.ready_after_prefetch && self.prefetch.is_empty() {
            problems.push(Problem::new(
                "server.ready_after_prefetch",
                "is set but no [[prefetch]] audiences are configured",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            problems.push(Problem::new("log.filter", e.to_string()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The identities to run: those configured, else application default
    /// credentials as Google's libraries find them (a key file named by
    /// `GOOGLE_APPLICATION_CREDENTIALS`, else the metadata server).
    pub fn effective_identities(&self, env: &HashMap<String, String>) -> Vec<IdentitySettings> {
        if !self.identities.is_empty() {
            return self.identities.clone();
        }
        let adc = env.get(CREDENTIALS_ENV).filter(|path| !path.is_empty());
        vec![IdentitySettings {
            name: DEFAULT_IDENTITY.into(),
            source: if adc.is_some() {
                SourceKind::ServiceAccountKey
            } else {
                SourceKind::Metadata
            },
            key_file: adc.map(PathBuf::from),
            metadata_host: None,
            allow_insecure_key_permissions: false,
        }]
    }

    /// The socket to serve on: the configured one (flag and
    /// `TOKEN_BROKER_SOCKET` are already folded in by [`Settings::load`]),
    /// else the default for this user.
    pub fn socket_path(&self, env: &HashMap<String, String>) -> PathBuf {
        self.server
            .socket_path
            .clone()
            .unwrap_or_else(|| default_socket_path(env))
    }

    /// Socket permission bits (validated).
    pub fn socket_mode(&self) -> u32 {
        parse_mode(&self.server.socket_mode).unwrap_or(0o660)
    }
}

/// Socket resolution shared by the server and the clients: flag, then env
/// `TOKEN_BROKER_SOCKET`, then config, then the default for this user.
pub fn resolve_socket_path(
    flag: Option<&Path>,
    env: &HashMap<String, String>,
    configured: Option<&Path>,
) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    if let Some(path) = env.get(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    if let Some(path) = configured {
        return path.to_path_buf();
    }
    default_socket_path(env)
}

fn default_socket_path(env: &HashMap<String, String>) -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/token-broker/broker.sock");
    }
    match env.get("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(dir) => Path::new(dir).join("token-broker.sock"),
        None => std::env::temp_dir().join(format!(
            "token-broker-{}.sock",
            nix::unistd::geteuid().as_raw()
        )),
    }
}

/// A per-uid share must be at least 1; above its total it is the total
/// (so lowering a total alone stays valid).
fn share_problems(key: &str, share: usize, problems: &mut Vec<Problem>) {
    if share == 0 {
        problems.push(Problem::new(key, "must be at least 1"));
    }
}

/// A connection timeout must leave a client time to talk.
fn timeout_problems(key: &str, timeout: Duration, problems: &mut Vec<Problem>) {
    if timeout < Duration::from_millis(100) {
        problems.push(Problem::new(key, "must be at least 100ms"));
    }
}

fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if !digits.is_empty() && mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not an octal permission string like \"0660\""
        )),
    }
}

fn validate_identity_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid identity name (1-64 of A-Z a-z 0-9 - _ .)"
        ))
    }
}

fn validate_host(host: &str) -> Result<(), String> {
    let valid = !host.is_empty()
        && !host.contains("://")
        && !host.contains('/')
        && url::Url::parse(&format!("http://{host}/")).is_ok();
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host[:port] (no scheme, no path), e.g. \"169.254.169.254\""
        ))
    }
}

/// A group given by name or id, as a gid.
pub fn resolve_group(group: &crate::policy::Principal) -> Result<u32, String> {
    match group {
        crate::policy::Principal::Id(id) => Ok(*id),
        crate::policy::Principal::Name(name) => name
            .parse::<u32>()
            .ok()
            .or_else(|| {
                nix::unistd::Group::from_name(name)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
            })
            .ok_or_else(|| format!("no such group {name:?} on this system")),
    }
}

/// The process environment as a map, for [`Settings::load`] and friends.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
        let text = "[server]\nsocket_path = \"/file.sock\"\n[refresh]\njitter = \"30s\"\nmax_entries = 5\n";
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
}
