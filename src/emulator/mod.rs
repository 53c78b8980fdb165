//! A small, faithful stand-in for Google, used by `serve --demo`, the
//! `emulator` subcommand and the tests: the OAuth2 token endpoint (jwt-bearer
//! grant, verifying assertions as Google does), the metadata server's
//! service-account routes, and the issuer's public certs. It counts the calls
//! it serves and can inject faults, so tests can assert how often the broker
//! went upstream and how it copes when Google misbehaves.
//!
//! This file holds the public API ([`Emulator`]), the state the routes share,
//! the call statistics and the fault switchboard. The routes live in
//! `metadata.rs` and `token_endpoint.rs`, key material in `keys.rs`.
//!
//! Every timestamp comes from the injected [`Clock`], so a test running on
//! tokio's paused clock moves the emulator's notion of "now" too.

mod aws;
mod iam;
mod keys;
pub mod kubelet;
mod metadata;
mod sts;
mod token_endpoint;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::clock::Clock;

pub use iam::Permission;
pub use keys::{
    generate_service_account_key, write_key_file, GeneratedKey, ServiceAccountRegistration,
};
pub use sts::{SubjectTokenIssuer, WorkloadProvider};

/// The metadata server's default service account unless configured otherwise.
pub const DEFAULT_ACCOUNT_EMAIL: &str = "default@token-broker-emulator.iam.gserviceaccount.com";

/// The `iss` of every ID token Google (and so the emulator) issues.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";

/// Google's real token URL; assertions addressed to it are accepted too, so
/// key files made for Google work against the emulator unchanged.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";

/// How long [`Emulator::shutdown`] lets open connections finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything that can go wrong starting the emulator or handling its keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// The listen address could not be bound.
    #[error("emulator cannot listen on {addr}: {source} (is the port in use? use port 0 for a free one)")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
    /// A service-account key file could not be read.
    #[error("cannot read service-account key file {}: {source}", path.display())]
    ReadKeyFile {
        /// The key file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// A generated key file could not be written.
    #[error("cannot write service-account key file {}: {source}", path.display())]
    WriteKeyFile {
        /// The key file.
        path: PathBuf,
        /// Why writing failed.
        #[source]
        source: std::io::Error,
    },
    /// A key file is not a usable Google service-account key. The message
    /// names the problem, never the key text.
    #[error("invalid service-account key: {0}")]
    InvalidKey(String),
    /// Generating RSA key material failed.
    #[error("generating key material failed: {0}")]
    KeyGeneration(String),
    /// Signing an ID token failed.
    #[error("signing an ID token failed: {0}")]
    Signing(String),
    /// A background task (key generation) panicked or was cancelled.
    #[error("emulator background task failed: {0}")]
    Task(String),
}

/// How to start an [`Emulator`].
#[derive(Clone, Debug)]
pub struct EmulatorOptions {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// Lifetime of issued ID tokens (Google: one hour).
    pub token_lifetime: Duration,
    /// Email of the metadata server's default service account.
    pub default_account_email: String,
    /// Service-account keys the token endpoint accepts from the start.
    pub service_accounts: Vec<ServiceAccountRegistration>,
    /// The source of all timestamps.
    pub clock: Clock,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            token_lifetime: Duration::from_secs(3600),
            default_account_email: DEFAULT_ACCOUNT_EMAIL.to_owned(),
            service_accounts: Vec::new(),
            clock: Clock::system(),
        }
    }
}

/// Calls the emulator has served, by endpoint. Also the JSON of
/// `GET /emulator/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Metadata server `.../identity` calls.
    pub identity: EndpointStats,
    /// `POST /token` calls.
    pub token: EndpointStats,
    /// Metadata server `.../email` and `.../?recursive=true` calls.
    pub email: u64,
    /// Metadata server `.../token` calls (access tokens).
    pub metadata_token: u64,
    /// `POST /token` calls asking for an access token (`scope`); also
    /// counted in `token`, under audience `""`.
    pub token_access: u64,
    /// IAM Credentials `generateIdToken` calls, by audience.
    pub iam: EndpointStats,
    /// IAM Credentials `generateAccessToken` calls.
    pub iam_access: u64,
    /// STS token exchanges, by workload provider audience.
    pub sts: EndpointStats,
    /// Calls to the emulated AWS instance metadata service.
    pub aws_metadata: u64,
}

/// Counters of one token-issuing endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointStats {
    /// Every call, whatever its outcome.
    pub total: u64,
    /// Calls per requested audience (`""` when none could be read).
    pub by_audience: BTreeMap<String, u64>,
    /// Calls answered 200 with a genuine, correct token.
    pub succeeded: u64,
    /// Every other call: error statuses and injected bad answers alike.
    pub failed: u64,
}

