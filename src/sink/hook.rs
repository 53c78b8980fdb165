//! What runs after a sink's file is replaced, so its reader picks up the new
//! token: a command (an argv array, no shell) with a timeout, or a signal
//! to the process named by a pid file (`nginx -s reload` style consumers).
//! Its outcome is logged; it never holds the token's text.

use std::{path::Path, process::Stdio, time::Duration};

use tokio::io::AsyncReadExt;

/// Most bytes of a hook's stderr kept for the log.
const STDERR_KEPT: usize = 1024;
/// Most bytes read from a pid file.
const PID_FILE_MAX: u64 = 64;

/// The hook of one sink, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    None,
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    Signal {
        signal: nix::sys::signal::Signal,
        pid_file: std::path::PathBuf,
    },
}

impl Hook {
    /// Runs the hook for the file at `path`; returns what to log.
    pub async fn run(&self, path: &Path) -> Result<String, String> {
        match self {
            Hook::None => Ok(String::new()),
            Hook::Command { argv, timeout } => run_command(argv, *timeout, path).await,
            Hook::Signal { signal, pid_file } => send_signal(*signal, pid_file).await,
        }
    }
}

async fn run_command(argv: &[String], timeout: Duration, path: &Path) -> Result<String, String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    // A minimal, known environment: the daemon's own (which may hold
    // GOOGLE_APPLICATION_CREDENTIALS) is not passed on.
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("TOKEN_BROKER_SINK_PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let mut stderr = child.stderr.take().expect("piped");
    let outcome = tokio::time::timeout(timeout, async {
        let mut kept = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match stderr.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = STDERR_KEPT.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
        (child.wait().await, kept)
    })
    .await;
    match outcome {
        Err(_) => {
            // kill_on_drop ends it when `child` goes out of scope.
            Err(format!(
                "{program:?} did not finish within {timeout:?} and was killed"
            ))
        }
        Ok((Err(e), _)) => Err(format!("{program:?}: {e}")),
        Ok((Ok(status), stderr)) => {
            let stderr = String::from_utf8_lossy(&stderr);
            let stderr = stderr.trim();
            if status.success() {
                Ok(format!("{program:?} exited 0"))
            } else {
                Err(format!("{program:?} failed ({status}); stderr: {stderr:?}"))
            }
        }
    }
}

async fn send_signal(signal: nix::sys::signal::Signal, pid_file: &Path) -> Result<String, String> {
    let mut text = String::new();
    tokio::fs::File::open(pid_file)
        .await
        .map_err(|e| format!("pid file {}: {e}", pid_file.display()))?
        .take(PID_FILE_MAX)
        .read_to_string(&mut text)
        .await
        .map_err(|e| format!("pid file {}: {e}", pid_file.display()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 1)
        .ok_or_else(|| format!("pid file {} does not hold a process id", pid_file.display()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .map(|()| format!("sent {signal} to pid {pid}"))
        .map_err(|e| format!("cannot send {signal} to pid {pid}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_report_exit_and_are_killed_at_their_timeout() {
        let path = Path::new("/tmp/x");
        let ok = Hook::Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "test \"$TOKEN_BROKER_SINK_PATH\" = /tmp/x".into(),
            ],
            timeout: Duration::from_secs(5),
        };
        assert!(ok.run(path).await.is_ok());
        let fails = Hook::Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo nope >&2; exit 3".into(),
            ],
            timeout: Duration::from_secs(5),
        };
        let err = fails.run(path).await.unwrap_err();
        assert!(
            err.contains("exit status: 3") && err.contains("nope"),
            "{err}"
        );
        let slow = Hook::Command {
            argv: vec!["/bin/sleep".into(), "30".into()],
            timeout: Duration::from_millis(200),
        };
        let t0 = std::time::Instant::now();
        let err = slow.run(path).await.unwrap_err();
        assert!(
            err.contains("killed") && t0.elapsed() < Duration::from_secs(5),
            "{err}"
        );
    }

    #[tokio::test]
    async fn pid_files_are_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("p.pid");
        for bad in ["", "1", "0", "-5", "abc"] {
            std::fs::write(&pid_file, bad).unwrap();
            let hook = Hook::Signal {
                signal: nix::sys::signal::Signal::SIGHUP,
                pid_file: pid_file.clone(),
            };
            assert!(hook.run(dir.path()).await.is_err(), "{bad:?}");
        }
    }
}
