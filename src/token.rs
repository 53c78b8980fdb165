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
    /// Both are foreign text (upstream's claim, the client's audience):
    /// each is cut to [`MAX_SHOWN_AUD_BYTES`] and shown quoted and escaped.
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
                expected: shown(expected_audience),
                actual: shown(&audiences.join(",")),
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

/// Most bytes of an audience an error shows (as a log field would).
pub const MAX_SHOWN_AUD_BYTES: usize = 256;

/// `text` cut to [`MAX_SHOWN_AUD_BYTES`] at a character boundary, marked
/// when cut; the error's `{:?}` quotes and escapes it.
fn shown(text: &str) -> String {
    if text.len() <= MAX_SHOWN_AUD_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_SHOWN_AUD_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} more bytes cut]", &text[..end], text.len() - end)
}

/// Replaces anything shaped like a compact JWS or JWE (three or more
/// dot-separated base64url segments, such as an ID token or an access
/// token an upstream echoes back) in `text` with `[redacted-jws]`, so
/// upstream error text can be passed on safely.
///
/// A word qualifies whatever its first characters are (a JWS header need
/// not encode as `eyJ`), when it is at least [`MIN_JWS_LEN`] long: shorter
/// dotted words (versions, IP addresses, short host names) stay. A long
/// dotted host name in upstream text is redacted too; erring that way costs
/// an operator a detail, erring the other way would leak a credential.
pub fn redact_jwts(text: &str) -> String {
    let is_word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_word) {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let end = candidate.find(|c| !is_word(c)).unwrap_or(candidate.len());
        let word = &candidate[..end];
        if is_jws_shaped(word) {
            out.push_str("[redacted-jws]");
        } else {
            out.push_str(word);
        }
        rest = &candidate[end..];
    }
    out.push_str(rest);
    out
}

/// Shortest word [`redact_jwts`] treats as a token: shorter than any signed
/// token (a JWS header alone is about 20 characters), longer than a dotted
/// version or an IPv4 address.
pub const MIN_JWS_LEN: usize = 16;

/// Three or more segments, the first two non-empty (the third is empty for
/// an unsigned `alg: none` token, and there are five in a JWE).
fn is_jws_shaped(word: &str) -> bool {
    let word = word.trim_start_matches('.');
    let segments: Vec<&str> = word.split('.').collect();
    word.len() >= MIN_JWS_LEN
        && segments.len() >= 3
        && !segments[0].is_empty()
        && !segments[1].is_empty()
}

#[cfg(test)]
mod redact_tests {
    use super::redact_jwts;

    #[test]
    fn removes_jws_shaped_text_only() {
        let text = "bad token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln here; eyJ alone";
        assert_eq!(
            redact_jwts(text),
            "bad token [redacted-jws] here; eyJ alone"
        );
        assert_eq!(redact_jwts("plain"), "plain");
        // A header with whitespace before its first key encodes as `eyAi`,
        // and nothing requires a JSON header to be recognisable at all.
        let spaced = "token=eyAiYWxnIjogIlJTMjU2IiB9.eyAic3ViIjogIjEiIH0.c2lnbmF0dXJl.";
        assert_eq!(redact_jwts(spaced), "token=[redacted-jws]");
        assert_eq!(
            redact_jwts("got aGVhZGVyaGVhZGVy.cGF5bG9hZA.c2lnbmF0dXJl (invalid)"),
            "got [redacted-jws] (invalid)"
        );
        // Unsigned and encrypted forms.
        assert_eq!(redact_jwts("eyJhbGciOiJub25lIn0.e30."), "[redacted-jws]");
        assert_eq!(
            redact_jwts("a.eyJhbGciOiJSU0EifQ.key.iv.cipher.tag"),
            "[redacted-jws]"
        );
        // Short dotted words stay.
        assert_eq!(
            redact_jwts("version 1.2.3 at 10.0.0.1 (a.b.c)"),
            "version 1.2.3 at 10.0.0.1 (a.b.c)"
        );
        assert_eq!(redact_jwts("invalid_grant: bad"), "invalid_grant: bad");
    }
}
