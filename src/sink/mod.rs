//! Token files (`[[sinks]]`): for programs that can only read a token from
//! a file (nginx, Envoy, shell scripts, cron jobs), the broker keeps one
//! (identity, audience) ID token or (identity, scopes) access token in a
//! file, replaced atomically at every refresh from the same cache, and runs
//! an optional hook after each write.
//!
//! Each sink is one task holding a watch on its cache entry, so the entry is
//! kept fresh and never idle-evicted. When no new token comes (an outage),
//! the last file stays while its token is valid and is removed when it
//! expires: readers fail closed instead of sending an expired token. A sink
//! removed from the config by a reload has its file removed; on stop, files
//! stay (their tokens are valid until they expire, and a restart rewrites
//! them).

mod file;
mod hook;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::task::JoinHandle;

use crate::{
    cache::{CacheError, CacheKey, TokenCache},
    clock::Clock,
    config::{RefreshSettings, SinkSettings},
    domain::LogText,
    source::access::AccessOf,
    token::{AccessToken, IdToken},
};
pub use file::{render, write_atomically, Ownership, SinkToken};
pub use hook::Hook;

/// A sink's settings, resolved for running.
#[derive(Debug)]
struct Sink {
    settings: SinkSettings,
    key: CacheKey,
    owner: Ownership,
    hook: Hook,
}

impl Sink {
    /// Resolves validated settings (names to ids, the hook).
    fn resolve(settings: &SinkSettings) -> Result<Sink, String> {
        let key = match &settings.audience {
            Some(audience) if settings.scopes.is_empty() => {
                CacheKey::new(&settings.identity, audience).map_err(|e| e.to_string())?
            }
            _ => CacheKey::access(
                &settings.identity,
                AccessOf::Identity,
                &settings.scopes.join(" "),
            )?,
        };
        let owner = Ownership {
            uid: settings
                .owner
                .as_ref()
                .map(|p| p.resolve_user())
                .transpose()?,
            gid: settings
                .group
                .as_ref()
                .map(|p| p.resolve_group())
                .transpose()?,
        };
        let hook = match (&settings.signal, &settings.pid_file) {
            (Some(signal), Some(pid_file)) => Hook::Signal {
                signal: signal
                    .parse()
                    .map_err(|_| format!("{signal:?} is not a signal"))?,
                pid_file: pid_file.clone(),
            },
            _ if !settings.on_refresh.is_empty() => Hook::Command {
                argv: settings.on_refresh.clone(),
                timeout: settings.on_refresh_timeout,
            },
            _ => Hook::None,
        };
        Ok(Sink {
            settings: settings.clone(),
            key,
            owner,
            hook,
        })
    }

    fn path(&self) -> &std::path::Path {
        &self.settings.path
    }

    /// The ID token's audience, for log lines.
    fn audience(&self) -> Option<&str> {
        (!self.settings.is_access()).then(|| self.key.audience())
    }

    /// The access token's scopes (sorted, space-separated), for log lines.
    fn scopes(&self) -> Option<&str> {
        self.key.scopes()
    }

    /// Writes `token` to the file, then runs the hook.
    async fn deliver(&self, token: &SinkToken) -> Result<(), String> {
        let s = &self.settings;
        let scopes = self.scopes().unwrap_or_default();
        let content = render(s.format, s.env_name(), &s.identity, scopes, token);
        let (path, mode, owner) = (s.path.clone(), self.settings.mode_bits(), self.owner);
        tokio::task::spawn_blocking(move || {
            // Checked at every write, like the socket's directory: no user
            // but root and the daemon's may own or write any directory on the
            // way, or they could swap the file its reader trusts.
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return Err("not a file path".to_owned());
            };
            let dir = crate::domain::trusted_path::resolve(dir)
                .map_err(|e| format!("the directory is not safe for a token file: {e}"))?;
            write_atomically(&dir.join(name), content.as_bytes(), mode, owner)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("writer task failed: {e}"))?
        .map_err(|e| format!("cannot write {}: {e}", s.path.display()))?;
        tracing::info!(
            sink = %s.path.display(), identity = %s.identity, audience = self.audience(),
            scopes = self.scopes(),
            expire_time = %humantime::format_rfc3339_seconds(token.expires_at()),
            "token file written"
        );
        match self.hook.run(&s.path).await {
            Ok(done) if done.is_empty() => {}
            // The hook's own stderr is foreign text: quoted and capped.
            Ok(done) => tracing::info!(
                sink = %s.path.display(), hook = LogText::new(&done).as_str(), "sink hook ran"
            ),
            Err(why) => tracing::warn!(
                sink = %s.path.display(), error = LogText::new(&why).as_str(), "sink hook failed"
            ),
        }
        Ok(())
    }