/// Faults to inject. Also the JSON of `POST /emulator/faults`; absent fields
/// mean "no fault".
///
/// `token_lifetime_secs` and `metadata_cache_secs` are settings rather than
/// failures: `fail_next` does not limit them. Faults never apply to the
/// email, root or certs routes, so probing and account lookups by the broker
/// do not use up a `fail_next` budget meant for token calls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer this HTTP status: a JSON OAuth error body on `/token`
    /// (`internal_failure` for 5xx), a text body on the metadata server.
    pub status: Option<u16>,
    /// Only the next N matching calls get the failure faults (every field
    /// but `token_lifetime_secs`, `metadata_cache_secs`, `endpoint` and
    /// `flap_secs`); later calls are answered normally. Without it the
    /// faults last until cleared.
    pub fail_next: Option<u64>,
    /// Sleep this long (tokio time, so paused clocks apply) before answering.
    pub delay_ms: Option<u64>,
    /// 200 with a body that is no JWT: `not-a-jwt` from the metadata server,
    /// `{"id_token":"not-a-jwt"}` from `/token`.
    pub malformed: bool,
    /// `/token`: 200 with an access token and no `id_token`.
    pub missing_id_token: bool,
    /// `/token`: 200 with an HTML body.
    pub non_json: bool,
    /// Issue tokens whose `exp` has already passed.
    pub expired: bool,
    /// Issue tokens for another audience than the one asked for.
    pub wrong_audience: bool,
    /// Lifetime of issued tokens, overriding the emulator's setting.
    pub token_lifetime_secs: Option<u64>,
    /// Emulate the metadata server's own cache: answer the SAME token for an
    /// audience until it has fewer than this many seconds left (GCE: 300).
    pub metadata_cache_secs: Option<u64>,
    /// `"identity"`, `"token"`, `"iam"` or `"sts"`: the only endpoint the
    /// faults apply to. `None`: all.
    pub endpoint: Option<String>,
    /// Lifetime of issued access tokens (default 3599 s).
    pub access_token_lifetime_secs: Option<u64>,
    /// With `status`: send `Retry-After: N` (seconds), as Google does on
    /// 429 and 503.
    pub retry_after_secs: Option<u64>,
    /// Accept the request and never answer (a hung upstream).
    pub hang: bool,
    /// Answer 200 with headers, then never send the body.
    pub stall_after_headers: bool,
    /// Send the answer's body at this many bytes per second.
    pub trickle_bytes_per_sec: Option<u64>,
    /// Flapping: the failure faults apply for N seconds, then not for N
    /// seconds, and so on, starting (down) when the faults are set.
    pub flap_secs: Option<u64>,
    /// Pad issued tokens with a junk claim to about this many bytes.
    pub huge_body_bytes: Option<u64>,
    /// Claims written over those of issued tokens (e.g. `exp` = 1e19, a
    /// string `iat`, an `exp` ten years out), signed as usual.
    pub override_claims: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Faults {
    /// Problems that make these faults meaningless, for the HTTP hook to
    /// refuse rather than silently ignore.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(status) = self.status {
            if !(100..=599).contains(&status) {
                problems.push(format!("status {status} is not an HTTP status"));
            }
        }
        if self.retry_after_secs.is_some() && self.status.is_none() {
            problems.push("retry_after_secs needs a status (429 or 503)".to_owned());
        }
        if self.trickle_bytes_per_sec == Some(0) {
            problems.push("trickle_bytes_per_sec must be at least 1".to_owned());
        }
        if self.flap_secs == Some(0) {
            problems.push("flap_secs must be at least 1".to_owned());
        }
        if let Some(endpoint) = self.endpoint.as_deref() {
            if Endpoint::from_name(endpoint).is_none() {
                problems.push(format!(
                    "endpoint {endpoint:?} is unknown; use \"identity\", \"token\", \"iam\" or \"sts\""
                ));
            }
        }
        problems
    }
}

/// The token-issuing endpoints, which faults and stats distinguish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Identity,
    Token,
    Iam,
    Sts,
}

impl Endpoint {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "identity" => Some(Self::Identity),
            "token" => Some(Self::Token),
            "iam" => Some(Self::Iam),
            "sts" => Some(Self::Sts),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Token => "token",
            Self::Iam => "iam",
            Self::Sts => "sts",
        }
    }
}

