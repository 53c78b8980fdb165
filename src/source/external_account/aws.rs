//! `credential_source.environment_id = "aws1"` (google-auth's `aws.py`):
//! the subject token is a SigV4-signed AWS STS `GetCallerIdentity` request,
//! serialized for Google's STS, which has AWS check the signature. The
//! region and the role's credentials come from `AWS_REGION` /
//! `AWS_DEFAULT_REGION` and `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
//! `AWS_SESSION_TOKEN` when set, else from the instance metadata service,
//! with an IMDSv2 session token when `imdsv2_session_token_url` is given.
//! Signing is done by the `aws-sigv4` crate.

use std::{collections::HashMap, time::SystemTime};

use serde_json::{Map, Value};

use super::{read_subject_body, SubjectError};
use crate::{
    source::{describe_http_error, sanitize_upstream_text},
    token::Secret,
};

const IMDSV2_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const IMDSV2_TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const IMDSV2_TTL_SECONDS: &str = "300";
const TARGET_RESOURCE_HEADER: &str = "x-goog-cloud-target-resource";

#[derive(Clone)]
pub(crate) struct AwsSource {
    region_url: Option<url::Url>,
    credentials_url: Option<url::Url>,
    verification_url: String,
    imdsv2_url: Option<url::Url>,
    env_region: Option<String>,
    env_credentials: Option<Credentials>,
}

#[derive(Clone)]
struct Credentials {
    access_key_id: String,
    secret_access_key: Secret,
    session_token: Option<Secret>,
}

impl std::fmt::Debug for AwsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsSource")
            .field(
                "region_url",
                &self.region_url.as_ref().map(url::Url::as_str),
            )
            .field(
                "credentials_url",
                &self.credentials_url.as_ref().map(url::Url::as_str),
            )
            .field("verification_url", &self.verification_url)
            .field(
                "imdsv2_url",
                &self.imdsv2_url.as_ref().map(url::Url::as_str),
            )
            .finish_non_exhaustive()
    }
}

impl AwsSource {
    pub(crate) fn parse(
        source: &Map<String, Value>,
        env: &HashMap<String, String>,
    ) -> Result<Self, String> {
        let id = source
            .get("environment_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match id.strip_prefix("aws") {
            Some("1") => {}
            Some(version) if version.chars().all(|c| c.is_ascii_digit()) && !version.is_empty() => {
                return Err(format!(
                    "credential_source.environment_id: aws version {version:?} is not supported (only \"aws1\")"
                ))
            }
            _ => {
                return Err(format!(
                    "credential_source.environment_id is {id:?}; the only one known is \"aws1\""
                ))
            }
        }
        let url = |field: &str| -> Result<Option<url::Url>, String> {
            match source.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(text)) => url::Url::parse(text)
                    .map(Some)
                    .map_err(|e| format!("credential_source.{field} is not a URL: {e}")),
                Some(_) => Err(format!("credential_source.{field} is not a string")),
            }
        };
        let verification_url = source
            .get("regional_cred_verification_url")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .ok_or("credential_source.regional_cred_verification_url is missing (No valid AWS 'credential_source' provided)")?
            .to_owned();
        if !verification_url.starts_with("https://") {
            return Err(
                "credential_source.regional_cred_verification_url must be an https URL".into(),
            );
        }
        let nonempty = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
        let env_credentials = match (
            nonempty("AWS_ACCESS_KEY_ID"),
            nonempty("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(access_key_id), Some(secret)) => Some(Credentials {
                access_key_id,
                secret_access_key: Secret::new(secret),
                session_token: nonempty("AWS_SESSION_TOKEN").map(Secret::new),
            }),
            _ => None,
        };
        let env_region = nonempty("AWS_REGION").or_else(|| nonempty("AWS_DEFAULT_REGION"));
        let aws = AwsSource {
            region_url: url("region_url")?,
            credentials_url: url("url")?,
            verification_url,
            imdsv2_url: url("imdsv2_session_token_url")?,
            env_region,
            env_credentials,
        };
        if aws.env_region.is_none() && aws.region_url.is_none() {
            return Err("credential_source.region_url is missing and neither AWS_REGION nor AWS_DEFAULT_REGION is set".into());
        }
        if aws.env_credentials.is_none() && aws.credentials_url.is_none() {
            return Err("credential_source.url is missing and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not set".into());
        }
        Ok(aws)
    }

    pub(crate) fn describe(&self) -> String {
        match &self.credentials_url {
            Some(url) if self.env_credentials.is_none() => {
                format!("AWS role credentials from {url}")
            }
            _ => "AWS credentials from the environment".into(),
        }
    }

    /// The serialized, signed GetCallerIdentity request.
    pub(crate) async fn subject_token(
        &self,
        client: &reqwest::Client,
        audience: &str,
        now: SystemTime,
    ) -> Result<String, SubjectError> {
        let needs_metadata = self.env_region.is_none() || self.env_credentials.is_none();
        let session = match (&self.imdsv2_url, needs_metadata) {
            (Some(url), true) => Some(self.imdsv2_session(client, url).await?),
            _ => None,
        };
        let region = match &self.env_region {
            Some(region) => region.clone(),
            None => {
                let url = self.region_url.as_ref().expect("checked at parse");
                let zone = metadata_get(client, url, session.as_deref(), "region").await?;
                // An availability zone (us-east-2b) names its region plus a letter.
                let mut region = zone.trim().to_owned();
                region.pop();
                if region.is_empty() {
                    return Err(SubjectError::permanent(
                        "AWS metadata",
                        format!("region_url answered {zone:?}, not an availability zone"),
                    ));
                }
                region
            }
        };
        let credentials = match &self.env_credentials {
            Some(credentials) => credentials.clone(),
            None => {
                let url = self.credentials_url.as_ref().expect("checked at parse");
                self.role_credentials(client, url, session.as_deref())
                    .await?
            }
        };
        sign_get_caller_identity(
            &self.verification_url.replace("{region}", &region),
            &region,
            &credentials,
            audience,
            now,
        )
        .map_err(|m| SubjectError::permanent("AWS request signing", m))
    }

    async fn imdsv2_session(
        &self,
        client: &reqwest::Client,
        url: &url::Url,
    ) -> Result<String, SubjectError> {
        let from = format!("IMDSv2 session token URL {url}");
        let response = client
            .put(url.clone())
            .header(IMDSV2_TTL_HEADER, IMDSV2_TTL_SECONDS)
            .send()
            .await
            .map_err(|e| SubjectError::Transient(format!("{from}: {}", describe_http_error(&e))))?;
        read_text(response, &from).await
    }

    async fn role_credentials(
        &self,
        client: &reqwest::Client,
        url: &url::Url,
        session: Option<&str>,
    ) -> Result<Credentials, SubjectError> {
        let role = metadata_get(client, url, session, "role name").await?;
        let role = role.trim();
        let mut role_url = url.clone();
        role_url
            .path_segments_mut()
            .map_err(|_| SubjectError::permanent("AWS metadata", "url cannot be a base".into()))?
            .pop_if_empty()
            .push(role);
        let text = metadata_get(client, &role_url, session, "role credentials").await?;
        let json: Value = serde_json::from_str(&text).map_err(|_| {
            SubjectError::permanent("AWS metadata", "role credentials are not JSON".into())
        })?;
        let field = |name: &str| {
            json.get(name)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| {
                    SubjectError::permanent(
                        "AWS metadata",
                        format!("role credentials have no `{name}`"),
                    )
                })
        };
        Ok(Credentials {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: Secret::new(field("SecretAccessKey")?),
            session_token: field("Token").ok().map(Secret::new),
        })
    }
}

