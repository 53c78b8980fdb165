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

use std::{fmt, path::Path, sync::Arc, time::Duration};

pub use cgroup::{CgroupInfo, PodRef};
use process::Pinned;

use crate::kubernetes::{Pod, PodDirectory};

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
    /// That pod as the kubelet lists it (namespace, service account,
    /// labels), once looked up and its container confirmed; what the
    /// `k8s_*` rules match.
    pub k8s_pod: Option<Arc<Pod>>,
    /// Why the pod the cgroup names could not be looked up (kubelet down,
    /// unknown pod or container, no `[kubernetes]`); for denials.
    pub k8s_unattested: Option<String>,
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
        Self::of_pinned_in(pinned, uid, Path::new("/proc"))
    }

    /// As [`Attestation::of_pinned`], reading the `/proc` mounted at
    /// `proc_root` (the host's, in a pod without `hostPID`).
    pub fn of_pinned_in(pinned: Result<Pinned, String>, uid: u32, proc_root: &Path) -> Attestation {
        match pinned.and_then(|p| confirm(&p, uid, proc_root)) {
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

    /// With the pod its cgroup names looked up in `pods` (waiting at most
    /// `wait`). A lookup that fails leaves the workload without `k8s_pod`,
    /// noting why: its other selectors and its uid still count. The pod
    /// is trusted only as the kubelet lists it, and only when the cgroup's
    /// container is one of the pod's containers.
    pub async fn with_pod(self, pods: Option<&PodDirectory>, wait: Duration) -> Attestation {
        let Attestation::Confirmed(mut workload) = self else {
            return self;
        };
        let Some(pod) = &workload.pod else {
            return Attestation::Confirmed(workload);
        };
        let Some(pods) = pods else {
            workload.k8s_unattested = Some("no [kubernetes] section is configured".into());
            return Attestation::Confirmed(workload);
        };
        let lookup = pods.by_uid(&pod.uid, pod.container_id.as_deref());
        match tokio::time::timeout(wait, lookup).await {
            Ok(Ok(found)) => workload.k8s_pod = Some(found),
            Ok(Err(error)) => workload.k8s_unattested = Some(error.to_string()),
            Err(_) => {
                workload.k8s_unattested = Some(format!(
                    "the pod lookup took longer than {}ms",
                    wait.as_millis()
                ))
            }
        }
        Attestation::Confirmed(workload)
    }

    pub fn workload(&self) -> Option<&Workload> {
        match self {
            Attestation::Confirmed(w) => Some(w),
            Attestation::Unconfirmed(_) => None,
        }
    }
}

fn confirm(pinned: &Pinned, uid: u32, proc_root: &Path) -> Result<Workload, String> {
    let facts = pinned.read_in(proc_root)?;
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
        k8s_pod: None,
        k8s_unattested: None,
    })
}

/// `gids=1000,27 unit=nginx.service`, or for a pod
/// `gids=0 k8s=payments/api-sa pod=payments/api-7f9c` (or
/// `gids=0 pod=<uid> k8s=unattested (why)`): the attested selectors, for
/// logs and denials (each value is quoted by the caller's log formatter
/// where it is foreign text).
impl fmt::Display for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attestation::Unconfirmed(why) => write!(f, "unattested ({why})"),
            Attestation::Confirmed(w) => {
                let gids: Vec<String> = w.gids.iter().map(u32::to_string).collect();
                write!(f, "gids={}", gids.join(","))?;
                // A container's scope (`cri-containerd-<id>.scope`) says
                // less than its pod, and would crowd it out of a log field.
                if let (Some(unit), None) = (&w.systemd_unit, &w.pod) {
                    write!(f, " unit={unit}")?;
                }
                match (&w.k8s_pod, &w.pod) {
                    (Some(found), _) => write!(f, " {found}")?,
                    (None, Some(pod)) => {
                        write!(f, " pod={}", pod.uid)?;
                        if let Some(why) = &w.k8s_unattested {
                            write!(f, " k8s=unattested ({why})")?;
                        }
                    }
                    (None, None) => {}
                }
                Ok(())
            }
        }
    }
}
