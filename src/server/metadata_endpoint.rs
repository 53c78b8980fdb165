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
//! | `.../service-accounts/{default,EMAIL}/identity?audience=A[&format=standard\|full]` | 200 application/text: the bare JWT, from the same cache as gRPC |
//! | `.../service-accounts/{default,EMAIL}/token[?scopes=A,B]` | 200 application/json: an access token, from the same cache and policy as gRPC |
//! | `.../service-accounts/{default,EMAIL}/{email,scopes,aliases}` | 200 application/text |
//! | `.../service-accounts/[{default,EMAIL}/]?recursive=true` | 200 application/json: `aliases`, `email`, `scopes` |
//! | `project/{project-id,numeric-project-id}`, `instance/{zone,id}`, `universe/universe-domain` and their directories | [`super::metadata_paths`] |
//!
//! Values and directories honour `?alt=json|text` and `?recursive=true` as
//! Google's server does; `?wait_for_change=true` is 400.
//!
//! Who is asking: each connection's peer is resolved at accept to the uid
//! owning its socket ([`super::loopback_peer`]); tokens are then admitted
//! exactly as over the socket ([`super::admission`]: `[[policy]]`, the
//! per-uid new-audience limit), and every request's log line carries
//! `peer_uid`. A peer with no socket on this host (a pod in its own network
//! namespace, on a node address) is attested by its source address instead
//! ([`super::pod_peer`]) and has no uid; for a per-workload identity the
//! token is minted as the caller's account ([`super::workload_account`]),
//! which `.../email` then answers. A peer resolved neither way gets 403 on
//! every path: it is never treated as "no policy, open".
//!
//! Refusals, in the order checked: 403 for a `Host` that does not name this
//! endpoint (`localhost`, `metadata.google.internal`, `metadata`,
//! `169.254.169.254` or the address connected to, with or without its port,
//! or port 80 for the metadata server's names behind a redirect: a
//! DNS-rebinding web page sends its own name), for an absolute-form request
//! target (a proxy request), or with `X-Forwarded-For`, `Forwarded` or `X-Real-IP` (SSRF
//! through a proxy); 403 for an unresolved peer; 405 for methods other than
//! GET; 403 without `Metadata-Flavor: Google` (except on `/`, which Go's
//! detection probes without it); 403 for an audience off the optional
//! `audiences` allow-list or one `[[policy]]` does not grant the peer; 429
//! (with `Retry-After`) past the peer's new-audience limit; 400 for a
//! missing or invalid audience or format; 404 for anything else. HTTP/2
//! (h2c or prior knowledge) is not spoken at all ([`super::http_listener`]).
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
    borrow::Cow,
    future::Future,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri},
    response::Response,
};
use tokio::time::Instant;

use super::{
    admission::Refused,
    http_listener::{Answer, Connection, ConnectionLimits, HttpListener},
    live::Live,
    metadata_paths::{
        self, refuse_wait_for_change, tree_route, InstanceValues, Tree, APPLICATION_TEXT,
    },
    peer::PeerCredentials,
    workload_account::{self, Record},
};
use crate::{
    cache::{CacheError, CacheKey, CacheOutcome, TokenCache},
    config::MetadataEndpointSettings,
    domain::LogText,
    kubernetes::PodDirectory,
    metadata_protocol::{account_and_leaf, Leaf, Query},
    policy::Decision,
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
/// Error messages are the broker's own plain text.
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const SERVICE_ACCOUNTS: &str = "/computeMetadata/v1/instance/service-accounts/";
/// Headers a proxy adds; as constants, not parsed from text per request.
const RELAYED: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
];

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
    limits: ConnectionLimits,
    state: Arc<EndpointState>,
    /// Pods on this node, for callers from other network namespaces.
    pods: Option<Arc<PodDirectory>>,
}

