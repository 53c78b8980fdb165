//! SIGHUP reload: re-read and validate the config file, then change the
//! policy, rate limits, identities and log filter in place. Identities whose
//! source is unchanged keep their cached tokens; a config that fails to load
//! or validate is logged and the running one stays in force.

use std::{collections::HashMap, sync::Arc};

use super::{live, systemd, warn_if_open, Prepared};
use crate::{
    cache::TokenCache,
    config::{ConfigError, Settings},
    sink::SinkSet,
};

/// Re-reads and validates the configuration for a SIGHUP reload.
pub type Reload = Box<dyn FnMut() -> Result<Prepared, ConfigError> + Send>;

/// The configuration in force, as a reload sees it.
pub(crate) struct Running {
    pub(crate) settings: Settings,
    /// identity name -> its source's fingerprint.
    pub(crate) fingerprints: HashMap<String, String>,
}

/// Applies a new configuration on each SIGHUP; a config that fails to load
/// or validate is logged and the running one stays in force.
pub(crate) async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    mut reload: Option<Reload>,
    mut running: Running,
    cache: TokenCache,
    live: Arc<live::Live>,
    mut sinks: Option<SinkSet>,
) {
    while hangup.recv().await.is_some() {
        let Some(reload) = reload.as_mut() else {
            tracing::warn!("SIGHUP received, but this daemon has no config file to reload");
            continue;
        };
        tracing::info!("SIGHUP received: reloading the configuration");
        systemd::notify("RELOADING=1");
        match reload() {
            Ok(prepared) => {
                apply(&mut running, prepared, &cache, &live);
                // After the identities, so a sink of a new identity finds it.
                if let Some(sinks) = sinks.as_mut() {
                    sinks.reload(&running.settings.refresh, &running.settings.sinks);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reload rejected; the running configuration stays in force")
            }
        }
        systemd::notify("READY=1");
    }
}

/// Changes policy, limits, identities and the log filter in place. Tokens of
/// identities whose source is unchanged stay cached.
fn apply(running: &mut Running, new: Prepared, cache: &TokenCache, live: &live::Live) {
    let old = &running.settings;
    let needs_restart = [
        ("server", old.server != new.settings.server),
        ("refresh", old.refresh != new.settings.refresh),
        (
            "metadata_endpoint",
            old.metadata_endpoint != new.settings.metadata_endpoint,
        ),
        ("telemetry", old.telemetry != new.settings.telemetry),
        ("kubernetes", old.kubernetes != new.settings.kubernetes),
        ("log.format", old.log.format != new.settings.log.format),
        (
            "limits.max_connections/max_streams/max_request_bytes/*_per_uid/idle_timeout",
            old.limits.max_connections != new.settings.limits.max_connections
                || old.limits.max_streams != new.settings.limits.max_streams
                || old.limits.max_request_bytes != new.settings.limits.max_request_bytes
                || old.limits.max_connections_per_uid
                    != new.settings.limits.max_connections_per_uid
                || old.limits.max_streams_per_uid != new.settings.limits.max_streams_per_uid
                || old.limits.idle_timeout != new.settings.limits.idle_timeout,
        ),
    ];
    for (section, changed) in needs_restart {
        if changed {
            tracing::warn!(
                section,
                "changed in the config; takes effect after a restart"
            );
        }
    }
    live.set_policy(new.policy.clone());
    live.set_limits(new.settings.limits.clone());
    warn_if_open(&new.policy, &new.socket_path);
    let mut fingerprints = HashMap::new();
    let (mut kept, mut changed) = (Vec::new(), Vec::new());
    for (identity, source) in &new.identities {
        let fingerprint = source.fingerprint();
        if running.fingerprints.get(&identity.name) == Some(&fingerprint) {
            kept.push(identity.name.clone());
        } else {
            cache.set_identity(&identity.name, source.clone());
            changed.push(identity.name.clone());
        }
        fingerprints.insert(identity.name.clone(), fingerprint);
    }
    let removed: Vec<String> = running
        .fingerprints
        .keys()
        .filter(|name| !fingerprints.contains_key(*name))
        .cloned()
        .collect();
    for name in &removed {
        cache.remove_identity(name);
    }
    // Open watch streams re-check their grant against all of the above.
    live.reloaded();
    if let Err(e) = crate::logging::set_filter(&new.settings.log.filter) {
        tracing::error!(error = %e, "log.filter not applied");
    }
    let prefetch = new.prefetch_keys();
    if !prefetch.is_empty() {
        let cache = cache.clone();
        tokio::spawn(async move { cache.prefetch(prefetch).await });
    }
    tracing::info!(
        kept = ?kept, added_or_changed = ?changed, removed = ?removed,
        rules = new.settings.policy.len(),
        "configuration reloaded"
    );
    running.settings = new.settings;
    running.fingerprints = fingerprints;
}
