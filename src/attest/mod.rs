//! Workload attestation: which process is on the other end of a connection,
//! in the terms policy rules speak (supplementary groups, executable,
//! systemd unit, Kubernetes pod), read once per connection from `/proc` and
//! confirmed to belong to the connecting process ([`process`]).
//!
//! The uid stays what the kernel recorded at `connect()`; what is read here
//! adds to it. When the read cannot be confirmed (the client exited, its pid
//! was reused, its socket is shared, `/proc` is hidden), the connection has
//! no attested selectors, and rules that need one do not match it.

pub mod cgroup;
pub mod process;
pub mod socket_owner;

use std::fmt;

pub use cgroup::{CgroupInfo, PodRef};
use process::Pinned;

/// A confirmed workload: what `/proc` said about the connecting process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub pid: i32,
    /// Every gid the process holds: its effective gid and its supplementary
    /// groups.
    pub gids: Vec<u32>,
    /// The executable's path (`/proc/PID/exe`), when readable.
    pub exe: Option<String>,
    /// The systemd unit its cgroup lies in.
    pub systemd_unit: Option<String>,
    /// The Kubernetes pod its cgroup names.
    pub pod: Option<PodRef>,
}

/// The outcome of attesting one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attestation {
    Confirmed(Workload),
    /// Why no selectors could be confirmed; for logs and denials.
    Unconfirmed(String),
}

impl Attestation {
    /// A Unix-socket peer pinned at accept, whose kernel-recorded uid is
    /// `uid`. Blocks on `/proc`.
    pub fn of_pinned(pinned: Result<Pinned, String>, uid: u32) -> Attestation {
        match pinned.and_then(|p| confirm(&p, uid)) {
            Ok(workload) => Attestation::Confirmed(workload),
            Err(why) => Attestation::Unconfirmed(why),
        }
    }

    /// A TCP peer whose socket, inode `inode`, the kernel says `uid` owns;
    /// `accepted_ticks` from [`process::boottime_ticks`] at accept. Blocks on
    /// `/proc`.
    pub fn of_tcp_socket(inode: u64, uid: u32, accepted_ticks: u64) -> Attestation {
        Self::of_pinned(socket_owner::holder(inode, uid, accepted_ticks), uid)
    }

    pub fn workload(&self) -> Option<&Workload> {
        match self {
            Attestation::Confirmed(w) => Some(w),
            Attestation::Unconfirmed(_) => None,
        }
    }
}

fn confirm(pinned: &Pinned, uid: u32) -> Result<Workload, String> {
    let facts = pinned.read()?;
    // A process that changed its user since it connected is not described
    // by what the kernel recorded at connect.
    if facts.effective_uid != uid {
        return Err(format!(
            "pid {} now runs as uid {}, not the uid {uid} it connected as",
            facts.pid, facts.effective_uid
        ));
    }
    Ok(Workload {
        pid: facts.pid,
        gids: facts.gids,
        exe: facts.exe,
        systemd_unit: facts.cgroup.systemd_unit,
        pod: facts.cgroup.pod,
    })
}

/// `gids=1000,27 exe=/usr/bin/x unit=nginx.service pod=<uid>`: the
/// attested selectors, for logs and denials (each value is quoted by the
/// caller's log formatter where it is foreign text).
impl fmt::Display for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attestation::Unconfirmed(why) => write!(f, "unattested ({why})"),
            Attestation::Confirmed(w) => {
                let gids: Vec<String> = w.gids.iter().map(u32::to_string).collect();
                write!(f, "gids={}", gids.join(","))?;
                if let Some(unit) = &w.systemd_unit {
                    write!(f, " unit={unit}")?;
                }
                if let Some(pod) = &w.pod {
                    write!(f, " pod={}", pod.uid)?;
                }
                Ok(())
            }
        }
    }
}
