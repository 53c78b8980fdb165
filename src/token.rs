//! ID tokens as the broker holds them: the compact JWT behind a redacting
//! wrapper, with the issue and expiry times read from its own claims.
//!
//! The broker does not verify Google's signature (clients' verifiers do), but
//! it refuses anything it would be wrong to hand out: a body that is not a
//! JWT, a token without `exp`, one already expired, or one minted for another
//! audience (PROTOCOLS.md §5).

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use serde::Deserialize;
use zeroize::Zeroizing;

/// Secret text (a token, a private key): zeroized on drop, never printed.
///
/// `Debug` and `Display` print `[redacted]`, so a secret that slips into a
/// `format!` or a log field shows nothing. The text is reachable only through
/// [`Secret::expose`], which is easy to grep for.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(text: String) -> Self {
        Self(Zeroizing::new(text))
    }

    /// The secret text. Call sites are the only places secrets leave the type.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Why an upstream answer is not a token the broker may serve.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    #[error("the answer is not a JWT ({0})")]
    NotAJwt(&'static str),
    #[error("the token has no `exp` claim")]
    MissingExpiry,
    #[error("the token expired {0}s ago")]
    Expired(u64),
    #[error("the token's `aud` is {actual:?}, not the audience asked for ({expected:?})")]
    AudienceMismatch { expected: String, actual: String },
}

/// A Google-signed OIDC ID token, checked to be usable for one audience.
///
/// Cloning is cheap: the JWT text is shared.
#[derive(Clone)]
pub struct IdToken {
    jwt: Arc<Secret>,
    issued_at: SystemTime,
    expires_at: SystemTime,
    audience: String,
    email: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    iat: Option<f64>,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl IdToken {
    /// Parses and checks a compact JWT received for `expected_audience`.
    ///
    /// Surrounding whitespace (a trailing newline from a text body) is
    /// ignored; anything else that is not `header.claims.signature` with
    /// JSON header and claims is refused.
    pub fn parse(
        jwt: &str,
        expected_audience: &str,
        now: SystemTime,
    ) -> Result<IdToken, TokenError> {
        let jwt = jwt.trim();
        let mut parts = jwt.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::NotAJwt("expected three dot-separated parts"));
        };
        if signature.is_empty() {
            return Err(TokenError::NotAJwt("the signature is empty"));
        }
        let header = decode_segment(header).ok_or(TokenError::NotAJwt("bad header"))?;
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&header)
            .map_err(|_| TokenError::NotAJwt("the header is not a JSON object"))?;
        let claims = decode_segment(claims).ok_or(TokenError::NotAJwt("bad claims"))?;
        let claims: Claims = serde_json::from_slice(&claims)
            .map_err(|_| TokenError::NotAJwt("the claims are not a JSON object"))?;

        let exp = claims
            .exp
            .filter(|exp| exp.is_finite() && *exp > 0.0)
            .ok_or(TokenError::MissingExpiry)?;
        let expires_at = UNIX_EPOCH + Duration::from_secs(exp as u64);
        if expires_at <= now {
            let ago = now.duration_since(expires_at).unwrap_or_default().as_secs();
            return Err(TokenError::Expired(ago));
        }
        let audiences = match claims.aud {
            Some(Audience::One(aud)) => vec![aud],
            Some(Audience::Many(auds)) => auds,
            None => Vec::new(),
        };
        if !audiences.iter().any(|aud| aud == expected_audience) {
            return Err(TokenError::AudienceMismatch {
                expected: expected_audience.to_owned(),
                actual: audiences.join(","),
            });
        }
        let issued_at = claims
            .iat
            .filter(|iat| iat.is_finite() && *iat > 0.0)
            .map(|iat| UNIX_EPOCH + Duration::from_secs(iat as u64))
            .unwrap_or(now);
        Ok(IdToken {
            jwt: Arc::new(Secret::new(jwt.to_owned())),
            issued_at,
            expires_at,
            audience: expected_audience.to_owned(),
            email: claims.email,
        })
    }

    /// The compact JWT, for the one place it is sent to a client.
    pub fn expose(&self) -> &str {
        self.jwt.expose()
    }

    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The `email` claim, when the issuer included one (`format=full`).
    pub fn email(&self) -> Option<&str> {
        self.email.as_deref()
    }

    /// Life left at `now`; zero once expired.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at.duration_since(now).unwrap_or_default()
    }

    /// Whether this is the very same token as `other` (same JWT text), as
    /// when the metadata server answers a refresh from its own cache.
    pub fn same_token_as(&self, other: &IdToken) -> bool {
        self.jwt.expose() == other.jwt.expose()
    }
}

