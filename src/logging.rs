//! Logging setup: human-readable text by default, JSON when configured,
//! always to stderr (stdout belongs to command output such as `token`).
//! The filter can be changed at run time (SIGHUP reload); the format needs
//! a restart.

use std::{io::IsTerminal, sync::OnceLock};

use tracing_subscriber::{
    fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry,
};

use crate::config::{LogFormat, LogSettings};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the
/// configured filter. Calling it twice keeps the first subscriber.
pub fn init(settings: &LogSettings) {
    let filter = rust_log()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&settings.filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let installed = match settings.format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the log filter (config reload). `RUST_LOG`, when set, still wins.
pub fn set_filter(filter: &str) -> Result<(), String> {
    if rust_log().is_some() {
        return Ok(());
    }
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    match FILTER.get() {
        Some(handle) => handle.reload(filter).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// `RUST_LOG`, unless unset or empty.
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
}
