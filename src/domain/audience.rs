//! What a valid audience is. Checked before an audience is logged, cached or
//! sent upstream, and when a config names one.

/// Audience limit from DESIGN.md: longer is refused before any upstream call.
pub const MAX_AUDIENCE_LEN: usize = 2048;

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
}
