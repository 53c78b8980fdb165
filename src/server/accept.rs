//! What an accept loop does when `accept` fails: a failure of one
//! connection (reset before it was accepted) is skipped at once, but running
//! out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) would
//! fail again immediately, so the loop waits, doubling from 10 ms to 1 s,
//! instead of spinning a core while the condition lasts.

use std::{io, time::Duration};

use tokio::time::Instant;

const FIRST_WAIT: Duration = Duration::from_millis(10);
const MAX_WAIT: Duration = Duration::from_secs(1);
/// At most one warning per listener this often while the condition lasts.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One listener's backoff state.
#[derive(Debug)]
pub struct AcceptBackoff {
    listener: &'static str,
    wait: Duration,
    warned: Option<Instant>,
    skipped: u64,
}

impl AcceptBackoff {
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            wait: FIRST_WAIT,
            warned: None,
            skipped: 0,
        }
    }

    /// A connection was accepted: the next shortage starts from the shortest wait.
    pub fn accepted(&mut self) {
        self.wait = FIRST_WAIT;
    }

    /// Handles a failed `accept`, waiting when the process is out of resources.
    pub async fn failed(&mut self, error: &io::Error) {
        if !is_exhaustion(error) {
            tracing::debug!(listener = self.listener, %error, "accept failed for one connection");
            return;
        }
        self.skipped += 1;
        let now = Instant::now();
        if self
            .warned
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            tracing::warn!(
                listener = self.listener,
                %error,
                failures = self.skipped,
                wait_ms = self.wait.as_millis() as u64,
                "cannot accept connections: out of file descriptors or memory; waiting \
                 (raise the daemon's RLIMIT_NOFILE or lower the connection limits)"
            );
            self.warned = Some(now);
            self.skipped = 0;
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(MAX_WAIT);
    }
}

fn is_exhaustion(error: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// Warnings about connections refused at a limit, at most one per listener
/// every few seconds with the count since the last, so a flood of refused
/// connections cannot flood the log.
#[derive(Debug, Default)]
pub struct RefusalLog {
    warned: Option<Instant>,
    refused: u64,
}

impl RefusalLog {
    /// Counts one refusal; true when a warning is due now (then
    /// [`RefusalLog::take`] gives the count to report).
    pub fn due(&mut self) -> bool {
        self.refused += 1;
        let now = Instant::now();
        let due = self
            .warned
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
        if due {
            self.warned = Some(now);
        }
        due
    }

    /// Refusals since the last warning.
    pub fn take(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, so the connection
/// limits, not the descriptor limit, decide when connections are refused;
/// logs both.
pub fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(
                soft = hard,
                hard,
                was = soft,
                "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
            ),
            Err(error) => tracing::warn!(
                soft,
                hard,
                %error,
                "cannot raise the open-file limit (RLIMIT_NOFILE); keeping it"
            ),
        },
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit (RLIMIT_NOFILE)"),
        Err(error) => tracing::warn!(%error, "cannot read the open-file limit (RLIMIT_NOFILE)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn descriptor_exhaustion_waits_longer_each_time_and_resets() {
        let mut backoff = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        let started = Instant::now();
        for _ in 0..10 {
            backoff.failed(&emfile).await;
        }
        // 10+20+40+80+160+320+640+1000+1000+1000 ms
        assert_eq!(started.elapsed(), Duration::from_millis(4270));
        backoff.accepted();
        let started = Instant::now();
        backoff.failed(&emfile).await;
        assert_eq!(started.elapsed(), FIRST_WAIT);
        // One connection's failure does not wait.
        let started = Instant::now();
        backoff
            .failed(&io::Error::from(io::ErrorKind::ConnectionAborted))
            .await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