/// The faults one call actually gets, after the endpoint filter and the
/// `fail_next` countdown.
#[derive(Clone, Debug, Default)]
pub(crate) struct ActiveFaults {
    pub(crate) status: Option<StatusCode>,
    pub(crate) delay: Option<Duration>,
    pub(crate) malformed: bool,
    pub(crate) missing_id_token: bool,
    pub(crate) non_json: bool,
    pub(crate) expired: bool,
    pub(crate) wrong_audience: bool,
    pub(crate) token_lifetime: Option<Duration>,
    pub(crate) metadata_cache: Option<Duration>,
    pub(crate) retry_after: Option<u64>,
    pub(crate) hang: bool,
    pub(crate) stall_after_headers: bool,
    pub(crate) trickle: Option<u64>,
    pub(crate) huge_body: Option<u64>,
    pub(crate) override_claims: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ActiveFaults {
    /// Sleeps for the injected delay, if any; a hang never returns (the
    /// client's timeout ends the call).
    pub(crate) async fn delay(&self) {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        if self.hang {
            std::future::pending::<()>().await;
        }
    }

    /// Whether issued tokens are bent (never kept by the metadata cache).
    pub(crate) fn bends_tokens(&self) -> bool {
        self.expired
            || self.wrong_audience
            || self.override_claims.is_some()
            || self.huge_body.is_some()
    }

    /// Delivers `response` as the transport faults say: `Retry-After` on an
    /// injected status, headers then silence, or a trickle.
    pub(crate) async fn deliver(&self, mut response: Response) -> Response {
        use axum::body::{Body, Bytes};
        use tokio_stream::StreamExt;
        if let (Some(secs), Some(_)) = (self.retry_after, self.status) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        if self.stall_after_headers {
            response.headers_mut().remove(header::CONTENT_LENGTH);
            let never = tokio_stream::pending::<Result<Bytes, std::convert::Infallible>>();
            *response.body_mut() = Body::from_stream(never);
        } else if let Some(rate) = self.trickle {
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let chunks: Vec<Result<Bytes, std::convert::Infallible>> = bytes
                .chunks(usize::try_from(rate).unwrap_or(usize::MAX).max(1))
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let mut parts = parts;
            parts.headers.remove(header::CONTENT_LENGTH);
            let slow = tokio_stream::iter(chunks).throttle(Duration::from_secs(1));
            response = Response::from_parts(parts, Body::from_stream(slow));
        }
        response
    }
}

#[derive(Debug, Default)]
struct FaultState {
    faults: Faults,
    /// Calls left that get the failure faults; `None` = unlimited.
    remaining: Option<u64>,
    /// When the faults were set (the flapping cycle starts here).
    set_at: Option<std::time::SystemTime>,
}

/// The fake instance the metadata server runs on, for `format=full` tokens.
#[derive(Debug)]
pub(crate) struct ComputeEngine {
    pub(crate) project_id: String,
    pub(crate) project_number: u64,
    pub(crate) zone: &'static str,
    pub(crate) instance_id: String,
    pub(crate) instance_name: &'static str,
    pub(crate) instance_creation_timestamp: u64,
}

/// What an ID token is issued for.
pub(crate) struct IdTokenRequest<'a> {
    pub(crate) audience: &'a str,
    /// The account's numeric id: `sub` and `azp`.
    pub(crate) subject: &'a str,
    /// Adds `email` and `email_verified`.
    pub(crate) email: Option<&'a str>,
    /// The `google` claim of metadata `format=full` tokens.
    pub(crate) google: Option<serde_json::Value>,
}

/// A freshly signed ID token.
pub(crate) struct MintedToken {
    pub(crate) jwt: String,
    pub(crate) exp: u64,
}

/// Key of the emulated metadata-server token cache: (audience, format, licenses).
pub(crate) type MetadataCacheKey = (String, String, bool);

/// State shared by every route.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) clock: Clock,
    token_lifetime: Duration,
    pub(crate) default_email: String,
    pub(crate) default_client_id: String,
    pub(crate) compute_engine: ComputeEngine,
    issuer: keys::IssuerKey,
    pub(crate) token_url: String,
    pub(crate) accounts: Mutex<keys::AccountRegistry>,
    stats: Mutex<Stats>,
    faults: Mutex<FaultState>,
    pub(crate) metadata_cache: Mutex<HashMap<MetadataCacheKey, MintedTokenEntry>>,
    /// Access tokens issued and not revoked: token → what it stands for.
    pub(crate) access_tokens: Mutex<HashMap<String, IssuedAccessToken>>,
    /// IAM grants: (caller principal, target account, permission).
    pub(crate) grants: Mutex<HashSet<(String, String, Permission)>>,
    /// Workload identity providers STS accepts subject tokens from.
    pub(crate) providers: Mutex<Vec<WorkloadProvider>>,
    /// User credentials: refresh token → the user and its OAuth client.
    pub(crate) users: Mutex<HashMap<String, AuthorizedUser>>,
    /// The emulated AWS instance and its role.
    pub(crate) aws: Mutex<aws::AwsInstance>,
}

/// A user who signed in with an OAuth client (`authorized_user` files).
#[derive(Clone, Debug)]
pub(crate) struct AuthorizedUser {
    pub(crate) email: String,
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
}

/// What an issued access token stands for.
#[derive(Clone, Debug)]
pub(crate) struct IssuedAccessToken {
    /// An account email, or a federated `principal://...`.
    pub(crate) principal: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) exp: u64,
}

/// A token held by the emulated metadata-server cache.
#[derive(Clone, Debug)]
pub(crate) struct MintedTokenEntry {
    pub(crate) jwt: String,
    pub(crate) exp: u64,
}