/// A serving endpoint; [`RunningEndpoint::stop`] begins a graceful stop.
pub struct RunningEndpoint {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

pub(super) struct EndpointState {
    pub(super) cache: TokenCache,
    /// The policy and rate limit, shared with gRPC and replaced by reloads.
    pub(super) live: Arc<Live>,
    pub(super) identity: String,
    audiences: Vec<String>,
    pub(super) email: AccountEmail,
    /// `project/...`, `instance/...`, `universe/...` values.
    pub(super) instance_values: InstanceValues,
    /// The node's pods, for a per-workload identity's callers' accounts.
    pub(super) pods: Option<Arc<PodDirectory>>,
}

impl MetadataEndpoint {
    /// Binds `settings.listen` now, so a busy port fails startup. Must be
    /// called inside the tokio runtime.
    pub(crate) fn bind(
        settings: &MetadataEndpointSettings,
        cache: TokenCache,
        live: Arc<Live>,
        pods: Option<Arc<PodDirectory>>,
    ) -> Result<Self, BindError> {
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
            limits: ConnectionLimits {
                max_connections: settings.max_connections,
                max_connections_per_uid: settings.max_connections_per_uid,
                header_read_timeout: settings.header_read_timeout,
                idle_timeout: settings.idle_timeout,
            },
            state: Arc::new(EndpointState {
                cache,
                live,
                identity: settings.identity.clone(),
                audiences: settings.audiences.clone(),
                email: AccountEmail::new(known),
                instance_values: InstanceValues::new(settings),
                pods: pods.clone(),
            }),
            pods,
        })
    }

    /// The bound address (the real port when `listen` named port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves on a background task until [`RunningEndpoint::stop`].
    pub fn spawn(self) -> RunningEndpoint {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tracing::info!(
            addr = %self.addr,
            identity = %self.state.identity,
            allow_list = self.state.audiences.len(),
            pods_by_address = self.pods.is_some(),
            "metadata endpoint listening"
        );
        if self.pods.is_some() && self.state.live.policy().is_open() {
            tracing::warn!(
                addr = %self.addr,
                "no [[policy]] configured: every pod the kubelet lists on this node may get any \
                 token through the metadata endpoint; write rules with k8s_* selectors"
            );
        }
        let listener = HttpListener {
            name: "metadata_endpoint",
            listener: self.listener,
            router: Endpoint(Arc::clone(&self.state)),
            limits: self.limits,
            resolve_owner: true,
            pods: self.pods,
        };
        let task = tokio::spawn(listener.serve(async move {
            let _ = stop_rx.await;
        }));
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
pub(super) struct AccountEmail {
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

    pub(super) async fn get(&self, cache: &TokenCache, identity: &str) -> Result<String, Refusal> {
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
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) message: String,
    /// Seconds, for a `Retry-After` header.
    retry_after: Option<u64>,
    /// A body to send instead of the message (Google's 404 page), with its
    /// content type; the message is then only logged.
    pub(super) page: Option<(HeaderValue, String)>,
}

impl Refusal {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            page: None,
        }
    }
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Root,
    /// A directory listing with this body.
    Listing(&'static str),
    /// `/computeMetadata/v1/` and the project, instance and universe paths.
    Tree(Tree),
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
        "/computeMetadata/v1/instance/service-accounts" => return Route::ServiceAccounts,
        _ => {}
    }
    if let Some(tree) = tree_route(path) {
        return Route::Tree(tree);
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
pub(super) struct Outcome {
    audience: Option<String>,
    /// An access token's scopes, space-separated.
    pub(super) scopes: Option<String>,
    /// The account a per-workload identity minted as for this caller.
    pub(super) minted_as: Option<String>,
    pub(super) cache: Option<CacheOutcome>,
    pub(super) decision: Option<Decision>,
}

/// Status logged for a request whose client went away before the answer
/// (nginx's "client closed request"); nothing is sent.
const CLIENT_CLOSED: u16 = 499;

/// One request's log line, written once: by [`RequestLine::write`] with the
/// answer, or on drop, when the client went away first and hyper dropped
/// the handler mid-fetch. Every field a client or upstream wrote is capped
/// and quoted ([`LogText`]).
struct RequestLine<'a> {
    peer: SocketAddr,
    /// The uid owning the client's socket and its group, when resolved.
    peer_uid: Option<u32>,
    peer_gid: Option<u32>,
    peer_pid: Option<i32>,
    peer_exe: Option<&'a str>,
    /// The attested selectors, or why there are none.
    selectors: Option<&'a str>,
    method: Cow<'a, str>,
    path: Cow<'a, str>,
    identity: Cow<'a, str>,
    outcome: Outcome,
    started: Instant,
    written: bool,
}

