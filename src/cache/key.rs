//! The cache key: a struct of (identity, audience), never a concatenated
//! string, so no audience can collide with another identity's key. A key
//! can only be built from an audience that passed validation.

use std::{fmt, sync::Arc};

use crate::config::MAX_AUDIENCE_LEN;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    identity: Arc<str>,
    audience: Arc<str>,
}

impl CacheKey {
    /// Validates `audience` and builds the key.
    pub fn new(identity: &str, audience: &str) -> Result<Self, AudienceError> {
        validate_audience(audience)?;
        Ok(Self {
            identity: identity.into(),
            audience: audience.into(),
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({:?}, {:?})", self.identity, self.audience)
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AudienceError {
    #[error("audience is empty")]
    Empty,
    #[error("audience is {0} bytes; the limit is {MAX_AUDIENCE_LEN}")]
    TooLong(usize),
    #[error("audience contains whitespace or a control character at byte {0}")]
    BadCharacter(usize),
}

/// Longest identity name a request may carry. Configured names are at
/// most 64 bytes; the slack only makes the error say what was wrong.
pub const MAX_IDENTITY_LEN: usize = 128;

/// Why a requested identity name is refused before it is looked up or logged.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("identity is {0} bytes; the limit is {MAX_IDENTITY_LEN}")]
    TooLong(usize),
    #[error("identity contains a character other than printable ASCII at byte {0}")]
    BadCharacter(usize),
}

/// A requested identity must be at most [`MAX_IDENTITY_LEN`] bytes of
/// printable ASCII without spaces (every configured name is). Checked
/// before the name reaches a log, so a client cannot flood the audit log
/// with kilobytes of identity per request.
pub fn validate_identity(identity: &str) -> Result<(), IdentityError> {
    if identity.len() > MAX_IDENTITY_LEN {
        return Err(IdentityError::TooLong(identity.len()));
    }
    if let Some(at) = identity.bytes().position(|b| !b.is_ascii_graphic()) {
        return Err(IdentityError::BadCharacter(at));
    }
    Ok(())
}

/// An audience must be 1..=2048 bytes with no whitespace or control
/// characters (it ends up in a query string and a JWT claim).
pub fn validate_audience(audience: &str) -> Result<(), AudienceError> {
    if audience.is_empty() {
        return Err(AudienceError::Empty);
    }
    if audience.len() > MAX_AUDIENCE_LEN {
        return Err(AudienceError::TooLong(audience.len()));
    }
    if let Some((at, _)) = audience
        .char_indices()
        .find(|(_, c)| c.is_whitespace() || c.is_control())
    {
        return Err(AudienceError::BadCharacter(at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences() {
        assert!(validate_audience("https://svc-abc-uc.a.run.app").is_ok());
        assert_eq!(validate_audience(""), Err(AudienceError::Empty));
        assert_eq!(
            validate_audience(&"a".repeat(2049)),
            Err(AudienceError::TooLong(2049))
        );
        assert!(validate_audience(&"a".repeat(2048)).is_ok());
        assert_eq!(
            validate_audience("a b"),
            Err(AudienceError::BadCharacter(1))
        );
        assert_eq!(
            validate_audience("a\u{0}"),
            Err(AudienceError::BadCharacter(1))
        );
        assert_eq!(
            validate_audience("ab\u{2003}"),
            Err(AudienceError::BadCharacter(2))
        );
    }

    #[test]
    fn identities() {
        assert!(validate_identity("default").is_ok());
        assert!(validate_identity(&"a".repeat(128)).is_ok());
        assert_eq!(
            validate_identity(&"a".repeat(16 * 1024)),
            Err(IdentityError::TooLong(16 * 1024))
        );
        assert_eq!(
            validate_identity("de fault"),
            Err(IdentityError::BadCharacter(2))
        );
        assert_eq!(
            validate_identity("x\u{1b}[31m"),
            Err(IdentityError::BadCharacter(1))
        );
        assert_eq!(
            validate_identity("défaut"),
            Err(IdentityError::BadCharacter(1))
        );
        // Printable, so allowed here; the log quotes and escapes it.
        assert!(validate_identity(r#"a"b\c"#).is_ok());
    }

    #[test]
    fn keys_are_structs_not_strings() {
        let a = CacheKey::new("a:b", "c").unwrap();
        let b = CacheKey::new("a", "b:c").unwrap();
        assert_ne!(a, b);
    }
}
