//! `impersonated_service_account` credential files (what `gcloud auth
//! application-default login --impersonate-service-account` writes): a
//! source credential (`authorized_user`, `service_account` or
//! `external_account`) and the account it impersonates. Used by
//! `source = "impersonate"` with `credential_file`, and by application
//! default credentials when `GOOGLE_APPLICATION_CREDENTIALS` names one.

use std::{collections::HashMap, path::Path, sync::Arc};

use serde_json::{Map, Value};

use super::{
    access::{parse_oauth_access_token, AccessFetcher, AccessFuture, AccessToken},
    external_account::{ExternalAccountFile, ExternalAccountSource},
    http_client,
    impersonate::{ImpersonateOptions, ImpersonateSource},
    key_file::read_secret_file,
    record_hop, sanitize_upstream_text, send_once, Answer, FetchFuture, IdTokenSource,
    ServiceAccountKey, ServiceAccountSource, SourceError,
};
use crate::{clock::Clock, domain::SourceKind, token::Secret};

const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const DELEGATE_PREFIX: &str = "projects/-/serviceAccounts/";

/// Builds the impersonating source an `impersonated_service_account` file
/// describes. `iam_endpoint` overrides the impersonation URL's origin.
pub fn impersonated_file_source(
    identity: &str,
    path: &Path,
    allow_insecure_permissions: bool,
    include_email: bool,
    iam_endpoint: Option<&str>,
    env: &HashMap<String, String>,
    clock: &Clock,
) -> Result<ImpersonateSource, String> {
    let text = read_secret_file(path, allow_insecure_permissions).map_err(|e| e.to_string())?;
    let fail = |problem: String| format!("credential file {}: {problem}", path.display());
    let json: Value = serde_json::from_str(&text).map_err(|e| {
        fail(format!(
            "is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let Value::Object(fields) = json else {
        return Err(fail("is not a JSON object".into()));
    };
    if fields.get("type").and_then(Value::as_str) != Some("impersonated_service_account") {
        return Err(fail(
            "field `type` is not \"impersonated_service_account\"".into(),
        ));
    }
    let url = fields
        .get("service_account_impersonation_url")
        .and_then(Value::as_str)
        .ok_or_else(|| fail("field `service_account_impersonation_url` is missing".into()))?;
    let (service_account, origin) = super::impersonate::account_from_impersonation_url(
        url,
        "service_account_impersonation_url",
    )
    .map_err(fail)?;
    let delegates = match fields.get("delegates") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|d| {
                d.as_str()
                    .map(|d| d.strip_prefix(DELEGATE_PREFIX).unwrap_or(d).to_owned())
                    .filter(|d| d.contains('@'))
                    .ok_or_else(|| fail(format!("field `delegates` holds {d}, not an account")))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(fail("field `delegates` is not a list".into())),
    };
    let Some(Value::Object(source)) = fields.get("source_credentials") else {
        return Err(fail(
            "field `source_credentials` is missing or not an object".into(),
        ));
    };
    let base = source_credentials(identity, path, source, env, clock).map_err(fail)?;
    ImpersonateSource::new(
        ImpersonateOptions {
            identity,
            base_name: "source_credentials",
            named_base: false,
            base,
            service_account: Some(&service_account),
            account_from: None,
            delegates: &delegates,
            include_email,
            iam_endpoint: iam_endpoint.unwrap_or(&origin),
        },
        clock.clone(),
    )
}

fn source_credentials(
    identity: &str,
    path: &Path,
    source: &Map<String, Value>,
    env: &HashMap<String, String>,
    clock: &Clock,
) -> Result<Arc<dyn IdTokenSource>, String> {
    let text = Value::Object(source.clone()).to_string();
    let text = zeroize::Zeroizing::new(text);
    match source.get("type").and_then(Value::as_str) {
        Some("service_account") => {
            let key = ServiceAccountKey::parse(path, &text)
                .map_err(|p| format!("source_credentials: {p}"))?;
            let source =
                ServiceAccountSource::for_identity(key, clock.clone(), identity)?;
            Ok(Arc::new(source))
        }
        Some("authorized_user") => {
            let user = UserSource::parse(identity, source, clock)
                .map_err(|p| format!("source_credentials: {p}"))?;
            Ok(Arc::new(user))
        }
        Some("external_account") => {
            let file = ExternalAccountFile::parse(path, &text, env)
                .map_err(|p| format!("source_credentials: {p}"))?;
            let source = ExternalAccountSource::new(identity, file, None, clock.clone())?;
            Ok(Arc::new(source))
        }
        other => Err(format!(
            "source_credentials has type {other:?}; use \"authorized_user\", \"service_account\" or \"external_account\""
        )),
    }
}

/// A user's OAuth credentials (`authorized_user`): access tokens from the
/// refresh-token grant. They only ever serve as a base: a user cannot mint
/// ID tokens for an arbitrary audience.
pub struct UserSource {
    grant: Arc<RefreshGrant>,
}

struct RefreshGrant {
    client: reqwest::Client,
    token_uri: url::Url,
    client_id: String,
    client_secret: Secret,
    refresh_token: Secret,
    upstream: String,
    identity: &'static str,
    clock: Clock,
}

impl UserSource {
    fn parse(identity: &str, fields: &Map<String, Value>, clock: &Clock) -> Result<Self, String> {
        let string = |name: &str| {
            fields
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("field `{name}` is missing"))
        };
        let token_uri = fields
            .get("token_uri")
            .and_then(Value::as_str)
            .unwrap_or(GOOGLE_TOKEN_URI);
        let token_uri = url::Url::parse(token_uri)
            .map_err(|e| format!("field `token_uri` is not a URL: {e}"))?;
        let grant = Arc::new(RefreshGrant {
            client: http_client()?,
            upstream: format!("token endpoint {token_uri} (user credentials)"),
            token_uri,
            client_id: string("client_id")?.to_owned(),
            client_secret: Secret::new(string("client_secret")?.to_owned()),
            refresh_token: Secret::new(string("refresh_token")?.to_owned()),
            identity: crate::metrics::identity_label(identity),
            clock: clock.clone(),
        });
        Ok(Self { grant })
    }
}

impl IdTokenSource for UserSource {
    fn fetch<'a>(&'a self, _audience: &'a str) -> FetchFuture<'a> {
        Box::pin(async move {
            Err(SourceError::InvalidResponse {
                upstream: self.grant.upstream.clone(),
                message: "user credentials cannot mint ID tokens for an audience; impersonate a service account".into(),
            })
        })
    }

    /// Never an identity of its own: only the base inside a file.
    fn kind(&self) -> SourceKind {
        SourceKind::Impersonate
    }

    fn upstream(&self) -> &str {
        &self.grant.upstream
    }

    fn fingerprint(&self) -> String {
        format!(
            "authorized_user|{}|{}",
            self.grant.token_uri, self.grant.client_id
        )
    }

    fn access(&self) -> Option<&dyn AccessFetcher> {
        Some(&*self.grant)
    }
}

impl RefreshGrant {
    /// One refresh-token grant.
    async fn call(&self) -> Result<AccessToken, SourceError> {
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
            self.client.post(self.token_uri.clone()).form(&[
                ("grant_type", "refresh_token"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.expose()),
                ("refresh_token", self.refresh_token.expose()),
            ]),
            &self.upstream,
            &self.clock,
        )
        .await?;
        if status.is_success() {
            return parse_oauth_access_token(&body, self.clock.now()).map_err(|message| {
                SourceError::InvalidResponse {
                    upstream: self.upstream.clone(),
                    message,
                }
            });
        }
        let text = sanitize_upstream_text(&String::from_utf8_lossy(&body));
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(unavailable(format!("HTTP {status}: {text}"), wait));
        }
        Err(SourceError::Rejected {
            upstream: self.upstream.clone(),
            status: status.as_u16(),
            message: text,
        })
    }
}

impl AccessFetcher for RefreshGrant {
    fn fetch_access<'a>(&'a self, _scopes: &'a str) -> AccessFuture<'a> {
        Box::pin(async move {
            let result = self.call().await;
            record_hop(self.identity, "authorized_user", &result);
            result
        })
    }
}
