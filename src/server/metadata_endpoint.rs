//! The optional metadata-compatible HTTP endpoint (`[metadata_endpoint]`):
//! answers like the GCE metadata server (PROTOCOLS.md §3) so unmodified
//! Google client libraries get their ID tokens from the broker's cache with
//! nothing but `GCE_METADATA_HOST` changed.
//!
//! Routes (every answer carries `Metadata-Flavor: Google`):
//!
//! | path | answer |
//! | --- | --- |
//! | `/` | 200, the ping libraries use to detect a metadata server |
//! | `.../service-accounts/{default,EMAIL}/identity?audience=A[&format=standard\|full]` | 200 text/plain: the bare JWT, from the same cache as gRPC |
//! | `.../service-accounts/{default,EMAIL}/email` | 200 text/plain: the identity's account |
//! | `.../service-accounts/{default,EMAIL}/?recursive=true` | 200 application/json: `aliases`, `email`, `scopes` |
//! | `.../service-accounts/{default,EMAIL}/token` | 404: access tokens are not served |
//!
//! Refusals: 403 without `Metadata-Flavor: Google` (except on `/`, which
//! Go's detection probes without it) or with `X-Forwarded-For` (SSRF); 403
//! for an audience off the optional `audiences` allow-list; 400 for a
//! missing or invalid audience or format; 404 for anything else; 405 for
//! methods other than GET.
//!
//! Upstream failures: 503 when upstream is unavailable or answered something
//! unusable (google-auth retries 5xx, and the cache's single flight and
//! backoff keep those retries off Google); 504 when no token came within
//! [`MAX_WAIT`] (retried too; the fetch goes on); 502 when upstream
//! rejected the credential. 502 rather than 403: a 403 would tell the
//! program (and whoever reads its logs) that *it* was refused, pointing at
//! the wrong fix, while the request was fine and the broker's own
//! credential is what Google turned down. 502 is not in google-auth's retry
//! list, so the client fails at once with the message, which is right for
//! a rejection no retry can fix.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use tokio::time::Instant;

use crate::{
    cache::{CacheError, CacheKey, CacheOutcome, TokenCache},
    config::MetadataEndpointSettings,
    metadata_protocol::{account_and_leaf, Leaf, Query},
    source::SourceError,
};

/// Longest an identity request waits for an upstream fetch. Clients time
/// out sooner (google-auth after 3 s) and retry, joining the same fetch.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// How long in-flight HTTP requests may take to finish after a stop signal.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The audience of the one token minted to learn a metadata-source
/// identity's email when it is asked for before any token was served.
pub const ACCOUNT_PROBE_AUDIENCE: &str = "token-broker-account-probe";

const METADATA_FLAVOR: HeaderName = HeaderName::from_static("metadata-flavor");
const GOOGLE: HeaderValue = HeaderValue::from_static("Google");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const SERVICE_ACCOUNTS: &str = "/computeMetadata/v1/instance/service-accounts/";

/// The endpoint could not listen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    #[error(
        "metadata_endpoint.listen: cannot listen on {addr}: {source} \
         (is another token-broker or a metadata emulator using the port?)"
    )]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The endpoint with its port bound, not yet serving.
pub struct MetadataEndpoint {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    state: Arc<EndpointState>,
}

/// A serving endpoint; [`RunningEndpoint::stop`] begins a graceful stop.
pub struct RunningEndpoint {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

struct EndpointState {
    cache: TokenCache,
    identity: String,
    audiences: Vec<String>,
    email: AccountEmail,
}

impl MetadataEndpoint {
    /// Binds `settings.listen` now, so a busy port fails startup. Must be
    /// called inside the tokio runtime.
    pub fn bind(settings: &MetadataEndpointSettings, cache: TokenCache) -> Result<Self, BindError> {
        let addr = settings.listen;
        let listen_error = |source| BindError::Listen { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_error)?;
        let addr = listener.local_addr().map_err(listen_error)?;
        let known = cache
            .source(&settings.identity)
            .and_then(|source| source.account().map(str::to_owned));
        Ok(Self {
            listener,
            addr,
            state: Arc::new(EndpointState {
                cache,
                identity: settings.identity.clone(),
                audiences: settings.audiences.clone(),
                email: AccountEmail::new(known),
            }),
        })
    }

    /// The bound address (the real port when `listen` named port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves on a background task until [`RunningEndpoint::stop`].
    pub fn spawn(self) -> RunningEndpoint {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&self.state));
        tracing::info!(
            addr = %self.addr,
            identity = %self.state.identity,
            allow_list = self.state.audiences.len(),
            "metadata endpoint listening"
        );
        let task = tokio::spawn(async move {
            let serving = axum::serve(
                self.listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            });
            if let Err(error) = serving.await {
                tracing::error!(%error, "metadata endpoint stopped with an error");
            }
        });
        RunningEndpoint {
            stop: Some(stop_tx),
            task,
        }
    }
}

