//! Layered loading: defaults < TOML file < env `TOKEN_BROKER__SECTION__KEY`
//! < command-line flags, read through the `config` crate. Loading only
//! parses; [`Settings::validate`](super::Settings::validate) judges.

use std::{collections::HashMap, path::Path};

use super::{ConfigError, Settings, ENV_PREFIX, SOCKET_ENV};

/// Flag values that override the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--socket`.
    pub socket_path: Option<std::path::PathBuf>,
}

impl Settings {
    /// Reads `file` (if any), then `TOKEN_BROKER__*` variables from `env`,
    /// then `overrides`. `env` is passed in so tests need not touch the
    /// process environment.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Settings, ConfigError> {
        let origin = file.map_or_else(|| "(none)".to_owned(), |p| p.display().to_string());
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Load {
                    path: origin,
                    message: "no such file".into(),
                });
            }
            refuse_empty(path, &origin)?;
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        let prefixed: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(prefixed)),
        );
        // Socket precedence (DESIGN.md): flag > TOKEN_BROKER_SOCKET > config.
        let socket = overrides
            .socket_path
            .as_ref()
            .map(|p| p.display().to_string())
            .or_else(|| env.get(SOCKET_ENV).filter(|p| !p.is_empty()).cloned());
        if let Some(socket) = socket {
            builder = builder
                .set_override("server.socket_path", socket)
                .map_err(|e| ConfigError::Load {
                    path: origin.clone(),
                    message: e.to_string(),
                })?;
        }
        let load_error = |e: config::ConfigError| ConfigError::Load {
            path: origin.clone(),
            message: e.to_string(),
        };
        builder
            .build()
            .map_err(load_error)?
            .try_deserialize()
            .map_err(load_error)
    }
}

/// A file with no settings at all is refused rather than taken as "all
/// defaults": a config truncated mid-write (or `: > config.toml`) would
/// otherwise drop every identity and open the policy on the next reload.
fn refuse_empty(path: &Path, origin: &str) -> Result<(), ConfigError> {
    let load_error = |message: String| ConfigError::Load {
        path: origin.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| load_error(e.to_string()))?;
    // A syntax error is left to the full parse below, which names its line.
    if let Ok(table) = text.parse::<toml::Table>() {
        if table.is_empty() {
            return Err(load_error(
                "the file has no settings (it is empty or only comments); refusing it, \
                 because an empty config would drop every identity and open the policy. \
                 Write config files atomically: write a temporary file, then rename it"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// The process environment as a map, for [`Settings::load`] and friends.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}
