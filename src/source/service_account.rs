//! Service-account key identities (PROTOCOLS.md §2): a self-signed JWT
//! assertion carrying `target_audience`, exchanged at the key's `token_uri`
//! for a Google-signed ID token.

use std::time::Duration;

use jsonwebtoken::{Algorithm, Header};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::{
    describe_http_error, http_client, read_body, retry_after, sanitize_upstream_text, BodyError,
    FetchFuture, IdTokenSource, ServiceAccountKey, SourceError,
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
    key: ServiceAccountKey,
    client: reqwest::Client,
    upstream: String,
    clock: Clock,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    target_audience: &'a str,
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
        Ok(Self {
            upstream: format!("token endpoint {}", key.token_uri),
            client: http_client()?,
            key,
            clock,
        })
    }

    /// The signed assertion for one audience.
    fn assertion(&self, audience: &str) -> Result<String, SourceError> {
        let iat = self
            .clock
            .unix_seconds()
            .saturating_sub(CLOCK_SKEW.as_secs());
        let claims = AssertionClaims {
            iss: &self.key.client_email,
            sub: &self.key.client_email,
            aud: self.key.token_uri.as_str(),
            target_audience: audience,
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

    /// One call: the token, or why not (with any `Retry-After`).
    async fn call(&self, audience: &str) -> Result<IdToken, SourceError> {
        let unavailable =
            |message: String, retry_after: Option<Duration>| SourceError::Unavailable {
                upstream: self.upstream.clone(),
                message,
                retry_after,
            };
        // A fresh assertion each attempt: its iat/exp track the clock.
        let assertion = self.assertion(audience)?;
        let response = self
            .client
            .post(self.key.token_uri.clone())
            .form(&[
                ("grant_type", GRANT_TYPE),
                ("assertion", assertion.as_str()),
            ])
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
        if status == StatusCode::OK {
            return self.read_success(&body, audience);
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
        Box::pin(self.call(audience))
    }

    fn kind(&self) -> SourceKind {
        SourceKind::ServiceAccountKey
    }

    fn upstream(&self) -> &str {
        &self.upstream
    }

    fn account(&self) -> Option<&str> {
        Some(&self.key.client_email)
    }

    /// A rotated key (new `private_key_id`) at the same path is a change.
    fn fingerprint(&self) -> String {
        format!(
            "service_account_key|{}|{}|{}",
            self.key.token_uri, self.key.client_email, self.key.private_key_id
        )
    }
}
