//! A kubelet and API-server stand-in for the pod tests: `/pods` answers a
//! PodList in the kubelet's shape from the pods a test sets, and
//! `/api/v1/namespaces/NS/serviceaccounts/NAME` a ServiceAccount with the
//! annotations a test sets (404 for one it did not). Both may change while
//! the broker runs.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};

/// One pod as the kubelet lists it.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            ips: Vec::new(),
            host_network: false,
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
        }
    }

    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ips.push(IpAddr::V4(ip));
        self
    }

    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    /// A stable UID from the pod's name, in the API's format.
    fn uid(&self) -> String {
        let mut hash: u128 = 0xcbf2_9ce4_8422_2325;
        for byte in format!("{}/{}", self.namespace, self.name).bytes() {
            hash = (hash ^ u128::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let hex = format!("{hash:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }

    /// The item of a kubelet `/pods` answer (the fields a real one has
    /// that the broker reads, in their places).
    fn to_json(&self) -> serde_json::Value {
        let ips: Vec<_> = self
            .ips
            .iter()
            .map(|ip| serde_json::json!({ "ip": ip.to_string() }))
            .collect();
        let uid = self.uid();
        serde_json::json!({
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": uid,
                "labels": self.labels,
                "annotations": { "kubernetes.io/config.source": "api" },
            },
            "spec": {
                "serviceAccountName": self.service_account,
                "hostNetwork": self.host_network,
                "containers": [{ "name": "app", "image": "registry.example.com/app:1" }],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ips.first().map(|ip| ip.to_string()),
                "podIPs": ips,
                "hostIP": "10.128.0.4",
                "containerStatuses": [{
                    "name": "app",
                    "ready": true,
                    "containerID": format!("containerd://{}", uid.replace('-', "").repeat(2)),
                }],
            },
        })
    }
}

#[derive(Default)]
struct Objects {
    pods: Vec<PodSpec>,
    annotations: BTreeMap<(String, String), BTreeMap<String, String>>,
}

/// The running stand-in.
pub struct Cluster {
    base: String,
    objects: Arc<Mutex<Objects>>,
    dir: tempfile::TempDir,
    _server: tokio::task::JoinHandle<()>,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let objects = Arc::new(Mutex::new(Objects::default()));
        let app = Router::new()
            .route("/pods", get(pods))
            .route(
                "/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
                get(service_account),
            )
            .with_state(objects.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let dir = super::workdir();
        std::fs::write(dir.path().join("token"), "stand-in-token").unwrap();
        std::fs::write(dir.path().join("ca.crt"), "").unwrap();
        Cluster {
            base,
            objects,
            dir,
            _server: server,
        }
    }

    pub fn set_pods(&self, pods: Vec<PodSpec>) {
        self.objects.lock().unwrap().pods = pods;
    }

    /// Sets (or, with `None`, removes) service account `namespace/name`'s
    /// `iam.gke.io/gcp-service-account` annotation; the account exists
    /// either way.
    pub fn annotate(&self, namespace: &str, name: &str, account: Option<&str>) {
        let mut objects = self.objects.lock().unwrap();
        let annotations = objects
            .annotations
            .entry((namespace.into(), name.into()))
            .or_default();
        match account {
            Some(account) => {
                annotations.insert("iam.gke.io/gcp-service-account".into(), account.into());
            }
            None => {
                annotations.remove("iam.gke.io/gcp-service-account");
            }
        }
    }

    /// The broker's `[kubernetes]` table for this stand-in.
    pub fn config(&self) -> String {
        format!(
            "[kubernetes]\nkubelet_url = \"{base}\"\napi_server_url = \"{base}\"\n\
             token_file = \"{dir}/token\"\nca_file = \"{dir}/ca.crt\"\n\
             annotations_ttl = \"1s\"\n",
            base = self.base,
            dir = self.dir.path().display()
        )
    }
}

async fn pods(State(objects): State<Arc<Mutex<Objects>>>) -> Json<serde_json::Value> {
    let items: Vec<_> = objects
        .lock()
        .unwrap()
        .pods
        .iter()
        .map(PodSpec::to_json)
        .collect();
    Json(serde_json::json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": items,
    }))
}

async fn service_account(
    State(objects): State<Arc<Mutex<Objects>>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let objects = objects.lock().unwrap();
    let known = objects
        .pods
        .iter()
        .any(|p| p.namespace == namespace && p.service_account == name)
        || objects
            .annotations
            .contains_key(&(namespace.clone(), name.clone()));
    if !known {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("serviceaccounts \"{name}\" not found"),
                "reason": "NotFound", "code": 404,
            })),
        )
            .into_response();
    }
    let annotations = objects
        .annotations
        .get(&(namespace.clone(), name.clone()))
        .cloned()
        .unwrap_or_default();
    Json(serde_json::json!({
        "kind": "ServiceAccount",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "7d1e0f4a-3b2c-4d5e-8f90-a1b2c3d4e5f6",
            "annotations": annotations,
        },
    }))
    .into_response()
}
