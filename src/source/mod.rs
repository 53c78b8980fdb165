//! Where ID tokens come from: one [`IdTokenSource`] per configured identity.
//!
//! A source makes ONE upstream call for one audience and returns a token
//! already checked by [`IdToken::parse`], or the error with any `Retry-After`
//! the upstream sent. It never retries: the cache's backoff
//! (`retry_initial`..`retry_max`) is the only retry layer, so the upstream
//! sees exactly the rate the configuration promises. Caching, single-flight
//! and refresh scheduling live in the cache, not here.

pub mod access;
mod external_account;
mod impersonate;
mod impersonated_file;
pub mod instance;
mod key_file;
mod metadata;
mod service_account;

use std::{
    collections::HashMap,
    future::Future,
    path::Path,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use external_account::{ExternalAccountFile, ExternalAccountSource, ALLOW_EXECUTABLES_ENV};
pub use impersonate::{ImpersonateOptions, ImpersonateSource, DEFAULT_IAM_ENDPOINT};
pub use impersonated_file::{impersonated_file_source, UserSource};
pub use key_file::{KeyFileError, ServiceAccountKey};
pub use metadata::MetadataSource;
pub use service_account::ServiceAccountSource;

use crate::{
    clock::Clock,
    config::IdentitySettings,
    domain::{Problem, SourceKind},
    token::{IdToken, TokenError},
};

/// The future a source's fetch returns.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<IdToken, SourceError>> + Send + 'a>>;

/// Mints Google-signed ID tokens for one identity.
pub trait IdTokenSource: Send + Sync + 'static {
    /// Fetches a new token for `audience` with one upstream call (no retries:
    /// the cache retries, with backoff).
    fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a>;

    /// What kind of source this is, for logs and `check-config`.
    fn kind(&self) -> SourceKind;

    /// The upstream this source calls, named in errors and logs
    /// (e.g. "metadata server at http://metadata.google.internal").
    fn upstream(&self) -> &str;

    /// The account tokens are minted for, when known without a network call.
    fn account(&self) -> Option<&str> {
        None
    }

    /// Set for an identity that mints as an account each caller names
    /// (`service_account_from`) rather than one of its own: requests must
    /// resolve the caller's account and use [`IdTokenSource::fetch_as`].
    fn account_from(&self) -> Option<crate::config::AccountFrom> {
        None
    }

    /// Fetches a token for `audience` minted as `account`, for an identity
    /// with [`IdTokenSource::account_from`]; other sources refuse.
    fn fetch_as<'a>(&'a self, account: &'a str, audience: &'a str) -> FetchFuture<'a> {
        let _ = audience;
        Box::pin(async move {
            Err(SourceError::Rejected {
                upstream: self.upstream().to_owned(),
                status: 400,
                message: format!(
                    "this identity mints as its own account and cannot mint as {}",
                    crate::domain::LogText::new(account)
                ),
            })
        })
    }

    /// What makes this source's tokens what they are: a reload keeps an
    /// identity's cached tokens only while this stays the same. A source
    /// built on another identity includes that identity's fingerprint, so a
    /// change to any link of a chain changes everything built on it.
    fn fingerprint(&self) -> String {
        format!("{:?}|{}|{:?}", self.kind(), self.upstream(), self.account())
    }

    /// Mints this identity's own access tokens, for identities built on it
    /// (impersonation); `None` when it cannot. The cache engine holds them.
    fn access(&self) -> Option<&dyn access::AccessFetcher> {
        None
    }

    /// Mints the access tokens of the credential under this identity when
    /// that credential is no identity of its own (an `external_account`'s
    /// federated token, the source credential of an impersonated-credentials
    /// file); the cache engine holds them as [`access::AccessOf::Base`].
    fn base_access(&self) -> Option<&dyn access::AccessFetcher> {
        None
    }

    /// Hands the source the cache engine's access tokens, once the engine
    /// is built; a source that presents bearer tokens keeps it.
    fn attach(&self, _tokens: &Arc<dyn access::AccessTokens>) {}

    /// How this identity reaches Google when it is built on others, for
    /// `check-config` (e.g. "impersonate X via base (metadata server)").
    fn chain(&self) -> Option<String> {
        None
    }

    /// What this identity knows of its project and machine, for the
    /// metadata endpoint's `project/` and `instance/` paths.
    fn instance(&self) -> instance::InstanceFacts {
        instance::InstanceFacts::default()
    }
}