    /// Fail closed: a token that expired with no replacement leaves no file.
    async fn expire(&self) {
        let path = self.settings.path.clone();
        let removed = tokio::task::spawn_blocking(move || file::remove(&path)).await;
        match removed {
            Ok(Ok(())) => tracing::warn!(
                sink = %self.path().display(), identity = %self.settings.identity,
                audience = self.audience(), scopes = self.scopes(),
                "the token expired and no new one could be had: token file removed"
            ),
            Ok(Err(e)) => tracing::error!(
                sink = %self.path().display(), error = %e,
                "the token expired but its file could not be removed"
            ),
            Err(e) => {
                tracing::error!(sink = %self.path().display(), error = %e, "remover task failed")
            }
        }
    }
}

/// The running sinks.
pub struct SinkSet {
    cache: TokenCache,
    clock: Clock,
    retry: (Duration, Duration),
    running: Vec<(SinkSettings, JoinHandle<()>)>,
}

impl SinkSet {
    /// Starts a task for each sink. Settings must have passed validation.
    pub fn start(
        cache: TokenCache,
        clock: Clock,
        refresh: &RefreshSettings,
        sinks: &[SinkSettings],
    ) -> SinkSet {
        let mut set = SinkSet {
            cache,
            clock,
            retry: (refresh.retry_initial, refresh.retry_max),
            running: Vec::new(),
        };
        for settings in sinks {
            set.spawn(settings);
        }
        set
    }

    fn spawn(&mut self, settings: &SinkSettings) {
        match Sink::resolve(settings) {
            Ok(sink) => {
                let task = tokio::spawn(run(
                    Arc::new(sink),
                    self.cache.clone(),
                    self.clock.clone(),
                    self.retry,
                ));
                self.running.push((settings.clone(), task));
            }
            Err(why) => tracing::error!(
                sink = %settings.path.display(), error = %why,
                "sink not started"
            ),
        }
    }

    /// Applies a reloaded `[[sinks]]`: unchanged sinks keep running, changed
    /// ones restart, removed ones stop and their files are removed.
    pub fn reload(&mut self, refresh: &RefreshSettings, sinks: &[SinkSettings]) {
        self.retry = (refresh.retry_initial, refresh.retry_max);
        let mut kept = Vec::new();
        for (settings, task) in self.running.drain(..) {
            if sinks.contains(&settings) {
                kept.push((settings, task));
                continue;
            }
            task.abort();
            let still_written = sinks.iter().any(|s| s.path == settings.path);
            if !still_written {
                if let Err(e) = file::remove(&settings.path) {
                    tracing::warn!(sink = %settings.path.display(), error = %e, "could not remove the file of a removed sink");
                }
            }
        }
        self.running = kept;
        let new: Vec<SinkSettings> = sinks
            .iter()
            .filter(|s| !self.running.iter().any(|(r, _)| r == *s))
            .cloned()
            .collect();
        for settings in &new {
            self.spawn(settings);
        }
    }

    /// The paths being kept.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.running.iter().map(|(s, _)| s.path.clone()).collect()
    }

    /// Stops every sink; files stay until their tokens expire.
    pub fn stop(&mut self) {
        for (_, task) in self.running.drain(..) {
            task.abort();
        }
    }
}

