//! Where ID tokens come from: one [`IdTokenSource`] per configured identity.
//!
//! A source makes the upstream call for one audience, with its own bounded
//! retries for transient failures, and returns a token already checked by
//! [`IdToken::parse`]. Caching, single-flight and refresh scheduling live in
//! the cache, not here.

mod key_file;
mod metadata;
mod retry;
mod service_account;

use std::{future::Future, pin::Pin, sync::Arc};

pub use key_file::{KeyFileError, ServiceAccountKey};
pub use metadata::MetadataSource;
pub use retry::RetryPolicy;
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
    /// Fetches a new token for `audience`, retrying transient failures
    /// within the source's retry policy.
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

    /// What makes this source's tokens what they are: a reload keeps an
    /// identity's cached tokens only while this stays the same.
    fn fingerprint(&self) -> String {
        format!("{:?}|{}|{:?}", self.kind(), self.upstream(), self.account())
    }
}

/// Why a source could not produce a token. Messages never carry token or
/// key text; upstream text is passed through with JWT-looking strings removed.
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
    /// Upstream unreachable or failing after every retry.
    #[error("{upstream} is unavailable after {attempts} attempt(s); last error: {message}")]
    Unavailable {
        upstream: String,
        attempts: u32,
        message: String,
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

    pub(crate) fn invalid_token(upstream: &str, err: TokenError) -> Self {
        SourceError::InvalidResponse {
            upstream: upstream.to_owned(),
            message: err.to_string(),
        }
    }
}

/// Builds the source an identity names. Reads and checks key files, so a
/// bad one fails `serve` and `check-config` before anything binds.
pub fn build_source(
    index: usize,
    identity: &IdentitySettings,
    env: &std::collections::HashMap<String, String>,
    clock: &Clock,
) -> Result<Arc<dyn IdTokenSource>, Problem> {
    let key = |field: &str| format!("identities[{index}].{field}");
    match identity.source {
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
            MetadataSource::new(&host, clock.clone(), RetryPolicy::default())
                .map(|s| Arc::new(s) as Arc<dyn IdTokenSource>)
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
            ServiceAccountSource::new(key_file, clock.clone(), RetryPolicy::default())
                .map(|s| Arc::new(s) as Arc<dyn IdTokenSource>)
                .map_err(|message| Problem::new(key("key_file"), message))
        }
    }
}

/// The HTTP client every source uses: rustls, short connect timeout, an
/// overall per-attempt timeout, and no redirects (a redirect from the metadata
/// server or token endpoint is not something to follow with credentials).
pub(crate) fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Largest upstream answer read. Google's ID tokens are about 1 KB and its
/// error bodies a few hundred bytes: anything larger is broken or hostile,
/// and must not be buffered, cached or passed on.
pub const MAX_UPSTREAM_BODY: usize = 64 * 1024;

/// Reads an upstream answer chunk by chunk, never more than
/// [`MAX_UPSTREAM_BODY`]. A 200 that would exceed it is refused (an error
/// naming `upstream`, not retried at once: the same upstream would send the
/// same); an error answer is cut at the limit, since only its start is shown.
pub(crate) async fn read_body<T>(
    mut response: reqwest::Response,
    upstream: &str,
) -> Result<Vec<u8>, retry::Attempt<T>> {
    let ok = response.status().is_success();
    let too_large = |size: String| {
        retry::Attempt::Fail(SourceError::InvalidResponse {
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
            Err(e) => return Err(retry::Attempt::Retry(describe_http_error(&e))),
        };
        let room = MAX_UPSTREAM_BODY - body.len();
        if chunk.len() > room {
            if ok {
                return Err(too_large(format!("more than {}", MAX_UPSTREAM_BODY)));
            }
            body.extend_from_slice(&chunk[..room]);
            return Ok(body);
        }
        body.extend_from_slice(&chunk);
    }
}

/// Upstream text fit to pass on: JWT-looking strings removed, length capped.
pub(crate) fn sanitize_upstream_text(text: &str) -> String {
    const MAX: usize = 512;
    let redacted = crate::token::redact_jwts(text.trim());
    if redacted.len() <= MAX {
        return redacted;
    }
    let mut end = MAX;
    while !redacted.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &redacted[..end])
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
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use axum::{body::Body, http::StatusCode, routing::get, Router};
    use tokio_stream::StreamExt as _;

    use super::*;

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
        match read_body::<()>(response, "the test upstream").await {
            Err(retry::Attempt::Fail(err)) => {
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
        let Ok(body) = read_body::<()>(response, "the test upstream").await else {
            panic!("an error answer is kept, cut");
        };
        assert_eq!(body.len(), MAX_UPSTREAM_BODY);
        assert!(produced.load(Ordering::Relaxed) < CHUNKS / 4);
    }
}