impl RequestLine<'_> {
    fn write(&mut self, status: u16, error: Option<&str>) {
        if self.written {
            return;
        }
        self.written = true;
        let latency_us = self.started.elapsed().as_micros() as u64;
        let audience = self.outcome.audience.as_deref().map(LogText::capped);
        let scopes = self.outcome.scopes.as_deref().map(LogText::capped);
        let error = error.map(LogText::capped);
        let decision = self
            .outcome
            .decision
            .map(|d| if d.allowed() { "allowed" } else { "denied" });
        let rule = self.outcome.decision.map(Decision::rule);
        let mut buffer = [0u8; 64];
        let peer = addr_text(self.peer, &mut buffer);
        // Served lines have a target of their own: the only info lines a
        // full log queue may drop (logging::pipe).
        macro_rules! line {
            ($($target:tt)*) => { tracing::info!(
            $($target)*
            peer = %peer,
            peer_uid = self.peer_uid,
            peer_gid = self.peer_gid,
            peer_pid = self.peer_pid,
            peer_exe = self.peer_exe,
            selectors = self.selectors,
            method = &*self.method,
            path = &*self.path,
            identity = &*self.identity,
            audience = audience.as_deref(),
            scopes = scopes.as_deref(),
            minted_as = self.outcome.minted_as.as_deref(),
            decision,
            rule,
            cache = self.outcome.cache.map(CacheOutcome::as_str),
            latency_us,
            status,
            error = error.as_deref(),
            "metadata endpoint"
        ) };
        }
        if status < 300 {
            line!(target: crate::logging::SERVED_TARGET,);
        } else {
            line!();
        }
    }
}

/// `addr` as its `Display` writes it, in `buffer`: IPv4 (every loopback
/// client but `::1`) by hand, since `core::fmt` spent about 1,300
/// instructions per log line on it.
fn addr_text(addr: SocketAddr, buffer: &mut [u8; 64]) -> &str {
    use std::io::Write;
    let len = match addr {
        SocketAddr::V4(v4) => {
            let mut at = 0;
            let mut push = |text: &[u8]| {
                buffer[at..at + text.len()].copy_from_slice(text);
                at += text.len();
            };
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    push(b".");
                }
                push_decimal(&mut push, u32::from(octet));
            }
            push(b":");
            push_decimal(&mut push, u32::from(v4.port()));
            at
        }
        SocketAddr::V6(_) => {
            let mut cursor = std::io::Cursor::new(&mut buffer[..]);
            // At most 55 bytes: `[` 39 for the address, `%` and 10 for the
            // scope, `]:` and 5 for the port.
            let _ = write!(cursor, "{addr}");
            cursor.position() as usize
        }
    };
    std::str::from_utf8(&buffer[..len]).unwrap_or("?")
}

fn push_decimal(push: &mut impl FnMut(&[u8]), value: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    push(&digits[at..]);
}

impl Drop for RequestLine<'_> {
    fn drop(&mut self) {
        self.write(
            CLIENT_CLOSED,
            Some("the client went away before the answer"),
        );
    }
}

/// Every request goes straight to [`handle`]: an axum router's layers
/// and extractors (which copy the headers) cost more per request than
/// hyper's own work, and the endpoint routes by itself ([`route`]).
#[derive(Clone)]
struct Endpoint(Arc<EndpointState>);

impl Answer for Endpoint {
    async fn answer(
        self,
        request: hyper::Request<hyper::body::Incoming>,
        connection: Arc<Connection>,
    ) -> Response {
        // The body is never read: every route is a GET.
        let (request, _body) = request.into_parts();
        handle(&self.0, &connection, &request).await
    }
}

