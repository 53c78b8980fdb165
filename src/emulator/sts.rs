//! The emulated Security Token Service, `POST /v1/token` (PROTOCOLS.md §7):
//! the RFC 8693 token exchange of workload identity federation. A subject
//! token is accepted only when it is an RS256 JWT verified against a
//! configured provider's JWKS, with the provider's issuer, an accepted
//! audience and an `exp` in the future; the answer is a federated access
//! token standing for `principal://.../subject/{sub}`, which IAM Credentials
//! accepts as a caller.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::{keys::IssuerKey, lock, log_call, EmulatorError, Endpoint, Shared};

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const AWS_TYPE: &str = "urn:ietf:params:aws:token-type:aws4_request";
const JWT_TYPES: [&str; 2] = [
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
];

/// A workload identity pool provider: which external tokens STS accepts.
#[derive(Clone, Debug)]
pub struct WorkloadProvider {
    /// `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X`,
    /// the `audience` of credential files.
    pub audience: String,
    /// The subject tokens' required `iss`.
    pub issuer: String,
    /// The issuer's public keys (a JWKS).
    pub jwks: Value,
    /// Accepted `aud` values of subject tokens; empty means Google's
    /// default, `https://iam.googleapis.com/` + the provider's resource name.
    pub allowed_audiences: Vec<String>,
    /// An AWS provider: subject tokens are signed GetCallerIdentity
    /// requests, checked against the emulated AWS role.
    pub aws: bool,
}

impl WorkloadProvider {
    /// An AWS provider at `audience`.
    pub fn aws(audience: &str) -> Self {
        Self {
            audience: audience.to_owned(),
            issuer: String::new(),
            jwks: Value::Null,
            allowed_audiences: Vec::new(),
            aws: true,
        }
    }
}

impl WorkloadProvider {
    fn accepts_audience(&self, aud: &str) -> bool {
        if self.allowed_audiences.is_empty() {
            let resource = self.audience.trim_start_matches("//iam.googleapis.com/");
            aud == format!("https://iam.googleapis.com/{resource}")
        } else {
            self.allowed_audiences.iter().any(|a| a == aud)
        }
    }

    /// The federated principal a subject stands for.
    pub fn principal(&self, subject: &str) -> String {
        let pool = self
            .audience
            .trim_start_matches("//iam.googleapis.com/")
            .split("/providers/")
            .next()
            .unwrap_or_default()
            .to_owned();
        format!("principal://iam.googleapis.com/{pool}/subject/{subject}")
    }
}

/// An external OIDC issuer for tests and the demo: signs subject tokens
/// that a [`WorkloadProvider`] built from it accepts.
#[derive(Debug)]
pub struct SubjectTokenIssuer {
    issuer: String,
    key: IssuerKey,
}

impl SubjectTokenIssuer {
    /// A fresh RSA key for `issuer` (CPU-bound for a moment).
    pub fn generate(issuer: &str) -> Result<Self, EmulatorError> {
        Ok(Self {
            issuer: issuer.to_owned(),
            key: IssuerKey::generate()?,
        })
    }

    /// A provider at `audience` trusting this issuer, with the default
    /// accepted subject-token audience.
    pub fn provider(&self, audience: &str) -> WorkloadProvider {
        WorkloadProvider {
            audience: audience.to_owned(),
            issuer: self.issuer.clone(),
            jwks: self.key.jwks(),
            allowed_audiences: Vec::new(),
            aws: false,
        }
    }

    /// A subject token for `subject`, addressed to `aud`, valid from
    /// `now_unix` for `lifetime_secs`.
    pub fn sign(
        &self,
        subject: &str,
        aud: &str,
        now_unix: u64,
        lifetime_secs: u64,
    ) -> Result<String, EmulatorError> {
        self.key.sign(&serde_json::json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": aud,
            "iat": now_unix,
            "exp": now_unix + lifetime_secs,
        }))
    }
}

struct OAuthError {
    error: &'static str,
    description: String,
    status: StatusCode,
}

fn oauth(error: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        error,
        description: description.into(),
        status: StatusCode::BAD_REQUEST,
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({
                "error": self.error,
                "error_description": self.description,
            })),
        )
            .into_response()
    }
}

