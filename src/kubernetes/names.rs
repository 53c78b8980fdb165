//! Kubernetes' own name grammars (DNS-1123 labels and subdomains, label
//! keys and values), so a policy selector or a kubelet answer that could
//! never name a real object is refused instead of silently never matching.

/// A DNS-1123 label (namespaces): at most 63 of `a-z 0-9 -`, alphanumeric
/// at both ends.
pub fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// A DNS-1123 subdomain (pod and service-account names): at most 253
/// characters of dot-separated labels.
pub fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of
/// at most 63 of `A-Z a-z 0-9 - _ .`, alphanumeric at both ends.
pub fn is_label_key(text: &str) -> bool {
    let name = match text.split_once('/') {
        Some((prefix, name)) => {
            if !is_dns_subdomain(prefix) {
                return false;
            }
            name
        }
        None => text,
    };
    !name.is_empty() && is_label_value(name)
}

/// A label value: empty, or at most 63 of `A-Z a-z 0-9 - _ .`,
/// alphanumeric at both ends.
pub fn is_label_value(text: &str) -> bool {
    let alnum = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && alnum(text.chars().next())
        && alnum(text.chars().next_back())
}

/// A pod UID: 8-4-4-4-12 lower-case hex digits.
pub fn is_pod_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, len)| {
            g.len() == len && g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
}

/// A container ID as the runtimes write it: 64 lower-case hex digits.
pub fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `namespace/name` of a service account, checked.
pub fn parse_service_account_ref(text: &str) -> Result<(&str, &str), String> {
    let Some((namespace, name)) = text.split_once('/') else {
        return Err(format!(
            "{text:?} is not `namespace/name` (e.g. \"payments/api-sa\")"
        ));
    };
    if !is_dns_label(namespace) {
        return Err(format!(
            "{namespace:?} in {text:?} is not a namespace name (DNS-1123 label: a-z 0-9 -, at most 63)"
        ));
    }
    if !is_dns_subdomain(name) {
        return Err(format!(
            "{name:?} in {text:?} is not a service-account name (DNS-1123 subdomain)"
        ));
    }
    Ok((namespace, name))
}

/// `key=value` of a pod label, checked.
pub fn parse_label_selector(text: &str) -> Result<(&str, &str), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("{text:?} is not `key=value` (e.g. \"app=api\")"));
    };
    if !is_label_key(key) {
        return Err(format!(
            "{key:?} in {text:?} is not a label key ([prefix/]name, name at most 63 of A-Z a-z 0-9 - _ .)"
        ));
    }
    if !is_label_value(value) {
        return Err(format!(
            "{value:?} in {text:?} is not a label value (at most 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends)"
        ));
    }
    Ok((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kubernetes_grammar() {
        assert!(is_dns_label("payments"));
        assert!(is_dns_label("kube-system"));
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("api-sa"));
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("a/b"));
        assert!(is_label_key("app"));
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(is_label_key("A_b.c-D"));
        for bad in ["", "/x", "a/", "Bad.Prefix/x", "-a", "a b", "a/b/c"] {
            assert!(!is_label_key(bad), "{bad}");
        }
        assert!(is_label_value(""));
        assert!(is_label_value("v1.2_x-Y"));
        assert!(!is_label_value("-v"));
        assert!(!is_label_value(&"v".repeat(64)));
        assert!(is_pod_uid("8a7d3e1c-5b2f-4c6d-9e0a-1b2c3d4e5f60"));
        assert!(!is_pod_uid("8A7D3E1C-5b2f-4c6d-9e0a-1b2c3d4e5f60"));
        assert!(!is_pod_uid("8a7d3e1c-5b2f-4c6d-9e0a"));
        assert!(is_container_id(&"ab".repeat(32)));
        assert!(!is_container_id(&"AB".repeat(32)));
    }

    #[test]
    fn selectors_parse_or_say_why_not() {
        assert_eq!(
            parse_service_account_ref("payments/api-sa"),
            Ok(("payments", "api-sa"))
        );
        for bad in ["payments", "Payments/x", "a/B", "/x", "a/"] {
            let err = parse_service_account_ref(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        assert_eq!(parse_label_selector("app=api"), Ok(("app", "api")));
        assert_eq!(parse_label_selector("tier="), Ok(("tier", "")));
        assert_eq!(
            parse_label_selector("app.kubernetes.io/name=x=y").unwrap_err(),
            "\"x=y\" in \"app.kubernetes.io/name=x=y\" is not a label value (at most 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends)"
        );
        assert!(parse_label_selector("app")
            .unwrap_err()
            .contains("key=value"));
        assert!(parse_label_selector("-x=1")
            .unwrap_err()
            .contains("label key"));
    }
}