/// Every request: checks, routing, one log line.
async fn handle(
    state: &EndpointState,
    connection: &Connection,
    request: &axum::http::request::Parts,
) -> Response {
    let (method, headers, uri) = (&request.method, &request.headers, &request.uri);
    let resolved = connection.owner.as_ref().and_then(|o| o.as_ref().ok());
    let mut line = RequestLine {
        peer: connection.peer,
        peer_uid: resolved.and_then(|peer| peer.uid),
        peer_gid: resolved.and_then(|peer| peer.gid),
        peer_pid: resolved.and_then(|peer| peer.pid),
        peer_exe: resolved.and_then(PeerCredentials::exe_text),
        selectors: resolved.and_then(PeerCredentials::selectors_text),
        method: LogText::capped(method.as_str()),
        path: LogText::capped(uri.path()),
        identity: LogText::capped(&state.identity),
        outcome: Outcome::default(),
        started: Instant::now(),
        written: false,
    };
    let result = match admit_connection(connection, headers, uri) {
        Ok(peer) => answer(state, &peer, method, headers, uri, &mut line.outcome).await,
        Err(refusal) => Err(refusal),
    };
    match result {
        Ok(response) => {
            line.write(response.status().as_u16(), None);
            response
        }
        Err(refusal) => {
            line.write(refusal.status.as_u16(), Some(&refusal.message));
            let mut response = match refusal.page {
                Some((content_type, page)) => respond(refusal.status, content_type, page),
                None => {
                    let mut message = refusal.message;
                    message.push('\n');
                    respond(refusal.status, TEXT, message)
                }
            };
            if let Some(retry_after) = refusal.retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            response
        }
    }
}

/// Checks that do not depend on the path: the request is addressed to this
/// endpoint by a local program, not relayed or rebound to it, and its
/// peer's uid is known. Returns the peer as policy decisions see it.
fn admit_connection(
    connection: &Connection,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<PeerCredentials, Refusal> {
    // A web page whose name was rebound to 127.0.0.1 still sends its own
    // name as Host; only names for this endpoint are served.
    let host = headers.get(header::HOST).map(|h| h.to_str().unwrap_or("?"));
    match host {
        Some(host) if host_names_endpoint(host, connection.local) => {}
        Some(host) => {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {} does not name this metadata endpoint and was rejected: use \
                     localhost, metadata.google.internal, metadata, 169.254.169.254 or {} \
                     (DNS-rebinding protection)",
                    LogText::new(host),
                    connection.local.ip()
                ),
            ))
        }
        None => {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "Request had no Host header and was rejected: send Host: localhost \
                 (or metadata.google.internal)",
            ))
        }
    }
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "Request had an absolute-form target (a proxy request) and was rejected: the \
             metadata endpoint does not accept proxied requests",
        ));
    }
    // SSRF protection, as Google's server: a request relayed by a proxy (or
    // by a server-side fetch of an attacker's URL) must not get credentials.
    for relayed in &RELAYED {
        if headers.contains_key(relayed) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Request had a {} header and was rejected: the metadata endpoint does \
                     not accept proxied requests",
                    header_title(relayed.as_str())
                ),
            ));
        }
    }
    match &connection.owner {
        Some(Ok(peer)) => Ok(peer.clone()),
        Some(Err(unresolved)) => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "{unresolved}; token-broker serves only local programs whose user it can \
                 identify, and pods it can tell apart by address, so the request was rejected"
            ),
        )),
        None => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "the connection's user was not resolved, so the request was rejected",
        )),
    }
}

fn header_title(name: &str) -> &'static str {
    match name {
        "x-forwarded-for" => "X-Forwarded-For",
        "forwarded" => "Forwarded",
        _ => "X-Real-IP",
    }
}

/// The metadata server's well-known address (PROTOCOLS.md §3). Accepted as
/// a Host even when the endpoint listens elsewhere: pods reach the endpoint
/// through a node-level redirect of `169.254.169.254:80` (README,
/// Kubernetes) and name it so. A rebinding web page cannot send it: its
/// requests carry the page's own name.
const METADATA_IP: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254));

