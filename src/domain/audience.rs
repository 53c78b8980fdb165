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
    // Nearly every audience is printable ASCII without spaces, which passes
    // the check below: this finds that many bytes per instruction (no
    // early exit) before walking characters one at a time.
    let printable = audience
        .bytes()
        .fold(true, |ok, b| ok & (b'!'..=b'~').contains(&b));
    if printable {
        return Ok(());
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
        assert_eq!(
            validate_audience("https://a\u{7f}"),
            Err(AudienceError::BadCharacter(9))
        );
        assert!(validate_audience("https://é.example").is_ok());
        // Every ASCII byte: the fast path agrees with the character walk.
        for b in 0u8..=0x7f {
            let text = format!("ab{}", b as char);
            let walk = (b as char).is_whitespace() || (b as char).is_control();
            assert_eq!(validate_audience(&text).is_err(), walk, "{b:#x}");
        }
    }
}
