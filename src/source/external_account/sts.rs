//! The STS hop (PROTOCOLS.md §7): the subject token, read anew for every
//! exchange, traded for a federated access token with the RFC 8693 form
//! google-auth sends.

use base64::Engine as _;
use reqwest::StatusCode;

use super::{
    executable::Context, subject_error, CredentialSource, ExternalAccountFile, SubjectError,
};
use crate::{
    clock::Clock,
    source::{
        access::{parse_oauth_access_token, AccessFetcher, AccessFuture, AccessToken},
        http_client, record_hop, sanitize_upstream_text, send_once, Answer, SourceError,
    },
};

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

pub(crate) struct Exchange {
    client: reqwest::Client,
    file: ExternalAccountFile,
    upstream: String,
    identity: &'static str,
    clock: Clock,
}

impl Exchange {
    pub(crate) fn new(
        identity: &str,
        file: ExternalAccountFile,
        clock: Clock,
    ) -> Result<Self, String> {
        Ok(Self {
            client: http_client()?,
            upstream: format!("STS at {}", file.token_url),
            file,
            identity: crate::metrics::identity_label(identity),
            clock,
        })
    }

    async fn subject_token(&self) -> Result<String, SubjectError> {
        match &self.file.source {
            CredentialSource::File(file) => file.read().await,
            CredentialSource::Url(url) => url.fetch(&self.client).await,
            CredentialSource::Aws(aws) => {
                aws.subject_token(&self.client, &self.file.audience, self.clock.now())
                    .await
            }
            CredentialSource::Executable(executable) => {
                executable
                    .run(&Context {
                        audience: &self.file.audience,
                        token_type: &self.file.subject_token_type,
                        impersonated_email: &self.file.service_account,
                        now_unix: self.clock.unix_seconds(),
                    })
                    .await
            }
        }
    }

    /// One exchange: a fresh subject token, then one call to STS.
    async fn call(&self, scopes: &str) -> Result<AccessToken, SourceError> {
        let unavailable =
            |message: String, retry_after: Option<std::time::Duration>| SourceError::Unavailable {
                upstream: self.upstream.clone(),
                message,
                retry_after,
            };
        let subject = match self.subject_token().await {
            Ok(token) => token,
            Err(SubjectError::Transient(message)) => return Err(unavailable(message, None)),
            Err(SubjectError::Permanent(err)) => return Err(err),
        };
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE.to_owned()),
            ("audience", self.file.audience.clone()),
            ("scope", scopes.to_owned()),
            ("requested_token_type", ACCESS_TOKEN_TYPE.to_owned()),
            ("subject_token", subject),
            ("subject_token_type", self.file.subject_token_type.clone()),
        ];
        // As google-auth: the user project only without client auth, and
        // the JSON percent-encoded once more inside the form.
        if let (Some(project), None) = (
            &self.file.workforce_pool_user_project,
            &self.file.client_auth,
        ) {
            let json = serde_json::json!({ "userProject": project }).to_string();
            let encoded: String = url::form_urlencoded::byte_serialize(json.as_bytes()).collect();
            form.push(("options", encoded.replace('+', "%20")));
        }
        let mut request = self.client.post(self.file.token_url.clone()).form(&form);
        if let Some((id, secret)) = &self.file.client_auth {
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("{id}:{}", secret.expose()));
            request = request.header(reqwest::header::AUTHORIZATION, format!("Basic {basic}"));
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
                    message,
                }
            });
        }
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        let text = match json.as_ref().and_then(|j| j.get("error")?.as_str()) {
            Some(error) => {
                let description = json
                    .as_ref()
                    .and_then(|j| j.get("error_description")?.as_str())
                    .unwrap_or_default();
                format!("{error}: {description}")
            }
            None => String::from_utf8_lossy(&body).into_owned(),
        };
        let text = sanitize_upstream_text(&text);
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(unavailable(format!("HTTP {status}: {text}"), wait));
        }
        Err(SourceError::Rejected {
            upstream: self.upstream.clone(),
            status: status.as_u16(),
            message: format!("token exchange for {}: {text}", self.file.audience),
        })
    }
}

impl AccessFetcher for Exchange {
    fn fetch_access<'a>(&'a self, scopes: &'a str) -> AccessFuture<'a> {
        Box::pin(async move {
            let result = self.call(scopes).await;
            record_hop(self.identity, "sts", &result);
            result
        })
    }
}

impl SubjectError {
    pub(crate) fn permanent(from: &str, message: String) -> Self {
        SubjectError::Permanent(subject_error(from, message))
    }
}
