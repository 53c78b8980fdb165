//! `credential_source.url`: the subject token is fetched with a GET (with
//! the configured headers, e.g. Azure's `Metadata: True`) at every exchange.

use reqwest::header::{HeaderName, HeaderValue};

use super::{read_subject_body, Format, SubjectError, MAX_FILE_BYTES};
use crate::source::{describe_http_error, sanitize_upstream_text};

#[derive(Clone, Debug)]
pub(crate) struct UrlSource {
    pub(crate) url: url::Url,
    /// Values are marked sensitive, so `Debug` does not print them.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) format: Format,
}

impl UrlSource {
    pub(crate) async fn fetch(&self, client: &reqwest::Client) -> Result<String, SubjectError> {
        let from = format!("subject token URL {}", self.url);
        let mut request = client.get(self.url.clone());
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SubjectError::Transient(format!("{from}: {}", describe_http_error(&e))))?;
        let status = response.status();
        let body = read_subject_body(response, &from).await?;
        if body.len() as u64 > MAX_FILE_BYTES {
            return Err(SubjectError::permanent(
                &from,
                "answered too large a body".into(),
            ));
        }
        let text = String::from_utf8_lossy(&body);
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(SubjectError::Transient(format!(
                "{from}: HTTP {status}: {}",
                sanitize_upstream_text(&text)
            )));
        }
        if !status.is_success() {
            return Err(SubjectError::permanent(
                &from,
                format!("HTTP {status}: {}", sanitize_upstream_text(&text)),
            ));
        }
        self.format
            .extract(&text, "the answer")
            .map_err(|m| SubjectError::permanent(&from, m))
    }
}
