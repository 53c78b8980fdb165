//! The emulated IAM Credentials API (PROTOCOLS.md §4):
//! `POST /v1/projects/-/serviceAccounts/{EMAIL}:generateIdToken` and
//! `:generateAccessToken`. Strict as Google is: the bearer must be an access
//! token this emulator issued (unexpired, with the cloud-platform scope), the
//! body must be JSON with only the fields Google knows, every delegate must
//! be written `projects/-/serviceAccounts/EMAIL`, and each hop of the chain
//! (caller → delegates → target) needs its grant. Errors carry Google's
//! bodies: `{"error": {"code", "message", "status"}}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{Map, Value};

use super::{lock, log_call, Endpoint, IdTokenRequest, Shared};

pub(super) const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const IAM_SCOPE: &str = "https://www.googleapis.com/auth/iam";
const DELEGATE_PREFIX: &str = "projects/-/serviceAccounts/";
const UNAUTHENTICATED: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
/// Google's ceiling for `generateAccessToken`'s `lifetime` (without the
/// org policy that allows 12 h).
const MAX_ACCESS_LIFETIME_SECS: u64 = 3600;

/// What a grant lets the caller do on the target account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Permission {
    /// `iam.serviceAccounts.getOpenIdToken` (Service Account OpenID Connect
    /// Identity Token Creator): `generateIdToken`.
    OpenIdToken,
    /// `iam.serviceAccounts.getAccessToken` (Service Account Token Creator):
    /// `generateAccessToken`.
    AccessToken,
}

impl Permission {
    pub fn name(self) -> &'static str {
        match self {
            Permission::OpenIdToken => "iam.serviceAccounts.getOpenIdToken",
            Permission::AccessToken => "iam.serviceAccounts.getAccessToken",
        }
    }
}

/// A Google API error answer.
struct GoogleError {
    status: StatusCode,
    message: String,
    permission: Option<Permission>,
}

impl GoogleError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            permission: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn denied(permission: Permission) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "Permission '{}' denied on resource (or it may not exist).",
                permission.name()
            ),
            permission: Some(permission),
        }
    }

    fn status_name(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "INTERNAL",
        }
    }
}

impl IntoResponse for GoogleError {
    fn into_response(self) -> Response {
        let mut error = serde_json::json!({
            "code": self.status.as_u16(),
            "message": self.message,
            "status": self.status_name(),
        });
        if let Some(permission) = self.permission {
            error["details"] = serde_json::json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "IAM_PERMISSION_DENIED",
                "domain": "iam.googleapis.com",
                "metadata": { "permission": permission.name() },
            }]);
        }
        let mut response =
            (self.status, Json(serde_json::json!({ "error": error }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"https://accounts.google.com/\""),
            );
        }
        response
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    GenerateIdToken,
    GenerateAccessToken,
}

