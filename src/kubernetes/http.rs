//! The calls to the kubelet (`GET /pods`) and the API server (`GET` a
//! service account), over the project's one HTTP stack (reqwest, rustls).
//!
//! Over https the only trusted root is `ca_file` (the cluster's CA: a
//! certificate from any other authority, or a MITM, is refused) and the
//! service-account token goes along as a bearer; over http (loopback only,
//! the kubelet's read-only port or a `kubectl proxy`) neither is used. The
//! token is read from `token_file` at every call, so a rotated projected
//! token is picked up; fetches are rare (the directory spaces them), so the
//! read costs nothing that matters. Every answer is read with a size cap.

use std::{
    collections::BTreeMap,
    future::Future,
    io::Read,
    path::{Path, PathBuf},
    pin::Pin,
    time::Duration,
};

use serde::Deserialize;

use super::{names, pod_list::parse_pod_list, Pod, PodLookupError};
use crate::{config::KubernetesSettings, domain::Problem};

/// Largest pod list read. 110 pods (the kubelet's default `maxPods`) with
/// managedFields come to about 1 MiB; a node with 250 fat pods stays well
/// under this. Anything bigger is refused, not buffered.
pub const MAX_POD_LIST_BYTES: usize = 64 * 1024 * 1024;

/// Largest service-account object read.
pub const MAX_SERVICE_ACCOUNT_BYTES: usize = 1024 * 1024;

/// Largest token file read (projected tokens are about 1 KiB).
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

pub(super) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where pods and service accounts are read: the kubelet and the API
/// server, or in tests a stand-in.
pub(super) trait PodSource: Send + Sync + 'static {
    /// The node's pods, and how many the answer held that were malformed.
    fn pods(&self) -> BoxFuture<'_, Result<(Vec<Pod>, usize), PodLookupError>>;
    /// A service account's annotations.
    fn annotations<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, PodLookupError>>;
}

/// The kubelet and the API server over HTTP.
pub(super) struct HttpSource {
    kubelet: reqwest::Client,
    pods_url: url::Url,
    /// The API server's client, or why none could be built (its CA could
    /// not be read): reported when annotations are first needed.
    api: Result<reqwest::Client, String>,
    api_server: url::Url,
    token_file: PathBuf,
}

impl HttpSource {
    pub(super) fn new(
        settings: &KubernetesSettings,
        env: &std::collections::HashMap<String, String>,
    ) -> Result<HttpSource, Problem> {
        let pods_url = settings
            .kubelet_pods_url(env)
            .map_err(|m| Problem::new("kubernetes.kubelet_url", m))?;
        let api_server = url::Url::parse(&settings.api_server_url)
            .map_err(|e| Problem::new("kubernetes.api_server_url", e.to_string()))?;
        let kubelet = client(&pods_url, &settings.ca_file, settings.request_timeout)
            .map_err(|m| Problem::new("kubernetes.ca_file", m))?;
        if pods_url.scheme() == "https" {
            // Re-read at every call; here only so a missing file is a
            // startup error rather than every pod's denial.
            read_token(&settings.token_file)
                .map_err(|e| Problem::new("kubernetes.token_file", e.to_string()))?;
        }
        let api = client(&api_server, &settings.ca_file, settings.request_timeout);
        if let Err(message) = &api {
            tracing::warn!(
                error = %message,
                "service-account annotations cannot be read from the API server until kubernetes.ca_file is readable"
            );
        }
        Ok(HttpSource {
            kubelet,
            pods_url,
            api,
            api_server,
            token_file: settings.token_file.clone(),
        })
    }

    /// The kubelet's pod list URL, for logs.
    pub(super) fn pods_url(&self) -> &url::Url {
        &self.pods_url
    }

    async fn get(
        &self,
        client: &reqwest::Client,
        url: &url::Url,
        cap: usize,
        hint: &'static str,
    ) -> Result<Vec<u8>, PodLookupError> {
        let mut request = client.get(url.clone()).header("Accept", "application/json");
        if url.scheme() == "https" {
            request = request.bearer_auth(read_token(&self.token_file)?);
        }
        let shown = url.to_string();
        let response = request
            .send()
            .await
            .map_err(|e| PodLookupError::Unavailable {
                url: shown.clone(),
                message: describe(&e),
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(PodLookupError::Refused {
                url: shown,
                status: status.as_u16(),
                hint: match status.as_u16() {
                    401 => " (the service-account token was not accepted)",
                    403 => hint,
                    _ => "",
                },
            });
        }
        read_capped(response, cap, &shown).await
    }
}

impl PodSource for HttpSource {
    fn pods(&self) -> BoxFuture<'_, Result<(Vec<Pod>, usize), PodLookupError>> {
        Box::pin(async move {
            let body = self
                .get(
                    &self.kubelet,
                    &self.pods_url,
                    MAX_POD_LIST_BYTES,
                    " (the broker's service account needs `get` on `nodes/proxy`)",
                )
                .await?;
            let parsed =
                parse_pod_list(&body).map_err(|message| PodLookupError::InvalidAnswer {
                    url: self.pods_url.to_string(),
                    message,
                })?;
            Ok((parsed.pods, parsed.skipped))
        })
    }