/// Counts one upstream hop (`source` = metadata, service_account_key, sts,
/// iam) of an identity's token, whatever it was for.
pub(crate) fn record_hop<T>(
    identity: &'static str,
    source: &'static str,
    result: &Result<T, SourceError>,
) {
    crate::metrics::get()
        .upstream_hops
        .get_or_create(&crate::metrics::UpstreamLabels {
            identity,
            source,
            outcome: match result {
                Ok(_) => "ok",
                Err(SourceError::Rejected { .. }) => "rejected",
                Err(SourceError::Unavailable { .. }) => "unavailable",
                Err(_) => "invalid_response",
            },
        })
        .inc();
}

/// Why a source could not produce a token. Messages never carry token or
/// key text; upstream text is passed through quoted, capped, and with
/// token-shaped strings removed ([`sanitize_upstream_text`]).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceError {
    /// Upstream refused for a reason retrying will not fix (HTTP 4xx,
    /// `invalid_grant`).
    #[error("{upstream} rejected the request (HTTP {status}): {message}")]
    Rejected {
        upstream: String,
        status: u16,
        message: String,
    },
    /// Upstream unreachable, timed out, or answering a transient error.
    #[error("{upstream} is unavailable; last error: {message}{}", retry_after_text(*retry_after))]
    Unavailable {
        upstream: String,
        message: String,
        /// How long the upstream asked callers to wait (`Retry-After` on a
        /// 429 or 503); the cache waits at least this long, up to `retry_max`.
        retry_after: Option<Duration>,
    },
    /// Upstream answered 200 with something that is not a usable token.
    #[error("{upstream} returned an unusable answer: {message}")]
    InvalidResponse { upstream: String, message: String },
}

impl SourceError {
    /// Permanent failures surface as FAILED_PRECONDITION and are not retried fast.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SourceError::Rejected { .. })
    }

    /// The wait the upstream asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn invalid_token(upstream: &str, err: TokenError) -> Self {
        SourceError::InvalidResponse {
            upstream: upstream.to_owned(),
            message: err.to_string(),
        }
    }
}

/// An identity's settings and the source built from them.
pub type BuiltIdentity = (IdentitySettings, Arc<dyn IdTokenSource>);

/// Builds every identity's source, bases before the identities built on
/// them, and returns them in the order given, with every problem found.
pub fn build_sources(
    identities: &[IdentitySettings],
    env: &HashMap<String, String>,
    clock: &Clock,
) -> (Vec<BuiltIdentity>, Vec<Problem>) {
    let mut built: HashMap<String, Arc<dyn IdTokenSource>> = HashMap::new();
    let mut failed: Vec<String> = Vec::new();
    let mut problems = Vec::new();
    let mut pending: Vec<usize> = (0..identities.len()).collect();
    while !pending.is_empty() {
        let before = pending.len();
        pending.retain(|&index| {
            let identity = &identities[index];
            if let Some(base) = identity.base.as_deref().filter(|_| {
                identity.source == SourceKind::Impersonate && identity.credential_file.is_none()
            }) {
                if failed.iter().any(|f| f == base) {
                    failed.push(identity.name.clone());
                    problems.push(Problem::new(
                        format!("identities[{index}].base"),
                        format!("identity {base:?} could not be built (see its problem)"),
                    ));
                    return false;
                }
                if !built.contains_key(base) {
                    return true;
                }
            }
            match build_one(index, identity, env, clock, &built) {
                Ok(source) => {
                    built.insert(identity.name.clone(), source);
                }
                Err(problem) => {
                    failed.push(identity.name.clone());
                    problems.push(problem);
                }
            }
            false
        });
        if pending.len() == before {
            // Unknown bases and cycles: check-config's validation names them.
            for &index in &pending {
                problems.push(Problem::new(
                    format!("identities[{index}].base"),
                    "the base identity is missing or part of a cycle",
                ));
            }
            break;
        }
    }
    let sources = identities
        .iter()
        .filter_map(|i| built.get(&i.name).map(|s| (i.clone(), s.clone())))
        .collect();
    (sources, problems)
}