/// `POST /v1/projects/{project}/serviceAccounts/{EMAIL}:{method}`.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    Path((project, target)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (account, method) = match target.rsplit_once(':') {
        Some((account, "generateIdToken")) => (account, Method::GenerateIdToken),
        Some((account, "generateAccessToken")) => (account, Method::GenerateAccessToken),
        _ => return GoogleError::new(StatusCode::NOT_FOUND, "Method not found.").into_response(),
    };
    let fields: Option<Map<String, Value>> = serde_json::from_slice(&body).ok();
    let audience = fields
        .as_ref()
        .and_then(|f| f.get("audience"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    match method {
        Method::GenerateIdToken => shared.count_call(Endpoint::Iam, &audience),
        Method::GenerateAccessToken => shared.count(|stats| stats.iam_access += 1),
    }
    let faults = shared.faults_for(Endpoint::Iam);
    faults.delay().await;
    let result = if let Some(status) = faults.status {
        Err(GoogleError::new(
            status,
            format!(
                "{} (injected by the emulator)",
                status.canonical_reason().unwrap_or("Error")
            ),
        ))
    } else {
        answer(
            &shared, &project, account, method, &headers, fields, &faults,
        )
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if method == Method::GenerateIdToken {
        let ok = response.status() == StatusCode::OK
            && !(faults.malformed || faults.expired || faults.wrong_audience);
        shared.count_outcome(Endpoint::Iam, ok);
    }
    log_call("iamcredentials", &audience, response.status());
    response
}

fn answer(
    shared: &Shared,
    project: &str,
    account: &str,
    method: Method,
    headers: &HeaderMap,
    fields: Option<Map<String, Value>>,
    faults: &super::ActiveFaults,
) -> Result<Response, GoogleError> {
    let caller = bearer_principal(shared, headers)?;
    if project != "-" {
        return Err(GoogleError::invalid(
            "The project in the resource name must be the wildcard \"-\".",
        ));
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    let Some(fields) = fields.filter(|_| is_json) else {
        return Err(GoogleError::invalid(
            "Invalid JSON payload received. The body must be a JSON object sent as application/json.",
        ));
    };
    let known: &[&str] = match method {
        Method::GenerateIdToken => &["audience", "includeEmail", "delegates"],
        Method::GenerateAccessToken => &["scope", "lifetime", "delegates"],
    };
    if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(GoogleError::invalid(format!(
            "Invalid JSON payload received. Unknown name \"{unknown}\": Cannot find field."
        )));
    }
    let delegates = delegates(&fields)?;
    let permission = match method {
        Method::GenerateIdToken => Permission::OpenIdToken,
        Method::GenerateAccessToken => Permission::AccessToken,
    };
    // Every account of the chain must exist, then every hop needs its grant.
    for email in delegates.iter().map(String::as_str).chain([account]) {
        if account_id(shared, email).is_none() {
            return Err(GoogleError::new(
                StatusCode::NOT_FOUND,
                format!("Not found; Gaia id not found for email {email}"),
            ));
        }
    }
    let mut hop_caller = caller.as_str();
    {
        let grants = lock(&shared.grants);
        for next in delegates.iter().map(String::as_str).chain([account]) {
            if !grants.contains(&(hop_caller.to_owned(), next.to_owned(), permission)) {
                return Err(GoogleError::denied(permission));
            }
            hop_caller = next;
        }
    }
    let client_id = account_id(shared, account).unwrap_or_default();
    match method {
        Method::GenerateIdToken => {
            let audience = match fields.get("audience") {
                Some(Value::String(a)) if !a.is_empty() => a.as_str(),
                _ => return Err(GoogleError::invalid("Missing required field: audience")),
            };
            let include_email = match fields.get("includeEmail") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(GoogleError::invalid(
                        "Invalid value at 'include_email' (TYPE_BOOL)",
                    ))
                }
            };
            if faults.malformed {
                return Ok(Json(serde_json::json!({ "token": "not-a-jwt" })).into_response());
            }
            let request = IdTokenRequest {
                audience,
                subject: &client_id,
                email: include_email.then_some(account),
                google: None,
            };
            let minted = shared.mint_id_token(&request, faults).map_err(|error| {
                tracing::error!(%error, "emulator could not sign an ID token");
                GoogleError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error.")
            })?;
            Ok(Json(serde_json::json!({ "token": minted.jwt })).into_response())
        }
        Method::GenerateAccessToken => {
            let scopes: Vec<String> = match fields.get("scope") {
                Some(Value::Array(items)) if !items.is_empty() => items
                    .iter()
                    .map(|s| s.as_str().map(str::to_owned))
                    .collect::<Option<_>>()
                    .ok_or_else(|| GoogleError::invalid("Invalid value at 'scope'"))?,
                _ => return Err(GoogleError::invalid("Missing required field: scope")),
            };
            let lifetime = match fields.get("lifetime") {
                None => MAX_ACCESS_LIFETIME_SECS,
                Some(Value::String(text)) => text
                    .strip_suffix('s')
                    .and_then(|n| n.parse::<f64>().ok())
                    .filter(|n| n.is_finite() && *n > 0.0)
                    .map(|n| n.ceil() as u64)
                    .ok_or_else(|| GoogleError::invalid("Invalid value at 'lifetime'"))?,
                Some(_) => return Err(GoogleError::invalid("Invalid value at 'lifetime'")),
            };
            if lifetime > MAX_ACCESS_LIFETIME_SECS {
                return Err(GoogleError::invalid(format!(
                    "The lifetime requested is {lifetime}s; it must be at most {MAX_ACCESS_LIFETIME_SECS}s."
                )));
            }
            let (token, lifetime) = shared.issue_access_token(
                account,
                scopes,
                Some(std::time::Duration::from_secs(lifetime)),
            );
            let expire = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(shared.clock.unix_seconds() + lifetime);
            Ok(Json(serde_json::json!({
                "accessToken": token,
                "expireTime": humantime::format_rfc3339_seconds(expire).to_string(),
            }))
            .into_response())
        }
    }
}

