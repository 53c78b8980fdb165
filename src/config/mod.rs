//! Configuration: typed settings ([`settings`]), layered loading
//! ([`load`]: defaults < TOML file < env `TOKEN_BROKER__SECTION__KEY` <
//! command-line flags), validation that names every problem's key
//! ([`validate`]), and what the settings resolve to on this machine
//! ([`resolve`]). Nothing here touches the network or binds sockets.
//!
//! Layering: config imports only [`crate::domain`]; the sources, the policy,
//! the cache and the servers import config, never the other way round.

mod load;
mod resolve;
mod settings;
#[cfg(test)]
mod tests;
mod validate;

pub use load::{process_env, Overrides};
pub use resolve::resolve_socket_path;
pub use settings::{
    AccountFrom, IdentitySettings, KubernetesSettings, LimitSettings, LogFormat, LogSettings,
    MetadataEndpointSettings, PrefetchSettings, RefreshSettings, RuleSettings, ServerSettings,
    Settings, SinkFormat, SinkSettings, TelemetrySettings, SERVICE_ACCOUNT_DIR,
};
pub use validate::validate_account_email;

use crate::domain::Problem;

/// Env prefix for overrides: `TOKEN_BROKER__REFRESH__JITTER=30s`.
pub const ENV_PREFIX: &str = "TOKEN_BROKER";
/// Env var naming the socket, for clients and the server alike.
pub const SOCKET_ENV: &str = "TOKEN_BROKER_SOCKET";
/// Google's env var naming a service-account key file (application default credentials).
pub const CREDENTIALS_ENV: &str = "GOOGLE_APPLICATION_CREDENTIALS";
/// Google's env var naming the metadata server's host[:port].
pub const METADATA_HOST_ENV: &str = "GCE_METADATA_HOST";
/// The node's name, from the downward API (`spec.nodeName`): the default
/// kubelet is `https://$NODE_NAME:10250`.
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    Load { path: String, message: String },
    #[error("invalid configuration: {}", describe_problems(.0))]
    Invalid(Vec<Problem>),
}

/// One problem fits on the error's line; several get a line each.
fn describe_problems(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => many.iter().map(|p| format!("\n  {p}")).collect::<String>(),
    }
}
