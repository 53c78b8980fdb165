//! Validation: every semantic problem of a loaded config, each as a
//! [`Problem`] naming its key path, so an operator fixes a config in one
//! round. Checks that need the layers above (policy names, key files) are
//! added by the server's preparation, which reports them in the same list.

use std::{collections::HashSet, time::Duration};

use super::{resolve::parse_mode, ConfigError, Settings};
use crate::domain::{validate_audience, validate_identity_name, Problem, SourceKind};

impl Settings {
    /// Every semantic problem this layer can see, each naming its key.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Err(message) = parse_mode(&self.server.socket_mode) {
            problems.push(Problem::new("server.socket_mode", message));
        }
        if let Some(path) = &self.server.socket_path {
            if path.as_os_str().is_empty() {
                problems.push(Problem::new("server.socket_path", "must not be empty"));
            } else if path.as_os_str().len() > 100 {
                // sun_path holds 108 bytes; leave room and say so before bind does.
                problems.push(Problem::new(
                    "server.socket_path",
                    "longer than 100 bytes, too long for a Unix socket address",
                ));
            }
        }
        let r = &self.refresh;
        if r.refresh_before_expiry < Duration::from_secs(60) {
            problems.push(Problem::new(
                "refresh.refresh_before_expiry",
                "must be at least 1m (tokens under 30s are treated as expired)",
            ));
        }
        if r.refresh_before_expiry > Duration::from_secs(45 * 60) {
            problems.push(Problem::new(
                "refresh.refresh_before_expiry",
                "must be at most 45m: Google's ID tokens live 1h",
            ));
        }
        if r.jitter >= r.refresh_before_expiry {
            problems.push(Problem::new(
                "refresh.jitter",
                "must be smaller than refresh.refresh_before_expiry",
            ));
        }
        if r.retry_initial.is_zero() {
            problems.push(Problem::new(
                "refresh.retry_initial",
                "must be more than 0s",
            ));
        }
        if r.retry_max < r.retry_initial {
            problems.push(Problem::new(
                "refresh.retry_max",
                "must be at least refresh.retry_initial",
            ));
        }
        if r.idle_evict_after < Duration::from_secs(60) {
            problems.push(Problem::new(
                "refresh.idle_evict_after",
                "must be at least 1m",
            ));
        }
        if r.max_entries == 0 {
            problems.push(Problem::new("refresh.max_entries", "must be at least 1"));
        }
        if r.upstream_concurrency == 0 {
            problems.push(Problem::new(
                "refresh.upstream_concurrency",
                "must be at least 1",
            ));
        }
        let mut names = HashSet::new();
        for (i, identity) in self.identities.iter().enumerate() {
            let key = |field: &str| format!("identities[{i}].{field}");
            if let Err(message) = validate_identity_name(&identity.name) {
                problems.push(Problem::new(key("name"), message));
            } else if !names.insert(identity.name.as_str()) {
                problems.push(Problem::new(
                    key("name"),
                    format!("identity {:?} is defined twice", identity.name),
                ));
            }
            let only = |field: &str, sources: &str| {
                Problem::new(key(field), format!("only for source = {sources}"))
            };
            let kind = identity.source;
            if identity.key_file.is_some() && kind != SourceKind::ServiceAccountKey {
                problems.push(only("key_file", "\"service_account_key\""));
            }
            if identity.metadata_host.is_some() && kind != SourceKind::Metadata {
                problems.push(only("metadata_host", "\"metadata\""));
            }
            if kind != SourceKind::Impersonate {
                for (field, set) in [
                    ("base", identity.base.is_some()),
                    ("service_account", identity.service_account.is_some()),
                    ("delegates", !identity.delegates.is_empty()),
                    ("include_email", !identity.include_email),
                ] {
                    if set {
                        problems.push(only(field, "\"impersonate\""));
                    }
                }
            }
            if identity.iam_endpoint.is_some()
                && !matches!(kind, SourceKind::Impersonate | SourceKind::ExternalAccount)
            {
                problems.push(only(
                    "iam_endpoint",
                    "\"impersonate\" or \"external_account\"",
                ));
            }
            if identity.credential_file.is_some()
                && !matches!(kind, SourceKind::Impersonate | SourceKind::ExternalAccount)
            {
                problems.push(only(
                    "credential_file",
                    "\"impersonate\" or \"external_account\"",
                ));
            }
            if let Some(endpoint) = &identity.iam_endpoint {
                if let Err(message) = validate_base_url(endpoint) {
                    problems.push(Problem::new(key("iam_endpoint"), message));
                }
            }
            match kind {
                SourceKind::Metadata => {
                    if let Some(host) = &identity.metadata_host {
                        if let Err(message) = validate_host(host) {
                            problems.push(Problem::new(key("metadata_host"), message));
                        }
                    }
                }
                SourceKind::ServiceAccountKey => {
                    if identity.key_file.is_none() {
                        problems.push(Problem::new(
                            key("key_file"),
                            "required when source = \"service_account_key\"",
                        ));
                    }
                }
                SourceKind::Impersonate if identity.credential_file.is_some() => {
                    for (field, set) in [
                        ("base", identity.base.is_some()),
                        ("service_account", identity.service_account.is_some()),
                        ("delegates", !identity.delegates.is_empty()),
                    ] {
                        if set {
                            problems.push(Problem::new(
                                key(field),
                                "not with credential_file: the impersonated_service_account file names the source, the account and the delegates",
                            ));
                        }
                    }
                }
                SourceKind::Impersonate => {
                    match &identity.base {
                        None => problems.push(Problem::new(
                            key("base"),
                            "required when source = \"impersonate\": the identity whose credential impersonates",
                        )),
                        Some(base) if base == &identity.name => problems.push(Problem::new(
                            key("base"),
                            "an identity cannot be its own base",
                        )),
                        Some(_) => {}
                    }
                    match &identity.service_account {
                        None => problems.push(Problem::new(
                            key("service_account"),
                            "required when source = \"impersonate\": the account to mint ID tokens for",
                        )),
                        Some(email) => {
                            if let Err(message) = validate_account_email(email) {
                                problems.push(Problem::new(key("service_account"), message));
                            }
                        }
                    }
                    for (j, email) in identity.delegates.iter().enumerate() {
                        if let Err(message) = validate_account_email(email) {
                            problems.push(Problem::new(key(&format!("delegates[{j}]")), message));
                        }
                    }
                }
                SourceKind::ExternalAccount => {
                    if identity.credential_file.is_none() {
                        problems.push(Problem::new(
                            key("credential_file"),
                            "required when source = \"external_account\"",
                        ));
                    }
                }
            }
        }
        problems.extend(self.chain_problems());
        for (i, prefetch) in self.prefetch.iter().enumerate() {
            if prefetch.audiences.is_empty() {
                problems.push(Problem::new(
                    format!("prefetch[{i}].audiences"),
                    "must list at least one audience",
                ));
            }
            for (j, audience) in prefetch.audiences.iter().enumerate() {
                if let Err(e) = validate_audience(audience) {
                    problems.push(Problem::new(
                        format!("prefetch[{i}].audiences[{j}]"),
                        e.to_string(),
                    ));
                }
            }
        }
        if let Some(group) = &self.server.socket_group {
            if let Err(message) = group.resolve_group() {
                problems.push(Problem::new("server.socket_group", message));
            }
        }
        let l = &self.limits;
        if !(1024..=16 * 1024 * 1024).contains(&l.max_request_bytes) {
            problems.push(Problem::new(
                "limits.max_request_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if l.new_audiences_per_minute == 0 {
            problems.push(Problem::new(
                "limits.new_audiences_per_minute",
                "must be at least 1",
            ));
        }
        if l.new_audience_burst == 0 {
            problems.push(Problem::new(
                "limits.new_audience_burst",
                "must be at least 1",
            ));
        }
        if l.max_connections == 0 {
            problems.push(Problem::new("limits.max_connections", "must be at least 1"));
        }
        if l.max_streams == 0 {
            problems.push(Problem::new("limits.max_streams", "must be at least 1"));
        }
        if let Some(endpoint) = &self.metadata_endpoint {
            if !endpoint.listen.ip().is_loopback() && !endpoint.allow_non_loopback {
                problems.push(Problem::new(
                    "metadata_endpoint.listen",
                    format!(
                        "{} is not a loopback address; anyone who can reach it gets tokens. \
                         Use 127.0.0.1, or set metadata_endpoint.allow_non_loopback = true",
                        endpoint.listen
                    ),
                ));
            }
            for (j, audience) in endpoint.audiences.iter().enumerate() {
                if let Err(e) = validate_audience(audience) {
                    problems.push(Problem::new(
                        format!("metadata_endpoint.audiences[{j}]"),
                        e.to_string(),
                    ));
                }
            }
        }
        if self.server.ready_after_prefetch && self.prefetch.is_empty() {
            problems.push(Problem::new(
                "server.ready_after_prefetch",
                "is set but no [[prefetch]] audiences are configured",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            problems.push(Problem::new("log.filter", e.to_string()));
        }
        problems
    }

    /// `Ok` when [`Settings::problems`] finds none.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

impl Settings {
    /// Impersonation chains: every `base` names a configured identity and
    /// no chain comes back to where it started.
    fn chain_problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let base_of = |name: &str| {
            self.identities
                .iter()
                .find(|i| i.name == name)
                .filter(|i| i.source == SourceKind::Impersonate)
                .and_then(|i| i.base.as_deref())
        };
        for (i, identity) in self.identities.iter().enumerate() {
            let Some(base) = identity.base.as_deref() else {
                continue;
            };
            if identity.source != SourceKind::Impersonate
                || identity.credential_file.is_some()
                || base == identity.name
            {
                continue;
            }
            if !self.identities.iter().any(|other| other.name == base) {
                problems.push(Problem::new(
                    format!("identities[{i}].base"),
                    format!("no identity named {base:?} is configured"),
                ));
                continue;
            }
            let mut path = vec![identity.name.as_str()];
            let mut next = Some(base);
            while let Some(name) = next {
                if path.contains(&name) {
                    path.push(name);
                    problems.push(Problem::new(
                        format!("identities[{i}].base"),
                        format!("impersonation chain is a cycle: {}", path.join(" -> ")),
                    ));
                    break;
                }
                path.push(name);
                next = base_of(name);
            }
        }
        problems
    }
}

/// A service account's email, as IAM Credentials takes it.
fn validate_account_email(email: &str) -> Result<(), String> {
    let ok = email.len() <= 254
        && email.split_once('@').is_some_and(|(user, domain)| {
            !user.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && email
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '-' | '_'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{email:?} is not a service account email (e.g. \"deploy@my-project.iam.gserviceaccount.com\")"
        ))
    }
}

/// An http(s) base URL without query or fragment; plain http only to loopback.
fn validate_base_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(format!(
                "{text:?} must be an https URL (plain http only to loopback)"
            ))
        }
    }
    if url.query().is_some()
        || url.fragment().is_some()
        || !url.path().trim_end_matches('/').is_empty()
    {
        return Err(format!(
            "{text:?} must be a base URL like \"https://iamcredentials.googleapis.com\", without path or query"
        ));
    }
    Ok(())
}

fn validate_host(host: &str) -> Result<(), String> {
    let valid = !host.is_empty()
        && !host.contains("://")
        && !host.contains('/')
        && url::Url::parse(&format!("http://{host}/")).is_ok();
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host[:port] (no scheme, no path), e.g. \"169.254.169.254\""
        ))
    }
}
