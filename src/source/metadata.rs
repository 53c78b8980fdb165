//! The metadata server of GCE, GKE, Cloud Run and Cloud Functions
//! (PROTOCOLS.md §3): `GET .../service-accounts/default/identity?audience=&format=full`
//! with `Metadata-Flavor: Google`; and, for identities built on this one,
//! the default account's access token from `.../default/token` (§4).

use reqwest::StatusCode;

use std::sync::Arc;

use super::{
    access::{parse_oauth_access_token, AccessFetcher, AccessFuture, AccessToken},
    http_client,
    instance::{InstanceFacts, InstanceMetadata},
    record_hop, sanitize_upstream_text, send_once, Answer, FetchFuture, IdTokenSource, SourceError,
};
use crate::{clock::Clock, domain::SourceKind, token::IdToken};

/// Used when neither the config nor `GCE_METADATA_HOST` names a host.
pub const DEFAULT_HOST: &str = "metadata.google.internal";
const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// Fetches ID tokens for the instance's default service account.
pub struct MetadataSource {
    client: reqwest::Client,
    identity_url: url::Url,
    upstream: String,
    clock: Clock,
    access: MetadataAccess,
    instance: Arc<InstanceMetadata>,
}

/// Fetches the default account's access tokens.
struct MetadataAccess {
    client: reqwest::Client,
    token_url: url::Url,
    upstream: String,
    identity: &'static str,
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
        let token_url = base
            .join(TOKEN_PATH)
            .map_err(|e| format!("{host:?}: {e}"))?;
        let client = http_client()?;
        let upstream = format!("metadata server at http://{host}");
        let instance = Arc::new(InstanceMetadata::new(
            base.clone(),
            upstream.clone(),
            clock.clone(),
        )?);
        let access = MetadataAccess {
            client: client.clone(),
            token_url,
            upstream: upstream.clone(),
            identity: crate::metrics::identity_label("unknown"),
            clock: clock.clone(),
        };
        Ok(Self {
            client,
            identity_url,
            upstream,
            access,
            clock,
            instance,
        })
    }

    /// Names the identity this source serves, for the metrics of its hops.
    pub fn named(mut self, identity: &str) -> Self {
        let access = MetadataAccess {
            client: self.client.clone(),
            token_url: self.identity_url.join(TOKEN_PATH).expect("same base"),
            upstream: self.upstream.clone(),
            identity: crate::metrics::identity_label(identity),
            clock: self.clock.clone(),
        };
        self.access = access;
        self
    }

    /// One call: the token, or why not (with any `Retry-After`).
    async fn call(&self, audience: &str) -> Result<IdToken, SourceError> {
        let unavailable =
            |message: String, retry_after: Option<std::time::Duration>| SourceError::Unavailable {
                upstream: self.upstream.clone(),
                message,
                retry_after,
            };
        let Answer {
            status,
            body,
            retry_after: wait,
        } = send_once(
            self.client
                .get(self.identity_url.clone())
                .query(&[("audience", audience), ("format", "full")])
                .header("Metadata-Flavor", "Google"),
            &self.upstream,
            &self.clock,
        )
        .await?;
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

    fn access(&self) -> Option<&dyn AccessFetcher> {
        Some(&self.access)
    }

    fn instance(&self) -> InstanceFacts {
        InstanceFacts {
            project_id: None,
            metadata: Some(self.instance.clone()),
        }
    }
}

impl MetadataAccess {
    /// One call for an access token.
    async fn call(&self, scopes: &str) -> Result<AccessToken, SourceError> {
        let unavailable =
            |message: String, retry_after: Option<std::time::Duration>| SourceError::Unavailable {
                upstream: self.upstream.clone(),
                message,
                retry_after,
            };
        let mut request = self
            .client
            .get(self.token_url.clone())
            .header("Metadata-Flavor", "Google");
        if scopes != super::access::CLOUD_PLATFORM_SCOPE {
            request = request.query(&[("scopes", scopes.replace(' ', ","))]);
        }
        let Answer {
            status,
            body,
            retry_after: wait,
        } = send_once(request, &self.upstream, &self.clock).await?;
        if status == StatusCode::OK {
            return parse_oauth_access_token(&body, self.clock.now()).map_err(|message| {
                SourceError::InvalidResponse {
                    upstream: self.upstream.clone(),
                    message: format!("access token: {message}"),
                }
            });
        }
        let text = sanitize_upstream_text(&String::from_utf8_lossy(&body));
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(unavailable(format!("HTTP {status}: {text}"), wait));
        }
        Err(SourceError::Rejected {
            upstream: self.upstream.clone(),
            status: status.as_u16(),
            message: format!("access token: {text}"),
        })
    }
}

impl AccessFetcher for MetadataAccess {
    fn fetch_access<'a>(&'a self, scopes: &'a str) -> AccessFuture<'a> {
        Box::pin(async move {
            let result = self.call(scopes).await;
            record_hop(self.identity, "metadata", &result);
            result
        })
    }
}