/// `POST /v1/token`.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut form: Map<String, Value> = Map::new();
    for (name, value) in url::form_urlencoded::parse(&body) {
        form.entry(name.into_owned())
            .or_insert(Value::String(value.into_owned()));
    }
    let audience = field(&form, "audience").to_owned();
    shared.count_call(Endpoint::Sts, &audience);
    let faults = shared.faults_for(Endpoint::Sts);
    faults.delay().await;
    let result = match faults.status {
        Some(status) => Err(OAuthError {
            error: if status.is_server_error() {
                "server_error"
            } else {
                "invalid_request"
            },
            description: "injected by the emulator".into(),
            status,
        }),
        None => exchange(&shared, &headers, &form),
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    shared.count_outcome(Endpoint::Sts, response.status() == StatusCode::OK);
    log_call("/v1/token", &audience, response.status());
    response
}

fn exchange(
    shared: &Shared,
    headers: &HeaderMap,
    form: &Map<String, Value>,
) -> Result<Response, OAuthError> {
    let field = |name: &str| field(form, name);
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(oauth(
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    if field("grant_type") != TOKEN_EXCHANGE {
        return Err(oauth(
            "unsupported_grant_type",
            format!(
                "Invalid value for \"grant_type\": {:?}",
                field("grant_type")
            ),
        ));
    }
    if field("requested_token_type") != ACCESS_TOKEN_TYPE {
        return Err(oauth(
            "invalid_request",
            "Invalid value for \"requested_token_type\": only access tokens can be requested",
        ));
    }
    let subject_token_type = field("subject_token_type");
    if !JWT_TYPES.contains(&subject_token_type) && subject_token_type != AWS_TYPE {
        return Err(oauth(
            "invalid_request",
            format!("Invalid value for \"subject_token_type\": {subject_token_type:?} (the emulator accepts jwt and id_token)"),
        ));
    }
    let scopes: Vec<String> = field("scope")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if scopes.is_empty() {
        return Err(oauth(
            "invalid_scope",
            "The \"scope\" parameter is required",
        ));
    }
    // google-auth percent-encodes the JSON once more inside the form.
    let options = field("options");
    let options: Map<String, Value> = if options.is_empty() {
        Map::new()
    } else {
        let decoded: String = url::form_urlencoded::parse(format!("o={options}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        serde_json::from_str(&decoded).map_err(|_| {
            oauth(
                "invalid_request",
                "The \"options\" parameter is not URL-encoded JSON",
            )
        })?
    };
    let audience = field("audience");
    let provider = lock(&shared.providers)
        .iter()
        .find(|p| p.audience == audience)
        .cloned()
        .ok_or_else(|| {
            oauth(
                "invalid_target",
                format!("The target service indicated by the \"audience\" parameters is invalid. This might either be because the pool or provider is disabled or deleted or because it doesn't exist. ({audience})"),
            )
        })?;
    let workforce = audience.contains("/workforcePools/");
    if options.contains_key("userProject") && !workforce {
        return Err(oauth(
            "invalid_request",
            "userProject is only valid for workforce pools",
        ));
    }
    let client_auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Basic "));
    if workforce && !client_auth && !options.contains_key("userProject") {
        return Err(oauth(
            "invalid_request",
            "Workforce pool requests need a user project (options.userProject) or client authentication",
        ));
    }
    let subject = if provider.aws {
        if subject_token_type != AWS_TYPE {
            return Err(oauth(
                "invalid_request",
                format!("An AWS provider takes subject_token_type {AWS_TYPE}"),
            ));
        }
        let arn =
            super::aws::verify_subject_token(shared, &provider.audience, field("subject_token"))
                .map_err(|why| {
                    oauth("invalid_grant", format!("Invalid AWS subject token: {why}"))
                })?;
        lock(&shared.aws).last_subject_token = Some(field("subject_token").to_owned());
        arn
    } else {
        if subject_token_type == AWS_TYPE {
            return Err(oauth(
                "invalid_request",
                "This provider is not an AWS provider",
            ));
        }
        verify_subject_token(shared, &provider, field("subject_token"))?
    };
    let principal = provider.principal(&subject);
    let (token, expires_in) = shared.issue_access_token(&principal, scopes, None);
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(serde_json::json!({
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": expires_in,
        })),
    )
        .into_response())
}