impl RunningEndpoint {
    /// Stops accepting connections; open requests go on.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops and waits (a few seconds at most) for open requests to finish.
    pub fn finish(mut self) -> impl Future<Output = ()> + Send {
        self.stop();
        async move {
            let abort = self.task.abort_handle();
            if tokio::time::timeout(STOP_GRACE, self.task).await.is_err() {
                tracing::warn!("metadata endpoint requests still open; stopping anyway");
                abort.abort();
            }
        }
    }
}

/// The identity's account email, learned once.
///
/// Key-file identities know it from the key. A metadata-source identity
/// learns it from the `email` claim of the first token the endpoint serves
/// (the broker asks the metadata server for `format=full` tokens, which
/// carry it); if a client asks for the email first, as google-auth does,
/// one token for [`ACCOUNT_PROBE_AUDIENCE`] is minted straight from the
/// source to read it. That works the same for every kind of source without
/// teaching the endpoint where each one's upstream lives, costs one upstream
/// call per broker lifetime, and the probe token is neither cached nor
/// served.
struct AccountEmail {
    known: OnceLock<String>,
    probing: tokio::sync::Mutex<()>,
}

impl AccountEmail {
    fn new(known: Option<String>) -> Self {
        let cell = OnceLock::new();
        if let Some(email) = known {
            let _ = cell.set(email);
        }
        Self {
            known: cell,
            probing: tokio::sync::Mutex::new(()),
        }
    }

    fn learn(&self, email: Option<&str>) {
        if let Some(email) = email.filter(|e| !e.is_empty()) {
            if self.known.get().is_none() {
                let _ = self.known.set(email.to_owned());
            }
        }
    }

    async fn get(&self, cache: &TokenCache, identity: &str) -> Result<String, Refusal> {
        if let Some(email) = self.known.get() {
            return Ok(email.clone());
        }
        // One probe at a time; the others find its result.
        let _probing = self.probing.lock().await;
        if let Some(email) = self.known.get() {
            return Ok(email.clone());
        }
        let Some(source) = cache.source(identity) else {
            return Err(unknown_identity(identity));
        };
        let token = tokio::time::timeout(MAX_WAIT, source.fetch(ACCOUNT_PROBE_AUDIENCE))
            .await
            .map_err(|_| timed_out(identity))?
            .map_err(|e| upstream_failure(&e, "cannot learn the identity's email: "))?;
        match token.email() {
            Some(email) if !email.is_empty() => {
                self.learn(Some(email));
                Ok(email.to_owned())
            }
            _ => Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "identity {identity:?}: its tokens carry no email claim, so the endpoint \
                     cannot name the account"
                ),
            )),
        }
    }
}

/// An error answer: status and a text a person can act on.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Root,
    /// A directory listing with this body.
    Listing(&'static str),
    ServiceAccounts,
    Account {
        account: String,
        leaf: Leaf,
    },
    Unknown,
}

fn route(path: &str) -> Route {
    match path {
        "/" | "" => return Route::Root,
        "/computeMetadata" | "/computeMetadata/" => return Route::Listing("v1/\n"),
        "/computeMetadata/v1" | "/computeMetadata/v1/" => return Route::Listing("instance/\n"),
        "/computeMetadata/v1/instance" | "/computeMetadata/v1/instance/" => {
            return Route::Listing("service-accounts/\n")
        }
        "/computeMetadata/v1/instance/service-accounts" => return Route::ServiceAccounts,
        _ => {}
    }
    let Some(tail) = path.strip_prefix(SERVICE_ACCOUNTS) else {
        return Route::Unknown;
    };
    if tail.is_empty() {
        return Route::ServiceAccounts;
    }
    let (account, leaf) = account_and_leaf(tail);
    Route::Account { account, leaf }
}

/// What one request did, for its log line.
#[derive(Default)]
struct Outcome {
    audience: Option<String>,
    cache: Option<CacheOutcome>,
}

