//! The GCE metadata server's service-account paths and query parameters
//! (PROTOCOLS.md §3), parsed once for both sides that speak it: the emulator,
//! which plays Google's server, and the broker's metadata-compatible endpoint.

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
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