impl fmt::Debug for IdToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdToken")
            .field("jwt", &"[redacted]")
            .field("audience", &self.audience)
            .field("issued_at", &humantime::format_rfc3339(self.issued_at))
            .field("expires_at", &humantime::format_rfc3339(self.expires_at))
            .finish()
    }
}

fn decode_segment(segment: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwt(claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(json!({"alg":"RS256","typ":"JWT"}).to_string());
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{claims}.c2lnbmF0dXJl")
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn reads_expiry_issue_time_and_email() {
        let text = jwt(
            json!({"aud":"https://a","iat":1_800_000_000u64 - 10,"exp":1_800_003_590u64,"email":"sa@x"}),
        );
        let token = IdToken::parse(&format!("{text}\n"), "https://a", now()).unwrap();
        assert_eq!(token.remaining(now()), Duration::from_secs(3590));
        assert_eq!(token.issued_at(), now() - Duration::from_secs(10));
        assert_eq!(token.email(), Some("sa@x"));
        assert_eq!(token.expose(), text);
    }

    #[test]
    fn refuses_what_must_not_be_served() {
        let cases = [
            ("not-a-jwt".to_owned(), "three dot-separated"),
            ("a.b".to_owned(), "three dot-separated"),
            ("!!.e30.sig".to_owned(), "bad header"),
            (jwt(json!({"aud":"https://a"})), "no `exp`"),
            (
                jwt(json!({"aud":"https://a","exp":1_700_000_000u64})),
                "expired",
            ),
            (
                jwt(json!({"aud":"https://b","exp":1_900_000_000u64})),
                "not the audience",
            ),
            (jwt(json!({"exp":1_900_000_000u64})), "not the audience"),
        ];
        for (text, expected) in cases {
            let err = IdToken::parse(&text, "https://a", now())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn accepts_an_audience_list() {
        let text = jwt(json!({"aud":["x","https://a"],"exp":1_900_000_000u64}));
        assert!(IdToken::parse(&text, "https://a", now()).is_ok());
    }

    #[test]
    fn debug_never_prints_the_token() {
        let text = jwt(json!({"aud":"https://a","exp":1_900_000_000u64}));
        let token = IdToken::parse(&text, "https://a", now()).unwrap();
        assert!(!format!("{token:?}").contains(&text));
        assert_eq!(format!("{:?}", Secret::new("hunter2".into())), "[redacted]");
    }
}

/// Replaces anything shaped like a compact JWT (`eyJ…​.…​.…`) in `text` with
/// `[redacted-jwt]`, so upstream error text can be passed on safely.
pub fn redact_jwts(text: &str) -> String {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '=';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("eyJ") {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let end = candidate
            .find(|c: char| !(is_b64(c) || c == '.'))
            .unwrap_or(candidate.len());
        let word = &candidate[..end];
        if word.split('.').count() >= 2 && word.len() > 16 {
            out.push_str("[redacted-jwt]");
        } else {
            out.push_str(word);
        }
        rest = &candidate[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod redact_tests {
    use super::redact_jwts;

    #[test]
    fn removes_jwt_shaped_text_only() {
        let text = "bad token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln here; eyJ alone";
        assert_eq!(
            redact_jwts(text),
            "bad token [redacted-jwt] here; eyJ alone"
        );
        assert_eq!(redact_jwts("plain"), "plain");
    }
}