/// Locks a std mutex, shrugging off poisoning: every critical section here is
/// a few field updates that cannot leave the data half-written in a way that
/// matters to a test double. These guards are never held across `.await`.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Counts a call as it arrives, so a test can see a delayed call in flight.
    pub(crate) fn count_call(&self, endpoint: Endpoint, audience: &str) {
        let mut stats = lock(&self.stats);
        let counters = stats.endpoint_mut(endpoint);
        counters.total += 1;
        *counters.by_audience.entry(audience.to_owned()).or_insert(0) += 1;
    }

    /// Counts how a call ended.
    pub(crate) fn count_outcome(&self, endpoint: Endpoint, succeeded: bool) {
        let mut stats = lock(&self.stats);
        let counters = stats.endpoint_mut(endpoint);
        if succeeded {
            counters.succeeded += 1;
        } else {
            counters.failed += 1;
        }
    }

    pub(crate) fn count_email(&self) {
        lock(&self.stats).email += 1;
    }

    /// Updates the call counters.
    pub(crate) fn count(&self, update: impl FnOnce(&mut Stats)) {
        update(&mut lock(&self.stats));
    }

    /// Issues an access token for `principal`: (token, lifetime in seconds).
    pub(crate) fn issue_access_token(
        &self,
        principal: &str,
        scopes: Vec<String>,
        lifetime: Option<Duration>,
    ) -> (String, u64) {
        let forced = lock(&self.faults).faults.access_token_lifetime_secs;
        let lifetime = forced
            .map(Duration::from_secs)
            .or(lifetime)
            .unwrap_or(Duration::from_secs(3599))
            .as_secs();
        let token = format!("ya29.emulator-{}", keys::random_key_id());
        lock(&self.access_tokens).insert(
            token.clone(),
            IssuedAccessToken {
                principal: principal.to_owned(),
                scopes,
                exp: self.clock.unix_seconds().saturating_add(lifetime),
            },
        );
        (token, lifetime)
    }

    /// The faults for one call to `endpoint`, using up one `fail_next` unit.
    pub(crate) fn faults_for(&self, endpoint: Endpoint) -> ActiveFaults {
        let mut state = lock(&self.faults);
        let faults = state.faults.clone();
        if let Some(only) = faults.endpoint.as_deref() {
            if only != endpoint.name() {
                return ActiveFaults::default();
            }
        }
        let mut active = ActiveFaults {
            token_lifetime: faults.token_lifetime_secs.map(Duration::from_secs),
            metadata_cache: faults.metadata_cache_secs.map(Duration::from_secs),
            ..ActiveFaults::default()
        };
        let down = match (faults.flap_secs, state.set_at) {
            (Some(period), Some(set_at)) => {
                let elapsed = self.clock.now().duration_since(set_at).unwrap_or_default();
                (elapsed.as_secs() / period) % 2 == 0
            }
            _ => true,
        };
        let failing = down
            && match state.remaining {
                None => true,
                Some(0) => false,
                Some(n) => {
                    state.remaining = Some(n - 1);
                    true
                }
            };
        if failing {
            active.status = faults
                .status
                .map(|s| StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
            active.delay = faults.delay_ms.map(Duration::from_millis);
            active.malformed = faults.malformed;
            active.missing_id_token = faults.missing_id_token;
            active.non_json = faults.non_json;
            active.expired = faults.expired;
            active.wrong_audience = faults.wrong_audience;
            active.retry_after = faults.retry_after_secs;
            active.hang = faults.hang;
            active.stall_after_headers = faults.stall_after_headers;
            active.trickle = faults.trickle_bytes_per_sec;
            active.huge_body = faults.huge_body_bytes;
            active.override_claims = faults.override_claims;
        }
        active
    }

    fn set_faults(&self, faults: Faults) {
        let mut state = lock(&self.faults);
        state.remaining = faults.fail_next;
        state.set_at = Some(self.clock.now());
        state.faults = faults;
        // A new fault set starts from an empty metadata cache, so a test that
        // turns caching on sees exactly the tokens issued after that.
        lock(&self.metadata_cache).clear();
    }

    /// Lifetime of the next issued token.
    pub(crate) fn lifetime(&self, faults: &ActiveFaults) -> Duration {
        faults.token_lifetime.unwrap_or(self.token_lifetime)
    }

    /// Signs an ID token as Google would, bent by the `expired` and
    /// `wrong_audience` faults.
    pub(crate) fn mint_id_token(
        &self,
        request: &IdTokenRequest<'_>,
        faults: &ActiveFaults,
    ) -> Result<MintedToken, EmulatorError> {
        let lifetime = self.lifetime(faults).as_secs();
        let now = self.clock.unix_seconds();
        let (iat, exp) = if faults.expired {
            // Expired a minute ago: past any reasonable clock-skew allowance.
            let exp = now.saturating_sub(60);
            (exp.saturating_sub(lifetime), exp)
        } else {
            (now, now.saturating_add(lifetime))
        };
        let audience = if faults.wrong_audience {
            format!("{}-wrong-audience", request.audience)
        } else {
            request.audience.to_owned()
        };
        let mut claims = serde_json::Map::new();
        claims.insert("iss".into(), GOOGLE_ISSUER.into());
        claims.insert("aud".into(), audience.into());
        claims.insert("azp".into(), request.subject.into());
        claims.insert("sub".into(), request.subject.into());
        claims.insert("iat".into(), iat.into());
        claims.insert("exp".into(), exp.into());
        // RS256 signatures are deterministic: without a unique claim two
        // tokens minted in the same second would be byte-identical, and a
        // test could not tell a refresh from a cache hit.
        claims.insert("jti".into(), keys::random_key_id().into());
        if let Some(email) = request.email {
            claims.insert("email".into(), email.into());
            claims.insert("email_verified".into(), true.into());
        }
        if let Some(google) = &request.google {
            claims.insert("google".into(), google.clone());
        }
        if let Some(bytes) = faults.huge_body {
            // base64 grows text by 4/3: pad to about `bytes` of JWT.
            let pad = usize::try_from(bytes / 4 * 3).unwrap_or(usize::MAX);
            claims.insert("padding".into(), "x".repeat(pad).into());
        }
        if let Some(overrides) = &faults.override_claims {
            for (name, value) in overrides {
                claims.insert(name.clone(), value.clone());
            }
        }
        let jwt = self.issuer.sign(&claims)?;
        Ok(MintedToken { jwt, exp })
    }

    /// The URLs an assertion's `aud` may name.
    pub(crate) fn accepted_token_audiences(&self, host: Option<&str>) -> Vec<String> {
        let mut accepted = vec![self.token_url.clone(), GOOGLE_TOKEN_URL.to_owned()];
        // Reached under another name (e.g. localhost, or a 0.0.0.0 listener
        // from another machine): the URL the client used is also "ours".
        if let Some(host) = host {
            accepted.push(format!("http://{host}/token"));
        }
        accepted
    }
}

