//! Where ID tokens come from: one [`IdTokenSource`] per configured identity.
//!
//! A source makes the upstream call for one audience, with its own bounded
//! retries for transient failures, and returns a token already checked by
//! [`IdToken::parse`]. Caching, single-flight and refresh scheduling live in
//! the cache, not here.

pub mod access;
mod external_account;
mod impersonate;
mod impersonated_file;
mod key_file;
mod metadata;
mod retry;
mod service_account;

use std::{collections::HashMap, future::Future, path::Path, pin::Pin, sync::Arc};

pub use external_account::{ExternalAccountFile, ExternalAccountSource, ALLOW_EXECUTABLES_ENV};
pub use impersonate::{ImpersonateOptions, ImpersonateSource, DEFAULT_IAM_ENDPOINT};
pub use impersonated_file::{impersonated_file_source, UserSource};
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
    /// identity's cached tokens only while this stays the same. A source
    /// built on another identity includes that identity's fingerprint, so a
    /// change to any link of a chain changes everything built on it.
    fn fingerprint(&self) -> String {
        format!("{:?}|{}|{:?}", self.kind(), self.upstream(), self.account())
    }

    /// The access tokens of this identity's credential, for identities built
    /// on it (impersonation); `None` when it cannot mint them.
    fn access_tokens(&self) -> Option<&access::AccessTokenCache> {
        None
    }

    /// How this identity reaches Google when it is built on others, for
    /// `check-config` (e.g. "impersonate X via base (metadata server)").
    fn chain(&self) -> Option<String> {
        None
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
            let Some(service_account) = identity.service_account.as_deref() else {
                return Err(Problem::new(
                    key("service_account"),
                    "required when source = \"impersonate\"",
                ));
            };
            ImpersonateSource::new(
                ImpersonateOptions {
                    identity: &identity.name,
                    base_name,
                    base: base.clone(),
                    service_account,
                    delegates: &identity.delegates,
                    include_email: identity.include_email,
                    iam_endpoint: identity
                        .iam_endpoint
                        .as_deref()
                        .unwrap_or(DEFAULT_IAM_ENDPOINT),
                },
                clock.clone(),
                RetryPolicy::default(),
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
                RetryPolicy::default(),
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
            MetadataSource::new(&host, clock.clone(), RetryPolicy::default())
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
            ServiceAccountSource::for_identity(
                key_file,
                clock.clone(),
                RetryPolicy::default(),
                &identity.name,
            )
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