async fn metadata_get(
    client: &reqwest::Client,
    url: &url::Url,
    session: Option<&str>,
    what: &str,
) -> Result<String, SubjectError> {
    let from = format!("AWS metadata {what} at {url}");
    let mut request = client.get(url.clone());
    if let Some(session) = session {
        request = request.header(IMDSV2_TOKEN_HEADER, session);
    }
    let response = request
        .send()
        .await
        .map_err(|e| SubjectError::Transient(format!("{from}: {}", describe_http_error(&e))))?;
    read_text(response, &from).await
}

async fn read_text(response: reqwest::Response, from: &str) -> Result<String, SubjectError> {
    let status = response.status();
    let text = String::from_utf8_lossy(&read_subject_body(response, from).await?).into_owned();
    if status.is_success() {
        return Ok(text);
    }
    let message = format!("HTTP {status}: {}", sanitize_upstream_text(&text));
    if status.is_server_error() || status.as_u16() == 429 {
        Err(SubjectError::Transient(format!("{from}: {message}")))
    } else {
        Err(SubjectError::permanent(from, message))
    }
}

/// Signs `POST url` (GetCallerIdentity) and serializes it as Google's STS
/// expects: percent-encoded compact JSON `{"headers": [{"key", "value"}...],
/// "method", "url"}`, keys sorted, with `x-goog-cloud-target-resource`
/// (the provider) added after signing.
fn sign_get_caller_identity(
    url: &str,
    region: &str,
    credentials: &Credentials,
    audience: &str,
    now: SystemTime,
) -> Result<String, String> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("{url:?} has no host"))?
        .to_owned();
    let identity = aws_credential_types::Credentials::new(
        credentials.access_key_id.clone(),
        credentials.secret_access_key.expose().to_owned(),
        credentials
            .session_token
            .as_ref()
            .map(|t| t.expose().to_owned()),
        None,
        "token-broker",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let signable = SignableRequest::new("POST", url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| format!("cannot sign {url:?}: {e}"))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| format!("cannot sign {url:?}: {e}"))?
        .into_parts();
    let signed = |name: &str| {
        instructions
            .headers()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_owned())
    };
    let authorization = signed("authorization").ok_or("no signature was computed")?;
    let date = signed("x-amz-date").ok_or("no x-amz-date was computed")?;
    // google-auth's order and spelling, which Google's STS is used to.
    let mut headers = vec![
        ("Authorization", authorization),
        ("host", host),
        ("x-amz-date", date),
    ];
    if let Some(token) = &credentials.session_token {
        headers.push(("x-amz-security-token", token.expose().to_owned()));
    }
    headers.push((TARGET_RESOURCE_HEADER, audience.to_owned()));
    let headers: Vec<Value> = headers
        .into_iter()
        .map(|(key, value)| serde_json::json!({ "key": key, "value": value }))
        .collect();
    // serde_json's maps are sorted by key, and `to_string` is compact.
    let request = serde_json::json!({ "headers": headers, "method": "POST", "url": url });
    Ok(percent_encode(&request.to_string()))
}

/// Python's `urllib.parse.quote` with its default `safe="/"`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"_.-~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
