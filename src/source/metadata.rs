//! The metadata server of GCE, GKE, Cloud Run and Cloud Functions
//! (PROTOCOLS.md §3): `GET .../service-accounts/default/identity?audience=&format=full`
//! with `Metadata-Flavor: Google`.

use reqwest::StatusCode;

use super::{
    describe_http_error, http_client, read_body, retry::Attempt, sanitize_upstream_text,
    FetchFuture, IdTokenSource, RetryPolicy, SourceError,
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
    retry: RetryPolicy,
}

impl MetadataSource {
    /// `host` is host[:port], as in `GCE_METADATA_HOST`.
    pub fn new(host: &str, clock: Clock, retry: RetryPolicy) -> Result<Self, String> {
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
            retry,
        })
    }

    async fn attempt(&self, audience: &str) -> Attempt<IdToken> {
        let response = self
            .client
            .get(self.identity_url.clone())
            .query(&[("audience", audience), ("format", "full")])
            .header("Metadata-Flavor", "Google")
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(describe_http_error(&e)),
        };
        let status = response.status();
        let body = match read_body(response, &self.upstream).await {
            Ok(body) => String::from_utf8_lossy(&body).into_owned(),
            Err(attempt) => return attempt,
        };
        if status == StatusCode::OK {
            return match IdToken::parse(&body, audience, self.clock.now()) {
                Ok(token) => Attempt::Done(token),
                Err(e) => Attempt::Fail(SourceError::invalid_token(&self.upstream, e)),
            };
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Attempt::Retry(format!("HTTP {status}: {}", sanitize_upstream_text(&body)));
        }
        Attempt::Fail(SourceError::Rejected {
            upstream: self.upstream.clone(),
            status: status.as_u16(),
            message: sanitize_upstream_text(&body),
        })
    }
}

impl IdTokenSource for MetadataSource {
    fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a> {
        Box::pin(
            self.retry
                .run(&self.upstream, move || self.attempt(audience)),
        )
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Metadata
    }

    fn upstream(&self) -> &str {
        &self.upstream
    }
}