/// Builds the source an identity names. Reads and checks key files, so a
/// bad one fails `serve` and `check-config` before anything binds. An
/// identity built on others needs [`build_sources`].
pub fn build_source(
    index: usize,
    identity: &IdentitySettings,
    env: &HashMap<String, String>,
    clock: &Clock,
) -> Result<Arc<dyn IdTokenSource>, Problem> {
    build_one(index, identity, env, clock, &HashMap::new())
}

fn build_one(
    index: usize,
    identity: &IdentitySettings,
    env: &HashMap<String, String>,
    clock: &Clock,
    built: &HashMap<String, Arc<dyn IdTokenSource>>,
) -> Result<Arc<dyn IdTokenSource>, Problem> {
    let key = |field: &str| format!("identities[{index}].{field}");
    match identity.source {
        SourceKind::Impersonate if identity.credential_file.is_some() => {
            let path = identity.credential_file.as_deref().unwrap_or(Path::new(""));
            impersonated_file_source(
                &identity.name,
                path,
                identity.allow_insecure_key_permissions,
                identity.include_email,
                identity.iam_endpoint.as_deref(),
                env,
                clock,
            )
            .map(|s| Arc::new(s) as Arc<dyn IdTokenSource>)
            .map_err(|message| Problem::new(key("credential_file"), message))
        }
        SourceKind::Impersonate => {
            let base_name = identity.base.as_deref().unwrap_or_default();
            let Some(base) = built.get(base_name) else {
                return Err(Problem::new(
                    key("base"),
                    format!("no identity named {base_name:?} is configured"),
                ));
            };
            let service_account = identity.service_account.as_deref();
            if service_account.is_none() && identity.service_account_from.is_none() {
                return Err(Problem::new(
                    key("service_account"),
                    "required when source = \"impersonate\"",
                ));
            }
            ImpersonateSource::new(
                ImpersonateOptions {
                    identity: &identity.name,
                    base_name,
                    named_base: true,
                    base: base.clone(),
                    service_account,
                    account_from: identity.service_account_from,
                    delegates: &identity.delegates,
                    include_email: identity.include_email,
                    iam_endpoint: identity
                        .iam_endpoint
                        .as_deref()
                        .unwrap_or(DEFAULT_IAM_ENDPOINT),
                },
                clock.clone(),
            )
            .map(|s| Arc::new(s) as Arc<dyn IdTokenSource>)
            .map_err(|message| Problem::new(key("base"), message))
        }
        SourceKind::ExternalAccount => {
            let Some(path) = &identity.credential_file else {
                return Err(Problem::new(
                    key("credential_file"),
                    "required when source = \"external_account\"",
                ));
            };
            let file = ExternalAccountFile::load(path, env)
                .map_err(|message| Problem::new(key("credential_file"), message))?;
            ExternalAccountSource::new(
                &identity.name,
                file,
                identity.iam_endpoint.as_deref(),
                clock.clone(),
            )
            .map(|s| Arc::new(s) as Arc<dyn IdTokenSource>)
            .map_err(|message| Problem::new(key("credential_file"), message))
        }
        SourceKind::Metadata => {
            let host = identity
                .metadata_host
                .clone()
                .or_else(|| {
                    env.get(crate::config::METADATA_HOST_ENV)
                        .filter(|h| !h.is_empty())
                        .cloned()
                })
                .unwrap_or_else(|| metadata::DEFAULT_HOST.to_owned());
            MetadataSource::new(&host, clock.clone())
                .map(|s| Arc::new(s.named(&identity.name)) as Arc<dyn IdTokenSource>)
                .map_err(|message| Problem::new(key("metadata_host"), message))
        }
        SourceKind::ServiceAccountKey => {
            let Some(path) = &identity.key_file else {
                return Err(Problem::new(
                    key("key_file"),
                    "required when source = \"service_account_key\"",
                ));
            };
            let key_file = ServiceAccountKey::load(path, identity.allow_insecure_key_permissions)
                .map_err(|e| Problem::new(key("key_file"), e.to_string()))?;
            ServiceAccountSource::for_identity(key_file, clock.clone(), &identity.name)
                .map(|s| Arc::new(s) as Arc<dyn IdTokenSource>)
                .map_err(|message| Problem::new(key("key_file"), message))
        }
    }
}

