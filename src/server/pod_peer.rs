//! Callers of the metadata endpoint from other network namespaces: pods
//! reaching it on a node address. Such a caller has no socket on this host
//! ([`super::loopback_peer`] finds no owner), so it is attested by its
//! source address alone: the one pod the kubelet lists with that `podIP`.
//!
//! What this trusts, and why it is refused otherwise:
//! - The source address of an established TCP connection. A pod cannot
//!   complete a handshake from an address whose answers are routed
//!   elsewhere (the SYN-ACK goes to the real holder, which resets it), and
//!   CNI plugins drop packets a pod sends with a source that is not its own
//!   (strict `rp_filter` on the host side of its veth, or the plugin's
//!   anti-spoofing). A CNI that leaves pods on one plain L2 bridge without
//!   anti-spoofing lets a pod take a neighbour's address: that is as much
//!   trust as GKE's own metadata server places in it (SECURITY.md).
//! - An address of this host itself is never a pod's: a process of the
//!   host whose uid could not be resolved must not become a hostNetwork pod
//!   that happens to be alone on the node.
//! - An address several pods share (hostNetwork pods have the node's) or
//!   no pod has is refused by the directory; a hostNetwork pod is refused
//!   here as well. hostNetwork pods are attested by their process, through
//!   the Unix socket or a loopback listener.

use std::{future::Future, net::IpAddr, pin::Pin};

use crate::{
    attest::{Attestation, PodRef, Workload},
    kubernetes::PodDirectory,
};

/// What the pod lookup answers: the caller's attestation, or why none.
pub type PodAttestFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Attestation, String>> + Send + 'a>>;

/// Finds the pod holding a source address (the kubelet's pod list).
pub trait PodAddresses: Send + Sync + 'static {
    /// The attested workload of the pod whose `podIP` is `address`, or why
    /// the caller cannot be told apart (unknown, shared, hostNetwork).
    fn attest(&self, address: IpAddr) -> PodAttestFuture<'_>;
}

/// The kubelet's pod list: the one running pod with that `podIP` (from a
/// list at most [`crate::kubernetes::POD_IP_MAX_AGE`] old,
/// since addresses are reused), never a hostNetwork one.
impl PodAddresses for PodDirectory {
    fn attest(&self, address: IpAddr) -> PodAttestFuture<'_> {
        Box::pin(async move {
            let pod = self.by_ip(address).await.map_err(|e| e.to_string())?;
            if pod.host_network {
                return Err(format!(
                    "{address} is hostNetwork pod {}/{}'s, which shares the node's address",
                    pod.namespace, pod.name
                ));
            }
            // Known by its address only: no process, so no uid, groups,
            // executable or unit; the pod is all the policy can match.
            Ok(Attestation::Confirmed(Workload {
                pid: 0,
                gids: Vec::new(),
                exe: None,
                systemd_unit: None,
                pod: Some(PodRef {
                    uid: pod.uid.clone(),
                    container_id: None,
                }),
                k8s_pod: Some(pod),
                k8s_unattested: None,
            }))
        })
    }
}

/// Attests the caller at `address`: refuses this host's own addresses, then
/// asks `pods`. Blocks briefly on `getifaddrs`; call off the accept loop.
pub async fn attest(pods: &dyn PodAddresses, address: IpAddr) -> Result<Attestation, String> {
    let address = canonical(address);
    if address.is_loopback() || address.is_unspecified() {
        return Err(format!("{address} is not a pod address"));
    }
    let local = tokio::task::spawn_blocking(move || is_local_address(address))
        .await
        .unwrap_or(true);
    if local {
        return Err(format!(
            "{address} is an address of this host, not of a pod: a hostNetwork pod or a host \
             process that is not in the pod list by IP; hostNetwork pods are attested through \
             the Unix socket"
        ));
    }
    pods.attest(address).await
}

/// An IPv4 peer on a dual-stack listener is `::ffff:a.b.c.d`.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

/// Whether `address` is assigned to an interface of this network
/// namespace. When the interfaces cannot be listed, it is treated as local
/// (refused): failing closed.
fn is_local_address(address: IpAddr) -> bool {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return true;
    };
    interfaces.into_iter().any(|interface| {
        let Some(storage) = interface.address else {
            return false;
        };
        if let Some(v4) = storage.as_sockaddr_in() {
            IpAddr::V4(v4.ip()) == address
        } else if let Some(v6) = storage.as_sockaddr_in6() {
            IpAddr::V6(v6.ip()) == address
        } else {
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Everyone;

    impl PodAddresses for Everyone {
        fn attest(&self, address: IpAddr) -> PodAttestFuture<'_> {
            Box::pin(async move { Err(format!("asked for {address}")) })
        }
    }

    #[tokio::test]
    async fn the_hosts_own_addresses_are_never_a_pods() {
        for address in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0"] {
            let refused = attest(&Everyone, address.parse().unwrap()).await;
            assert!(
                refused.as_ref().unwrap_err().contains("not a pod address"),
                "{address}: {refused:?}"
            );
        }
        // Every address on this host's interfaces is refused before the
        // directory is asked.
        for interface in nix::ifaddrs::getifaddrs().unwrap() {
            let Some(v4) = interface.address.and_then(|a| a.as_sockaddr_in().copied()) else {
                continue;
            };
            let address = IpAddr::V4(v4.ip());
            if address.is_loopback() {
                continue;
            }
            let refused = attest(&Everyone, address).await.unwrap_err();
            assert!(refused.contains("an address of this host"), "{refused}");
        }
        // Any other address is the directory's to answer.
        let elsewhere: IpAddr = "192.0.2.77".parse().unwrap();
        assert_eq!(
            attest(&Everyone, elsewhere).await.unwrap_err(),
            "asked for 192.0.2.77"
        );
    }
}
