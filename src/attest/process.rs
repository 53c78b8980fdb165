//! Reading one process's attributes from `/proc` without being fooled by
//! pid reuse.
//!
//! A pid names a process only while it lives: once the client exits and is
//! reaped, the kernel may give its pid to another process, and `/proc/PID`
//! then describes that one. So the process is pinned by a pidfd taken when
//! the connection is accepted (from the socket itself, `SO_PEERPIDFD`, which
//! names exactly the process that called `connect`; or `pidfd_open` on the
//! pid the kernel recorded), and after `/proc/PID` is read the pidfd must
//! still be alive (a pid is not reused before its process has exited and
//! been reaped) and the start time in `/proc/PID/stat` unchanged from
//! before the reads. A process that started after the connection was
//! accepted cannot be its client. This is the check SPIRE's peer tracker
//! makes, with a pidfd instead of a `/proc` directory handle.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use super::cgroup::CgroupInfo;

/// `SO_PEERPIDFD` (Linux 6.5): the peer's pidfd (asm-generic value, as on
/// x86-64 and arm64). Older kernels answer ENOPROTOOPT.
const SO_PEERPIDFD: libc::c_int = 77;

/// A process pinned at accept.
#[derive(Debug)]
pub struct Pinned {
    pidfd: OwnedFd,
    /// `CLOCK_BOOTTIME` at accept, in clock ticks: the unit of a process's
    /// start time in `/proc/PID/stat`.
    accepted_ticks: u64,
}

/// What `/proc` said about a pinned process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: i32,
    pub effective_uid: u32,
    /// Effective gid, then the supplementary groups (`Groups:`).
    pub gids: Vec<u32>,
    pub exe: Option<String>,
    pub cgroup: CgroupInfo,
}

impl Pinned {
    /// The peer of a Unix socket: its own pidfd when the kernel gives one,
    /// else `pidfd_open` of the pid SO_PEERCRED recorded. System calls
    /// only, no file reads: cheap enough for an accept loop.
    pub fn unix_peer(socket: &impl AsFd, pid: Option<i32>) -> Result<Pinned, String> {
        let accepted_ticks = boottime_ticks()?;
        if let Some(pidfd) = peer_pidfd(socket)? {
            return Ok(Pinned {
                pidfd,
                accepted_ticks,
            });
        }
        // A kernel before 6.5: the pid is pinned now, and a process that
        // took it after the client exited must have started after accept
        // to be caught (see `read`).
        let pid = pid.filter(|p| *p > 0).ok_or("the kernel recorded no pid")?;
        Self::open(pid, accepted_ticks)
    }

    /// `pid`, pinned now; `accepted_ticks` from [`boottime_ticks`] at accept.
    pub fn open(pid: i32, accepted_ticks: u64) -> Result<Pinned, String> {
        // SAFETY: a plain syscall with integer arguments; on success it
        // returns a new descriptor we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(format!(
                "pidfd_open({pid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is a fresh descriptor returned by the kernel.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Pinned {
            pidfd,
            accepted_ticks,
        })
    }

    /// The pinned process's pid in our pid namespace.
    pub fn pid(&self) -> Result<i32, String> {
        pidfd_pid(&self.pidfd, Path::new("/proc"))
    }

    /// Whether the pinned process has not exited.
    pub fn alive(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready == 0
    }

    /// Reads the process's attributes and confirms they are its own: it
    /// was alive and unchanged from before the first read to after the
    /// last, and it started before the connection was accepted.
    pub fn read(&self) -> Result<ProcessFacts, String> {
        self.read_in(Path::new("/proc"))
    }

    /// As [`Pinned::read`], through the `/proc` mounted at `proc_root`. A
    /// daemon in a pod without `hostPID` reads the host's `/proc` (mounted
    /// e.g. at `/host/proc`): the pidfd's `Pid:` read through that mount is
    /// the client's pid in the host's namespace, and its entries are the
    /// client's, though our own `/proc` cannot see it.
    pub fn read_in(&self, proc_root: &Path) -> Result<ProcessFacts, String> {
        let pid = pidfd_pid(&self.pidfd, proc_root)?;
        let dir = format!("{}/{pid}", proc_root.display());
        if !self.alive() {
            return Err("the client exited before it could be attested".into());
        }
        let started = start_ticks(&dir)?;
        if started > self.accepted_ticks {
            return Err(format!(
                "pid {pid} started after the connection was accepted: it is not the client"
            ));
        }
        let status = fs::read_to_string(format!("{dir}/status"))
            .map_err(|e| format!("{dir}/status: {e}"))?;
        let (effective_uid, gids) = ids_of_status(&status)
            .ok_or_else(|| format!("{dir}/status has no Uid/Gid/Groups lines"))?;
        let exe = fs::read_link(format!("{dir}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let cgroup = fs::read_to_string(format!("{dir}/cgroup"))
            .map_err(|e| format!("{dir}/cgroup: {e}"))?;
        let cgroup = CgroupInfo::parse(&cgroup);
        if start_ticks(&dir)? != started || !self.alive() {
            return Err("the client exited while it was attested".into());
        }
        Ok(ProcessFacts {
            pid,
            effective_uid,
            gids,
            exe,
            cgroup,
        })
    }
}

/// The socket's peer pidfd (`SO_PEERPIDFD`); `None` on a kernel without
/// it. Any other failure (the client has exited and been reaped) is final:
/// falling back to its pid could pin whichever process has it now.
fn peer_pidfd(socket: &impl AsFd) -> Result<Option<OwnedFd>, String> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd and len are valid for writes of the sizes given.
    let result = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if result == 0 && fd >= 0 {
        // SAFETY: on success fd is a new descriptor we own.
        return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENOPROTOOPT) => Ok(None),
        Some(libc::ESRCH) => Err("the client exited before it could be attested".into()),
        _ => Err(format!("SO_PEERPIDFD: {error}")),
    }
}