/// Longest one upstream call may take, connecting and reading the whole
/// body included (a hung upstream, headers then silence, a 1 byte/s trickle).
/// With one call per attempt this is also the longest a cold caller waits
/// for an answer from a hung upstream: well inside the 30 s a request waits
/// by default, so it gets UNAVAILABLE naming the upstream, not
/// DEADLINE_EXCEEDED.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP client every source uses: rustls, short connect timeout, an
/// overall per-attempt timeout, and no redirects (a redirect from the metadata
/// server or token endpoint is not something to follow with credentials).
pub(crate) fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Largest upstream answer read. Google's ID tokens are about 1 KB and its
/// error bodies a few hundred bytes: anything larger is broken or hostile,
/// and must not be buffered, cached or passed on.
pub const MAX_UPSTREAM_BODY: usize = 64 * 1024;

/// Why an upstream answer's body was not read.
pub(crate) enum BodyError {
    /// A 200 over [`MAX_UPSTREAM_BODY`]: the error to report (not retried
    /// at once: the same upstream would send the same).
    TooLarge(SourceError),
    /// The transfer failed: what happened, for an "unavailable" error.
    Transfer(String),
}

/// One upstream answer: its status, its body (read with the
/// [`MAX_UPSTREAM_BODY`] cap) and any `Retry-After`.
pub(crate) struct Answer {
    pub(crate) status: reqwest::StatusCode,
    pub(crate) body: Vec<u8>,
    pub(crate) retry_after: Option<Duration>,
}

/// Sends `request` once, as every source's single attempt does. A failed
/// send or transfer is `Unavailable` naming `upstream`; an oversized success
/// is refused; any status is the caller's to judge.
pub(crate) async fn send_once(
    request: reqwest::RequestBuilder,
    upstream: &str,
    clock: &Clock,
) -> Result<Answer, SourceError> {
    let unavailable = |message: String| SourceError::Unavailable {
        upstream: upstream.to_owned(),
        message,
        retry_after: None,
    };
    let response = request
        .send()
        .await
        .map_err(|e| unavailable(describe_http_error(&e)))?;
    let status = response.status();
    let wait = retry_after(status, response.headers(), clock.now());
    let body = read_body(response, upstream).await.map_err(|e| match e {
        BodyError::TooLarge(err) => err,
        BodyError::Transfer(message) => unavailable(message),
    })?;
    Ok(Answer {
        status,
        body,
        retry_after: wait,
    })
}

/// Reads an upstream answer chunk by chunk, never more than
/// [`MAX_UPSTREAM_BODY`]. A 200 that would exceed it is refused with an
/// error naming `upstream`; an error answer is cut at the limit, since only
/// its start is shown.
pub(crate) async fn read_body(
    mut response: reqwest::Response,
    upstream: &str,
) -> Result<Vec<u8>, BodyError> {
    let ok = response.status().is_success();
    let too_large = |size: String| {
        BodyError::TooLarge(SourceError::InvalidResponse {
            upstream: upstream.to_owned(),
            message: format!(
                "the answer is {size} bytes, more than the {} KiB any ID token needs; refused",
                MAX_UPSTREAM_BODY / 1024
            ),
        })
    };
    if let Some(length) = response.content_length() {
        if ok && length > MAX_UPSTREAM_BODY as u64 {
            return Err(too_large(length.to_string()));
        }
    }
    let mut body = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok(body),
            Err(e) => return Err(BodyError::Transfer(describe_http_error(&e))),
        };
        let room = MAX_UPSTREAM_BODY - body.len();
        if chunk.len() > room {
            if ok {
                return Err(too_large(format!("more than {MAX_UPSTREAM_BODY}")));
            }
            body.extend_from_slice(&chunk[..room]);
            return Ok(body);
        }
        body.extend_from_slice(&chunk);
    }
}

fn retry_after_text(retry_after: Option<Duration>) -> String {
    retry_after
        .map(|d| format!(" (it asked to retry after {}s)", d.as_secs()))
        .unwrap_or_default()
}

