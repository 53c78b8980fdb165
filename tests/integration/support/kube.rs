//! The pod tests' view of the emulator's kubelet and API-server stand-in
//! (`token_broker::emulator::kubelet`, recorded-shape pod list): pods by
//! namespace, name, service account and IP, and service-account
//! annotations, both changeable while the broker runs.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
};

use token_broker::emulator::kubelet::{Kubelet, KubeletOptions, StandInPod};

/// One pod as the kubelet lists it.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ip: Option<IpAddr>,
    pub host_network: bool,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            ip: None,
            host_network: false,
        }
    }

    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(IpAddr::V4(ip));
        self
    }

    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    /// A UID of the API's format, stable for the pod's name.
    fn uid(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in format!("{}/{}", self.namespace, self.name).bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let hex = format!("{hash:016x}{:016x}", hash.rotate_left(17));
        format!(
            "{}-{}-4{}-8{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[13..16],
            &hex[17..20],
            &hex[20..32]
        )
    }

    fn stand_in(&self) -> StandInPod {
        let uid = self.uid();
        StandInPod {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: uid.clone(),
            service_account: self.service_account.clone(),
            labels: BTreeMap::from([("app".to_owned(), self.name.clone())]),
            pod_ip: self.ip,
            host_network: self.host_network,
            container_ids: vec![uid.replace('-', "").repeat(2)],
            phase: "Running".into(),
        }
    }
}

/// The running stand-in, plain http (the read-only port's way: no token).
pub struct Cluster {
    kubelet: Kubelet,
    listed: Mutex<Vec<String>>,
    annotations: Mutex<BTreeMap<(String, String), BTreeMap<String, String>>>,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let kubelet = Kubelet::start(KubeletOptions::default())
            .await
            .expect("the kubelet stand-in starts");
        Cluster {
            kubelet,
            listed: Mutex::default(),
            annotations: Mutex::default(),
        }
    }

    /// Lists exactly `pods`; each one's service account exists (with no
    /// annotation until [`Cluster::annotate`]).
    pub fn set_pods(&self, pods: Vec<PodSpec>) {
        let mut listed = self.listed.lock().unwrap();
        for uid in listed.drain(..) {
            self.kubelet.remove_pod(&uid);
        }
        for pod in pods {
            let stand_in = pod.stand_in();
            self.kubelet.add_pod(&stand_in);
            listed.push(stand_in.uid);
            let key = (pod.namespace.clone(), pod.service_account.clone());
            let mut annotations = self.annotations.lock().unwrap();
            let current = annotations.entry(key).or_default().clone();
            self.kubelet
                .set_service_account(&pod.namespace, &pod.service_account, current);
        }
    }

    /// Sets (or, with `None`, removes) service account `namespace/name`'s
    /// `iam.gke.io/gcp-service-account` annotation.
    pub fn annotate(&self, namespace: &str, name: &str, account: Option<&str>) {
        let mut all = self.annotations.lock().unwrap();
        let annotations = all.entry((namespace.into(), name.into())).or_default();
        match account {
            Some(account) => {
                annotations.insert("iam.gke.io/gcp-service-account".into(), account.into());
            }
            None => {
                annotations.remove("iam.gke.io/gcp-service-account");
            }
        }
        self.kubelet
            .set_service_account(namespace, name, annotations.clone());
    }

    /// The broker's `[kubernetes]` table for this stand-in; annotations
    /// are kept 1 s, so a test sees a change take effect.
    pub fn config(&self) -> String {
        format!(
            "[kubernetes]\nkubelet_url = \"{url}\"\napi_server_url = \"{url}\"\n\
             annotations_ttl = \"1s\"\n",
            url = self.kubelet.url()
        )
    }

    /// `GET /pods` calls the broker made.
    pub fn pod_list_calls(&self) -> u64 {
        self.kubelet.pod_list_calls()
    }

    /// Service-account reads the broker made.
    pub fn service_account_calls(&self) -> u64 {
        self.kubelet.service_account_calls()
    }
}