/// Who the bearer token stands for; 401 unless it is live, 403 without a
/// scope that reaches IAM.
fn bearer_principal(shared: &Shared, headers: &HeaderMap) -> Result<String, GoogleError> {
    let unauthenticated = || GoogleError::new(StatusCode::UNAUTHORIZED, UNAUTHENTICATED);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(unauthenticated)?;
    let issued = lock(&shared.access_tokens)
        .get(token.trim())
        .cloned()
        .ok_or_else(unauthenticated)?;
    if issued.exp <= shared.clock.unix_seconds() {
        return Err(unauthenticated());
    }
    if !issued
        .scopes
        .iter()
        .any(|s| s == CLOUD_PLATFORM_SCOPE || s == IAM_SCOPE)
    {
        return Err(GoogleError::new(
            StatusCode::FORBIDDEN,
            "Request had insufficient authentication scopes.",
        ));
    }
    Ok(issued.principal)
}

fn delegates(fields: &Map<String, Value>) -> Result<Vec<String>, GoogleError> {
    // google-auth sends `"delegates": null` when there are none.
    let value = match fields.get("delegates") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(value) => value,
    };
    let Value::Array(items) = value else {
        return Err(GoogleError::invalid("Invalid value at 'delegates'"));
    };
    items
        .iter()
        .map(|item| {
            item.as_str()
                .and_then(|name| name.strip_prefix(DELEGATE_PREFIX))
                .filter(|email| !email.is_empty() && !email.contains('/'))
                .map(str::to_owned)
                .ok_or_else(|| {
                    GoogleError::invalid(format!(
                        "Invalid delegate {item}; delegates must be written projects/-/serviceAccounts/{{ACCOUNT_EMAIL}}"
                    ))
                })
        })
        .collect()
}

