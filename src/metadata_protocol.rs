//! The GCE metadata server's service-account paths and query parameters
//! (PROTOCOLS.md §3), parsed once for both sides that speak it: the emulator,
//! which plays Google's server, and the broker's metadata-compatible endpoint.

use std::borrow::Cow;

/// What `.../service-accounts/{account}/{leaf}` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// `{account}/`: the directory (JSON with `?recursive=true`).
    Directory,
    Identity,
    Email,
    Token,
    Scopes,
    Aliases,
    Unknown,
}

/// Splits the part after `.../service-accounts/` into the account and what
/// is asked of it. `default` without a trailing slash is the directory (the
/// real server redirects there); some clients percent-encode the `@` of an
/// email-named account.
pub fn account_and_leaf(tail: &str) -> (String, Leaf) {
    let (account, leaf) = tail.split_once('/').unwrap_or((tail, ""));
    let leaf = match leaf {
        "" => Leaf::Directory,
        "identity" => Leaf::Identity,
        "email" => Leaf::Email,
        "token" => Leaf::Token,
        "scopes" => Leaf::Scopes,
        "aliases" => Leaf::Aliases,
        _ => Leaf::Unknown,
    };
    (account.replace("%40", "@"), leaf)
}

/// The query parameters the metadata server looks at; the first occurrence
/// of each wins.
#[derive(Debug, Default)]
pub struct Query {
    pub audience: Option<String>,
    pub format: Option<String>,
    pub licenses: Option<String>,
    pub recursive: Option<String>,
    /// `json` or `text`: how a value or directory is rendered.
    pub alt: Option<String>,
    /// Long polling for a change; the broker does not offer it.
    pub wait_for_change: Option<String>,
    /// `.../token?scopes=a,b`: comma-separated.
    pub scopes: Option<String>,
}

impl Query {
    pub fn parse(query: Option<&str>) -> Self {
        let mut parsed = Query::default();
        for (name, value) in form_pairs(query.unwrap_or("")) {
            let slot = match name.as_ref() {
                "audience" => &mut parsed.audience,
                "format" => &mut parsed.format,
                "licenses" => &mut parsed.licenses,
                "recursive" => &mut parsed.recursive,
                "alt" => &mut parsed.alt,
                "wait_for_change" => &mut parsed.wait_for_change,
                "scopes" => &mut parsed.scopes,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value.into_owned());
            }
        }
        parsed
    }

    /// `recursive=true` (any case).
    pub fn recursive(&self) -> bool {
        self.recursive
            .as_deref()
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// `wait_for_change=true` (any case).
    pub fn wait_for_change(&self) -> bool {
        self.wait_for_change
            .as_deref()
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

/// `application/x-www-form-urlencoded` pairs, exactly as
/// `url::form_urlencoded::parse` reads them (`&`-separated, empty pieces
/// skipped, split at the first `=`, `+` as space, `%XX` decoded, invalid
/// UTF-8 replaced), but borrowing every part that needs no decoding and
/// decoding the others in one pass: this runs on every metadata request.
pub fn form_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            (form_decode(name), form_decode(value))
        })
}

fn form_decode(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    if !bytes.iter().any(|&b| b == b'+' || b == b'%') {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let byte = match bytes[at] {
            b'+' => b' ',
            b'%' => match (
                bytes.get(at + 1).and_then(|&h| hex_value(h)),
                bytes.get(at + 2).and_then(|&l| hex_value(l)),
            ) {
                (Some(high), Some(low)) => {
                    at += 2;
                    high << 4 | low
                }
                _ => b'%',
            },
            other => other,
        };
        out.push(byte);
        at += 1;
    }
    match String::from_utf8(out) {
        Ok(text) => Cow::Owned(text),
        Err(invalid) => Cow::Owned(String::from_utf8_lossy(invalid.as_bytes()).into_owned()),
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn form_pairs_read_as_form_urlencoded_does(
            query in "([a-z=&+%]|%[0-9a-fA-F]{0,2}|%[89a-fA-F][0-9a-f]|é|[0-9G-Zg-z]){0,40}"
        ) {
            let ours: Vec<(String, String)> = form_pairs(&query)
                .map(|(n, v)| (n.into_owned(), v.into_owned()))
                .collect();
            let theirs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .map(|(n, v)| (n.into_owned(), v.into_owned()))
                .collect();
            proptest::prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn form_pairs_borrow_what_needs_no_decoding() {
        let pairs: Vec<_> = form_pairs("audience=https%3A%2F%2Fa+b&format=full&&x").collect();
        assert_eq!(pairs[0].1, "https://a b");
        assert!(matches!(
            pairs[1],
            (Cow::Borrowed("format"), Cow::Borrowed("full"))
        ));
        assert_eq!(pairs[2], (Cow::Borrowed("x"), Cow::Borrowed("")));
        assert_eq!(pairs.len(), 3);
        assert_eq!(form_pairs("a=%zz%4").next().unwrap().1, "%zz%4");
        assert_eq!(form_pairs("a=%ff").next().unwrap().1, "\u{fffd}");
    }

    #[test]
    fn accounts_and_leaves() {
        assert_eq!(
            account_and_leaf("default/identity"),
            ("default".into(), Leaf::Identity)
        );
        assert_eq!(
            account_and_leaf("default"),
            ("default".into(), Leaf::Directory)
        );
        assert_eq!(
            account_and_leaf("default/"),
            ("default".into(), Leaf::Directory)
        );
        assert_eq!(
            account_and_leaf("a%40b.com/email"),
            ("a@b.com".into(), Leaf::Email)
        );
        assert_eq!(
            account_and_leaf("default/nope"),
            ("default".into(), Leaf::Unknown)
        );
    }

    #[test]
    fn first_occurrence_wins_and_recursive_is_case_blind() {
        let q = Query::parse(Some(
            "audience=https%3A%2F%2Fa&audience=b&recursive=TRUE&format=full",
        ));
        assert_eq!(q.audience.as_deref(), Some("https://a"));
        assert_eq!(q.format.as_deref(), Some("full"));
        assert!(q.recursive());
        assert!(!Query::parse(Some("recursive=false")).recursive());
        assert!(Query::parse(None).audience.is_none());
    }
}
