//! `source = "external_account"` (PROTOCOLS.md §7): workload identity
//! federation. A subject token from outside Google (a file, a URL, or an
//! executable) is exchanged at STS for a federated access token, which then
//! asks IAM Credentials `generateIdToken` for the account named in
//! `service_account_impersonation_url`: the hop sequence of Google's Go
//! `idtoken` package, which uses the federated token directly rather than
//! first impersonating the account for an access token.
//!
//! The credential file is the JSON `gcloud iam workload-identity-pools
//! create-cred-config` writes; it is read and checked when the config is
//! prepared, while the subject token is read anew for every exchange
//! (projected tokens rotate).

mod aws;
mod executable;
mod file;
mod sts;
mod url_source;

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::{Map, Value};

use super::{
    access::{AccessFetcher, AccessFuture, AccessOf, AccessTokens, Bearer, EngineLink},
    impersonate::IamCredentials,
    key_file::{check_universe_domain, string_field},
    FetchFuture, IdTokenSource, SourceError,
};
use crate::{clock::Clock, domain::SourceKind};

pub use executable::ALLOW_EXECUTABLES_ENV;

/// Credential and subject-token files are small; a larger one is not one.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
const TOKEN_TYPES: [&str; 4] = [
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:saml2",
    "urn:ietf:params:aws:token-type:aws4_request",
];

/// How the subject token is laid out in a file or URL answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    Json { field: String },
}

impl Format {
    /// The subject token out of `content`; `from` names where it came from.
    pub(crate) fn extract(&self, content: &str, from: &str) -> Result<String, String> {
        let token = match self {
            Format::Text => content.trim().to_owned(),
            Format::Json { field } => {
                let json: Value = serde_json::from_str(content)
                    .map_err(|_| format!("{from} is not JSON (format type is \"json\")"))?;
                json.get(field)
                    .and_then(Value::as_str)
                    .map(|s| s.trim().to_owned())
                    .ok_or_else(|| format!("{from} has no string field {field:?}"))?
            }
        };
        if token.is_empty() {
            return Err(format!("{from} holds no subject token"));
        }
        Ok(token)
    }
}

/// Where the subject token comes from.
#[derive(Clone, Debug)]
pub(crate) enum CredentialSource {
    File(file::FileSource),
    Url(url_source::UrlSource),
    Executable(executable::ExecutableSource),
    Aws(Box<aws::AwsSource>),
}

impl CredentialSource {
    fn describe(&self) -> String {
        match self {
            CredentialSource::File(f) => format!("subject token file {}", f.path.display()),
            CredentialSource::Url(u) => format!("subject token URL {}", u.url),
            CredentialSource::Executable(e) => format!("executable {:?}", e.command),
            CredentialSource::Aws(a) => a.describe(),
        }
    }
}

/// A checked `external_account` credential file.
#[derive(Clone, Debug)]
pub struct ExternalAccountFile {
    pub(crate) path: PathBuf,
    pub(crate) audience: String,
    pub(crate) subject_token_type: String,
    pub(crate) token_url: url::Url,
    /// The account of `service_account_impersonation_url`.
    pub(crate) service_account: String,
    /// The origin of `service_account_impersonation_url`.
    pub(crate) iam_origin: String,
    pub(crate) workforce_pool_user_project: Option<String>,
    /// `service_account_impersonation.token_lifetime_seconds`: how long the
    /// impersonated access tokens live (Google's default: an hour).
    pub(crate) token_lifetime: Option<std::time::Duration>,
    pub(crate) client_auth: Option<(String, crate::token::Secret)>,
    pub(crate) source: CredentialSource,
}

