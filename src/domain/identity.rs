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

/// Longest identity name a request may carry. Configured names are at
/// most 64 bytes; the slack only makes the error say what was wrong.
pub const MAX_REQUESTED_IDENTITY_LEN: usize = 128;

/// Why a requested identity name is refused before it is looked up or logged.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("identity is {0} bytes; the limit is {MAX_REQUESTED_IDENTITY_LEN}")]
    TooLong(usize),
    #[error("identity contains a character other than printable ASCII at byte {0}")]
    BadCharacter(usize),
}

/// An identity name as a request may carry it (over gRPC, or as the account
/// in a metadata endpoint path): at most [`MAX_REQUESTED_IDENTITY_LEN`]
/// bytes of printable ASCII without spaces (every configured name is one).
/// Checked before the name reaches a log, so a client cannot flood the
/// audit log with kilobytes of identity per request.
pub fn validate_requested_identity(identity: &str) -> Result<(), IdentityError> {
    if identity.len() > MAX_REQUESTED_IDENTITY_LEN {
        return Err(IdentityError::TooLong(identity.len()));
    }
    if let Some(at) = identity.bytes().position(|b| !b.is_ascii_graphic()) {
        return Err(IdentityError::BadCharacter(at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_identities() {
        assert!(validate_requested_identity("default").is_ok());
        assert!(validate_requested_identity("sa@p.iam.gserviceaccount.com").is_ok());
        assert!(validate_requested_identity(&"a".repeat(128)).is_ok());
        assert_eq!(
            validate_requested_identity(&"a".repeat(16 * 1024)),
            Err(IdentityError::TooLong(16 * 1024))
        );
        assert_eq!(
            validate_requested_identity("de fault"),
            Err(IdentityError::BadCharacter(2))
        );
        assert_eq!(
            validate_requested_identity("x\u{1b}[31m"),
            Err(IdentityError::BadCharacter(1))
        );
        assert_eq!(
            validate_requested_identity("défaut"),
            Err(IdentityError::BadCharacter(1))
        );
        // Printable, so allowed here; the log quotes and escapes it.
        assert!(validate_requested_identity(r#"a"b\c"#).is_ok());
    }

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