/// The `Retry-After` of a 429 or 503 answer: delta-seconds or an HTTP-date
/// (RFC 9110 §10.2.3), as a wait from `now`. Other statuses and unreadable
/// values give `None`.
pub(crate) fn retry_after(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    now: SystemTime,
) -> Option<Duration> {
    if status != reqwest::StatusCode::TOO_MANY_REQUESTS
        && status != reqwest::StatusCode::SERVICE_UNAVAILABLE
    {
        return None;
    }
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Upstream text fit to pass on: anything shaped like a token removed, then
/// capped and quoted with its quotes, backslashes and control characters
/// escaped ([`LogText`](crate::domain::LogText)), so an upstream's body
/// can neither forge a log line nor leak a token into one.
pub(crate) fn sanitize_upstream_text(text: &str) -> String {
    crate::domain::LogText::new(&crate::token::redact_jwts(text.trim())).to_string()
}

/// Describes a reqwest failure without its URL's query (which holds the audience
/// only, but keep messages short) and without chains of internals.
pub(crate) fn describe_http_error(err: &reqwest::Error) -> String {
    let what = if err.is_connect() {
        "cannot connect"
    } else if err.is_timeout() {
        "timed out"
    } else if err.is_body() || err.is_decode() {
        "failed reading the answer"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    /// The 64 KiB cap on upstream answers, against a server that streams
    /// without end.
    mod body_cap {
        use std::sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        };

        use axum::{body::Body, http::StatusCode, routing::get, Router};
        use tokio_stream::StreamExt as _;

        use crate::source::{read_body, BodyError, MAX_UPSTREAM_BODY};

        const CHUNK: usize = 1024;
        /// 256 MiB, far more than any buffer between the two ends.
        const CHUNKS: usize = 256 * 1024;

        /// A server streaming 1 KiB chunks without a Content-Length, counting
        /// the chunks it produced.
        async fn endless(status: StatusCode) -> (String, Arc<AtomicUsize>) {
            let produced = Arc::new(AtomicUsize::new(0));
            let counter = produced.clone();
            let app = Router::new().route(
                "/",
                get(move || {
                    let counter = counter.clone();
                    let chunks = tokio_stream::iter(0..CHUNKS).map(move |_| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, std::convert::Infallible>(vec![b'x'; CHUNK])
                    });
                    async move { (status, Body::from_stream(chunks)) }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            (url, produced)
        }

        #[tokio::test]
        async fn a_streamed_answer_is_refused_at_the_limit_without_reading_the_rest() {
            let (url, produced) = endless(StatusCode::OK).await;
            let response = reqwest::get(&url).await.unwrap();
            assert_eq!(
                response.content_length(),
                None,
                "the test needs a chunked body"
            );
            match read_body(response, "the test upstream").await {
                Err(BodyError::TooLarge(err)) => {
                    let text = err.to_string();
                    assert!(
                        text.contains("the test upstream") && text.contains("64 KiB"),
                        "{text}"
                    );
                    assert!(!err.is_permanent());
                }
                Ok(body) => panic!("read {} bytes", body.len()),
                Err(_) => panic!("not refused as too large"),
            }
            // Reading it whole would have drained all 256 MiB.
            let produced = produced.load(Ordering::Relaxed);
            assert!(produced < CHUNKS / 4, "{produced} KiB were produced");
        }

        #[tokio::test]
        async fn a_huge_error_answer_is_cut_at_the_limit() {
            let (url, produced) = endless(StatusCode::SERVICE_UNAVAILABLE).await;
            let response = reqwest::get(&url).await.unwrap();
            let Ok(body) = read_body(response, "the test upstream").await else {
                panic!("an error answer is kept, cut");
            };
            assert_eq!(body.len(), MAX_UPSTREAM_BODY);
            assert!(produced.load(Ordering::Relaxed) < CHUNKS / 4);
        }
    }

    use super::*;
    use reqwest::{
        header::{HeaderMap, HeaderValue, RETRY_AFTER},
        StatusCode,
    };

    #[test]
    fn reads_retry_after_in_both_forms_on_429_and_503_only() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            headers
        };
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        for status in [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert_eq!(
                retry_after(status, &with("30"), now),
                Some(Duration::from_secs(30))
            );
            assert_eq!(
                retry_after(status, &with(&date), now),
                Some(Duration::from_secs(90))
            );
            assert_eq!(retry_after(status, &with("soon"), now), None);
            assert_eq!(retry_after(status, &HeaderMap::new(), now), None);
        }
        assert_eq!(
            retry_after(StatusCode::INTERNAL_SERVER_ERROR, &with("30"), now),
            None
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(
            retry_after(StatusCode::SERVICE_UNAVAILABLE, &with(&past), now),
            Some(Duration::ZERO)
        );
    }
}