impl Drop for SinkSet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One sink's life: watch the cache entry, write each new token, remove the
/// file when its token expires without a successor.
async fn run(
    sink: Arc<Sink>,
    cache: TokenCache,
    clock: Clock,
    (initial, max): (Duration, Duration),
) {
    let mut written: Option<SinkToken> = None;
    let mut backoff = initial;
    loop {
        let watched = Feed::open(&cache, &sink).await;
        let (first, mut receiver) = match watched {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(
                    sink = %sink.path().display(), identity = %sink.settings.identity,
                    audience = sink.audience(), scopes = sink.scopes(), error = %e,
                    retry_in = ?backoff,
                    "no token for the sink; the last file stays until its token expires"
                );
                let retry_at = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(max);
                wait_or_expire(&sink, &clock, &mut written, retry_at).await;
                continue;
            }
        };
        backoff = initial;
        let mut pending = Some(first);
        loop {
            if let Some(token) = pending
                .take()
                .filter(|t| !clock.until(t.expires_at()).is_zero())
            {
                let fresh = written.as_ref().is_none_or(|w| !w.same_token_as(&token));
                if fresh {
                    match sink.deliver(&token).await {
                        Ok(()) => written = Some(token),
                        Err(why) => {
                            tracing::error!(sink = %sink.path().display(), error = %why, retry_in = ?backoff, "token file not written");
                            let retry_at = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(max);
                            wait_or_expire(&sink, &clock, &mut written, retry_at).await;
                            pending = Some(token);
                            continue;
                        }
                    }
                    backoff = initial;
                }
            }
            let expiry = written.as_ref().map(|t| clock.deadline_for(t.expires_at()));
            tokio::select! {
                changed = receiver.changed() => match changed {
                    Ok(token) => pending = token,
                    // The entry is gone (identity removed or changed by a
                    // reload): watch again.
                    Err(_) => break,
                },
                () = sleep_until_opt(expiry) => {
                    sink.expire().await;
                    written = None;
                    break;
                }
            }
        }
    }
}

/// A sink's watch on its cache entry, of either kind.
enum Feed {
    Id(tokio::sync::watch::Receiver<Option<IdToken>>),
    Access(tokio::sync::watch::Receiver<Option<AccessToken>>),
}

impl Feed {
    /// The current token and a watch for the next ones.
    async fn open(cache: &TokenCache, sink: &Sink) -> Result<(SinkToken, Feed), CacheError> {
        if sink.settings.is_access() {
            let (lookup, receiver) = cache.watch_access(&sink.key, Duration::ZERO).await?;
            Ok((SinkToken::Access(lookup.token), Feed::Access(receiver)))
        } else {
            let (lookup, receiver) = cache.watch(&sink.key, Duration::ZERO).await?;
            Ok((SinkToken::Id(lookup.token), Feed::Id(receiver)))
        }
    }

    /// The next token published (or `None` when the entry was emptied);
    /// an error when the entry is gone.
    async fn changed(&mut self) -> Result<Option<SinkToken>, tokio::sync::watch::error::RecvError> {
        match self {
            Feed::Id(receiver) => {
                receiver.changed().await?;
                Ok(receiver.borrow_and_update().clone().map(SinkToken::Id))
            }
            Feed::Access(receiver) => {
                receiver.changed().await?;
                Ok(receiver.borrow_and_update().clone().map(SinkToken::Access))
            }
        }
    }
}

/// Sleeps until `retry_at`, removing the file if its token expires first.
async fn wait_or_expire(
    sink: &Sink,
    clock: &Clock,
    written: &mut Option<SinkToken>,
    retry_at: tokio::time::Instant,
) {
    if let Some(token) = written {
        let expiry = clock.deadline_for(token.expires_at());
        if expiry <= retry_at {
            tokio::time::sleep_until(expiry).await;
            sink.expire().await;
            *written = None;
        }
    }
    tokio::time::sleep_until(retry_at).await;
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
