//! Which process holds a TCP client's socket: a TCP connection carries no
//! pid, but the client's socket has an inode (the kernel's socket lookup
//! reports it with the owning uid), and the process that opened it has a
//! descriptor `socket:[inode]` in `/proc/PID/fd`.
//!
//! Only processes whose `/proc/PID` belongs to the socket's uid (or to
//! root, which is how a process that is not dumpable shows) are searched.
//! A socket held by more than one process (inherited across `fork`) names
//! no single workload: nothing is attributed.

use std::{fs, os::unix::fs::MetadataExt};

use super::process::Pinned;

/// The one process holding socket `inode`, pinned, or why there is none.
pub fn holder(inode: u64, uid: u32, accepted_ticks: u64) -> Result<Pinned, String> {
    if inode == 0 {
        return Err("the kernel reported no inode for the client's socket".into());
    }
    let target = format!("socket:[{inode}]");
    let mut holders = Vec::new();
    let entries = fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let owner = entry.metadata().map(|m| m.uid()).unwrap_or(u32::MAX);
        if owner != uid && owner != 0 {
            continue;
        }
        if let Some(fd) = fd_holding(pid, &target) {
            holders.push((pid, fd));
            if holders.len() > 1 {
                return Err(format!(
                    "the client's socket is held by more than one process (pids {} and {})",
                    holders[0].0, holders[1].0
                ));
            }
        }
    }
    let Some((pid, fd)) = holders.pop() else {
        return Err("no process visible to this daemon holds the client's socket".into());
    };
    let pinned = Pinned::open(pid, accepted_ticks)?;
    // Between the search and the pidfd the pid could have been reused: the
    // pinned process must be the one holding the socket.
    if !fd_links_to(pid, fd, &target) {
        return Err(format!("pid {pid} no longer holds the client's socket"));
    }
    Ok(pinned)
}

fn fd_holding(pid: i32, target: &str) -> Option<u64> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    dir.flatten().find_map(|entry| {
        let fd = entry.file_name().to_str()?.parse::<u64>().ok()?;
        fd_links_to(pid, fd, target).then_some(fd)
    })
}

fn fd_links_to(pid: i32, fd: u64, target: &str) -> bool {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).is_ok_and(|link| link.as_os_str() == target)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::attest::process::boottime_ticks;

    /// A socket this process holds is found, as this process.
    #[test]
    fn finds_the_process_holding_a_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
        let inode = fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let me = nix::unistd::geteuid().as_raw();
        let started = std::time::Instant::now();
        let pinned = holder(inode, me, boottime_ticks().unwrap()).unwrap();
        let searched = started.elapsed();
        let started = std::time::Instant::now();
        let attested = crate::attest::Attestation::of_pinned(Ok(pinned), me);
        println!(
            "TCP peer: socket holder found among {} processes in {searched:?}; /proc read and confirmed in {:?}",
            fs::read_dir("/proc").unwrap().count(),
            started.elapsed()
        );
        assert_eq!(
            attested.workload().map(|w| w.pid),
            Some(std::process::id() as i32)
        );
        let pinned = holder(inode, me, boottime_ticks().unwrap()).unwrap();
        assert_eq!(pinned.pid().unwrap(), std::process::id() as i32);
        assert!(holder(0, me, 0).is_err());
        assert!(holder(u64::MAX, me, boottime_ticks().unwrap())
            .unwrap_err()
            .contains("no process"));
    }
}