fn field<'a>(form: &'a Map<String, Value>, name: &str) -> &'a str {
    form.get(name).and_then(Value::as_str).unwrap_or("")
}

/// The subject's `sub`, once the token verifies against the provider.
fn verify_subject_token(
    shared: &Shared,
    provider: &WorkloadProvider,
    token: &str,
) -> Result<String, OAuthError> {
    let invalid = |why: &str| oauth("invalid_grant", format!("Invalid subject token: {why}"));
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("not a JWT"))?;
    if header.alg != Algorithm::RS256 {
        return Err(invalid("the signing algorithm must be RS256"));
    }
    let jwks: JwkSet =
        serde_json::from_value(provider.jwks.clone()).map_err(|_| invalid("unusable JWKS"))?;
    let jwk = header
        .kid
        .as_deref()
        .and_then(|kid| jwks.find(kid))
        .ok_or_else(|| invalid("no key of the provider's JWKS matches the token's kid"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| invalid("unusable JWKS key"))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
        .map_err(|_| invalid("the signature does not verify"))?
        .claims;
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if iss != provider.issuer {
        return Err(invalid(&format!(
            "the issuer {iss:?} is not the provider's issuer"
        )));
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(aud)) => provider.accepts_audience(aud),
        Some(Value::Array(auds)) => auds
            .iter()
            .filter_map(Value::as_str)
            .any(|a| provider.accepts_audience(a)),
        _ => false,
    };
    if !aud_ok {
        return Err(oauth(
            "invalid_grant",
            "The audience in ID Token does not match the expected audience.",
        ));
    }
    let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    if exp <= shared.clock.unix_seconds() {
        return Err(oauth(
            "invalid_grant",
            "ID Token issued at is stale to sign-in; the subject token has expired.",
        ));
    }
    claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| invalid("no `sub` claim"))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const PROVIDER: &str =
        "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x";
    const AUD: &str =
        "https://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x";

    async fn exchange(
        emulator: &super::super::Emulator,
        audience: &str,
        token: &str,
    ) -> (u16, Value) {
        let response = client()
            .post(emulator.sts_token_url())
            .form(&[
                ("grant_type", TOKEN_EXCHANGE),
                ("audience", audience),
                ("scope", "https://www.googleapis.com/auth/cloud-platform"),
                ("requested_token_type", ACCESS_TOKEN_TYPE),
                ("subject_token", token),
                ("subject_token_type", JWT_TYPES[0]),
            ])
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    #[tokio::test]
    async fn sts_verifies_subject_tokens_against_the_provider() {
        let emulator = start().await;
        let issuer = SubjectTokenIssuer::generate("https://idp.example.com").unwrap();
        let impostor = SubjectTokenIssuer::generate("https://idp.example.com").unwrap();
        let other_issuer = SubjectTokenIssuer::generate("https://other.example.com").unwrap();
        emulator.add_workload_provider(issuer.provider(PROVIDER));
        let now = unix_now() as u64;

        let (status, body) = exchange(
            &emulator,
            PROVIDER,
            &issuer.sign("sub-1", AUD, now, 600).unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["issued_token_type"], ACCESS_TOKEN_TYPE);
        assert_eq!(body["token_type"], "Bearer");

        let cases = [
            (PROVIDER, impostor.sign("s", AUD, now, 600).unwrap(), "invalid_grant"),
            (PROVIDER, other_issuer.sign("s", AUD, now, 600).unwrap(), "invalid_grant"),
            (PROVIDER, issuer.sign("s", "https://elsewhere", now, 600).unwrap(), "invalid_grant"),
            (PROVIDER, issuer.sign("s", AUD, now - 7200, 600).unwrap(), "invalid_grant"),
            (PROVIDER, "not-a-jwt".to_owned(), "invalid_grant"),
            ("//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/none",
             issuer.sign("s", AUD, now, 600).unwrap(), "invalid_target"),
        ];
        for (audience, token, error) in cases {
            let (status, body) = exchange(&emulator, audience, &token).await;
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error"], error, "{body}");
        }
        let stats = emulator.stats();
        assert_eq!((stats.sts.total, stats.sts.succeeded), (7, 1));
    }
}
