//! Logging setup: human-readable text by default, JSON when configured,
//! always to stderr (stdout belongs to command output such as `token`).
//! The filter can be changed at run time (SIGHUP reload); the format needs
//! a restart.
//!
//! Lines are written by one thread behind a bounded queue ([`pipe`]), so a
//! request pays for formatting its audit line, not for writing it; text
//! lines are formatted by [`text`], the default format without its cost. Under a
//! flood only served-request audit lines (target [`SERVED_TARGET`]) and
//! debug/trace lines may be dropped, counted and reported; denials, errors
//! and everything else wait briefly for room.

pub mod pipe;
mod text;

use std::{io::IsTerminal, sync::OnceLock, time::Duration};

use tracing::{Level, Metadata};
use tracing_subscriber::{
    fmt::{self, MakeWriter},
    layer::SubscriberExt,
    reload,
    util::SubscriberInitExt,
    EnvFilter, Registry,
};

use pipe::{Keep, Pipe};

/// The target of audit lines for requests that were served: the only
/// info-level lines a full log queue may drop.
pub const SERVED_TARGET: &str = "token_broker::audit::served";

static PIPE: OnceLock<Pipe> = OnceLock::new();

/// Hands each event a buffer from the pipe; on drop the line is queued.
#[derive(Clone)]
struct PipeWriter(Pipe);

/// One event's line on its way into the pipe.
pub struct Line {
    pipe: Pipe,
    buffer: Vec<u8>,
    keep: Keep,
}

impl std::io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.buffer.is_empty() {
            self.pipe.send(std::mem::take(&mut self.buffer), self.keep);
        }
    }
}

impl<'a> MakeWriter<'a> for PipeWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            pipe: self.0.clone(),
            buffer: self.0.buffer(),
            keep: Keep::Always,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        let droppable = *meta.level() > Level::INFO || meta.target() == SERVED_TARGET;
        let mut line = self.make_writer();
        if droppable {
            line.keep = Keep::Droppable;
        }
        line
    }
}

/// Waits (up to 2 s) until every line logged so far is written. Call before
/// the process exits.
pub fn flush() {
    if let Some(pipe) = PIPE.get() {
        pipe.flush(Duration::from_secs(2));
    }
}

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
    let pipe = match PIPE.get() {
        Some(pipe) => pipe.clone(),
        None => match Pipe::start(pipe::CAPACITY, Box::new(std::io::stderr()), |n| {
            crate::metrics::get().log_lines_dropped.inc_by(n);
        }) {
            Ok(pipe) => PIPE.get_or_init(|| pipe).clone(),
            Err(e) => {
                eprintln!("error: cannot start the log writer thread: {e}");
                return;
            }
        },
    };
    let writer = PipeWriter(pipe);
    let installed = match settings.format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(
                fmt::layer()
                    .with_ansi(ansi)
                    .event_format(text::TextFormat::default())
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().json().flatten_event(true).with_writer(writer))
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
