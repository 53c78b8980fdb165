//! Which Kubernetes pod a connection comes from: the node's pod list, read
//! from the kubelet, and the cluster's service accounts, read from the API
//! server, turned into [`Pod`] values the attestation and the policy use.
//!
//! [`PodDirectory`] keeps the last pod list and answers lookups by pod UID
//! (a process's cgroup names it, [`crate::attest`]) or by IP (a pod's
//! source address). A miss refetches, but many concurrent misses share one
//! fetch, fetches are at least `min_fetch_interval` apart however many
//! lookups miss, and a lookup for a pod the kubelet does not list yet keeps
//! trying for `start_race_budget` (a container can connect before its pod
//! shows up in the list). Nothing here trusts a caller: a UID, container ID
//! or IP is only ever looked up, never believed.

mod directory;
mod http;
pub mod names;
mod pod_list;

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

pub use directory::{PodDirectory, POD_IP_MAX_AGE};
pub use pod_list::{parse_pod_list, ParsedPods};

/// One pod of the node, as the kubelet listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// The pod's UID, lower case with dashes.
    pub uid: String,
    /// `spec.serviceAccountName` (Kubernetes fills in `default`).
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` (and `status.podIP`).
    pub pod_ips: Vec<IpAddr>,
    /// The pod shares the node's network namespace: its IPs are the node's.
    pub host_network: bool,
    /// IDs of its containers (regular, init and ephemeral) the runtime has
    /// started, without the `containerd://` style prefix.
    pub containers: Vec<String>,
    /// `status.phase` is `Running`.
    pub running: bool,
}

impl Pod {
    /// `namespace/service-account`, as `k8s_service_accounts` names it.
    pub fn service_account_ref(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

/// `k8s=payments/api-sa pod=payments/api-7f9c`: what was attested, for logs.
impl fmt::Display for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "k8s={}/{} pod={}/{}",
            self.namespace, self.service_account, self.namespace, self.name
        )
    }
}

/// Why a pod (or a service account's annotations) could not be looked up.
/// Messages say what to check; they never hold the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PodLookupError {
    /// The kubelet or the API server could not be reached or timed out.
    #[error("{url} cannot be reached: {message}")]
    Unavailable { url: String, message: String },
    /// It answered with an error status.
    #[error("{url} answered HTTP {status}{hint}")]
    Refused {
        url: String,
        status: u16,
        hint: &'static str,
    },
    /// It answered something that is not what it should send.
    #[error("{url} sent an answer that cannot be used: {message}")]
    InvalidAnswer { url: String, message: String },
    /// The service-account token could not be read.
    #[error("cannot read the service-account token {path}: {message}")]
    Token { path: String, message: String },
    /// No pod with this UID, even after waiting for a starting one.
    #[error("the kubelet lists no pod with UID {uid} (looked for {}ms)", .waited.as_millis())]
    UnknownPod { uid: String, waited: Duration },
    /// The pod is listed, but not the container its cgroup names.
    #[error(
        "pod {namespace}/{name} has no container {container_id} (looked for {}ms)",
        .waited.as_millis()
    )]
    UnknownContainer {
        namespace: String,
        name: String,
        container_id: String,
        waited: Duration,
    },
    /// No running pod has this IP.
    #[error("no running pod has IP {ip}")]
    UnknownIp { ip: IpAddr },
    /// Several pods have this IP (hostNetwork pods share the node's): it
    /// names none of them.
    #[error("{}", shared_ip_text(*.ip, *.pods, *.host_network))]
    SharedIp {
        ip: IpAddr,
        pods: usize,
        host_network: bool,
    },
    /// A namespace or service-account name that is not a Kubernetes name.
    #[error("{0:?} is not a valid Kubernetes name")]
    InvalidName(String),
}

/// [`PodLookupError::SharedIp`]'s message; one hostNetwork pod alone on an
/// address is not "shared by 1 pods".
fn shared_ip_text(ip: IpAddr, pods: usize, host_network: bool) -> String {
    match (pods, host_network) {
        (1, true) => format!(
            "IP {ip} is a hostNetwork pod's, that is the node's address; it names no single pod"
        ),
        (_, true) => {
            format!("IP {ip} is shared by {pods} pods (hostNetwork); it names no single pod")
        }
        _ => format!("IP {ip} is shared by {pods} pods; it names no single pod"),
    }
}
