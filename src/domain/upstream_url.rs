//! Where the broker may send a credential: Google's endpoints over https,
//! or plain http to this machine only (the emulator, a local proxy).

/// Whether `url` is https, or http to a loopback host.
pub fn is_https_or_loopback(url: &url::Url) -> bool {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    url.scheme() == "https" || (url.scheme() == "http" && loopback)
}

/// `text` parsed as a URL that passes [`is_https_or_loopback`], or an error
/// naming `field`.
pub fn parse_https_or_loopback(text: &str, field: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("field `{field}` is not a URL: {e}"))?;
    if is_https_or_loopback(&url) {
        Ok(url)
    } else {
        Err(format!(
            "field `{field}` must be an https URL (plain http only to loopback), not {text:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_anywhere_http_only_to_loopback() {
        for ok in [
            "https://oauth2.googleapis.com/token",
            "http://127.0.0.1:8080/t",
            "http://[::1]/t",
            "http://localhost/t",
        ] {
            assert!(parse_https_or_loopback(ok, "token_uri").is_ok(), "{ok}");
        }
        for bad in [
            "http://oauth2.googleapis.com/token",
            "http://10.0.0.1/t",
            "ftp://localhost/t",
            "not a url",
        ] {
            let err = parse_https_or_loopback(bad, "token_uri").unwrap_err();
            assert!(err.contains("token_uri"), "{err}");
        }
    }
}