    fn annotations<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, PodLookupError>> {
        Box::pin(async move {
            if !names::is_dns_label(namespace) {
                return Err(PodLookupError::InvalidName(namespace.into()));
            }
            if !names::is_dns_subdomain(name) {
                return Err(PodLookupError::InvalidName(name.into()));
            }
            let client = self.api.as_ref().map_err(|m| PodLookupError::Unavailable {
                url: self.api_server.to_string(),
                message: m.clone(),
            })?;
            let url = self
                .api_server
                .join(&format!(
                    "{}/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
                    self.api_server.path().trim_end_matches('/')
                ))
                .map_err(|e| PodLookupError::InvalidName(e.to_string()))?;
            let body = self
                .get(
                    client,
                    &url,
                    MAX_SERVICE_ACCOUNT_BYTES,
                    " (the broker's service account needs `get` on `serviceaccounts`)",
                )
                .await?;
            parse_service_account(&body).map_err(|message| PodLookupError::InvalidAnswer {
                url: url.to_string(),
                message,
            })
        })
    }
}

/// A client trusting only `ca_file` when `url` is https; none needed over
/// http. No redirects: credentials are not followed anywhere.
fn client(url: &url::Url, ca_file: &Path, timeout: Duration) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(timeout.min(Duration::from_secs(3)))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")));
    if url.scheme() == "https" {
        let pem = std::fs::read(ca_file).map_err(|e| {
            format!(
                "{}: {e} (the CA that signed the kubelet's and API server's certificates is needed for {url})",
                ca_file.display()
            )
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("{} holds no PEM certificate", ca_file.display()))?;
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The bearer token, read now (it rotates); its text never reaches an error.
fn read_token(path: &Path) -> Result<String, PodLookupError> {
    let error = |message: String| PodLookupError::Token {
        path: path.display().to_string(),
        message,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| error(e.to_string()))?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(error(format!("larger than {MAX_TOKEN_BYTES} bytes")));
    }
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(error("empty, or not a token (printable ASCII)".into()));
    }
    Ok(token.to_owned())
}

/// Reads a body, refusing one over `cap` (by its `Content-Length`, or as
/// soon as the bytes read pass it) instead of buffering it.
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
    url: &str,
) -> Result<Vec<u8>, PodLookupError> {
    let too_large = |size: String| PodLookupError::InvalidAnswer {
        url: url.to_owned(),
        message: format!(
            "the answer is {size} bytes, more than the {} MiB cap; refused",
            cap / (1024 * 1024)
        ),
    };
    if let Some(length) = response.content_length() {
        if length > cap as u64 {
            return Err(too_large(length.to_string()));
        }
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if chunk.len() > cap - body.len() {
                    return Err(too_large(format!("more than {cap}")));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(PodLookupError::Unavailable {
                    url: url.to_owned(),
                    message: describe(&e),
                })
            }
        }
    }
}

/// What went wrong with a call, with its causes (reqwest's own message
/// alone is often just "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[derive(Deserialize)]
struct ServiceAccount {
    kind: Option<String>,
    #[serde(default)]
    metadata: ServiceAccountMeta,
}

#[derive(Deserialize, Default)]
struct ServiceAccountMeta {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn parse_service_account(body: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let account: ServiceAccount =
        serde_json::from_slice(body).map_err(|e| format!("not a v1 ServiceAccount: {e}"))?;
    if account
        .kind
        .as_deref()
        .is_some_and(|k| k != "ServiceAccount")
    {
        return Err("kind is not \"ServiceAccount\"".into());
    }
    Ok(account.metadata.annotations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_trusts_only_the_ca_file_and_http_needs_none() {
        let dir = tempfile::tempdir().unwrap();
        let https: url::Url = "https://node-1:10250/pods".parse().unwrap();
        let missing = dir.path().join("ca.crt");
        let err = client(&https, &missing, Duration::from_secs(1)).unwrap_err();
        assert!(
            err.contains("ca.crt") && err.contains("No such file"),
            "{err}"
        );
        std::fs::write(&missing, "not a certificate").unwrap();
        let err = client(&https, &missing, Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let ca = rcgen::generate_simple_self_signed(vec!["node-1".into()]).unwrap();
        std::fs::write(&missing, ca.cert.pem()).unwrap();
        client(&https, &missing, Duration::from_secs(1)).unwrap();
        let http: url::Url = "http://127.0.0.1:10255/pods".parse().unwrap();
        client(&http, &dir.path().join("absent"), Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn the_token_is_read_fresh_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "eyJhbGciOi.first\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "eyJhbGciOi.first");
        std::fs::write(&path, "eyJhbGciOi.rotated").unwrap();
        assert_eq!(read_token(&path).unwrap(), "eyJhbGciOi.rotated");
        std::fs::write(&path, "secret with spaces").unwrap();
        let err = read_token(&path).unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(read_token(&dir.path().join("none")).is_err());
    }

    #[test]
    fn service_account_annotations_are_read() {
        let body = br#"{"kind":"ServiceAccount","apiVersion":"v1","metadata":{"name":"api-sa",
            "namespace":"payments","annotations":{"iam.gke.io/gcp-service-account":"api@p.iam.gserviceaccount.com"}}}"#;
        let annotations = parse_service_account(body).unwrap();
        assert_eq!(
            annotations["iam.gke.io/gcp-service-account"],
            "api@p.iam.gserviceaccount.com"
        );
        assert!(parse_service_account(br#"{"kind":"Status"}"#).is_err());
        assert!(parse_service_account(br#"{"metadata":{}}"#)
            .unwrap()
            .is_empty());
    }
}
