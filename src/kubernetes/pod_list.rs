//! The kubelet's `GET /pods` answer (a v1 `PodList`), read for the few
//! fields attestation needs and checked: every other field (managedFields,
//! volumes, conditions, ...) is skipped unread, and a pod whose identifying
//! fields are malformed is left out rather than trusted.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

use super::{names, Pod};

#[derive(Deserialize)]
struct PodList {
    kind: Option<String>,
    #[serde(default)]
    items: Vec<PodObject>,
}

#[derive(Deserialize)]
struct PodObject {
    metadata: Metadata,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: Status,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Spec {
    service_account_name: Option<String>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Status {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<PodIp>,
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
struct PodIp {
    ip: String,
}

#[derive(Deserialize)]
struct ContainerStatus {
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

/// The pods of one answer, and how many were left out as malformed.
#[derive(Debug, Default)]
pub struct ParsedPods {
    pub pods: Vec<Pod>,
    /// Pods whose name, namespace, UID or service account is not a valid
    /// Kubernetes value: never matched by anything.
    pub skipped: usize,
}

/// Parses a `PodList`. An answer that is not one (not JSON, another
/// `kind`, fields of the wrong type) is an error; a pod with a malformed
/// UID, name, namespace or service account is skipped; an IP or container
/// ID that does not parse is dropped from its pod.
pub fn parse_pod_list(body: &[u8]) -> Result<ParsedPods, String> {
    let list: PodList =
        serde_json::from_slice(body).map_err(|e| format!("not a v1 PodList: {e}"))?;
    if let Some(kind) = list.kind.as_deref().filter(|k| *k != "PodList") {
        return Err(format!("kind is {:?}, not \"PodList\"", LogKind(kind)));
    }
    let mut parsed = ParsedPods::default();
    for item in list.items {
        match pod_of(item) {
            Some(pod) => parsed.pods.push(pod),
            None => parsed.skipped += 1,
        }
    }
    Ok(parsed)
}

/// A foreign `kind`, cut short for an error message.
struct LogKind<'a>(&'a str);

impl std::fmt::Debug for LogKind<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut: String = self.0.chars().take(64).collect();
        write!(f, "{cut:?}")
    }
}

fn pod_of(item: PodObject) -> Option<Pod> {
    let PodObject {
        metadata,
        spec,
        status,
    } = item;
    // Kubernetes fills in `default`; an absent field is that, an invalid
    // one is a pod we do not trust.
    let service_account = spec
        .service_account_name
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let valid = names::is_dns_label(&metadata.namespace)
        && names::is_dns_subdomain(&metadata.name)
        && names::is_pod_uid(&metadata.uid)
        && names::is_dns_subdomain(&service_account);
    if !valid {
        return None;
    }
    let labels = metadata
        .labels
        .into_iter()
        .filter(|(k, v)| names::is_label_key(k) && names::is_label_value(v))
        .collect();
    let mut pod_ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.iter().map(|p| p.ip.as_str());
    for ip in status.pod_ip.as_deref().into_iter().chain(listed) {
        if let Ok(ip) = ip.parse::<IpAddr>() {
            if !pod_ips.contains(&ip) {
                pod_ips.push(ip);
            }
        }
    }
    let containers = status
        .container_statuses
        .iter()
        .chain(&status.init_container_statuses)
        .chain(&status.ephemeral_container_statuses)
        .filter_map(|s| s.container_id.as_deref())
        .filter_map(|id| id.split_once("://").map(|(_, id)| id))
        .filter(|id| names::is_container_id(id))
        .map(str::to_owned)
        .collect();
    Some(Pod {
        namespace: metadata.namespace,
        name: metadata.name,
        uid: metadata.uid,
        service_account,
        labels,
        pod_ips,
        host_network: spec.host_network,
        containers,
        running: status.phase.as_deref() == Some("Running"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorded-shape answer the emulator's kubelet serves.
    const FIXTURE: &str = include_str!("../emulator/kubelet_pods.json");

    #[test]
    fn reads_a_real_shaped_pod_list() {
        let parsed = parse_pod_list(FIXTURE.as_bytes()).unwrap();
        assert_eq!(parsed.skipped, 0);
        assert_eq!(parsed.pods.len(), 4);
        let api = &parsed.pods[0];
        assert_eq!(api.namespace, "payments");
        assert_eq!(api.name, "api-7f9c8d6b5-x2x4q");
        assert_eq!(api.uid, "5f1c2a9e-8b7d-4e3f-a1b2-c3d4e5f60718");
        assert_eq!(api.service_account, "api-sa");
        assert_eq!(api.labels.get("app").map(String::as_str), Some("api"));
        assert_eq!(
            api.pod_ips,
            vec![
                "10.244.1.17".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::11".parse().unwrap()
            ]
        );
        assert!(api.running && !api.host_network);
        // The running container and the init container; not the OOM-killed
        // container's old ID in lastState.
        assert_eq!(
            api.containers,
            vec![
                "14c2529eb4498c5d1ffd6915d05bf58a91bdda796af59f41d480d11c099d0479".to_owned(),
                "3bc801a33ea83df414e1aeb962a52412835be99db28668ec25de73fdd4733804".to_owned(),
            ]
        );
        assert_eq!(
            api.to_string(),
            "k8s=payments/api-sa pod=payments/api-7f9c8d6b5-x2x4q"
        );
        assert!(parsed.pods[1].host_network);
        assert!(
            !parsed.pods[3].running,
            "a Succeeded job pod is not running"
        );
    }

    #[test]
    fn refuses_what_is_no_pod_list_and_skips_malformed_pods() {
        assert!(parse_pod_list(b"<html>")
            .unwrap_err()
            .contains("not a v1 PodList"));
        assert!(parse_pod_list(br#"{"kind":"Status","items":[]}"#)
            .unwrap_err()
            .contains("\"Status\""));
        assert!(parse_pod_list(br#"{"items":[{"metadata":{"labels":{"a":1}}}]}"#).is_err());
        let body = br#"{"kind":"PodList","items":[
            {"metadata":{"name":"a","namespace":"ns","uid":"not-a-uid"}},
            {"metadata":{"name":"Bad","namespace":"ns","uid":"8a7d3e1c-5b2f-4c6d-9e0a-1b2c3d4e5f60"}},
            {"metadata":{"name":"b","namespace":"ns","uid":"8a7d3e1c-5b2f-4c6d-9e0a-1b2c3d4e5f60",
              "labels":{"ok":"1","bad key":"x"}},
             "status":{"podIP":"nonsense","containerStatuses":[{"containerID":"containerd://short"},{}]}}
        ]}"#;
        let parsed = parse_pod_list(body).unwrap();
        assert_eq!(parsed.skipped, 2);
        let pod = &parsed.pods[0];
        assert_eq!(pod.service_account, "default");
        assert_eq!(pod.labels.len(), 1);
        assert!(pod.pod_ips.is_empty() && pod.containers.is_empty() && !pod.running);
    }
}
