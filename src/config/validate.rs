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
            match identity.source {
                SourceKind::Metadata => {
                    if identity.key_file.is_some() {
                        problems.push(Problem::new(
                            key("key_file"),
                            "only for source = \"service_account_key\"",
                        ));
                    }
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
                    if identity.metadata_host.is_some() {
                        problems.push(Problem::new(
                            key("metadata_host"),
                            "only for source = \"metadata\"",
                        ));
                    }
                }
            }
        }
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
