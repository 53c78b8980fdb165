//! What an identity knows of the project and machine it runs as, for the
//! metadata endpoint's `project/...`, `instance/...` and `universe/...`
//! paths: a key file's `project_id`, and for an identity whose base is the
//! metadata server, that server's own answers for a FIXED set of paths
//! ([`InstanceValue::path`]). Nothing a client sends reaches the upstream
//! URL: a value names one of five constant paths, so the broker cannot be
//! made to fetch anything else from the metadata server (no SSRF through it).

use std::sync::Arc;

use reqwest::StatusCode;

use super::{http_client, sanitize_upstream_text, send_once, Answer, SourceError};
use crate::clock::Clock;

/// One value of the project or instance a library may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstanceValue {
    ProjectId,
    NumericProjectId,
    Zone,
    InstanceId,
    UniverseDomain,
}

impl InstanceValue {
    /// Every value, in a fixed order.
    pub const ALL: [InstanceValue; 5] = [
        InstanceValue::ProjectId,
        InstanceValue::NumericProjectId,
        InstanceValue::Zone,
        InstanceValue::InstanceId,
        InstanceValue::UniverseDomain,
    ];

    /// The metadata server's path for this value: the only paths ever
    /// fetched on a client's behalf.
    pub fn path(self) -> &'static str {
        match self {
            InstanceValue::ProjectId => "/computeMetadata/v1/project/project-id",
            InstanceValue::NumericProjectId => "/computeMetadata/v1/project/numeric-project-id",
            InstanceValue::Zone => "/computeMetadata/v1/instance/zone",
            InstanceValue::InstanceId => "/computeMetadata/v1/instance/id",
            InstanceValue::UniverseDomain => "/computeMetadata/v1/universe/universe-domain",
        }
    }

    /// Whether the value is a number (JSON renders it without quotes).
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            InstanceValue::NumericProjectId | InstanceValue::InstanceId
        )
    }

    /// Checks a value before it is served: the metadata server's answer is
    /// passed on only when it looks like what it should be.
    pub fn check(self, value: &str) -> Result<(), String> {
        let problem = |what: &str| Err(format!("{} {what}", self.path()));
        if value.is_empty() || value.len() > 256 {
            return problem("is empty or longer than 256 bytes");
        }
        if self.is_numeric() {
            if !value.bytes().all(|b| b.is_ascii_digit()) {
                return problem("is not a number");
            }
            return Ok(());
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-._:/".contains(c);
        if !value.chars().all(allowed) {
            return problem("holds characters no such value has");
        }
        Ok(())
    }
}

/// What an identity's source can tell about its project and machine.
#[derive(Clone, Default)]
pub struct InstanceFacts {
    /// The key file's `project_id`, when the identity (or its base) is a key.
    pub project_id: Option<String>,
    /// The metadata server to ask, when the identity's base is `metadata`.
    pub metadata: Option<Arc<InstanceMetadata>>,
}

/// Asks a metadata server for [`InstanceValue`]s, with the same client
/// (timeouts, no redirects, body cap) as every other upstream call.
pub struct InstanceMetadata {
    client: reqwest::Client,
    base: url::Url,
    upstream: String,
    clock: Clock,
}

impl InstanceMetadata {
    pub(crate) fn new(base: url::Url, upstream: String, clock: Clock) -> Result<Self, String> {
        Ok(Self {
            client: http_client()?,
            base,
            upstream,
            clock,
        })
    }

    /// The metadata server named in errors.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// One call: `Some(value)`, `None` when the server has no such value
    /// (404), or why not.
    pub async fn fetch(&self, value: InstanceValue) -> Result<Option<String>, SourceError> {
        let url = self
            .base
            .join(value.path())
            .map_err(|e| SourceError::InvalidResponse {
                upstream: self.upstream.clone(),
                message: e.to_string(),
            })?;
        let Answer {
            status,
            body,
            retry_after,
        } = send_once(
            self.client.get(url).header("Metadata-Flavor", "Google"),
            &self.upstream,
            &self.clock,
        )
        .await?;
        let text = String::from_utf8_lossy(&body);
        match status {
            StatusCode::OK => {
                let value_text = text.trim();
                value
                    .check(value_text)
                    .map_err(|message| SourceError::InvalidResponse {
                        upstream: self.upstream.clone(),
                        message,
                    })?;
                Ok(Some(value_text.to_owned()))
            }
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => {
                Err(SourceError::Unavailable {
                    upstream: self.upstream.clone(),
                    message: format!("HTTP {status}: {}", sanitize_upstream_text(&text)),
                    retry_after,
                })
            }
            status => Err(SourceError::Rejected {
                upstream: self.upstream.clone(),
                status: status.as_u16(),
                message: format!("{}: {}", value.path(), sanitize_upstream_text(&text)),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_before_they_are_served() {
        assert!(InstanceValue::ProjectId.check("my-project").is_ok());
        assert!(InstanceValue::ProjectId.check("example.com:legacy").is_ok());
        assert!(InstanceValue::Zone
            .check("projects/123/zones/us-central1-a")
            .is_ok());
        assert!(InstanceValue::InstanceId
            .check("4520031799277581759")
            .is_ok());
        assert!(InstanceValue::InstanceId.check("12a").is_err());
        assert!(InstanceValue::ProjectId.check("").is_err());
        assert!(InstanceValue::ProjectId.check("a b").is_err());
        assert!(InstanceValue::ProjectId.check("<script>").is_err());
        assert!(InstanceValue::ProjectId.check(&"a".repeat(257)).is_err());
    }

    #[test]
    fn every_path_is_a_fixed_metadata_path() {
        for value in InstanceValue::ALL {
            assert!(value.path().starts_with("/computeMetadata/v1/"));
            assert!(!value.path().contains(['?', '#', '%']));
        }
    }
}