impl Stats {
    fn endpoint_mut(&mut self, endpoint: Endpoint) -> &mut EndpointStats {
        match endpoint {
            Endpoint::Identity => &mut self.identity,
            Endpoint::Token => &mut self.token,
            Endpoint::Iam => &mut self.iam,
            Endpoint::Sts => &mut self.sts,
        }
    }
}

/// Logs one served call. Audiences are not secret; tokens and keys never
/// reach this line.
pub(crate) fn log_call(path: &str, audience: &str, status: StatusCode) {
    tracing::debug!(path, audience, status = status.as_u16(), "emulator call");
}

/// A running emulator. Dropping it stops the server at once; [`Self::shutdown`]
/// lets open requests finish first.
#[derive(Debug)]
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The address URLs name: the bound one, with an unspecified IP replaced
    /// by loopback so the URLs are dialable.
    url_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Generates the issuer key, binds `options.listen` and starts serving.
    pub async fn start(options: EmulatorOptions) -> Result<Emulator, EmulatorError> {
        let issuer = tokio::task::spawn_blocking(keys::IssuerKey::generate)
            .await
            .map_err(|e| EmulatorError::Task(e.to_string()))??;
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| EmulatorError::Bind {
                addr: options.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: options.listen,
                source,
            })?;
        let url_addr = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
            }
            _ => addr,
        };

        let mut accounts = keys::AccountRegistry::default();
        for registration in options.service_accounts {
            accounts.register(registration);
        }
        let now = options.clock.unix_seconds();
        let compute_engine = ComputeEngine {
            project_id: keys::project_id_from_email(&options.default_account_email),
            project_number: rand::random_range(100_000_000_000..1_000_000_000_000),
            zone: "us-central1-a",
            instance_id: rand::random_range(
                1_000_000_000_000_000_000u64..10_000_000_000_000_000_000,
            )
            .to_string(),
            instance_name: "token-broker-emulator",
            // The instance "booted" a day before the emulator started.
            instance_creation_timestamp: now.saturating_sub(86_400),
        };
        let shared = Arc::new(Shared {
            clock: options.clock,
            token_lifetime: options.token_lifetime,
            default_email: options.default_account_email,
            default_client_id: keys::random_numeric_id(),
            compute_engine,
            issuer,
            token_url: format!("http://{url_addr}/token"),
            accounts: Mutex::new(accounts),
            stats: Mutex::new(Stats::default()),
            faults: Mutex::new(FaultState::default()),
            metadata_cache: Mutex::new(HashMap::new()),
            access_tokens: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashSet::new()),
            providers: Mutex::new(Vec::new()),
            users: Mutex::new(HashMap::new()),
            aws: Mutex::new(aws::AwsInstance::new()),
        });

        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let app = router(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async move {
                // A dropped sender means the Emulator is gone: stop too.
                let _ = shutdown_rx.await;
            });
            if let Err(error) = server.await {
                tracing::warn!(%error, "emulator server stopped with an error");
            }
        });
        tracing::info!(%addr, "emulator listening");
        Ok(Emulator {
            shared,
            addr,
            url_addr,
            shutdown: Some(shutdown_tx),
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.url_addr)
    }

    /// `127.0.0.1:PORT`, the form `GCE_METADATA_HOST` takes.
    pub fn metadata_host(&self) -> String {
        self.url_addr.to_string()
    }

    /// `http://127.0.0.1:PORT/token`, the `token_uri` for key files.
    pub fn token_uri(&self) -> String {
        self.shared.token_url.clone()
    }

    /// Accepts a service-account key at the token endpoint from now on.
    pub fn register_service_account(&self, reg: ServiceAccountRegistration) {
        lock(&self.shared.accounts).register(reg);
    }

    /// Creates a service account without a key (one that is only ever
    /// impersonated). Accounts with a registered key exist already.
    pub fn create_service_account(&self, email: &str) {
        lock(&self.shared.accounts).register_keyless(email);
    }

    /// Lets `caller` (an account email, or a federated `principal://...`)
    /// use `permission` on the account `target`.
    pub fn grant(&self, caller: &str, target: &str, permission: Permission) {
        lock(&self.shared.grants).insert((caller.to_owned(), target.to_owned(), permission));
    }

    /// Takes back a grant made with [`Emulator::grant`].
    pub fn revoke_grant(&self, caller: &str, target: &str, permission: Permission) {
        lock(&self.shared.grants).remove(&(caller.to_owned(), target.to_owned(), permission));
    }

    /// What the emulator issued `token` to (a tokeninfo-style lookup):
    /// the principal and its scopes, or `None` for a token it never issued
    /// or has revoked.
    pub fn access_token_info(&self, token: &str) -> Option<(String, Vec<String>)> {
        lock(&self.shared.access_tokens)
            .get(token)
            .map(|t| (t.principal.clone(), t.scopes.clone()))
    }

    /// Every access token issued and not revoked, for tests that check
    /// none of them reached a log.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        lock(&self.shared.access_tokens).keys().cloned().collect()
    }

    /// Revokes every access token issued so far: IAM answers 401 to them.
    pub fn revoke_access_tokens(&self) {
        lock(&self.shared.access_tokens).clear();
    }

    /// Registers a user signed in with OAuth client (`client_id`,
    /// `client_secret`); returns the refresh token the token endpoint's
    /// refresh grant accepts for them.
    pub fn register_authorized_user(
        &self,
        email: &str,
        client_id: &str,
        client_secret: &str,
    ) -> String {
        let refresh_token = format!("1//emulator-{}", keys::random_key_id());
        lock(&self.shared.users).insert(
            refresh_token.clone(),
            AuthorizedUser {
                email: email.to_owned(),
                client_id: client_id.to_owned(),
                client_secret: client_secret.to_owned(),
            },
        );
        refresh_token
    }

    /// The emulated AWS instance role's session ARN, the federated subject
    /// of its `aws4_request` subject tokens.
    pub fn aws_role_arn(&self) -> String {
        lock(&self.shared.aws).arn()
    }

    /// The emulated AWS role's credentials (access key id, secret, session
    /// token), as `AWS_ACCESS_KEY_ID` and friends would hold them.
    pub fn aws_credentials(&self) -> (String, String, String) {
        let aws = lock(&self.shared.aws);
        (
            aws.access_key_id.clone(),
            aws.secret_access_key.clone(),
            aws.session_token.clone(),
        )
    }

    /// The last `aws4_request` subject token STS accepted.
    pub fn last_aws_subject_token(&self) -> Option<String> {
        lock(&self.shared.aws).last_subject_token.clone()
    }

    /// Makes STS accept subject tokens of `provider`.
    pub fn add_workload_provider(&self, provider: WorkloadProvider) {
        lock(&self.shared.providers).push(provider);
    }

    /// `http://127.0.0.1:PORT/v1/token`, the STS `token_url`.
    pub fn sts_token_url(&self) -> String {
        format!("{}/v1/token", self.base_url())
    }

    /// A snapshot of the call counters.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// Zeroes the call counters.
    pub fn reset_stats(&self) {
        *lock(&self.shared.stats) = Stats::default();
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.shared.set_faults(Faults::default());
    }

    /// The public key issued tokens verify with.
    pub fn issuer_decoding_key(&self) -> jsonwebtoken::DecodingKey {
        self.shared.issuer.decoding_key()
    }

    /// The `kid` of issued tokens.
    pub fn issuer_key_id(&self) -> String {
        self.shared.issuer.key_id().to_owned()
    }

    /// Stops accepting connections and waits (a few seconds at most) for open
    /// requests to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Serves until the server ends. Dropping this future (e.g. when a
    /// `select!` on ctrl-c wins) drops the emulator and so stops it.
    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(metadata::root))
        .route("/computeMetadata", get(metadata::handle))
        .route("/computeMetadata/", get(metadata::handle))
        .route("/computeMetadata/{*path}", get(metadata::handle))
        .route("/token", post(token_endpoint::handle))
        .route("/v1/token", post(sts::handle))
        .route("/latest/api/token", axum::routing::put(aws::session))
        .route("/latest/meta-data/{*path}", get(aws::metadata))
        .route(
            "/v1/projects/{project}/serviceAccounts/{method}",
            post(iam::handle),
        )
        .route("/oauth2/v1/certs", get(certs_v1))
        .route("/oauth2/v3/certs", get(certs_v3))
        .route("/oauth2/v3/tokeninfo", get(tokeninfo))
        .route("/emulator/stats", get(get_stats))
        .route("/emulator/stats/reset", post(reset_stats))
        .route("/emulator/faults", post(set_faults).delete(clear_faults))
        .fallback(not_found)
        .with_state(shared)
}