impl ExternalAccountFile {
    /// Reads and checks the file at `path`. Every problem is one line
    /// naming the field; the file's secrets (`client_secret`) never appear.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Self, String> {
        let mut text = String::new();
        let real = trusted_file(path)
            .map_err(|problem| format!("credential file {}: {problem}", path.display()))?;
        let file = std::fs::File::open(real)
            .map_err(|e| format!("credential file {}: cannot be read: {e}", path.display()))?;
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("credential file {}: cannot be read: {e}", path.display()))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(format!("credential file {}: too large", path.display()));
        }
        Self::parse(path, &text, env)
            .map_err(|problem| format!("credential file {}: {problem}", path.display()))
    }

    /// Parses credential-file JSON; the error is the problem alone.
    pub fn parse(path: &Path, text: &str, env: &HashMap<String, String>) -> Result<Self, String> {
        let json: Value = serde_json::from_str(text).map_err(|e| {
            format!(
                "is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let Value::Object(fields) = json else {
            return Err("is not a JSON object".into());
        };
        let kind = string_field(&fields, "type")?;
        if kind != "external_account" {
            return Err(format!(
                "field `type` is {kind:?}; source = \"external_account\" needs \"external_account\""
            ));
        }
        check_universe_domain(&fields, "ID tokens are minted")?;
        let audience = string_field(&fields, "audience")?.to_owned();
        let subject_token_type = string_field(&fields, "subject_token_type")?.to_owned();
        if !TOKEN_TYPES.contains(&subject_token_type.as_str()) {
            return Err(format!(
                "field `subject_token_type` is {subject_token_type:?}, not one Google knows"
            ));
        }
        let token_url = crate::domain::upstream_url::parse_https_or_loopback(
            string_field(&fields, "token_url")?,
            "token_url",
        )?;
        let workforce = audience.starts_with("//iam.googleapis.com/locations/")
            && audience.contains("/workforcePools/");
        let workforce_pool_user_project = match fields.get("workforce_pool_user_project") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if p.is_empty() => None,
            Some(Value::String(p)) if workforce => Some(p.clone()),
            Some(Value::String(_)) => {
                return Err(
                    "field `workforce_pool_user_project` is set, but `audience` is not a workforce pool (//iam.googleapis.com/locations/L/workforcePools/...)"
                        .into(),
                )
            }
            Some(_) => return Err("field `workforce_pool_user_project` is not a string".into()),
        };
        let Some(impersonation) = fields
            .get("service_account_impersonation_url")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
        else {
            return Err("has no `service_account_impersonation_url`: an ID token needs an account to impersonate, and a federated token alone cannot mint one. Recreate the file with `gcloud iam workload-identity-pools create-cred-config ... --service-account=EMAIL`".into());
        };
        let (service_account, iam_origin) = super::impersonate::account_from_impersonation_url(
            impersonation,
            "service_account_impersonation_url",
        )?;
        let token_lifetime = token_lifetime(fields.get("service_account_impersonation"))?;
        let client_auth = match (fields.get("client_id"), fields.get("client_secret")) {
            (Some(Value::String(id)), Some(Value::String(secret))) => {
                Some((id.clone(), crate::token::Secret::new(secret.clone())))
            }
            _ => None,
        };
        let source = match fields.get("credential_source") {
            Some(Value::Object(source)) => parse_source(source, env)?,
            _ => return Err("field `credential_source` is missing or not an object".into()),
        };
        Ok(Self {
            path: path.to_path_buf(),
            audience,
            subject_token_type,
            token_url,
            service_account,
            iam_origin,
            workforce_pool_user_project,
            token_lifetime,
            client_auth,
            source,
        })
    }

    /// The account ID tokens are minted for.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The default IAM Credentials base URL: the impersonation URL's origin.
    pub fn iam_origin(&self) -> &str {
        &self.iam_origin
    }
}

/// Longest `token_lifetime_seconds` IAM grants (12 hours, where the
/// organization allows more than one).
const MAX_TOKEN_LIFETIME_SECS: u64 = 43_200;

/// `service_account_impersonation: {"token_lifetime_seconds": N}`, as
/// google-auth reads it: absent or null, the default hour.
fn token_lifetime(field: Option<&Value>) -> Result<Option<std::time::Duration>, String> {
    let seconds = match field {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(fields)) => match fields.get("token_lifetime_seconds") {
            None | Some(Value::Null) => return Ok(None),
            Some(value) => value.as_u64(),
        },
        Some(_) => return Err("field `service_account_impersonation` is not an object".into()),
    };
    match seconds {
        Some(secs @ 1..=MAX_TOKEN_LIFETIME_SECS) => Ok(Some(std::time::Duration::from_secs(secs))),
        _ => Err(format!(
            "field `service_account_impersonation.token_lifetime_seconds` must be a whole \
             number of seconds from 1 to {MAX_TOKEN_LIFETIME_SECS}"
        )),
    }
}