/// `localhost`, `metadata.google.internal`, `metadata`, `169.254.169.254`,
/// or the address the client connected to; with no port or the one it
/// connected to (or 80 for the metadata server's own names, which a
/// redirected client sends).
fn host_names_endpoint(host: &str, local: SocketAddr) -> bool {
    let host = host.to_ascii_lowercase();
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        // [v6] or [v6]:port
        let Some((name, rest)) = bracketed.split_once(']') else {
            return false;
        };
        match rest {
            "" => (name, None),
            _ => match rest.strip_prefix(':') {
                Some(port) => (name, Some(port)),
                None => return false,
            },
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host.as_str(), None),
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let literal = name.parse::<std::net::IpAddr>().ok();
    let metadata_name =
        matches!(name, "metadata.google.internal" | "metadata") || literal == Some(METADATA_IP);
    if let Some(port) = port {
        let port = port.parse::<u16>().ok();
        if port != Some(local.port()) && !(metadata_name && port == Some(80)) {
            return false;
        }
    }
    match name {
        "localhost" => true,
        _ if metadata_name => true,
        _ => literal.is_some_and(|ip| ip == local.ip() || Some(ip) == mapped(local.ip())),
    }
}

/// `::ffff:127.0.0.1` on a dual-stack listener is named `127.0.0.1`.
fn mapped(ip: std::net::IpAddr) -> Option<std::net::IpAddr> {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4),
        std::net::IpAddr::V4(_) => None,
    }
}

async fn answer(
    state: &EndpointState,
    peer: &PeerCredentials,
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
    let route = route(uri.path());
    if route == Route::Root {
        // Detection probes (Go's sends no Metadata-Flavor) need only the
        // response header; the root reveals nothing.
        return Ok(respond(
            StatusCode::OK,
            APPLICATION_TEXT,
            "computeMetadata/\n".into(),
        ));
    }
    if headers.get(&METADATA_FLAVOR).map(HeaderValue::as_bytes) != Some(b"Google") {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor: Google\"",
        ));
    }
    let query = Query::parse(uri.query());
    refuse_wait_for_change(&query)?;
    match route {
        Route::Root => unreachable!("answered above"),
        Route::Listing(body) => Ok(respond(StatusCode::OK, APPLICATION_TEXT, body.into())),
        Route::Tree(tree) => metadata_paths::tree(state, peer, tree, uri.path(), &query).await,
        Route::ServiceAccounts => metadata_paths::service_accounts(state, peer, &query).await,
        Route::Account { account, leaf } => {
            if leaf == Leaf::Unknown {
                return Err(not_served(uri.path()));
            }
            state.check_account(peer, &account).await?;
            match leaf {
                Leaf::Identity => state.identity_token(peer, &query, outcome).await,
                Leaf::Token => metadata_paths::access_token(state, peer, &query, outcome).await,
                leaf => metadata_paths::account_leaf(state, peer, leaf, &query).await,
            }
        }
        Route::Unknown => Err(not_served(uri.path())),
    }
}

