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

/// An OAuth2 access token (PROTOCOLS.md §4): what a base credential
/// presents to Google as `Authorization: Bearer`. `Debug` shows only its
/// times.
#[derive(Clone)]
pub struct AccessToken {
    secret: Arc<Secret>,
    issued_at: SystemTime,
    expires_at: SystemTime,
}

impl AccessToken {
    /// `issued_at` is when the broker received it (access tokens are
    /// opaque; only their `expires_in` or `expireTime` says how long).
    pub fn new(token: String, issued_at: SystemTime, expires_at: SystemTime) -> Self {
        Self {
            secret: Arc::new(Secret::new(token)),
            issued_at,
            expires_at,
        }
    }

    /// The token text, for the one `Authorization` header it goes into.
    pub fn expose(&self) -> &str {
        self.secret.expose()
    }

    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Life left at `now`; zero once expired.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at.duration_since(now).unwrap_or_default()
    }

    /// Whether this is the very same token text as `other`.
    pub fn same_token_as(&self, other: &AccessToken) -> bool {
        self.secret.expose() == other.secret.expose()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"[redacted]")
            .field("issued_at", &display_time(self.issued_at))
            .field("expires_at", &display_time(self.expires_at))
            .finish()
    }
}

/// Longest lifetime (`exp` − `iat`) a token may claim. Google's ID tokens
/// live one hour; anything much longer is a broken or hostile upstream, and
/// caching it would serve it for years.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// How far in the future a token's `iat` may lie (clock skew between the
/// host and Google); beyond this the token is refused.
pub const MAX_ISSUED_AHEAD: Duration = Duration::from_secs(5 * 60);