/// Google's access-token introspection (`GET /oauth2/v3/tokeninfo?
/// access_token=`): who a token the emulator issued belongs to, its scopes
/// and expiry; 400 `invalid_token` for one it never issued, revoked, or
/// that has expired.
async fn tokeninfo(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let now = shared.clock.unix_seconds();
    let issued = query
        .get("access_token")
        .and_then(|t| lock(&shared.access_tokens).get(t).cloned())
        .filter(|t| t.exp > now);
    let Some(token) = issued else {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({
                "error": "invalid_token",
                "error_description": "Invalid Value",
            })),
        )
            .into_response();
    };
    let mut body = serde_json::json!({
        "azp": token.principal,
        "aud": token.principal,
        "scope": token.scopes.join(" "),
        "exp": token.exp.to_string(),
        "expires_in": (token.exp - now).to_string(),
    });
    if token.principal.contains('@') {
        body["email"] = token.principal.clone().into();
        body["email_verified"] = "true".into();
    }
    Json(body).into_response()
}

async fn certs_v1(State(shared): State<Arc<Shared>>) -> Response {
    certs_response(shared.issuer.certs_v1())
}

async fn certs_v3(State(shared): State<Arc<Shared>>) -> Response {
    certs_response(shared.issuer.jwks())
}

fn certs_response(body: serde_json::Value) -> Response {
    // Google lets verifiers cache its certs for hours; the issuer key here
    // lives as long as the process, so the same holds.
    (
        [(header::CACHE_CONTROL, "public, max-age=3600")],
        Json(body),
    )
        .into_response()
}

