//! Real pod networks for the tests: a network namespace joined to the
//! host's by a veth pair, as a CNI plugin makes one for every pod. The pod
//! side gets an address of a private /30 and a default route through the
//! host side, so a process run inside (`ip netns exec`) reaches the host's
//! addresses from its own pod IP, and the broker sees that IP as the
//! connection's source. Removed on drop (deleting the namespace deletes
//! the pair). Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip`;
//! [`PodNetwork::create`] says why not where the kernel refuses.

use std::{
    net::Ipv4Addr,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One pod's network namespace.
pub struct PodNetwork {
    pub name: String,
    host_link: String,
    /// The host side of the pair: the node address the pod reaches.
    pub host_ip: Ipv4Addr,
    /// The pod's own address (its `podIP`).
    pub pod_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl PodNetwork {
    /// A new namespace with a veth pair on a /30 of 10.(200+pid%50).n.0/24
    /// that no other test process uses. `Err` names why it could not be
    /// made (the caller skips with it).
    pub fn create() -> Result<PodNetwork, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let second = 200 + (pid % 50) as u8;
        let third = (n / 64) as u8;
        let base = ((n % 64) * 4) as u8;
        let host_ip = Ipv4Addr::new(10, second, third, base + 1);
        let pod_ip = Ipv4Addr::new(10, second, third, base + 2);
        // Interface names are at most 15 bytes.
        let tag = format!("{:x}{n}", pid % 0xfffff);
        let network = PodNetwork {
            name: format!("tb-pod-{tag}"),
            host_link: format!("tbh{tag}"),
            host_ip,
            pod_ip,
        };
        let pod_link = format!("tbp{tag}");
        ip(&["netns", "add", &network.name])?;
        // From here on, drop removes what was made.
        let host_cidr = format!("{host_ip}/30");
        let pod_cidr = format!("{pod_ip}/30");
        let host_ip_text = host_ip.to_string();
        ip(&[
            "link",
            "add",
            &network.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &pod_link,
        ])?;
        ip(&["link", "set", &pod_link, "netns", &network.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &network.host_link])?;
        ip(&["link", "set", &network.host_link, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &network.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &pod_cidr, "dev", &pod_link])?;
        inside(&["link", "set", &pod_link, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&["route", "add", "default", "via", &host_ip_text])?;
        // Strict reverse-path filtering on the host side, as CNI plugins
        // set it: a packet whose source is not this pod's is dropped.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{}/rp_filter", network.host_link),
            "1",
        );
        Ok(network)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .env_clear();
        for key in ["PATH", "HOME", "LANG"] {
            if let Ok(value) = std::env::var(key) {
                command.env(key, value);
            }
        }
        command
    }

    /// Adds `address` to the pod side too (a pod spoofing another's IP).
    pub fn add_pod_address(&self, address: Ipv4Addr) -> Result<(), String> {
        let pod_link = format!("tbp{}", &self.host_link[3..]);
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            &pod_link,
        ])
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        // Gone with the namespace; this only cleans up a half-made one.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
    }
}
