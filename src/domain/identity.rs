//! What an identity is called and where its tokens come from.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The identity used when a request names none.
pub const DEFAULT_IDENTITY: &str = "default";

/// Where an identity's tokens come from.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The metadata server of GCE, GKE, Cloud Run, Cloud Functions.
    Metadata,
    /// A service-account JSON key file, exchanged at its `token_uri`.
    ServiceAccountKey,
}

impl SourceKind {
    /// The name used in config files, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Metadata => "metadata",
            SourceKind::ServiceAccountKey => "service_account_key",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An identity name as a config may define it: 1-64 of `A-Z a-z 0-9 - _ .`.
pub fn validate_identity_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid identity name (1-64 of A-Z a-z 0-9 - _ .)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_names() {
        assert!(validate_identity_name("deployer-1.prod_x").is_ok());
        assert!(validate_identity_name("").is_err());
        assert!(validate_identity_name("bad name").is_err());
        assert!(validate_identity_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn source_kind_names_match_serde() {
        for kind in [SourceKind::Metadata, SourceKind::ServiceAccountKey] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
        }
    }
}
