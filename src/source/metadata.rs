//! The metadata server of GCE, GKE, Cloud Run and Cloud Functions
//! (PROTOCOLS.md §3): `GET .../service-accounts/default/identity?audience=&format=full`
//! with `Metadata-Flavor: Google`.

use reqwest::StatusCode;

use super::{
    describe_http_error, http_client, read_body, retry_after, sanitize_upstream_text, BodyError,
    FetchFuture, IdTokenSource, SourceError,
};
use crate::{clock::Clock, domain::SourceKind, token::IdToken};

/// Used when neither the config nor `GCE_METADATA_HOST` names a host.
pub const DEFAULT_HOST: &str = "metadata.google.internal";
const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";

/// Fetches ID tokens for the instance's default service account.
pub struct MetadataSource {
    client: reqwest::Client,
    identity_url: url::Url,
    upstream: String,
    clock: Clock,
}

impl MetadataSource {
    /// `host` is host[:port], as in `GCE_METADATA_HOST`.
    pub fn new(host: &str, clock: Clock) -> Result<Self, String> {
        let base = url::Url::parse(&format!("http://{host}"))
            .map_err(|e| format!("{host:?} is not a host[:port]: {e}"))?;
        let identity_url = base
            .join(IDENTITY_PATH)
            .map_err(|e| format!("{host:?}: {e}"))?;
        Ok(Self {
            client: http_client()?,
            identity_url,
            upstream: format!("metadata server at http://{host}"),
            clock,
        })
    }

    /// One call: the token, or why not (with any `Retry-After`).
    async fn call(&self, audience: &str) -> Result<IdToken, SourceError> {
        let unavailable =
            |message: String, retry_after: Option<std::time::Duration>| SourceError::Unavailable {
                upstream: self.upstream.clone(),
                message,
                retry_after,
            };
        let response = self
            .client
            .get(self.identity_url.clone())
            .query(&[("audience", audience), ("format", "full")])
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| unavailable(describe_http_error(&e), None))?;
        let status = response.status();
        let wait = retry_after(status, response.headers(), self.clock.now());
        let body = read_body(response, &self.upstream)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge(err) => err,
                BodyError::Transfer(message) => unavailable(message, None),
            })?;
        let body = String::from_utf8_lossy(&body);
        if status == StatusCode::OK {
            return IdToken::parse(&body, audience, self.clock.now())
                .map_err(|e| SourceError::invalid_token(&self.upstream, e));
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(unavailable(
                format!("HTTP {status}: {}", sanitize_upstream_text(&body)),
                wait,
            ));
        }
        Err(SourceError::Rejected {
            upstream: self.upstream.clone(),
            status: status.as_u16(),
            message: sanitize_upstream_text(&body),
        })
    }
}

impl IdTokenSource for MetadataSource {
    fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a> {
        Box::pin(self.call(audience))
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Metadata
    }

    fn upstream(&self) -> &str {
        &self.upstream
    }
}