/// The pid a pidfd names in our pid namespace (`Pid:` of its fdinfo):
/// `-1` once the process has exited, `0` outside our namespace.
fn pidfd_pid(pidfd: &OwnedFd, proc_root: &Path) -> Result<i32, String> {
    // `self` in a /proc is this process as that /proc's pid namespace
    // sees it, and the kernel writes `Pid:` in that namespace too.
    let path = format!("{}/self/fdinfo/{}", proc_root.display(), pidfd.as_raw_fd());
    let info = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse::<i32>().ok())
        .ok_or_else(|| format!("{path} has no Pid line"))?;
    match pid {
        p if p > 0 => Ok(p),
        -1 => Err("the client exited before it could be attested".into()),
        _ => Err("the client is in a pid namespace this daemon cannot see".into()),
    }
}

/// Now, as `/proc/PID/stat` counts a start time: clock ticks since boot.
pub fn boottime_ticks() -> Result<u64, String> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is valid for writes.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return Err(format!(
            "clock_gettime(CLOCK_BOOTTIME): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(now.tv_sec as u64 * hz + now.tv_nsec as u64 * hz / 1_000_000_000)
}

/// Field 22 of `/proc/PID/stat`, counted after the command name (which
/// may itself hold spaces and parentheses).
fn start_ticks(dir: &str) -> Result<u64, String> {
    let stat = fs::read_to_string(format!("{dir}/stat")).map_err(|e| format!("{dir}/stat: {e}"))?;
    parse_start_ticks(&stat).ok_or_else(|| format!("{dir}/stat has no start time"))
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    // Fields 3.. follow the command; the start time is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The effective uid, and the effective gid followed by the supplementary
/// groups, from `/proc/PID/status`.
fn ids_of_status(status: &str) -> Option<(u32, Vec<u32>)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|n| n.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
    };
    let uid = *field("Uid:")?.get(1)?;
    let gid = *field("Gid:")?.get(1)?;
    let mut gids = vec![gid];
    for g in field("Groups:")? {
        if !gids.contains(&g) {
            gids.push(g);
        }
    }
    Some((uid, gids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t100\t200\t200\t200\n\
                      Groups:\t27 200 4001 \n";
        assert_eq!(ids_of_status(status), Some((1001, vec![200, 27, 4001])));
        assert_eq!(
            ids_of_status("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\n"),
            Some((0, vec![0]))
        );
        assert_eq!(ids_of_status("Uid:\t0\t0\t0\t0\n"), None);
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        assert_eq!(parse_start_ticks("42 (x"), None);
    }

    /// This process, pinned and read: its own uid, groups and cgroup.
    #[test]
    fn reads_a_live_process_and_refuses_one_started_after_accept() {
        let me = std::process::id() as i32;
        let pinned = Pinned::open(me, boottime_ticks().unwrap()).unwrap();
        let facts = pinned.read().unwrap();
        assert_eq!(facts.effective_uid, nix::unistd::geteuid().as_raw());
        assert_eq!(facts.gids[0], nix::unistd::getegid().as_raw());
        assert!(facts.exe.is_some());
        // "Accepted" before this process started: it cannot be the client.
        let early = Pinned::open(me, 0).unwrap();
        assert!(early.read().unwrap_err().contains("started after"));
    }

    #[test]
    fn an_exited_process_is_not_read() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pinned = Pinned::open(child.id() as i32, boottime_ticks().unwrap()).unwrap();
        child.wait().unwrap();
        assert!(!pinned.alive());
        assert!(pinned.read().unwrap_err().contains("exited"));
    }
}
