//! A stand-in for a node's kubelet (`GET /pods`, a v1 `PodList` of the
//! shape a real kubelet answers, recorded in `kubelet_pods.json`) and for the
//! API server's service-account reads (`GET
//! /api/v1/namespaces/NS/serviceaccounts/NAME`), on one listener. Tests add
//! and remove pods while it runs, count the calls, take it down, slow it
//! or make its answers huge. Over TLS it serves a certificate from its own
//! CA (whose PEM the test hands the broker as `ca_file`), and it may
//! require a bearer token, as the real kubelet and API server do.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::{sync::oneshot, task::JoinHandle};

use super::{lock, EmulatorError};

/// The recorded-shape answer: four pods (a Deployment's pod with an init
/// container and a restarted container, two hostNetwork DaemonSet pods
/// sharing the node's IP, a finished Job's pod).
pub const RECORDED_POD_LIST: &str = include_str!("kubelet_pods.json");

/// How to start a [`Kubelet`].
#[derive(Debug, Clone, Default)]
pub struct KubeletOptions {
    /// Serve https with a certificate for `127.0.0.1` and `localhost`
    /// signed by a CA of its own ([`Kubelet::ca_pem`]).
    pub tls: bool,
    /// The bearer token every call must carry; `None`: no check (the
    /// read-only port).
    pub require_token: Option<String>,
    /// Start with the recorded pods (else with none).
    pub recorded_pods: bool,
}

/// A pod to list, filled into a copy of the recorded Deployment pod, so it
/// carries every field a real one does.
#[derive(Debug, Clone)]
pub struct StandInPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub pod_ip: Option<IpAddr>,
    pub host_network: bool,
    /// IDs (64 hex digits) of its running containers; empty while the
    /// runtime has not reported any (a starting pod).
    pub container_ids: Vec<String>,
    /// `Running`, `Pending`, `Succeeded`, `Failed`.
    pub phase: String,
}

#[derive(Default)]
struct Shared {
    pods: Mutex<Vec<Value>>,
    accounts: Mutex<BTreeMap<(String, String), BTreeMap<String, String>>>,
    require_token: Option<String>,
    pod_list_calls: AtomicU64,
    account_calls: AtomicU64,
    unauthorized_calls: AtomicU64,
    down: AtomicBool,
    delay_ms: AtomicU64,
    padding_bytes: AtomicU64,
}