fn parse_source(
    source: &Map<String, Value>,
    env: &HashMap<String, String>,
) -> Result<CredentialSource, String> {
    if source.contains_key("environment_id") {
        return aws::AwsSource::parse(source, env).map(|a| CredentialSource::Aws(Box::new(a)));
    }
    let format =
        match source.get("format") {
            None => Format::Text,
            Some(Value::Object(format)) => match format.get("type").and_then(Value::as_str) {
                None | Some("text") => Format::Text,
                Some("json") => match format
                    .get("subject_token_field_name")
                    .and_then(Value::as_str)
                {
                    Some(field) if !field.is_empty() => Format::Json {
                        field: field.to_owned(),
                    },
                    _ => return Err(
                        "credential_source.format: type \"json\" needs `subject_token_field_name`"
                            .into(),
                    ),
                },
                Some(other) => {
                    return Err(format!(
                        "credential_source.format.type is {other:?}; use \"text\" or \"json\""
                    ))
                }
            },
            Some(_) => return Err("credential_source.format is not an object".into()),
        };
    let kinds = ["file", "url", "executable"]
        .iter()
        .filter(|k| source.contains_key(**k))
        .count();
    if kinds != 1 {
        return Err(
            "credential_source must have exactly one of `file`, `url` or `executable`".into(),
        );
    }
    if let Some(path) = source.get("file") {
        let path = path
            .as_str()
            .filter(|p| !p.is_empty())
            .ok_or("credential_source.file is not a path")?;
        return Ok(CredentialSource::File(file::FileSource {
            path: PathBuf::from(path),
            format,
        }));
    }
    if let Some(url) = source.get("url") {
        let url = url
            .as_str()
            .ok_or("credential_source.url is not a string")?;
        let url =
            url::Url::parse(url).map_err(|e| format!("credential_source.url is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("credential_source.url must be http or https".into());
        }
        let mut headers = Vec::new();
        match source.get("headers") {
            None => {}
            Some(Value::Object(map)) => {
                for (name, value) in map {
                    let value = value.as_str().ok_or_else(|| {
                        format!("credential_source.headers.{name} is not a string")
                    })?;
                    let name =
                        reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                            format!("credential_source.headers: {name:?} is not a header name")
                        })?;
                    let mut value =
                        reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                            format!("credential_source.headers.{name} is not a valid header value")
                        })?;
                    value.set_sensitive(true);
                    headers.push((name, value));
                }
            }
            Some(_) => return Err("credential_source.headers is not an object".into()),
        }
        return Ok(CredentialSource::Url(url_source::UrlSource {
            url,
            headers,
            format,
        }));
    }
    let Some(Value::Object(executable)) = source.get("executable") else {
        return Err("credential_source.executable is not an object".into());
    };
    executable::ExecutableSource::parse(executable, env).map(CredentialSource::Executable)
}

/// A file that says where credentials go and what runs (a credential file,
/// an executable): every directory on the way trusted, and the file owned
/// by root or the broker's user and writable by nobody else. Whoever could
/// change it could send the subject token elsewhere or run commands as the
/// broker. The resolved path, to open.
pub(crate) fn trusted_file(path: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let real = crate::domain::trusted_path::resolve(path).map_err(|e| {
        if e.is_not_found() {
            "cannot be read: no such file".to_owned()
        } else {
            format!("is not safe to use: {e}")
        }
    })?;
    let meta = std::fs::symlink_metadata(&real).map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "is owned by uid {}, not by the broker's user ({me}) or root",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "is writable by group or others (mode {mode:04o}); run `chmod go-w` on it"
        ));
    }
    Ok(real)
}

/// Mints ID tokens through workload identity federation.
pub struct ExternalAccountSource {
    chain: Chain,
}

