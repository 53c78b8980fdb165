//! Service-account key identities (PROTOCOLS.md §2): a self-signed JWT
//! assertion carrying `target_audience`, exchanged at the key's `token_uri`
//! for a Google-signed ID token; and, for identities built on this one, the
//! same grant with a `scope` claim for an access token (§4).

use std::{sync::Arc, time::Duration};

use jsonwebtoken::{Algorithm, Header};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::{
    access::{parse_oauth_access_token, AccessFetcher, AccessFuture, AccessToken},
    http_client, record_hop, sanitize_upstream_text, send_once, Answer, FetchFuture, IdTokenSource,
    ServiceAccountKey, SourceError,
};
use crate::{clock::Clock, domain::SourceKind, token::IdToken};

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google rejects assertions living longer than 60 minutes.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// Backdating `iat` absorbs small clock skew against Google.
const CLOCK_SKEW: Duration = Duration::from_secs(10);
/// `error` codes Google answers for transient trouble.
const TRANSIENT_ERRORS: [&str; 3] = [
    "internal_failure",
    "server_error",
    "temporarily_unavailable",
];

/// Mints ID tokens with a service-account key.
pub struct ServiceAccountSource {
    inner: Arc<KeyGrant>,
}

/// The key and what it takes to use it; shared with the access-token cache.
struct KeyGrant {
    key: ServiceAccountKey,
    client: reqwest::Client,
    upstream: String,
    clock: Clock,
    identity: &'static str,
}

/// What a signed assertion asks for.
enum Grant<'a> {
    IdToken { audience: &'a str },
    AccessToken { scopes: &'a str },
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_audience: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl ServiceAccountSource {
    pub fn new(key: ServiceAccountKey, clock: Clock) -> Result<Self, String> {
        Self::for_identity(key, clock, "unknown")
    }

    /// Like [`ServiceAccountSource::new`], naming the identity served in
    /// the metrics of its hops.
    pub fn for_identity(
        key: ServiceAccountKey,
        clock: Clock,
        identity: &str,
    ) -> Result<Self, String> {
        let inner = Arc::new(KeyGrant {
            upstream: format!("token endpoint {}", key.token_uri),
            client: http_client()?,
            key,
            clock: clock.clone(),
            identity: crate::metrics::identity_label(identity),
        });
        Ok(Self { inner })
    }
}

impl KeyGrant {
    /// The signed assertion for one grant.
    fn assertion(&self, grant: &Grant<'_>) -> Result<String, SourceError> {
        let iat = self
            .clock
            .unix_seconds()
            .saturating_sub(CLOCK_SKEW.as_secs());
        let claims = AssertionClaims {
            iss: &self.key.client_email,
            sub: &self.key.client_email,
            aud: self.key.token_uri.as_str(),
            target_audience: match grant {
                Grant::IdToken { audience } => Some(audience),
                Grant::AccessToken { .. } => None,
            },
            scope: match grant {
                Grant::IdToken { .. } => None,
                Grant::AccessToken { scopes } => Some(scopes),
            },
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.key.private_key_id.clone());
        jsonwebtoken::encode(&header, &claims, &self.key.signing_key).map_err(|e| {
            SourceError::InvalidResponse {
                upstream: self.upstream.clone(),
                message: format!("cannot sign the assertion: {e}"),
            }
        })
    }

    /// One call for an ID token: the token, or why not.
    async fn call(&self, audience: &str) -> Result<IdToken, SourceError> {
        let body = self.exchange(&Grant::IdToken { audience }).await?;
        self.read_success(&body, audience)
    }

    /// One call for an access token.
    async fn call_access(&self, scopes: &str) -> Result<AccessToken, SourceError> {
        let body = self.exchange(&Grant::AccessToken { scopes }).await?;
        parse_oauth_access_token(&body, self.clock.now()).map_err(|message| {
            SourceError::InvalidResponse {
                upstream: self.upstream.clone(),
                message: format!("access token: {message}"),
            }
        })
    }

    /// Posts one assertion: the 200 body, or why not (with any `Retry-After`).
    async fn exchange(&self, grant: &Grant<'_>) -> Result<Vec<u8>, SourceError> {
        let unavailable =
            |message: String, retry_after: Option<Duration>| SourceError::Unavailable {
                upstream: self.upstream.clone(),
                message,
                retry_after,
            };
        // A fresh assertion each attempt: its iat/exp track the clock.
        let assertion = self.assertion(grant)?;
        let Answer {
            status,
            body,
            retry_after: wait,
        } = send_once(
            self.client.post(self.key.token_uri.clone()).form(&[
                ("grant_type", GRANT_TYPE),
                ("assertion", assertion.as_str()),
            ]),
            &self.upstream,
            &self.clock,
        )
        .await?;
        if status == StatusCode::OK {
            return Ok(body.to_vec());
        }
        let error: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        let transient_status = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        let transient_error = error
            .as_ref()
            .is_some_and(|e| TRANSIENT_ERRORS.contains(&e.error.as_str()));
        let message = match &error {
            Some(e) if !e.error.is_empty() => {
                if e.error_description.trim().is_empty() {
                    sanitize_upstream_text(&e.error)
                } else {
                    sanitize_upstream_text(&format!("{}: {}", e.error, e.error_description))
                }
            }
            _ => sanitize_upstream_text(&String::from_utf8_lossy(&body)),
        };
        if transient_status || transient_error {
            return Err(unavailable(format!("HTTP {status}: {message}"), wait));
        }
        Err(SourceError::Rejected {
            upstream: self.upstream.clone(),
            status: status.as_u16(),
            message: format!("{message} (account {})", self.key.client_email),
        })
    }

    fn read_success(&self, body: &[u8], audience: &str) -> Result<IdToken, SourceError> {
        let invalid = |message: &str| {
            Err(SourceError::InvalidResponse {
                upstream: self.upstream.clone(),
                message: message.to_owned(),
            })
        };
        let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
            return invalid("the answer is not a JSON object");
        };
        let Some(id_token) = fields.get("id_token").and_then(|v| v.as_str()) else {
            return invalid("No ID token in response (no `id_token` field)");
        };
        IdToken::parse(id_token, audience, self.clock.now())
            .map_err(|e| SourceError::invalid_token(&self.upstream, e))
    }
}

impl IdTokenSource for ServiceAccountSource {
    fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a> {
        Box::pin(self.inner.call(audience))
    }

    fn kind(&self) -> SourceKind {
        SourceKind::ServiceAccountKey
    }

    fn upstream(&self) -> &str {
        &self.inner.upstream
    }

    fn account(&self) -> Option<&str> {
        Some(&self.inner.key.client_email)
    }

    fn instance(&self) -> super::instance::InstanceFacts {
        super::instance::InstanceFacts {
            project_id: self.inner.key.project_id.clone(),
            metadata: None,
        }
    }

    /// A rotated key (new `private_key_id`) at the same path is a change.
    fn fingerprint(&self) -> String {
        let key = &self.inner.key;
        format!(
            "service_account_key|{}|{}|{}",
            key.token_uri, key.client_email, key.private_key_id
        )
    }

    fn access(&self) -> Option<&dyn AccessFetcher> {
        Some(&*self.inner)
    }
}

impl AccessFetcher for KeyGrant {
    fn fetch_access<'a>(&'a self, scopes: &'a str) -> AccessFuture<'a> {
        Box::pin(async move {
            let result = self.call_access(scopes).await;
            record_hop(self.identity, "service_account_key", &result);
            result
        })
    }
}