/// The account's unique id, if the account exists.
fn account_id(shared: &Shared, email: &str) -> Option<String> {
    if email == shared.default_email {
        return Some(shared.default_client_id.clone());
    }
    lock(&shared.accounts)
        .get(email)
        .map(|a| a.client_id.clone())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{Faults, DEFAULT_ACCOUNT_EMAIL};
    use super::*;

    const TARGET: &str = "target@p.iam.gserviceaccount.com";
    const HOP: &str = "hop@p.iam.gserviceaccount.com";

    async fn metadata_access_token(
        emulator: &super::super::Emulator,
        scopes: Option<&str>,
    ) -> String {
        let mut url = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            emulator.base_url()
        );
        if let Some(scopes) = scopes {
            url.push_str(&format!("?scopes={scopes}"));
        }
        let body: Value = client()
            .get(url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["token_type"], "Bearer");
        assert!(body["expires_in"].as_u64().unwrap() > 3000);
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn call(
        emulator: &super::super::Emulator,
        bearer: Option<&str>,
        target: &str,
        body: Value,
    ) -> (u16, Value) {
        let mut request = client()
            .post(format!(
                "{}/v1/projects/-/serviceAccounts/{target}",
                emulator.base_url()
            ))
            .json(&body);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn iam_is_strict_and_answers_like_google() {
        let emulator = start().await;
        emulator.create_service_account(HOP);
        emulator.create_service_account(TARGET);
        emulator.grant(DEFAULT_ACCOUNT_EMAIL, HOP, Permission::OpenIdToken);
        emulator.grant(HOP, TARGET, Permission::OpenIdToken);
        emulator.grant(DEFAULT_ACCOUNT_EMAIL, TARGET, Permission::AccessToken);
        let bearer = metadata_access_token(&emulator, None).await;
        let id = |body: Value| (format!("{TARGET}:generateIdToken"), body);
        let delegate = format!("projects/-/serviceAccounts/{HOP}");

        // Granted hop by hop.
        let (path, body) = id(serde_json::json!({
            "audience": "https://a", "includeEmail": true, "delegates": [delegate]
        }));
        let (status, answer) = call(&emulator, Some(&bearer), &path, body).await;
        assert_eq!(status, 200, "{answer}");
        let claims = verify(
            answer["token"].as_str().unwrap(),
            &emulator.issuer_decoding_key(),
            "https://a",
        );
        assert_eq!(claims["email"], TARGET);

        let cases: Vec<(Option<String>, String, Value, u16, &str)> = vec![
            (
                None,
                path.clone(),
                serde_json::json!({"audience": "a"}),
                401,
                "UNAUTHENTICATED",
            ),
            (
                Some("ya29.forged".into()),
                path.clone(),
                serde_json::json!({"audience": "a"}),
                401,
                "UNAUTHENTICATED",
            ),
            // No delegate: the default account has no grant on the target.
            (
                Some(bearer.clone()),
                path.clone(),
                serde_json::json!({"audience": "a"}),
                403,
                "Permission 'iam.serviceAccounts.getOpenIdToken' denied",
            ),
            (
                Some(bearer.clone()),
                path.clone(),
                serde_json::json!({"audience": "a", "delegates": [HOP]}),
                400,
                "projects/-/serviceAccounts/",
            ),
            (
                Some(bearer.clone()),
                path.clone(),
                serde_json::json!({"audience": "a", "extra": 1}),
                400,
                "Cannot find field",
            ),
            (
                Some(bearer.clone()),
                path.clone(),
                serde_json::json!({"delegates": [delegate]}),
                400,
                "audience",
            ),
            (
                Some(bearer.clone()),
                "nobody@p.iam.gserviceaccount.com:generateIdToken".into(),
                serde_json::json!({"audience": "a"}),
                404,
                "NOT_FOUND",
            ),
            (
                Some(bearer.clone()),
                format!("{TARGET}:generateAccessToken"),
                serde_json::json!({"scope": ["s"], "lifetime": "7200s"}),
                400,
                "at most 3600s",
            ),
            // generateAccessToken needs its own grant: the default
            // account may mint HOP's ID tokens, not its access tokens.
            (
                Some(bearer.clone()),
                format!("{HOP}:generateAccessToken"),
                serde_json::json!({"scope": ["s"]}),
                403,
                "Permission 'iam.serviceAccounts.getAccessToken' denied",
            ),
            (
                Some(bearer.clone()),
                format!("{TARGET}:signBlob"),
                serde_json::json!({}),
                404,
                "Method not found",
            ),
        ];
        for (bearer, path, body, expected, text) in cases {
            let (status, answer) = call(&emulator, bearer.as_deref(), &path, body.clone()).await;
            assert_eq!(status, expected, "{path} {body}: {answer}");
            assert!(answer.to_string().contains(text), "{path} {body}: {answer}");
            assert_eq!(answer["error"]["code"], expected);
        }

        // A token without a scope that reaches IAM is refused.
        let narrow = metadata_access_token(
            &emulator,
            Some("https://www.googleapis.com/auth/userinfo.email"),
        )
        .await;
        let (path, body) = id(serde_json::json!({"audience": "a", "delegates": [delegate]}));
        let (status, answer) = call(&emulator, Some(&narrow), &path, body).await;
        assert_eq!(status, 403, "{answer}");
        assert!(answer
            .to_string()
            .contains("insufficient authentication scopes"));

        // generateAccessToken: an access token IAM then accepts as a bearer.
        let (status, answer) = call(
            &emulator,
            Some(&bearer),
            &format!("{TARGET}:generateAccessToken"),
            serde_json::json!({"scope": [CLOUD_PLATFORM_SCOPE], "lifetime": "600s"}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer["expireTime"].as_str().unwrap().ends_with('Z'));
        assert!(answer["accessToken"].as_str().unwrap().starts_with("ya29."));

        // Revoked tokens are unknown from then on; faults reach IAM too.
        emulator.revoke_access_tokens();
        let (path, body) = id(serde_json::json!({"audience": "a", "delegates": [delegate]}));
        assert_eq!(
            call(&emulator, Some(&bearer), &path, body.clone()).await.0,
            401
        );
        let bearer = metadata_access_token(&emulator, None).await;
        emulator.set_faults(Faults {
            status: Some(503),
            endpoint: Some("iam".into()),
            fail_next: Some(1),
            ..Faults::default()
        });
        assert_eq!(
            call(&emulator, Some(&bearer), &path, body.clone()).await.0,
            503
        );
        assert_eq!(call(&emulator, Some(&bearer), &path, body).await.0, 200);
        let stats = emulator.stats();
        assert_eq!(stats.metadata_token, 3);
        // Two granted, one denied (HOP's access token, no grant).
        assert_eq!(stats.iam_access, 3);
        assert_eq!(stats.iam.succeeded, 2);
    }
}