/// Every request: checks, routing, one log line.
async fn handle(
    State(state): State<Arc<EndpointState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let result = answer(&state, &method, &headers, &uri, &mut outcome).await;
    let latency_us = started.elapsed().as_micros() as u64;
    let path = loggable(uri.path());
    let audience = outcome
        .audience
        .as_deref()
        .map(|a| tracing::field::display(loggable(a)));
    let cache = outcome.cache.map(CacheOutcome::as_str);
    match result {
        Ok(response) => {
            tracing::info!(
                target: crate::logging::SERVED_TARGET,
                %peer, %method, %path, identity = %state.identity, audience, cache,
                latency_us, status = response.status().as_u16(), "metadata endpoint"
            );
            response
        }
        Err(refusal) => {
            tracing::info!(
                %peer, %method, %path, identity = %state.identity, audience, cache,
                latency_us, status = refusal.status.as_u16(), error = %refusal.message,
                "metadata endpoint"
            );
            let mut message = refusal.message;
            message.push('\n');
            respond(refusal.status, TEXT, message)
        }
    }
}

async fn answer(
    state: &EndpointState,
    method: &Method,
    headers: &HeaderMap,
    uri: &Uri,
    outcome: &mut Outcome,
) -> Result<Response, Refusal> {
    if method != Method::GET {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed; the metadata endpoint answers GET only"),
        ));
    }
    // SSRF protection, as Google's server: a request relayed by a proxy (or
    // by a server-side fetch of an attacker's URL) must not get credentials.
    if headers.contains_key("x-forwarded-for") {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "Request had an X-Forwarded-For header and was rejected: the metadata endpoint \
             does not accept proxied requests",
        ));
    }
    let route = route(uri.path());
    if route == Route::Root {
        // Detection probes (Go's sends no Metadata-Flavor) need only the
        // response header; the root reveals nothing.
        return Ok(respond(StatusCode::OK, TEXT, "computeMetadata/\n".into()));
    }
    if headers.get(&METADATA_FLAVOR).map(HeaderValue::as_bytes) != Some(b"Google") {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor: Google\"",
        ));
    }
    let query = Query::parse(uri.query());
    match route {
        Route::Root => unreachable!("answered above"),
        Route::Listing(body) => Ok(respond(StatusCode::OK, TEXT, body.into())),
        Route::ServiceAccounts => {
            let email = state.email.get(&state.cache, &state.identity).await?;
            Ok(respond(
                StatusCode::OK,
                TEXT,
                format!("default/\n{email}/\n"),
            ))
        }
        Route::Account { account, leaf } => {
            if leaf == Leaf::Token {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    "access tokens are not served by token-broker: its metadata endpoint serves \
                     ID tokens only (.../service-accounts/default/identity?audience=...)",
                ));
            }
            if leaf == Leaf::Unknown {
                return Err(not_served(uri.path()));
            }
            state.check_account(&account).await?;
            match leaf {
                Leaf::Identity => state.identity_token(&query, outcome).await,
                Leaf::Email => {
                    let email = state.email.get(&state.cache, &state.identity).await?;
                    Ok(respond(StatusCode::OK, TEXT, email))
                }
                Leaf::Directory if query.recursive() => {
                    let email = state.email.get(&state.cache, &state.identity).await?;
                    // No scopes: the broker grants no access tokens.
                    let body = serde_json::json!({
                        "aliases": ["default"],
                        "email": email,
                        "scopes": [],
                    });
                    Ok(respond(StatusCode::OK, JSON, body.to_string()))
                }
                Leaf::Directory => Ok(respond(
                    StatusCode::OK,
                    TEXT,
                    "aliases\nemail\nidentity\nscopes\n".into(),
                )),
                Leaf::Scopes => Ok(respond(StatusCode::OK, TEXT, String::new())),
                Leaf::Aliases => Ok(respond(StatusCode::OK, TEXT, "default\n".into())),
                Leaf::Token | Leaf::Unknown => unreachable!("answered above"),
            }
        }
        Route::Unknown => Err(not_served(uri.path())),
    }
}