/// A running kubelet and API server stand-in; stops when dropped.
pub struct Kubelet {
    addr: SocketAddr,
    ca_pem: Option<String>,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Kubelet {
    /// Starts on a free loopback port.
    pub async fn start(options: KubeletOptions) -> Result<Kubelet, EmulatorError> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| EmulatorError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind { addr, source })?;
        let pods = if options.recorded_pods {
            recorded_items()
        } else {
            Vec::new()
        };
        let shared = Arc::new(Shared {
            pods: Mutex::new(pods),
            require_token: options.require_token,
            ..Shared::default()
        });
        let router = Router::new()
            .route("/pods", get(pod_list))
            .route(
                "/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
                get(service_account),
            )
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel();
        let (ca_pem, task) = if options.tls {
            let (ca_pem, config) = tls_material()?;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            (
                Some(ca_pem),
                tokio::spawn(serve_tls(listener, acceptor, router, stopped)),
            )
        } else {
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
            (None, task)
        };
        Ok(Kubelet {
            addr,
            ca_pem,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`: the
    /// `kubelet_url` and `api_server_url` to configure.
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The CA that signed its certificate (TLS only), for `ca_file`.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Lists `pod` (replacing a pod of the same UID).
    pub fn add_pod(&self, pod: &StandInPod) {
        let item = pod_object(pod);
        let mut pods = lock(&self.shared.pods);
        pods.retain(|p| p["metadata"]["uid"] != pod.uid.as_str());
        pods.push(item);
    }

    /// Stops listing the pod with `uid`.
    pub fn remove_pod(&self, uid: &str) {
        lock(&self.shared.pods).retain(|p| p["metadata"]["uid"] != uid);
    }

    /// Serves service account `namespace/name` with `annotations`.
    pub fn set_service_account(
        &self,
        namespace: &str,
        name: &str,
        annotations: BTreeMap<String, String>,
    ) {
        lock(&self.shared.accounts).insert((namespace.into(), name.into()), annotations);
    }

    /// `GET /pods` calls served (or refused).
    pub fn pod_list_calls(&self) -> u64 {
        self.shared.pod_list_calls.load(Ordering::SeqCst)
    }

    /// Service-account reads served (or refused).
    pub fn service_account_calls(&self) -> u64 {
        self.shared.account_calls.load(Ordering::SeqCst)
    }

    /// Calls refused for a missing or wrong bearer token.
    pub fn unauthorized_calls(&self) -> u64 {
        self.shared.unauthorized_calls.load(Ordering::SeqCst)
    }

    /// Answer every call 503 (a kubelet restarting) until set back.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Wait this long before answering (tokio time).
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Pad each pod list with a field of this many bytes.
    pub fn set_padding(&self, bytes: u64) {
        self.shared.padding_bytes.store(bytes, Ordering::SeqCst);
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The recorded answer's pods.
fn recorded_items() -> Vec<Value> {
    let list: Value =
        serde_json::from_str(RECORDED_POD_LIST).expect("the recorded pod list is JSON");
    list["items"].as_array().cloned().unwrap_or_default()
}

/// `pod` written into a copy of the recorded Deployment pod.
fn pod_object(pod: &StandInPod) -> Value {
    let mut item = recorded_items().swap_remove(0);
    let generate = format!(
        "{}-",
        pod.name
            .rsplit_once('-')
            .map_or(pod.name.as_str(), |(p, _)| p)
    );
    item["metadata"]["name"] = json!(pod.name);
    item["metadata"]["generateName"] = json!(generate);
    item["metadata"]["namespace"] = json!(pod.namespace);
    item["metadata"]["uid"] = json!(pod.uid);
    item["metadata"]["labels"] = json!(pod.labels);
    item["spec"]["serviceAccountName"] = json!(pod.service_account);
    item["spec"]["serviceAccount"] = json!(pod.service_account);
    item["spec"]["hostNetwork"] = json!(pod.host_network);
    let status = &mut item["status"];
    status["phase"] = json!(pod.phase);
    match pod.pod_ip {
        Some(ip) => {
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!([{ "ip": ip.to_string() }]);
        }
        None => {
            let fields = status.as_object_mut().expect("status is an object");
            fields.remove("podIP");
            fields.remove("podIPs");
        }
    }
    let template = status["containerStatuses"][0].clone();
    let statuses: Vec<Value> = pod
        .container_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut s = template.clone();
            s["name"] = json!(format!("c{i}"));
            s["containerID"] = json!(format!("containerd://{id}"));
            s["lastState"] = json!({});
            s["restartCount"] = json!(0);
            s
        })
        .collect();
    if statuses.is_empty() {
        // What the kubelet reports while the runtime creates the container.
        let mut waiting = template;
        waiting["state"] = json!({ "waiting": { "reason": "ContainerCreating" } });
        waiting["ready"] = json!(false);
        waiting["started"] = json!(false);
        waiting["lastState"] = json!({});
        waiting.as_object_mut().map(|s| s.remove("containerID"));
        status["containerStatuses"] = json!([waiting]);
    } else {
        status["containerStatuses"] = json!(statuses);
    }
    status["initContainerStatuses"] = json!([]);
    item
}

impl Shared {
    /// Delay, outage and token check shared by both routes.
    async fn admit(&self, headers: &HeaderMap) -> Result<(), Response> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "kubelet is restarting").into_response());
        }
        if let Some(token) = &self.require_token {
            let sent = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if sent != Some(token.as_str()) {
                self.unauthorized_calls.fetch_add(1, Ordering::SeqCst);
                return Err((StatusCode::UNAUTHORIZED, "Unauthorized").into_response());
            }
        }
        Ok(())
    }
}

async fn pod_list(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(refused) = shared.admit(&headers).await {
        shared.pod_list_calls.fetch_add(1, Ordering::SeqCst);
        return refused;
    }
    let items = serde_json::to_string(&*lock(&shared.pods)).unwrap_or_else(|_| "[]".into());
    // Counted once the answer's pods are fixed: a test that sees the
    // count rise knows what that call answered.
    shared.pod_list_calls.fetch_add(1, Ordering::SeqCst);
    // Padding is spliced in as text: building 64 MiB through serde_json
    // would make the stand-in, not the broker, the slow part.
    let padding = "x".repeat(shared.padding_bytes.load(Ordering::SeqCst) as usize);
    let body = format!(
        r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{"padding":"{padding}"}},"items":{items}}}"#
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn service_account(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    shared.account_calls.fetch_add(1, Ordering::SeqCst);
    if let Err(refused) = shared.admit(&headers).await {
        return refused;
    }
    let found = lock(&shared.accounts)
        .get(&(namespace.clone(), name.clone()))
        .cloned();
    match found {
        Some(annotations) => axum::Json(json!({
            "kind": "ServiceAccount",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                "resourceVersion": "48100221",
                "creationTimestamp": "2026-11-02T10:00:00Z",
                "annotations": annotations,
            },
        }))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("serviceaccounts \"{name}\" not found"),
                "reason": "NotFound", "code": 404,
            })),
        )
            .into_response(),
    }
}

/// A CA of its own and a server certificate it signed for `127.0.0.1`
/// and `localhost`: (the CA's PEM, the server's TLS config).
fn tls_material() -> Result<(String, tokio_rustls::rustls::ServerConfig), EmulatorError> {
    use tokio_rustls::rustls;
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        EmulatorError::KeyGeneration(format!("{what}: {e}"))
    };
    let ca_key = rcgen::KeyPair::generate().map_err(|e| fail("CA key", &e))?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "token-broker-emulator cluster CA",
    );
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(|e| fail("CA", &e))?;
    let key = rcgen::KeyPair::generate().map_err(|e| fail("server key", &e))?;
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .map_err(|e| fail("server certificate", &e))?;
    let cert = params
        .signed_by(&key, &ca)
        .map_err(|e| fail("server certificate", &e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("TLS config", &e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| fail("TLS config", &e))?;
    Ok((ca.pem(), config))
}

/// Accepts TLS connections and serves `router` on each (HTTP/1.1).
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    mut stopped: oneshot::Receiver<()>,
) {
    use tower::ServiceExt;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = &mut stopped => return,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            // A client that refuses our certificate ends here.
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    async move {
                        let response = router.oneshot(request.map(axum::body::Body::new)).await?;
                        Ok::<_, Infallible>(response)
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}