/// Why an upstream answer is not a token the broker may serve.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    #[error("the answer is not a JWT ({0})")]
    NotAJwt(&'static str),
    #[error("the token has no `exp` claim")]
    MissingExpiry,
    /// `exp` or `iat` is not a whole, non-negative number of seconds that
    /// names a representable time.
    #[error("the token's `{claim}` claim {problem}")]
    BadTime {
        claim: &'static str,
        problem: String,
    },
    #[error("the token expired {0}s ago")]
    Expired(u64),
    #[error(
        "the token claims a lifetime of {}s (`exp` − `iat`); at most {}s is plausible",
        lifetime.as_secs(), MAX_TOKEN_LIFETIME.as_secs()
    )]
    LifetimeTooLong { lifetime: Duration },
    #[error("the token's `exp` is before its `iat`")]
    ExpiresBeforeIssued,
    #[error(
        "the token's `iat` is {}s in the future; at most {}s of clock skew is accepted (is this host's clock right?)",
        ahead.as_secs(), MAX_ISSUED_AHEAD.as_secs()
    )]
    IssuedInFuture { ahead: Duration },
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
    /// Shared: the cache hands a held token its key's copy
    /// ([`IdToken::share_audience`]), so an entry holds the text once.
    audience: Arc<str>,
    email: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Option<Audience>,
    // Raw values: a string or a huge number must be a clear refusal, not a
    // parse failure blamed on the whole claims object, nor an overflow.
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    iat: Option<serde_json::Value>,
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

        let expires_at = match &claims.exp {
            None | Some(serde_json::Value::Null) => return Err(TokenError::MissingExpiry),
            Some(exp) => numeric_date("exp", exp)?,
        };
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
        let issued_at = match &claims.iat {
            None | Some(serde_json::Value::Null) => now,
            Some(iat) => numeric_date("iat", iat)?,
        };
        check_plausible(issued_at, expires_at, now)?;
        Ok(IdToken {
            jwt: Arc::new(Secret::new(jwt.to_owned())),
            issued_at,
            expires_at,
            audience: expected_audience.into(),
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

    /// Holds `audience` (the same text, already held elsewhere) instead of
    /// this token's own copy of it; a different text changes nothing.
    pub(crate) fn share_audience(&mut self, audience: &Arc<str>) {
        if *self.audience == **audience {
            self.audience = audience.clone();
        }
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
            .field("issued_at", &display_time(self.issued_at))
            .field("expires_at", &display_time(self.expires_at))
            .finish()
    }
}

/// A JWT `NumericDate` as a time, refusing anything that is not a whole,
/// non-negative number of seconds within the range `SystemTime` can hold.
fn numeric_date(claim: &'static str, value: &serde_json::Value) -> Result<SystemTime, TokenError> {
    let bad = |problem: String| TokenError::BadTime { claim, problem };
    let serde_json::Value::Number(number) = value else {
        return Err(bad(format!(
            "is {}, not a number of seconds since the Unix epoch",
            json_kind(value)
        )));
    };
    let seconds = if let Some(seconds) = number.as_u64() {
        seconds
    } else if number.as_i64().is_some() {
        return Err(bad(format!("is {number}, before the Unix epoch")));
    } else {
        // A float: Google sends whole seconds; a fraction, a negative or an
        // out-of-range value means the upstream is not what it claims.
        let float = number.as_f64().unwrap_or(f64::NAN);
        if float < 0.0 {
            return Err(bad(format!("is {number}, before the Unix epoch")));
        }
        if float.fract() != 0.0 || !float.is_finite() {
            return Err(bad(format!("is {number}, not a whole number of seconds")));
        }
        // 2^64: whole floats below it convert exactly.
        if float >= 18_446_744_073_709_551_616.0 {
            return Err(bad(format!("is {number}, beyond any representable time")));
        }
        float as u64
    };
    UNIX_EPOCH
        .checked_add(Duration::from_secs(seconds))
        .ok_or_else(|| bad(format!("is {seconds}, beyond any representable time")))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Refuses tokens no honest issuer mints: issued too far in the future, or
/// living longer than [`MAX_TOKEN_LIFETIME`] (counted from `now` when the
/// issue time lies before it is unknown).
fn check_plausible(
    issued_at: SystemTime,
    expires_at: SystemTime,
    now: SystemTime,
) -> Result<(), TokenError> {
    if let Ok(ahead) = issued_at.duration_since(now) {
        if ahead > MAX_ISSUED_AHEAD {
            return Err(TokenError::IssuedInFuture { ahead });
        }
    }
    let lifetime = expires_at
        .duration_since(issued_at)
        .map_err(|_| TokenError::ExpiresBeforeIssued)?;
    if lifetime > MAX_TOKEN_LIFETIME {
        return Err(TokenError::LifetimeTooLong { lifetime });
    }
    Ok(())
}

/// `time` in RFC 3339 (UTC, whole seconds), or `None` when RFC 3339 cannot
/// write it (before 1970 as `SystemTime` arithmetic goes here, or after 9999).
pub fn rfc3339(time: SystemTime) -> Option<String> {
    // 9999-12-31T23:59:59Z
    const LAST_RFC3339_SECOND: u64 = 253_402_300_799;
    let since = time.duration_since(UNIX_EPOCH).ok()?;
    (since.as_secs() <= LAST_RFC3339_SECOND)
        .then(|| humantime::format_rfc3339_seconds(time).to_string())
}

/// RFC 3339 for logs and `Debug`, or the raw seconds when the time lies
/// outside what RFC 3339 can write.
pub fn display_time(time: SystemTime) -> String {
    rfc3339(time).unwrap_or_else(|| match time.duration_since(UNIX_EPOCH) {
        Ok(since) => format!("{}s after the Unix epoch", since.as_secs()),
        Err(before) => format!("{}s before the Unix epoch", before.duration().as_secs()),
    })
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
    fn refuses_times_it_cannot_represent_or_believe() {
        let now_secs = 1_800_000_000u64;
        let cases = [
            (json!({"exp": 9.3e18}), "beyond any representable time"),
            (json!({"exp": u64::MAX}), "beyond any representable time"),
            (json!({"exp": 1e300}), "beyond any representable time"),
            (json!({"exp": -5}), "before the Unix epoch"),
            (json!({"exp": -1.5}), "before the Unix epoch"),
            (json!({"exp": 1_800_000_100.5}), "not a whole number"),
            (json!({"exp": "1800000100"}), "is a string"),
            (json!({"exp": [1]}), "is an array"),
            (json!({"exp": null}), "no `exp`"),
            (
                json!({"exp": now_secs + 60, "iat": 9_300_000_000_000_000_000u64}),
                "`iat` claim is 9300000000000000000, beyond",
            ),
            (
                json!({"exp": now_secs + 60, "iat": "x"}),
                "`iat` claim is a string",
            ),
            (
                json!({"exp": now_secs + 60, "iat": -1}),
                "`iat` claim is -1",
            ),
            // Implausible: ten years, or issued a day ahead.
            (
                json!({"exp": now_secs + 10 * 365 * 86_400, "iat": now_secs}),
                "lifetime of 315360000s",
            ),
            (json!({"exp": now_secs + 13 * 3600}), "at most 43200s"),
            (
                json!({"exp": now_secs + 86_400 + 3600, "iat": now_secs + 86_400}),
                "86400s in the future",
            ),
            (
                json!({"exp": now_secs + 60, "iat": now_secs + 120}),
                "`exp` is before its `iat`",
            ),
        ];
        for (mut claims, expected) in cases {
            claims["aud"] = json!("https://a");
            let err = IdToken::parse(&jwt(claims.clone()), "https://a", now())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{claims}: {err}");
        }
        // At the bounds: 12 h of life, issued 5 minutes ahead, a whole float.
        for claims in [
            json!({"aud": "https://a", "iat": now_secs, "exp": now_secs + 12 * 3600}),
            json!({"aud": "https://a", "iat": now_secs + 300, "exp": now_secs + 3900}),
            json!({"aud": "https://a", "exp": 1_800_003_600.0}),
        ] {
            assert!(
                IdToken::parse(&jwt(claims.clone()), "https://a", now()).is_ok(),
                "{claims}"
            );
        }
    }

    /// Any JSON value, numbers of every size and sign included.
    fn any_claim() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            (1_799_900_000u64..1_800_100_000).prop_map(serde_json::Value::from),
            (1_799_900_000.0f64..1_800_100_000.0).prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::from),
            any::<u64>().prop_map(|n| json!([n])),
        ]
    }

    proptest::proptest! {
        /// Whatever `exp` and `iat` hold (or lack), parsing never panics; a
        /// token it accepts is live, plausible and printable.
        #[test]
        fn parsing_never_panics_on_any_claim_values(
            exp in proptest::option::of(any_claim()),
            iat in proptest::option::of(any_claim()),
            now_secs in proptest::prop_oneof![0u64..4_000_000_000, 1_800_000_000u64..1_800_003_600],
        ) {
            let now = UNIX_EPOCH + Duration::from_secs(now_secs);
            let mut claims = json!({"aud": "https://a"});
            if let Some(exp) = exp {
                claims["exp"] = exp;
            }
            if let Some(iat) = iat {
                claims["iat"] = iat;
            }
            match IdToken::parse(&jwt(claims.clone()), "https://a", now) {
                Ok(token) => {
                    proptest::prop_assert!(token.expires_at() > now);
                    proptest::prop_assert!(token.remaining(now) <= MAX_TOKEN_LIFETIME + MAX_ISSUED_AHEAD);
                    proptest::prop_assert!(token.issued_at() <= now + MAX_ISSUED_AHEAD);
                    let _ = format!("{token:?}");
                }
                Err(err) => {
                    let text = err.to_string();
                    proptest::prop_assert!(text.contains("`exp`") || text.contains("`iat`") || text.contains("expired") || text.contains("lifetime"), "{}", text);
                }
            }
        }

        #[test]
        fn display_time_never_panics(secs in proptest::prelude::any::<u64>(), before in proptest::prelude::any::<bool>()) {
            let offset = Duration::from_secs(secs);
            let time = if before { UNIX_EPOCH.checked_sub(offset) } else { UNIX_EPOCH.checked_add(offset) };
            if let Some(time) = time {
                proptest::prop_assert!(!display_time(time).is_empty());
            }
        }
    }

    #[test]
    fn accepts_an_audience_list() {
        let text = jwt(json!({"aud":["x","https://a"],"exp":1_800_003_600u64}));
        assert!(IdToken::parse(&text, "https://a", now()).is_ok());
    }

    #[test]
    fn debug_never_prints_the_token() {
        let text = jwt(json!({"aud":"https://a","exp":1_800_003_600u64}));
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

/// Shortest first segment of a real JWS or JWE: its protected header must
/// hold `alg`, and `{"alg":""}` alone encodes as 14 base64url characters.
const MIN_HEADER_LEN: usize = 14;

/// Three or more segments, the first two non-empty (the third is empty for
/// an unsigned `alg: none` token, and there are five in a JWE); but not a
/// Google permission or method name (`iam.serviceAccounts.getAccessToken`),
/// which operators need to read in a refusal and no token can be.
fn is_jws_shaped(word: &str) -> bool {
    let word = word.trim_start_matches('.');
    let segments: Vec<&str> = word.split('.').collect();
    word.len() >= MIN_JWS_LEN
        && segments.len() >= 3
        && !segments[0].is_empty()
        && !segments[1].is_empty()
        && !is_permission_name(&segments)
}

/// `service.resource.verb`: three segments of letters only, the first
/// lower case and shorter than any JWS header ([`MIN_HEADER_LEN`]), so no
/// compact JWS (three segments, header first) or JWE (five) has this shape.
fn is_permission_name(segments: &[&str]) -> bool {
    segments.len() == 3
        && segments[0].len() < MIN_HEADER_LEN
        && segments[0].starts_with(|c: char| c.is_ascii_lowercase())
        && segments
            .iter()
            .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphabetic()))
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
        // Google's permission names stay readable in a refusal.
        let refusal = "Permission 'iam.serviceAccounts.getAccessToken' denied on resource";
        assert_eq!(redact_jwts(refusal), refusal);
        assert_eq!(
            redact_jwts("missing storage.objects.getIamPolicy"),
            "missing storage.objects.getIamPolicy"
        );
        // A token whose header is shorter than any real one is still
        // redacted when it is not letters only.
        assert_eq!(
            redact_jwts("got eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.sig-nat_ure0"),
            "got [redacted-jws]"
        );
        assert_eq!(redact_jwts("x abc.defghijklmnop1.qrs"), "x [redacted-jws]");
    }

    /// No real compact JWS (its header holds at least `alg`) is let
    /// through as a permission name, whatever its letters.
    #[test]
    fn every_minimal_header_is_redacted() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for header in [
            r#"{"alg":""}"#,
            r#"{"alg":"none"}"#,
            r#"{"alg":"RS256","typ":"JWT"}"#,
            " {\"alg\":\"x\"}",
            "\n{\"alg\":\"x\"}",
        ] {
            let token = format!("{}.{}.abc", b64.encode(header), b64.encode(r#"{"a":1}"#));
            assert_eq!(redact_jwts(&token), "[redacted-jws]", "{header}");
        }
    }
}