impl EndpointState {
    /// `default`, or the identity's own email, names the served account.
    async fn check_account(&self, account: &str) -> Result<(), Refusal> {
        if account == "default" {
            return Ok(());
        }
        // Only an email can match; do not mint a probe token for junk.
        if account.contains('@') && self.email.get(&self.cache, &self.identity).await? == account {
            return Ok(());
        }
        Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "Service account {:?} is not available on this endpoint: it serves token-broker \
                 identity {:?} as \"default\"",
                truncate(account),
                self.identity
            ),
        ))
    }

    async fn identity_token(
        &self,
        query: &Query,
        outcome: &mut Outcome,
    ) -> Result<Response, Refusal> {
        let audience = match query.audience.as_deref() {
            Some(a) if !a.is_empty() => a,
            _ => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "non-empty audience parameter required",
                ))
            }
        };
        outcome.audience = Some(audience.to_owned());
        // `standard` and `full` share the cached token: the broker fetches
        // `full` upstream, and extra claims do not disturb verifiers, while
        // one token per key is what keeps upstream calls down.
        match query.format.as_deref() {
            None | Some("standard") | Some("full") => {}
            Some(_) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "format must be \"standard\" or \"full\"",
                ))
            }
        }
        let key = CacheKey::new(&self.identity, audience)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("invalid audience: {e}")))?;
        if !self.audiences.is_empty() && !self.audiences.iter().any(|a| a == audience) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "audience {:?} is not on this endpoint's allow-list \
                     (metadata_endpoint.audiences); ask the operator to add it",
                    truncate(audience)
                ),
            ));
        }
        let lookup = tokio::time::timeout(MAX_WAIT, self.cache.get(&key, Duration::ZERO))
            .await
            .map_err(|_| timed_out(&self.identity))?
            .map_err(|e| self.cache_failure(e))?;
        outcome.cache = Some(lookup.outcome);
        self.email.learn(lookup.token.email());
        Ok(respond(
            StatusCode::OK,
            TEXT,
            lookup.token.expose().to_owned(),
        ))
    }

    fn cache_failure(&self, err: CacheError) -> Refusal {
        match &err {
            CacheError::InvalidAudience(e) => {
                Refusal::new(StatusCode::BAD_REQUEST, format!("invalid audience: {e}"))
            }
            CacheError::UnknownIdentity(identity) => unknown_identity(identity),
            CacheError::Upstream(source) => upstream_failure(source, ""),
            CacheError::Full { .. } => {
                Refusal::new(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
            }
            _ => Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
        }
    }
}

/// See the module doc for why a rejection is 502 and not 403.
fn upstream_failure(err: &SourceError, context: &str) -> Refusal {
    let status = if err.is_permanent() {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Refusal::new(status, format!("{context}{err}"))
}

fn unknown_identity(identity: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("no identity named {identity:?} is configured"),
    )
}

fn timed_out(identity: &str) -> Refusal {
    Refusal::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "no token for identity {identity:?} within {}s; the upstream fetch continues, retry",
            MAX_WAIT.as_secs()
        ),
    )
}

fn not_served(path: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!(
            "{:?} is not served by token-broker's metadata endpoint; it serves /, \
             {SERVICE_ACCOUNTS}default/identity?audience=..., .../default/email and \
             .../default/?recursive=true",
            truncate(path)
        ),
    )
}

/// Every answer carries `Metadata-Flavor: Google`: clients use it to tell a
/// metadata server from anything else on that address.
fn respond(status: StatusCode, content_type: HeaderValue, body: String) -> Response {
    (
        status,
        [
            (METADATA_FLAVOR, GOOGLE),
            (header::CONTENT_TYPE, content_type),
        ],
        body,
    )
        .into_response()
}

/// Client input echoed into answers is cut short.
fn truncate(text: &str) -> String {
    text.chars().take(256).collect()
}

/// Client input echoed into logs: cut short, `{:?}` escapes the rest.
fn loggable(text: &str) -> String {
    format!("{:?}", truncate(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        assert_eq!(route("/"), Route::Root);
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/default/identity"),
            Route::Account {
                account: "default".into(),
                leaf: Leaf::Identity
            }
        );
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/a%40b.com/email"),
            Route::Account {
                account: "a@b.com".into(),
                leaf: Leaf::Email
            }
        );
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/default/"),
            Route::Account {
                account: "default".into(),
                leaf: Leaf::Directory
            }
        );
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/default"),
            Route::Account {
                account: "default".into(),
                leaf: Leaf::Directory
            }
        );
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/default/token"),
            Route::Account {
                account: "default".into(),
                leaf: Leaf::Token
            }
        );
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/default/identity/x"),
            Route::Account {
                account: "default".into(),
                leaf: Leaf::Unknown
            }
        );
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/"),
            Route::ServiceAccounts
        );
        assert_eq!(
            route("/computeMetadata/v1/project/project-id"),
            Route::Unknown
        );
        assert_eq!(route("/metadata/v1/"), Route::Unknown);
    }

    #[test]
    fn rejections_are_bad_gateway_and_outages_unavailable() {
        let rejected = SourceError::Rejected {
            upstream: "u".into(),
            status: 400,
            message: "invalid_grant".into(),
        };
        assert_eq!(
            upstream_failure(&rejected, "").status,
            StatusCode::BAD_GATEWAY
        );
        let down = SourceError::Unavailable {
            upstream: "u".into(),
            attempts: 3,
            message: "refused".into(),
        };
        assert_eq!(
            upstream_failure(&down, "").status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
