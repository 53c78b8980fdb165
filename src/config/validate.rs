//! Validation: every semantic problem of a loaded config, each as a
//! [`Problem`] naming its key path, so an operator fixes a config in one
//! round. Checks that need the layers above (policy names, key files) are
//! added by the server's preparation, which reports them in the same list.

use std::{collections::HashSet, time::Duration};

use super::{resolve::parse_mode, ConfigError, Settings};
use crate::domain::{
    validate_audience, validate_identity_name, LogText, Principal, Problem, SourceKind,
};

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
        if !(1..=10_000).contains(&r.upstream_qps) {
            problems.push(Problem::new(
                "refresh.upstream_qps",
                "must be between 1 and 10000",
            ));
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
                    (
                        "service_account_from",
                        identity.service_account_from.is_some(),
                    ),
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
                        (
                            "service_account_from",
                            identity.service_account_from.is_some(),
                        ),
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
                    match (&identity.service_account, identity.service_account_from) {
                        (None, None) => problems.push(Problem::new(
                            key("service_account"),
                            "required when source = \"impersonate\": the account to mint ID tokens for \
                             (or service_account_from = \"k8s_service_account_annotation\" for an \
                             account per calling pod)",
                        )),
                        (Some(_), Some(_)) => problems.push(Problem::new(
                            key("service_account_from"),
                            "not with service_account: an identity mints either as one fixed \
                             account or as the one each caller's annotation names",
                        )),
                        (None, Some(from)) => {
                            if self.kubernetes.is_none() {
                                problems.push(Problem::new(
                                    key("service_account_from"),
                                    format!(
                                        "reads the calling pod's service-account annotation \
                                         {}, which needs a [kubernetes] section",
                                        from.annotation()
                                    ),
                                ));
                            }
                        }
                        (Some(email), None) => {
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
        problems.extend(self.per_workload_problems());
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
        // Prefetched entries are never evicted: more of them than the cache
        // holds could never all be kept.
        let prefetched: usize = self.prefetch.iter().map(|p| p.audiences.len()).sum();
        if prefetched > self.refresh.max_entries {
            problems.push(Problem::new(
                "prefetch",
                format!(
                    "lists {prefetched} audiences, more than refresh.max_entries = {}",
                    self.refresh.max_entries
                ),
            ));
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
        share_problems(
            "limits.max_connections_per_uid",
            l.max_connections_per_uid,
            &mut problems,
        );
        share_problems(
            "limits.max_streams_per_uid",
            l.max_streams_per_uid,
            &mut problems,
        );
        timeout_problems("limits.idle_timeout", l.idle_timeout, &mut problems);
        if let Some(telemetry) = &self.telemetry {
            if telemetry.max_connections == 0 {
                problems.push(Problem::new(
                    "telemetry.max_connections",
                    "must be at least 1",
                ));
            }
            timeout_problems(
                "telemetry.header_read_timeout",
                telemetry.header_read_timeout,
                &mut problems,
            );
            timeout_problems(
                "telemetry.idle_timeout",
                telemetry.idle_timeout,
                &mut problems,
            );
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
            if endpoint.max_connections == 0 {
                problems.push(Problem::new(
                    "metadata_endpoint.max_connections",
                    "must be at least 1",
                ));
            }
            share_problems(
                "metadata_endpoint.max_connections_per_uid",
                endpoint.max_connections_per_uid,
                &mut problems,
            );
            timeout_problems(
                "metadata_endpoint.header_read_timeout",
                endpoint.header_read_timeout,
                &mut problems,
            );
            timeout_problems(
                "metadata_endpoint.idle_timeout",
                endpoint.idle_timeout,
                &mut problems,
            );
            for (j, audience) in endpoint.audiences.iter().enumerate() {
                if let Err(e) = validate_audience(audience) {
                    problems.push(Problem::new(
                        format!("metadata_endpoint.audiences[{j}]"),
                        e.to_string(),
                    ));
                }
            }
            endpoint_instance_problems(endpoint, &mut problems);
        }
        if let Some(telemetry) = &self.telemetry {
            if !telemetry.listen.ip().is_loopback() && !telemetry.allow_non_loopback {
                problems.push(Problem::new(
                    "telemetry.listen",
                    format!(
                        "{} is not a loopback address; anyone who can reach it reads the metrics. \
                         Use 127.0.0.1, or set telemetry.allow_non_loopback = true",
                        telemetry.listen
                    ),
                ));
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
        self.sink_problems(&mut problems);
        self.kubernetes_problems(&mut problems);
        problems
    }

    /// `[kubernetes]`, and the `k8s_*` selectors that need it. (The kubelet
    /// URL's default, which needs `NODE_NAME`, is resolved at startup.)
    fn kubernetes_problems(&self, problems: &mut Vec<Problem>) {
        let Some(k) = &self.kubernetes else {
            for (i, rule) in self.policy.iter().enumerate() {
                for (field, set) in [
                    ("k8s_namespaces", !rule.k8s_namespaces.is_empty()),
                    (
                        "k8s_service_accounts",
                        !rule.k8s_service_accounts.is_empty(),
                    ),
                    ("k8s_pod_labels", !rule.k8s_pod_labels.is_empty()),
                ] {
                    if set {
                        problems.push(Problem::new(
                            format!("policy[{i}].{field}"),
                            "needs a [kubernetes] section: pods are looked up in the kubelet's pod list",
                        ));
                    }
                }
            }
            return;
        };
        if let Some(url) = &k.kubelet_url {
            if let Err(message) = base_url(url) {
                problems.push(Problem::new("kubernetes.kubelet_url", message));
            }
        }
        if let Err(message) = base_url(&k.api_server_url) {
            problems.push(Problem::new("kubernetes.api_server_url", message));
        }
        for (key, path) in [
            ("kubernetes.token_file", &k.token_file),
            ("kubernetes.ca_file", &k.ca_file),
            ("kubernetes.proc_root", &k.proc_root),
        ] {
            if !path.is_absolute() {
                problems.push(Problem::new(
                    key,
                    format!("{path:?} must be an absolute path"),
                ));
            }
        }
        for (key, value, least, most) in [
            (
                "kubernetes.pod_cache_ttl",
                k.pod_cache_ttl,
                1_000,
                3_600_000,
            ),
            (
                "kubernetes.min_fetch_interval",
                k.min_fetch_interval,
                100,
                60_000,
            ),
            (
                "kubernetes.start_race_budget",
                k.start_race_budget,
                0,
                60_000,
            ),
            (
                "kubernetes.annotations_ttl",
                k.annotations_ttl,
                1_000,
                3_600_000,
            ),
            ("kubernetes.request_timeout", k.request_timeout, 100, 60_000),
        ] {
            let ms = value.as_millis();
            if ms < least || ms > most {
                problems.push(Problem::new(
                    key,
                    format!(
                        "must be between {} and {}",
                        humantime::format_duration(Duration::from_millis(least as u64)),
                        humantime::format_duration(Duration::from_millis(most as u64))
                    ),
                ));
            }
        }
    }

    /// A per-workload identity mints only for a calling pod: prefetching
    /// it or keeping its token in a file has no caller to mint for.
    fn per_workload_problems(&self) -> Vec<Problem> {
        let per_workload = |name: &str| {
            self.identities
                .iter()
                .any(|i| i.name == name && i.service_account_from.is_some())
        };
        let refusal = |key: String, name: &str| {
            Problem::new(
                key,
                format!(
                    "identity {name:?} mints as each calling pod's annotated account \
                     (service_account_from), so it has no token of its own to keep"
                ),
            )
        };
        let mut problems = Vec::new();
        for (i, identity) in self.identities.iter().enumerate() {
            if let Some(base) = identity.base.as_deref().filter(|b| per_workload(b)) {
                problems.push(refusal(format!("identities[{i}].base"), base));
            }
        }
        for (i, prefetch) in self.prefetch.iter().enumerate() {
            if per_workload(&prefetch.identity) {
                problems.push(refusal(
                    format!("prefetch[{i}].identity"),
                    &prefetch.identity,
                ));
            }
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            if per_workload(&sink.identity) {
                problems.push(refusal(format!("sinks[{i}].identity"), &sink.identity));
            }
        }
        problems
    }

    fn sink_problems(&self, problems: &mut Vec<Problem>) {
        let mut paths = HashSet::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            let key = |field: &str| format!("sinks[{i}].{field}");
            if let Err(message) = validate_identity_name(&sink.identity) {
                problems.push(Problem::new(key("identity"), message));
            }
            match (&sink.audience, sink.scopes.is_empty()) {
                (Some(audience), true) => {
                    if let Err(e) = validate_audience(audience) {
                        problems.push(Problem::new(key("audience"), e.to_string()));
                    }
                }
                (None, false) => {
                    for (j, scope) in sink.scopes.iter().enumerate() {
                        let ok = !scope.is_empty()
                            && scope.len() <= 512
                            && scope.bytes().all(|b| b.is_ascii_graphic());
                        if !ok {
                            problems.push(Problem::new(
                                key(&format!("scopes[{j}]")),
                                format!(
                                    "{:?} is not a scope (printable ASCII without spaces, e.g. \
                                     \"https://www.googleapis.com/auth/cloud-platform\")",
                                    LogText::new(scope).as_str()
                                ),
                            ));
                        }
                    }
                }
                (Some(_), false) => problems.push(Problem::new(
                    key("scopes"),
                    "set either audience (the file holds an ID token) or scopes (an access \
                     token), not both",
                )),
                (None, true) => problems.push(Problem::new(
                    key("audience"),
                    "required: set audience for an ID token, or scopes for an access token",
                )),
            }
            let path_ok = sink.path.is_absolute()
                && sink.path.file_name().is_some()
                && sink
                    .path
                    .parent()
                    .is_some_and(|p| p != std::path::Path::new("/"));
            if !path_ok {
                problems.push(Problem::new(
                    key("path"),
                    format!(
                        "{:?} must be an absolute path to a file inside a directory, e.g. \"/run/tokens/api.jwt\"",
                        sink.path
                    ),
                ));
            } else if !paths.insert(sink.path.as_path()) {
                problems.push(Problem::new(
                    key("path"),
                    format!("{:?} is written by another sink too", sink.path),
                ));
            }
            let env_name = sink.env_name();
            let name_ok = !env_name.is_empty()
                && env_name.len() <= 128
                && !env_name.starts_with(|c: char| c.is_ascii_digit())
                && env_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !name_ok {
                problems.push(Problem::new(
                    key("env_name"),
                    format!(
                        "{:?} is not an environment variable name (A-Z a-z 0-9 _, not starting with a digit)",
                        env_name
                    ),
                ));
            }
            match parse_mode(&sink.mode) {
                Err(message) => problems.push(Problem::new(key("mode"), message)),
                Ok(mode) if mode & 0o133 != 0 => problems.push(Problem::new(
                    key("mode"),
                    format!(
                        "{:?} lets others change the file or marks it executable; a token file \
                         should be at most \"0644\" (\"0600\" or \"0640\" with a group are better)",
                        sink.mode
                    ),
                )),
                Ok(_) => {}
            }
            for (field, principal, resolve) in [
                (
                    "owner",
                    &sink.owner,
                    Principal::resolve_user as fn(&Principal) -> _,
                ),
                ("group", &sink.group, Principal::resolve_group),
            ] {
                if let Some(Err(message)) = principal.as_ref().map(resolve) {
                    problems.push(Problem::new(key(field), message));
                }
            }
            if let Some(program) = sink.on_refresh.first() {
                if !std::path::Path::new(program).is_absolute() {
                    problems.push(Problem::new(
                        key("on_refresh"),
                        format!("the program {program:?} must be an absolute path (no shell, no PATH search)"),
                    ));
                }
            }
            if !(Duration::from_secs(1)..=Duration::from_secs(600))
                .contains(&sink.on_refresh_timeout)
            {
                problems.push(Problem::new(
                    key("on_refresh_timeout"),
                    "must be between 1s and 10m",
                ));
            }
            match (&sink.signal, &sink.pid_file) {
                (Some(signal), Some(pid_file)) => {
                    if signal.parse::<nix::sys::signal::Signal>().is_err() {
                        problems.push(Problem::new(
                            key("signal"),
                            format!("{signal:?} is not a signal name like \"SIGHUP\""),
                        ));
                    }
                    if !pid_file.is_absolute() {
                        problems.push(Problem::new(key("pid_file"), "must be an absolute path"));
                    }
                    if !sink.on_refresh.is_empty() {
                        problems.push(Problem::new(
                            key("signal"),
                            "set either on_refresh or signal with pid_file, not both",
                        ));
                    }
                }
                (Some(_), None) => {
                    problems.push(Problem::new(key("pid_file"), "required with signal"))
                }
                (None, Some(_)) => {
                    problems.push(Problem::new(key("signal"), "required with pid_file"))
                }
                (None, None) => {}
            }
        }
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
/// A Google service account email, as `service_account` and a pod's
/// `iam.gke.io/gcp-service-account` annotation must hold.
pub fn validate_account_email(email: &str) -> Result<(), String> {
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

/// A Kubernetes base URL (a path is allowed: the kubelet may be reached
/// through the API server's node proxy): https, or plain http to loopback
/// only, since what it answers decides who gets which token; no query,
/// fragment or user info.
pub(super) fn base_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !crate::domain::upstream_url::is_https_or_loopback(&url) {
        return Err(format!(
            "{text:?} must be an https URL (plain http only to loopback: what it answers decides who gets which token)"
        ));
    }
    if url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(format!(
            "{text:?} must be a base URL like \"https://10.0.0.5:10250\", without query, fragment or user info"
        ));
    }
    Ok(url)
}

/// An http(s) base URL without query or fragment; plain http only to loopback.
fn validate_base_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !crate::domain::upstream_url::is_https_or_loopback(&url) {
        return Err(format!(
            "{text:?} must be an https URL (plain http only to loopback)"
        ));
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

/// A per-uid share must be at least 1; above its total it is the total
/// (so lowering a total alone stays valid).
fn share_problems(key: &str, share: usize, problems: &mut Vec<Problem>) {
    if share == 0 {
        problems.push(Problem::new(key, "must be at least 1"));
    }
}

/// A connection timeout must leave a client time to talk.
fn timeout_problems(key: &str, timeout: Duration, problems: &mut Vec<Problem>) {
    if timeout < Duration::from_millis(100) {
        problems.push(Problem::new(key, "must be at least 100ms"));
    }
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

/// The project and instance values an operator sets for the metadata
/// endpoint: shaped as Google's are, so libraries parsing them do not choke.
fn endpoint_instance_problems(
    endpoint: &super::MetadataEndpointSettings,
    problems: &mut Vec<Problem>,
) {
    if let Some(project) = &endpoint.project_id {
        // Google's rule (6-30 of a-z, 0-9, '-', a letter first, no '-'
        // last), plus the legacy domain-scoped form "example.com:name".
        let name = project
            .rsplit_once(':')
            .map_or(project.as_str(), |(_, n)| n);
        let domain_ok = project.rsplit_once(':').is_none_or(|(d, _)| {
            !d.is_empty()
                && d.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c))
        });
        let ok = (6..=30).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && !name.ends_with('-')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && domain_ok;
        if !ok {
            problems.push(Problem::new(
                "metadata_endpoint.project_id",
                format!(
                    "{:?} is not a Google Cloud project id (6 to 30 lowercase letters, digits \
                     and hyphens, starting with a letter, e.g. \"my-project\")",
                    LogText::new(project).as_str()
                ),
            ));
        }
    }
    for (key, value) in [
        (
            "metadata_endpoint.numeric_project_id",
            endpoint.numeric_project_id,
        ),
        ("metadata_endpoint.instance_id", endpoint.instance_id),
    ] {
        if value == Some(0) {
            problems.push(Problem::new(key, "must be a positive number"));
        }
    }
    if let Some(zone) = &endpoint.zone {
        let ok = !zone.is_empty()
            && zone.len() <= 63
            && zone
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            problems.push(Problem::new(
                "metadata_endpoint.zone",
                format!(
                    "{:?} is not a zone name: give the bare name, e.g. \"us-central1-a\" \
                     (it is served as projects/NUMERIC_PROJECT_ID/zones/ZONE)",
                    LogText::new(zone).as_str()
                ),
            ));
        } else if endpoint.numeric_project_id.is_none() {
            problems.push(Problem::new(
                "metadata_endpoint.zone",
                "needs metadata_endpoint.numeric_project_id: Google answers instance/zone as \
                 projects/NUMERIC_PROJECT_ID/zones/ZONE",
            ));
        }
    }
    if let Some(domain) = &endpoint.universe_domain {
        let ok = !domain.is_empty()
            && domain.len() <= 253
            && domain.contains('.')
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
        if !ok {
            problems.push(Problem::new(
                "metadata_endpoint.universe_domain",
                format!(
                    "{:?} is not a domain name such as \"googleapis.com\"",
                    LogText::new(domain).as_str()
                ),
            ));
        }
    }
}