impl EndpointState {
    /// The served account's email for `peer`: a per-workload identity's is
    /// the caller's own (its pod's annotation), any other the identity's.
    pub(super) async fn account_email(&self, peer: &PeerCredentials) -> Result<String, Refusal> {
        // A per-workload identity's account is read from the API server:
        // only for a caller the policy lets use the identity at all.
        let per_workload = self
            .cache
            .source(&self.identity)
            .and_then(|source| source.account_from())
            .is_some();
        if per_workload
            && !self
                .live
                .policy()
                .serves_identity(peer.caller(), &self.identity)
        {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} may not use identity {} (caller: {})",
                    peer.sharer(),
                    LogText::new(&self.identity),
                    peer.selectors_text().unwrap_or("unattested")
                ),
            ));
        }
        match workload_account::resolve(&self.cache, self.pods.as_deref(), peer, &self.identity)
            .await
        {
            Ok(Some(account)) => Ok(account),
            Ok(None) => self.email.get(&self.cache, &self.identity).await,
            Err(refused) => Err(self.refused(refused)),
        }
    }

    /// `default`, or the served account's email, names the served account.
    async fn check_account(&self, peer: &PeerCredentials, account: &str) -> Result<(), Refusal> {
        // Checked as gRPC checks a requested identity, before it is echoed.
        crate::domain::validate_requested_identity(account).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("the service account named in the path is not a valid name: {e}"),
            )
        })?;
        if account == "default" {
            return Ok(());
        }
        // Only an email can match; do not mint a probe token for junk.
        if account.contains('@') && self.account_email(peer).await? == account {
            return Ok(());
        }
        Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "Service account {} is not available on this endpoint: it serves token-broker \
                 identity {:?} as \"default\"",
                LogText::new(account),
                self.identity
            ),
        ))
    }

    async fn identity_token(
        &self,
        peer: &PeerCredentials,
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
        crate::domain::validate_audience(audience)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("invalid audience: {e}")))?;
        if !self.audiences.is_empty() && !self.audiences.iter().any(|a| a == audience) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "audience {} is not on this endpoint's allow-list \
                     (metadata_endpoint.audiences); ask the operator to add it",
                    LogText::new(audience)
                ),
            ));
        }
        let key = CacheKey::new(&self.identity, audience)
            .map_err(|e| self.refused(CacheError::from(e).into()))?;
        let key = workload_account::admit(
            &self.cache,
            &self.live,
            self.pods.as_deref(),
            peer,
            key,
            Duration::ZERO,
            Record {
                decision: &mut outcome.decision,
                minted_as: &mut outcome.minted_as,
            },
        )
        .await
        .map_err(|refused| self.refused(refused))?;
        let lookup = tokio::time::timeout(MAX_WAIT, self.cache.get(&key, Duration::ZERO))
            .await
            .map_err(|_| timed_out(&self.identity))?
            .map_err(|e| self.cache_failure(e))?;
        outcome.cache = Some(lookup.outcome);
        if key.account().is_none() {
            self.email.learn(lookup.token.email());
        }
        Ok(respond(
            StatusCode::OK,
            APPLICATION_TEXT,
            lookup.token.expose().to_owned(),
        ))
    }

    /// The one mapping from an admission refusal to an HTTP answer.
    pub(super) fn refused(&self, refused: Refused) -> Refusal {
        match refused {
            Refused::Cache(err) => self.cache_failure(err),
            Refused::Denied { .. } | Refused::DeniedScopes { .. } => {
                Refusal::new(StatusCode::FORBIDDEN, refused.to_string())
            }
            Refused::TooManyNewAudiences { retry_in, .. }
            | Refused::TooManyForcedMints { retry_in, .. } => {
                let mut refusal = Refusal::new(StatusCode::TOO_MANY_REQUESTS, refused.to_string());
                refusal.retry_after = Some(retry_in.as_secs().max(1));
                refusal
            }
            // 403, which google-auth does not retry: the operator must
            // annotate the service account.
            Refused::NoWorkloadAccount { .. } => {
                Refusal::new(StatusCode::FORBIDDEN, refused.to_string())
            }
            Refused::WorkloadAccountUnavailable { .. } => {
                Refusal::new(StatusCode::SERVICE_UNAVAILABLE, refused.to_string())
            }
        }
    }

    pub(super) fn cache_failure(&self, err: CacheError) -> Refusal {
        match &err {
            CacheError::InvalidAudience(e) => {
                Refusal::new(StatusCode::BAD_REQUEST, format!("invalid audience: {e}"))
            }
            CacheError::UnknownIdentity(identity) => unknown_identity(identity),
            CacheError::InvalidScopes(e) => {
                Refusal::new(StatusCode::BAD_REQUEST, format!("invalid scopes: {e}"))
            }
            CacheError::Upstream(source) => upstream_failure(source, ""),
            CacheError::Full { .. } | CacheError::NoFreshToken { .. } => {
                Refusal::new(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
            }
            _ => Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
        }
    }
}