/// STS (federated tokens, held by the cache engine as this identity's
/// [`AccessOf::Base`]) and the IAM hop.
struct Chain {
    identity: String,
    file: ExternalAccountFile,
    exchange: sts::Exchange,
    link: EngineLink,
    federated_hop: String,
    iam: IamCredentials,
}

impl ExternalAccountSource {
    pub fn new(
        identity: &str,
        file: ExternalAccountFile,
        iam_endpoint: Option<&str>,
        clock: Clock,
    ) -> Result<Self, String> {
        let exchange = sts::Exchange::new(identity, file.clone(), clock.clone())?;
        let mut iam = IamCredentials::new(
            iam_endpoint.unwrap_or(&file.iam_origin),
            identity,
            clock.clone(),
        )?;
        if let Some(lifetime) = file.token_lifetime {
            iam = iam.with_access_lifetime(lifetime);
        }
        let chain = Chain {
            identity: identity.to_owned(),
            federated_hop: format!("STS at {} ({})", file.token_url, file.source.describe()),
            exchange,
            link: EngineLink::default(),
            file,
            iam,
        };
        Ok(Self { chain })
    }
}

impl Chain {
    fn bearer(&self) -> Bearer<'_> {
        Bearer {
            link: &self.link,
            identity: &self.identity,
            of: AccessOf::Base,
            fetcher: &self.exchange,
            description: &self.federated_hop,
        }
    }
}

impl IdTokenSource for ExternalAccountSource {
    fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a> {
        Box::pin(async move {
            let c = &self.chain;
            c.iam
                .generate_id_token(&c.bearer(), &c.file.service_account, &[], audience, true)
                .await
        })
    }

    fn kind(&self) -> SourceKind {
        SourceKind::ExternalAccount
    }

    fn upstream(&self) -> &str {
        self.chain.iam.upstream()
    }

    fn account(&self) -> Option<&str> {
        Some(&self.chain.file.service_account)
    }

    fn fingerprint(&self) -> String {
        let f = &self.chain.file;
        format!(
            "external_account|{}|{}|{}|{}|{}|{:?}|{}",
            f.path.display(),
            f.audience,
            f.token_url,
            f.service_account,
            f.source.describe(),
            f.workforce_pool_user_project,
            self.chain.iam.upstream()
        )
    }

    fn access(&self) -> Option<&dyn AccessFetcher> {
        Some(&self.chain)
    }

    fn base_access(&self) -> Option<&dyn AccessFetcher> {
        Some(&self.chain.exchange)
    }

    fn attach(&self, tokens: &Arc<dyn AccessTokens>) {
        self.chain.link.attach(tokens.clone());
    }

    fn chain(&self) -> Option<String> {
        let c = &self.chain;
        Some(format!(
            "external_account {} from {}, exchanged at STS {}, impersonating {} through {}",
            c.file.audience,
            c.file.source.describe(),
            c.file.token_url,
            c.file.service_account,
            c.iam.upstream()
        ))
    }
}

impl AccessFetcher for Chain {
    fn fetch_access<'a>(&'a self, scopes: &'a str) -> AccessFuture<'a> {
        Box::pin(async move {
            self.iam
                .generate_access_token(&self.bearer(), &self.file.service_account, &[], scopes)
                .await
        })
    }
}

/// Why no subject token could be had.
pub(crate) enum SubjectError {
    /// Worth retrying within the exchange (a URL that answered 5xx).
    Transient(String),
    Permanent(SourceError),
}

/// A subject token problem, naming where it came from.
pub(crate) fn subject_error(from: &str, message: String) -> SourceError {
    SourceError::InvalidResponse {
        upstream: from.to_owned(),
        message,
    }
}

/// A subject-token answer (a URL source, AWS metadata), read with the same
/// cap as every upstream answer.
pub(crate) async fn read_subject_body(
    response: reqwest::Response,
    from: &str,
) -> Result<Vec<u8>, SubjectError> {
    super::read_body(response, from).await.map_err(|e| match e {
        super::BodyError::TooLarge(err) => SubjectError::Permanent(err),
        super::BodyError::Transfer(message) => {
            SubjectError::Transient(format!("{from}: {message}"))
        }
    })
}