async fn get_stats(State(shared): State<Arc<Shared>>) -> Json<Stats> {
    Json(lock(&shared.stats).clone())
}

async fn reset_stats(State(shared): State<Arc<Shared>>) -> StatusCode {
    *lock(&shared.stats) = Stats::default();
    StatusCode::NO_CONTENT
}

async fn set_faults(State(shared): State<Arc<Shared>>, Json(faults): Json<Faults>) -> Response {
    let problems = faults.problems();
    if !problems.is_empty() {
        return (StatusCode::BAD_REQUEST, problems.join("\n") + "\n").into_response();
    }
    tracing::debug!(?faults, "emulator faults set");
    shared.set_faults(faults);
    StatusCode::NO_CONTENT.into_response()
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.set_faults(Faults::default());
    StatusCode::NO_CONTENT
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "Not Found\n").into_response()
}

#[cfg(test)]
pub(crate) mod test_support;

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[tokio::test]
    async fn identity_faults_fail_next_then_recover() {
        let emulator = start().await;
        let client = client();
        emulator.set_faults(Faults {
            status: Some(503),
            fail_next: Some(2),
            ..Faults::default()
        });
        for _ in 0..2 {
            let response = client
                .get(identity_url(&emulator, "aud-a", "full"))
                .header("Metadata-Flavor", "Google")
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), 503);
            assert_eq!(response.headers()["metadata-flavor"], "Google");
        }
        let jwt = get_identity(&client, &emulator, "aud-a", "full").await;
        verify(&jwt, &emulator.issuer_decoding_key(), "aud-a");

        emulator.set_faults(Faults {
            malformed: true,
            ..Faults::default()
        });
        assert_eq!(
            get_identity(&client, &emulator, "aud-a", "full").await,
            "not-a-jwt"
        );

        emulator.set_faults(Faults {
            expired: true,
            ..Faults::default()
        });
        let claims = unverified(&get_identity(&client, &emulator, "aud-a", "full").await);
        assert!(claims["exp"].as_i64().expect("exp") < unix_now());

        emulator.set_faults(Faults {
            wrong_audience: true,
            token_lifetime_secs: Some(120),
            ..Faults::default()
        });
        let claims = unverified(&get_identity(&client, &emulator, "aud-a", "full").await);
        assert_ne!(claims["aud"], "aud-a");
        assert_eq!(
            claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
            120
        );

        // Faults aimed at the token endpoint leave the metadata server alone.
        emulator.set_faults(Faults {
            status: Some(500),
            endpoint: Some("token".into()),
            ..Faults::default()
        });
        get_identity(&client, &emulator, "aud-a", "full").await;

        let stats = emulator.stats();
        assert_eq!(stats.identity.total, 7);
        assert_eq!(stats.identity.succeeded, 2);
        assert_eq!(stats.identity.failed, 5);
    }

    #[tokio::test]
    async fn stats_and_faults_over_http() {
        let emulator = start().await;
        let client = client();
        let base = emulator.base_url();
        get_identity(&client, &emulator, "aud-1", "full").await;
        get_identity(&client, &emulator, "aud-1", "standard").await;
        get_identity(&client, &emulator, "aud-2", "full").await;

        let stats: Stats = client
            .get(format!("{base}/emulator/stats"))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json");
        assert_eq!(stats, emulator.stats());
        assert_eq!(stats.identity.total, 3);
        assert_eq!(stats.identity.succeeded, 3);
        assert_eq!(stats.identity.by_audience["aud-1"], 2);
        assert_eq!(stats.identity.by_audience["aud-2"], 1);

        let response = client
            .post(format!("{base}/emulator/faults"))
            .json(&serde_json::json!({"status": 429, "endpoint": "identity"}))
            .send()
            .await
            .expect("set faults");
        assert_eq!(response.status(), 204);
        let response = client
            .get(identity_url(&emulator, "aud-1", "full"))
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 429);

        // Typos and nonsense are refused rather than silently ignored.
        for bad in [
            serde_json::json!({"stauts": 500}),
            serde_json::json!({"endpoint": "metadata"}),
        ] {
            let response = client
                .post(format!("{base}/emulator/faults"))
                .json(&bad)
                .send()
                .await
                .expect("set faults");
            assert!(response.status().is_client_error(), "{bad}");
        }

        let response = client
            .delete(format!("{base}/emulator/faults"))
            .send()
            .await
            .expect("clear faults");
        assert_eq!(response.status(), 204);
        get_identity(&client, &emulator, "aud-1", "full").await;

        let response = client
            .post(format!("{base}/emulator/stats/reset"))
            .send()
            .await
            .expect("reset");
        assert_eq!(response.status(), 204);
        assert_eq!(emulator.stats(), Stats::default());
        emulator.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn hostile_upstream_faults() {
        let emulator = Emulator::start(EmulatorOptions {
            clock: Clock::tokio(),
            ..EmulatorOptions::default()
        })
        .await
        .expect("start");
        let client = client();
        let send = || {
            client
                .get(identity_url(&emulator, "aud", "full"))
                .header("Metadata-Flavor", "Google")
                .send()
        };

        emulator.set_faults(Faults {
            status: Some(429),
            retry_after_secs: Some(30),
            ..Faults::default()
        });
        let response = send().await.expect("send");
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "30");

        // Claims written over, signed as usual; padding to a huge size.
        emulator.set_faults(Faults {
            override_claims: serde_json::json!({"exp": 9.3e18, "iat": "soon"})
                .as_object()
                .cloned(),
            huge_body_bytes: Some(100_000),
            ..Faults::default()
        });
        let jwt = get_identity(&client, &emulator, "aud", "full").await;
        assert!(jwt.len() >= 99_000, "{}", jwt.len());
        let claims = unverified(&jwt);
        assert_eq!(claims["exp"], 9.3e18);
        assert_eq!(claims["iat"], "soon");

        // Flapping: down for 20 s, up for 20 s, down again.
        emulator.set_faults(Faults {
            status: Some(503),
            flap_secs: Some(20),
            ..Faults::default()
        });
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(send().await.expect("send").status().as_u16());
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        assert_eq!(seen, [503, 200, 503]);

        // A trickle delivers the whole body, slowly.
        emulator.set_faults(Faults {
            trickle_bytes_per_sec: Some(100),
            ..Faults::default()
        });
        let started = tokio::time::Instant::now();
        let jwt = get_identity(&client, &emulator, "aud", "full").await;
        assert!(started.elapsed() >= Duration::from_secs(jwt.len() as u64 / 100 - 1));
        verify(&jwt, &emulator.issuer_decoding_key(), "aud");

        // Headers, then nothing; and no answer at all.
        emulator.set_faults(Faults {
            stall_after_headers: true,
            ..Faults::default()
        });
        let response = send().await.expect("headers arrive");
        assert_eq!(response.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(600), response.text()).await;
        assert!(body.is_err(), "the body never comes");
        emulator.set_faults(Faults {
            hang: true,
            ..Faults::default()
        });
        assert!(
            tokio::time::timeout(Duration::from_secs(600), send())
                .await
                .is_err(),
            "no answer"
        );
    }

    #[tokio::test]
    async fn metadata_cache_returns_the_same_token() {
        let emulator = start().await;
        let client = client();
        let first = get_identity(&client, &emulator, "aud", "full").await;
        let second = get_identity(&client, &emulator, "aud", "full").await;
        assert_ne!(first, second, "without the cache every call mints a token");

        emulator.set_faults(Faults {
            metadata_cache_secs: Some(300),
            ..Faults::default()
        });
        let cached = get_identity(&client, &emulator, "aud", "full").await;
        assert_eq!(
            get_identity(&client, &emulator, "aud", "full").await,
            cached
        );
        // Cached per audience.
        assert_ne!(
            get_identity(&client, &emulator, "other", "full").await,
            cached
        );

        // Tokens living less than the cache threshold are never reused.
        emulator.set_faults(Faults {
            metadata_cache_secs: Some(300),
            token_lifetime_secs: Some(200),
            ..Faults::default()
        });
        let short = get_identity(&client, &emulator, "aud", "full").await;
        assert_ne!(get_identity(&client, &emulator, "aud", "full").await, short);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_clock_drives_delays_and_timestamps() {
        let emulator = Emulator::start(EmulatorOptions {
            clock: Clock::tokio(),
            ..EmulatorOptions::default()
        })
        .await
        .expect("start");
        let client = client();
        let before = get_identity(&client, &emulator, "aud", "full").await;
        let iat_before = unverified(&before)["iat"].as_u64().expect("iat");

        // A ten-minute injected delay passes instantly in paused time and
        // moves the emulator's clock with it.
        emulator.set_faults(Faults {
            delay_ms: Some(600_000),
            ..Faults::default()
        });
        let started = tokio::time::Instant::now();
        let after = get_identity(&client, &emulator, "aud", "full").await;
        assert!(started.elapsed() >= Duration::from_secs(600));
        let iat_after = unverified(&after)["iat"].as_u64().expect("iat");
        assert!(iat_after >= iat_before + 600, "{iat_before} -> {iat_after}");
    }
}