/// See the module doc for why a rejection is 502 and not 403.
pub(super) fn upstream_failure(err: &SourceError, context: &str) -> Refusal {
    let status = if err.is_permanent() {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Refusal::new(status, format!("{context}{err}"))
}

pub(super) fn unknown_identity(identity: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("no identity named {identity:?} is configured"),
    )
}

pub(super) fn timed_out(identity: &str) -> Refusal {
    Refusal::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "no token for identity {identity:?} within {}s; the upstream fetch continues, retry",
            MAX_WAIT.as_secs()
        ),
    )
}

/// Google's 404 page; the log line says what is served.
fn not_served(path: &str) -> Refusal {
    metadata_paths::not_found(
        path,
        format!(
            "{} is not served by token-broker's metadata endpoint (README: Metadata endpoint \
             lists what is)",
            LogText::new(path)
        ),
    )
}

/// Every answer carries `Metadata-Flavor: Google`: clients use it to tell a
/// metadata server from anything else on that address.
pub(super) fn respond(status: StatusCode, content_type: HeaderValue, body: String) -> Response {
    // Built directly: the same response as `(status, headers, body)
    // .into_response()`, headers in the same order, without its steps.
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(METADATA_FLAVOR, GOOGLE);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_read_as_display_writes_them() {
        for addr in [
            "127.0.0.1:8181",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.2.30.107:9",
            "[::1]:8181",
            "[::ffff:127.0.0.1]:1",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut buffer = [0u8; 64];
            assert_eq!(addr_text(addr, &mut buffer), addr.to_string());
        }
    }

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
            Route::Tree(Tree::Value(
                crate::source::instance::InstanceValue::ProjectId
            ))
        );
        assert_eq!(
            route("/computeMetadata/v1/project/attributes/ssh-keys"),
            Route::Unknown
        );
        assert_eq!(route("/metadata/v1/"), Route::Unknown);
    }

    #[test]
    fn only_names_for_this_endpoint_are_accepted_as_host() {
        let v4: SocketAddr = "127.0.0.1:8181".parse().unwrap();
        for host in [
            "localhost",
            "LOCALHOST:8181",
            "metadata",
            "metadata:8181",
            "metadata.google.internal",
            "metadata.google.internal.:8181",
            "127.0.0.1",
            "127.0.0.1:8181",
        ] {
            assert!(host_names_endpoint(host, v4), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:8181",
            "localhost:8182",
            "localhost:",
            "127.0.0.2:8181",
            "127.0.0.1.nip.io",
            "metadata.google.internal.attacker.example",
            "[::1]:8181",
            "",
        ] {
            assert!(!host_names_endpoint(host, v4), "{host}");
        }
        // On a node address, reached directly or through a redirect of the
        // metadata server's address.
        let node: SocketAddr = "10.128.0.4:8181".parse().unwrap();
        for host in [
            "10.128.0.4:8181",
            "10.128.0.4",
            "169.254.169.254",
            "169.254.169.254:80",
            "169.254.169.254:8181",
            "metadata.google.internal:80",
        ] {
            assert!(host_names_endpoint(host, node), "{host}");
        }
        for host in [
            "10.128.0.4:80",
            "localhost:80",
            "169.254.169.253",
            "169.254.169.254:81",
            "169.254.169.254.attacker.example",
            "attacker.example:80",
        ] {
            assert!(!host_names_endpoint(host, node), "{host}");
        }
        let v6: SocketAddr = "[::1]:8181".parse().unwrap();
        assert!(host_names_endpoint("[::1]:8181", v6));
        assert!(host_names_endpoint("[::1]", v6));
        assert!(!host_names_endpoint("[::1]x", v6));
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:8181".parse().unwrap();
        assert!(host_names_endpoint("127.0.0.1:8181", mapped));
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
            message: "refused".into(),
            retry_after: None,
        };
        assert_eq!(
            upstream_failure(&down, "").status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
