//! Issue 14 (Kubernetes part): pods attested for real. Each client process
//! is placed, before it runs, into a real cgroup v2 directory named exactly
//! as the kubelet names a container's (systemd driver:
//! `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`;
//! cgroupfs driver: `kubepods/burstable/pod<uid>/<id>`), made at the top
//! of the machine's cgroup2 mount (where the kubelet makes them, and only
//! root can), and runs under another uid. The kubelet is the emulator's
//! stand-in serving a recorded-shape pod list. The cgroups are removed
//! afterwards; where cgroup2 is not mounted or not writable the tests say
//! so and skip.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use token_broker::{
    config::KubernetesSettings,
    emulator::{
        kubelet::{Kubelet, KubeletOptions, StandInPod, RECORDED_POD_LIST},
        Emulator, Permission,
    },
    kubernetes::{parse_pod_list, PodDirectory, PodLookupError},
};

use crate::{
    support::{self, Broker},
    workloads::{self, WEB},
};

/// Serializes making and removing the shared `kubepods` parents, so one
/// test's cleanup never removes a parent another is about to fill.
static CGROUP_TREE: Mutex<()> = Mutex::new(());

/// How the kubelet's cgroup driver names a container's cgroup.
#[derive(Clone, Copy, Debug)]
enum Driver {
    Systemd,
    Cgroupfs,
}

/// One container's cgroup, made for a test, removed (with any parents
/// left empty) on drop.
struct PodCgroup {
    mount: PathBuf,
    /// From the container's cgroup up to the top `kubepods` one.
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    /// `relative` under the cgroup2 mount; `None`, saying why, where the
    /// kernel will not have it.
    fn at(relative: &str) -> Option<PodCgroup> {
        let Some(mount) = workloads::cgroup2_mount() else {
            eprintln!("SKIPPED: no cgroup2 mount on this machine");
            return None;
        };
        let leaf = mount.join(relative);
        let _tree = CGROUP_TREE.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = std::fs::create_dir_all(&leaf) {
            eprintln!("SKIPPED: cannot create {} ({error})", leaf.display());
            return None;
        }
        let dirs = leaf
            .ancestors()
            .take_while(|d| *d != mount)
            .map(Path::to_path_buf)
            .collect();
        Some(PodCgroup { mount, dirs })
    }

    /// The container `container_id` of pod `uid`, named as `driver` names it.
    fn container(driver: Driver, uid: &str, container_id: &str) -> Option<PodCgroup> {
        Self::at(&match driver {
            Driver::Systemd => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
                uid.replace('-', "_")
            ),
            Driver::Cgroupfs => format!("kubepods/burstable/pod{uid}/{container_id}"),
        })
    }

    fn procs(&self) -> PathBuf {
        self.dirs[0].join("cgroup.procs")
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let _tree = CGROUP_TREE.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(procs) = std::fs::read_to_string(self.procs()) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.mount.join("cgroup.procs"), pid);
            }
        }
        // Parents another test still uses are not empty and stay.
        for dir in &self.dirs {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

/// A pod UID and a container ID of its own for each test.
fn ids(seed: u32) -> (String, String) {
    let pid = std::process::id();
    (
        format!("{seed:08x}-{:04x}-4000-8000-{pid:012x}", pid & 0xffff),
        format!("{seed:08x}{pid:08x}").repeat(4),
    )
}

/// A new pod's container cgroup, named as `driver` names it, with IDs
/// from `seed`: the cgroup, the pod UID and the container ID. `None`,
/// saying why, where the kernel will not have it.
fn pod_container(seed: u32, driver: Driver) -> Option<(PodCgroup, String, String)> {
    let (uid, cid) = ids(seed);
    let cgroup = PodCgroup::container(driver, &uid, &cid)?;
    Some((cgroup, uid, cid))
}

fn stand_in_pod(namespace: &str, name: &str, uid: &str, account: &str, cid: &str) -> StandInPod {
    StandInPod {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
        service_account: account.into(),
        labels: BTreeMap::from([("app".into(), name.split('-').next().unwrap().into())]),
        pod_ip: Some("10.244.1.50".parse().unwrap()),
        host_network: false,
        container_ids: vec![cid.into()],
        phase: "Running".into(),
    }
}

/// The kubelet stand-in serving the recorded pod list (the `payments`
/// pods [`payments_rule`] is written for).
async fn recorded_kubelet() -> Kubelet {
    Kubelet::start(KubeletOptions {
        recorded_pods: true,
        ..KubeletOptions::default()
    })
    .await
    .unwrap()
}

/// Lists on `kubelet` the two `payments` pods [`payments_rule`] tells
/// apart: an api pod (service account `api-sa`) and a worker pod
/// (`worker-sa`), each given as (name, pod UID, container ID).
fn add_api_and_worker_pods(kubelet: &Kubelet, api: (&str, &str, &str), worker: (&str, &str, &str)) {
    for ((name, uid, cid), account) in [(api, "api-sa"), (worker, "worker-sa")] {
        kubelet.add_pod(&stand_in_pod("payments", name, uid, account, cid));
    }
}

/// A broker with `[kubernetes]` pointed at `kubelet` (plus `extra` keys)
/// and `rules`.
async fn broker_with(emulator: &Emulator, kubelet: &Kubelet, extra: &str, rules: &str) -> Broker {
    workloads::broker_with(
        emulator,
        format!(
            "[kubernetes]\nkubelet_url = \"{url}\"\napi_server_url = \"{url}\"\n{extra}\n{rules}",
            url = kubelet.url()
        ),
    )
    .await
}

/// The CLI with `args`, to run as WEB in `cgroup`.
fn command_in(cgroup: &PodCgroup, args: &[&str]) -> Command {
    let mut command = support::base_command(args);
    workloads::place(
        &mut command,
        Some(&cgroup.procs()),
        WEB,
        WEB,
        &[WEB],
        || Ok(()),
    );
    command
}

/// `token-broker token` for `audience`, to run as WEB in `cgroup`.
fn token_command_in(broker: &Broker, cgroup: &PodCgroup, audience: &str) -> Command {
    let socket = broker.socket.to_str().unwrap();
    command_in(
        cgroup,
        &["token", "--socket", socket, "--audience", audience],
    )
}

/// The CLI with `args`, run as WEB in `cgroup`: (exit code, stdout, stderr).
fn cli_in(cgroup: &PodCgroup, args: &[&str]) -> (i32, String, String) {
    output(command_in(cgroup, args))
}

/// Runs `command` to its end: (exit code, stdout, stderr).
fn output(mut command: Command) -> (i32, String, String) {
    let out = command.output().expect("client runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `token-broker token` for `audience`, run as WEB in `cgroup`: (exit
/// code, stdout, stderr).
fn token_in(broker: &Broker, cgroup: &PodCgroup, audience: &str) -> (i32, String, String) {
    output(token_command_in(broker, cgroup, audience))
}

/// `token-broker token --identity IDENTITY` for `audience`, run as WEB in
/// `cgroup`: (exit code, stdout, stderr).
fn token_as(
    broker: &Broker,
    cgroup: &PodCgroup,
    identity: &str,
    audience: &str,
) -> (i32, String, String) {
    let socket = broker.socket.to_str().unwrap();
    let args = [
        "token",
        "--socket",
        socket,
        "--identity",
        identity,
        "--audience",
        audience,
    ];
    cli_in(cgroup, &args)
}

/// `token-broker status --json`, run as WEB in `cgroup`: what a pod is
/// shown of the broker's entries.
fn status_in(broker: &Broker, cgroup: &PodCgroup) -> (i32, String, String) {
    let socket = broker.socket.to_str().unwrap();
    cli_in(cgroup, &["status", "--socket", socket, "--json"])
}

const AUDIENCE: &str = "https://payments.example.com";

fn payments_rule() -> String {
    format!(
        "[[policy]]\nk8s_namespaces = [\"payments\"]\nk8s_service_accounts = [\"payments/api-sa\"]\n\
         k8s_pod_labels = [\"app=api\"]\nidentities = [\"default\"]\naudiences = [\"{AUDIENCE}\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_is_known_by_its_service_account_and_another_on_the_same_uid_is_not() {
    let Some((api, api_uid, api_cid)) = pod_container(1, Driver::Systemd) else {
        return;
    };
    let Some((worker, worker_uid, worker_cid)) = pod_container(2, Driver::Cgroupfs) else {
        return;
    };
    // The api pod's container ID, in a pod-shaped tree below an ordinary
    // cgroup, as a user with a delegated subtree could make it.
    let forged_path = format!(
        "tb-test-{}-forged.slice/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{api_cid}.scope",
        std::process::id(),
        api_uid.replace('-', "_")
    );
    let Some(forged) = PodCgroup::at(&forged_path) else {
        return;
    };
    // A container the api pod does not have.
    let (_, stranger_cid) = ids(3);
    let Some(stranger) = PodCgroup::container(Driver::Systemd, &api_uid, &stranger_cid) else {
        return;
    };
    let emulator = support::emulator().await;
    let kubelet = recorded_kubelet().await;
    add_api_and_worker_pods(
        &kubelet,
        ("api-7f9c8d6b5-k2m4x", &api_uid, &api_cid),
        ("worker-5d8c7b9f4-q8z2n", &worker_uid, &worker_cid),
    );
    let broker = broker_with(
        &emulator,
        &kubelet,
        "start_race_budget = \"1s\"",
        &payments_rule(),
    )
    .await;

    let started = Instant::now();
    let (code, token, stderr) = token_in(&broker, &api, AUDIENCE);
    let first = started.elapsed();
    assert_eq!(code, 0, "the api pod: {stderr}");
    support::verify(&emulator, token.trim(), AUDIENCE).await;
    let started = Instant::now();
    let (code, _, stderr) = token_in(&broker, &api, AUDIENCE);
    let warm = started.elapsed();
    assert_eq!(code, 0, "the api pod again: {stderr}");
    eprintln!(
        "pod client, first (kubelet fetch): {first:?}; next (pod list cached): {warm:?} \
         (each includes starting the client process)"
    );

    // The worker pod runs as the same uid, in the same namespace.
    let (code, _, stderr) = token_in(&broker, &worker, AUDIENCE);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    assert!(
        stderr.contains("k8s=payments/worker-sa pod=payments/worker-5d8c7b9f4-q8z2n"),
        "the denial names the attested pod: {stderr}"
    );
    // A pod-shaped path below an ordinary cgroup names no pod at all.
    let (code, _, stderr) = token_in(&broker, &forged, AUDIENCE);
    assert_eq!(
        code, 1,
        "the forged cgroup was taken for the api pod: {stderr}"
    );
    assert!(
        !stderr.contains("k8s=") && !stderr.contains("pod="),
        "{stderr}"
    );
    // The api pod's UID with a container it does not have.
    let (code, _, stderr) = token_in(&broker, &stranger, AUDIENCE);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pod={api_uid} k8s=unattested (pod payments/api-7f9c8d6b5-k2m4x has no container"
        )),
        "{stderr}"
    );

    let log = broker.log();
    let allowed = workloads::audit_lines(&log, "decision=\"allowed\"");
    assert_eq!(allowed.len(), 2, "{log}");
    assert!(
        allowed[0].contains("k8s=payments/api-sa pod=payments/api-7f9c8d6b5-k2m4x"),
        "{}",
        allowed[0]
    );
    assert_eq!(
        workloads::audit_lines(&log, "decision=\"denied\"").len(),
        3,
        "{log}"
    );
}

/// A hostNetwork pod reaches a loopback metadata endpoint over TCP: the
/// process holding the client socket is found, and its cgroup's pod is
/// looked up as for a Unix-socket client, so `k8s_*` rules apply there too.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_on_loopback_is_known_at_the_metadata_endpoint() {
    let Some((api, api_uid, api_cid)) = pod_container(11, Driver::Systemd) else {
        return;
    };
    let Some((worker, worker_uid, worker_cid)) = pod_container(12, Driver::Cgroupfs) else {
        return;
    };
    let emulator = support::emulator().await;
    let kubelet = recorded_kubelet().await;
    add_api_and_worker_pods(
        &kubelet,
        ("api-7f9c8d6b5-h7j9k", &api_uid, &api_cid),
        ("worker-5d8c7b9f4-w3e5r", &worker_uid, &worker_cid),
    );
    let port = support::free_port();
    let broker = broker_with(
        &emulator,
        &kubelet,
        "",
        &format!(
            "{}\n[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\n",
            payments_rule()
        ),
    )
    .await;
    let url = format!(
        "http://127.0.0.1:{port}/computeMetadata/v1/instance/service-accounts/default/identity?audience={AUDIENCE}"
    );

    let (status, token) = workloads::curl_in(&api.procs(), &url);
    assert_eq!(status, 200, "the api pod over loopback: {token}");
    support::verify(&emulator, token.trim(), AUDIENCE).await;
    // The same uid in the worker pod is refused, and told which pod it is.
    let (status, body) = workloads::curl_in(&worker.procs(), &url);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("k8s=payments/worker-sa pod=payments/worker-5d8c7b9f4-w3e5r"),
        "the denial names the attested pod: {body}"
    );
    let log = broker.log();
    let allowed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("metadata endpoint peer=") && l.contains("decision=\"allowed\""))
        .collect();
    assert_eq!(allowed.len(), 1, "{log}");
    assert!(
        allowed[0].contains("k8s=payments/api-sa pod=payments/api-7f9c8d6b5-h7j9k"),
        "{}",
        allowed[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_that_connects_before_the_kubelet_lists_it_is_admitted() {
    let Some((cgroup, uid, cid)) = pod_container(4, Driver::Systemd) else {
        return;
    };
    let emulator = support::emulator().await;
    let kubelet = recorded_kubelet().await;
    let broker = broker_with(
        &emulator,
        &kubelet,
        "start_race_budget = \"3s\"",
        &payments_rule(),
    )
    .await;

    let client = token_command_in(&broker, &cgroup, AUDIENCE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client runs");
    // The pod shows up in the list only after the broker's first fetch
    // for the client missed it, first without its container's status
    // (ContainerCreating), and with it only after a second fetch.
    let fetches = |at_least: u64| {
        let kubelet = &kubelet;
        async move {
            for _ in 0..500 {
                if kubelet.pod_list_calls() >= at_least {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the broker made fewer than {at_least} kubelet fetches");
        }
    };
    let mut pod = stand_in_pod("payments", "api-7f9c8d6b5-r4t6y", &uid, "api-sa", &cid);
    pod.container_ids.clear();
    fetches(1).await;
    kubelet.add_pod(&pod);
    fetches(2).await;
    pod.container_ids.push(cid.clone());
    kubelet.add_pod(&pod);
    let out = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the starting pod was refused: {stderr}"
    );
    support::verify(
        &emulator,
        String::from_utf8_lossy(&out.stdout).trim(),
        AUDIENCE,
    )
    .await;
    // Its first two lookups missed (no pod, then no container) and were
    // retried.
    assert!(
        kubelet.pod_list_calls() >= 3,
        "{} fetches",
        kubelet.pod_list_calls()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_unknown_pod_uids_costs_a_bounded_number_of_kubelet_fetches() {
    const CLIENTS: u32 = 40;
    let mut cgroups = Vec::new();
    for i in 0..CLIENTS {
        let Some((cgroup, _, _)) = pod_container(100 + i, Driver::Systemd) else {
            return;
        };
        cgroups.push(cgroup);
    }
    let emulator = support::emulator().await;
    let kubelet = recorded_kubelet().await;
    let broker = broker_with(&emulator, &kubelet, "", &payments_rule()).await;
    let started = Instant::now();
    let clients: Vec<_> = cgroups
        .iter()
        .map(|cgroup| {
            token_command_in(&broker, cgroup, AUDIENCE)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("client runs")
        })
        .collect();
    for client in clients {
        let out = tokio::task::spawn_blocking(move || client.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("k8s=unattested (the kubelet lists no pod with UID"),
            "{stderr}"
        );
    }
    let elapsed = started.elapsed();
    let fetches = kubelet.pod_list_calls();
    eprintln!("{CLIENTS} connections from unknown pods in {elapsed:?}: {fetches} kubelet fetches");
    // One fetch per min_fetch_interval (500ms) at most, whatever the
    // number of lookups waiting.
    let bound = elapsed.as_millis() as u64 / 500 + 2;
    assert!(
        fetches <= bound,
        "{fetches} fetches in {elapsed:?} (bound {bound})"
    );
    assert!(
        fetches < u64::from(CLIENTS),
        "{fetches} fetches for {CLIENTS} clients"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubelet_that_is_down_leaves_uid_rules_working_and_k8s_rules_refusing() {
    let Some((cgroup, uid, cid)) = pod_container(5, Driver::Cgroupfs) else {
        return;
    };
    let emulator = support::emulator().await;
    let kubelet = Kubelet::start(KubeletOptions::default()).await.unwrap();
    kubelet.add_pod(&stand_in_pod(
        "payments",
        "api-7f9c8d6b5-d0wn1",
        &uid,
        "api-sa",
        &cid,
    ));
    kubelet.set_down(true);
    let by_uid = "https://by-uid.example.com";
    let telemetry = support::free_port();
    let broker = broker_with(
        &emulator,
        &kubelet,
        &format!("\n[telemetry]\nlisten = \"127.0.0.1:{telemetry}\"\n"),
        &format!(
            "{}\n[[policy]]\nuids = [{WEB}]\nidentities = [\"default\"]\naudiences = [\"{by_uid}\"]\n",
            payments_rule()
        ),
    )
    .await;
    let (code, token, stderr) = token_in(&broker, &cgroup, by_uid);
    assert_eq!(code, 0, "the uid rule: {stderr}");
    support::verify(&emulator, token.trim(), by_uid).await;
    let (code, _, stderr) = token_in(&broker, &cgroup, AUDIENCE);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pod={uid} k8s=unattested ({}/pods answered HTTP 503",
            kubelet.url()
        )),
        "the denial says why the pod is unknown: {stderr}"
    );
    // Back up: the same pod is recognised.
    kubelet.set_down(false);
    let (code, _, stderr) = token_in(&broker, &cgroup, AUDIENCE);
    assert_eq!(code, 0, "{stderr}");
    let (_, metrics) = support::scrape(telemetry, "/metrics").await;
    let fetches = |outcome: &str| {
        support::sample(
            &metrics,
            &format!("token_broker_kubelet_fetches_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert!(fetches("error") >= 1.0 && fetches("ok") >= 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_recycled_pid_is_not_attributed_to_the_process_that_connected() {
    let Some((allowed, allowed_uid, allowed_cid)) = pod_container(6, Driver::Systemd) else {
        return;
    };
    let Some((other, other_uid, other_cid)) = pod_container(7, Driver::Systemd) else {
        return;
    };
    let emulator = support::emulator().await;
    let kubelet = Kubelet::start(KubeletOptions::default()).await.unwrap();
    add_api_and_worker_pods(
        &kubelet,
        ("api-7f9c8d6b5-p1d00", &allowed_uid, &allowed_cid),
        ("worker-5d8c7b9f4-p1d01", &other_uid, &other_cid),
    );
    let broker = broker_with(&emulator, &kubelet, "", &payments_rule()).await;

    // Stopped, the broker accepts and attests nothing until told.
    support::signal(&broker.child, Signal::SIGSTOP);
    // The client, in the worker pod, connects and exits at once; its pid
    // goes to a process in the api pod, where possible.
    let (ours, gone) = workloads::connect_from_a_client_that_exits(&broker.socket, &other.procs());
    let sleeper = workloads::give_pid_to_a_sleeper_in(&allowed.procs(), gone, "the api pod");
    let status =
        workloads::refusal_of_the_exited_client(&broker, ours, sleeper, AUDIENCE, "the api pod")
            .await;
    assert!(!status.message().contains("api-sa"), "{status:?}");
}

/// `[kubernetes]` for `kubelet`, with the token and CA files in `dir`.
fn settings_for(kubelet: &Kubelet, dir: &Path, ca_pem: &str) -> KubernetesSettings {
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca_pem).unwrap();
    KubernetesSettings {
        kubelet_url: Some(kubelet.url()),
        api_server_url: kubelet.url(),
        token_file: dir.join("token"),
        ca_file,
        start_race_budget: Duration::ZERO,
        ..KubernetesSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_only_the_cluster_ca_and_the_current_token_are_accepted() {
    let token = "eyJhbGciOiJSUzI1NiJ9.k8s-sa-token.first";
    let kubelet = Kubelet::start(KubeletOptions {
        tls: true,
        require_token: Some(token.into()),
        recorded_pods: true,
    })
    .await
    .unwrap();
    kubelet.set_service_account(
        "payments",
        "api-sa",
        BTreeMap::from([(
            "iam.gke.io/gcp-service-account".into(),
            "api@p.iam.gserviceaccount.com".into(),
        )]),
    );
    let dir = support::workdir();
    let settings = settings_for(&kubelet, dir.path(), kubelet.ca_pem().unwrap());
    std::fs::write(&settings.token_file, format!("{token}\n")).unwrap();
    let env = Default::default();
    let pods = PodDirectory::new(&settings, &env).unwrap();
    let recorded = "5f1c2a9e-8b7d-4e3f-a1b2-c3d4e5f60718";
    let started = Instant::now();
    let pod = pods.by_uid(recorded, None).await.unwrap();
    let cold = started.elapsed();
    assert_eq!(pod.service_account_ref(), "payments/api-sa");
    let started = Instant::now();
    pods.by_uid(recorded, None).await.unwrap();
    eprintln!(
        "lookup over TLS: {cold:?} with the fetch, {:?} from the held list",
        started.elapsed()
    );
    let annotations = pods
        .service_account_annotations("payments", "api-sa")
        .await
        .unwrap();
    assert_eq!(
        annotations["iam.gke.io/gcp-service-account"],
        "api@p.iam.gserviceaccount.com"
    );
    let missing = pods
        .service_account_annotations("payments", "nobody")
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("HTTP 404"), "{missing}");

    // A kubelet whose certificate another CA signed (a MITM, or the wrong
    // ca_file) is refused before anything is sent.
    let impostor = Kubelet::start(KubeletOptions {
        tls: true,
        require_token: None,
        recorded_pods: true,
    })
    .await
    .unwrap();
    let mut wrong = settings_for(&impostor, dir.path(), kubelet.ca_pem().unwrap());
    wrong.token_file = settings.token_file.clone();
    let err = PodDirectory::new(&wrong, &env)
        .unwrap()
        .by_uid(recorded, None)
        .await
        .unwrap_err();
    assert!(matches!(err, PodLookupError::Unavailable { .. }), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    eprintln!("impostor kubelet: {err}");
    assert_eq!(
        impostor.pod_list_calls(),
        0,
        "a request reached the impostor"
    );

    // The token rotates: the old one is refused, the file's new one used.
    let rotated = PodDirectory::new(&settings, &env).unwrap();
    std::fs::write(&settings.token_file, "stale-token").unwrap();
    let err = rotated.by_uid(recorded, None).await.unwrap_err();
    assert!(err.to_string().contains("HTTP 401"), "{err}");
    assert!(!err.to_string().contains("stale-token"), "{err}");
    let unauthorized = kubelet.unauthorized_calls();
    assert_eq!(unauthorized, 1);
    std::fs::write(&settings.token_file, token).unwrap();
    tokio::time::sleep(settings.min_fetch_interval).await;
    rotated.by_uid(recorded, None).await.unwrap();
    assert_eq!(kubelet.unauthorized_calls(), unauthorized);

    // A full node: 110 pods (the kubelet's default maxPods). What a
    // connection's first request waits for when the list is not held.
    for i in 0..106u32 {
        let uid = format!("{i:08x}-1111-4222-8333-444444444444");
        kubelet.add_pod(&stand_in_pod(
            "bulk",
            &format!("bulk-{i}"),
            &uid,
            "default",
            &format!("{i:08x}").repeat(8),
        ));
    }
    let full = PodDirectory::new(&settings, &env).unwrap();
    let started = Instant::now();
    full.by_uid("00000069-1111-4222-8333-444444444444", None)
        .await
        .unwrap();
    let cold = started.elapsed();
    let started = Instant::now();
    full.by_uid("00000001-1111-4222-8333-444444444444", None)
        .await
        .unwrap();
    eprintln!(
        "110-pod list over TLS: first lookup {cold:?} (fetch and parse), next {:?}",
        started.elapsed()
    );
    assert!(
        cold < Duration::from_secs(4),
        "{cold:?}: longer than the attestation allows"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_or_slow_kubelet_answers_are_refused_with_a_clear_error() {
    let kubelet = recorded_kubelet().await;
    let dir = support::workdir();
    let settings = settings_for(&kubelet, dir.path(), "");
    let env = Default::default();
    let recorded = "5f1c2a9e-8b7d-4e3f-a1b2-c3d4e5f60718";
    kubelet.set_padding(65 * 1024 * 1024);
    let err = PodDirectory::new(&settings, &env)
        .unwrap()
        .by_uid(recorded, None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("more than the 64 MiB cap; refused"),
        "{err}"
    );
    kubelet.set_padding(0);
    kubelet.set_delay(Duration::from_secs(3));
    let started = Instant::now();
    let slow = KubernetesSettings {
        request_timeout: Duration::from_millis(500),
        ..settings.clone()
    };
    let err = PodDirectory::new(&slow, &env)
        .unwrap()
        .by_uid(recorded, None)
        .await
        .unwrap_err();
    assert!(matches!(err, PodLookupError::Unavailable { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    eprintln!("slow kubelet: {err} after {:?}", started.elapsed());
    // By IP: the recorded hostNetwork pods share the node's IP.
    kubelet.set_delay(Duration::ZERO);
    let pods = PodDirectory::new(&settings, &env).unwrap();
    let node: IpAddr = "10.128.0.5".parse().unwrap();
    let err = pods.by_ip(node).await.unwrap_err();
    assert!(
        matches!(
            err,
            PodLookupError::SharedIp {
                pods: 2,
                host_network: true,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        pods.by_ip("10.244.1.17".parse().unwrap())
            .await
            .unwrap()
            .name,
        "api-7f9c8d6b5-x2x4q"
    );
}

/// The kubelet's default `maxPods` is 110: a full node's list parsed.
#[test]
fn a_full_nodes_pod_list_parses_quickly() {
    let recorded: serde_json::Value = serde_json::from_str(RECORDED_POD_LIST).unwrap();
    let template = recorded["items"][0].clone();
    let items: Vec<_> = (0..110u32)
        .map(|i| {
            let mut pod = template.clone();
            pod["metadata"]["uid"] = format!("{i:08x}-0000-4000-8000-000000000000").into();
            pod["metadata"]["name"] = format!("api-{i}").into();
            pod
        })
        .collect();
    let body =
        serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            .to_string();
    let started = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        assert_eq!(parse_pod_list(body.as_bytes()).unwrap().pods.len(), 110);
    }
    let each = started.elapsed() / rounds;
    eprintln!(
        "110-pod list ({} KiB): parsed in {each:?}",
        body.len() / 1024
    );
    // Generous: a debug build on a busy machine.
    assert!(each < Duration::from_millis(500), "{each:?}");
}

const API_ACCOUNT: &str = "payments-api@apps.iam.gserviceaccount.com";
const BATCH_ACCOUNT: &str = "batch@apps.iam.gserviceaccount.com";

/// Per-workload identity on one node: three pods, each in a cgroup of its
/// own, whose service accounts' annotations name Google accounts, and a
/// broker serving them identity `pods` (impersonating, from `default`, the
/// account the annotation names) in namespaces `payments` and `batch`.
struct AnnotatedPods {
    broker: Broker,
    kubelet: Kubelet,
    emulator: Emulator,
    /// `payments/api-1` (systemd driver), service account `api-sa`
    /// annotated with [`API_ACCOUNT`].
    api: PodCgroup,
    /// `batch/job-1` (cgroupfs driver), service account `job-sa` annotated
    /// with [`BATCH_ACCOUNT`].
    batch: PodCgroup,
    /// The test's own third pod in `batch` (systemd driver).
    third: PodCgroup,
}

/// The third pod of [`AnnotatedPods`]: its name, its service account, and
/// the account that service account's annotation names (`None`: it has
/// no annotation).
type ThirdPod<'a> = (&'a str, &'a str, Option<&'a str>);

impl AnnotatedPods {
    /// The pods get IDs from `seed`, `seed + 1` and `seed + 2`; the node
    /// holds `grants`; the `pods` rule grants `scopes`, and `more_rules`
    /// follow it. `None` where the kernel will not have the cgroups.
    async fn start(
        seed: u32,
        third: ThirdPod<'_>,
        grants: &[(&str, Permission)],
        scopes: &str,
        more_rules: &str,
    ) -> Option<AnnotatedPods> {
        let (third_name, third_account, third_annotation) = third;
        let (api, api_uid, api_cid) = pod_container(seed, Driver::Systemd)?;
        let (batch, batch_uid, batch_cid) = pod_container(seed + 1, Driver::Cgroupfs)?;
        let (third, third_uid, third_cid) = pod_container(seed + 2, Driver::Systemd)?;
        let emulator = support::emulator_granting_the_node(grants).await;
        let kubelet = Kubelet::start(KubeletOptions::default()).await.unwrap();
        kubelet.add_pod(&stand_in_pod(
            "payments", "api-1", &api_uid, "api-sa", &api_cid,
        ));
        kubelet.add_pod(&stand_in_pod(
            "batch", "job-1", &batch_uid, "job-sa", &batch_cid,
        ));
        kubelet.add_pod(&stand_in_pod(
            "batch",
            third_name,
            &third_uid,
            third_account,
            &third_cid,
        ));
        let annotated = |account: Option<&str>| {
            account
                .map(|account| {
                    (
                        "iam.gke.io/gcp-service-account".to_owned(),
                        account.to_owned(),
                    )
                })
                .into_iter()
                .collect()
        };
        kubelet.set_service_account("payments", "api-sa", annotated(Some(API_ACCOUNT)));
        kubelet.set_service_account("batch", "job-sa", annotated(Some(BATCH_ACCOUNT)));
        kubelet.set_service_account("batch", third_account, annotated(third_annotation));
        let rules = format!(
            "[[identities]]\nname = \"pods\"\nsource = \"impersonate\"\nbase = \"default\"\n\
             service_account_from = \"k8s_service_account_annotation\"\niam_endpoint = \"{}\"\n\
             [[policy]]\nk8s_namespaces = [\"payments\", \"batch\"]\nidentities = [\"pods\"]\n\
             audiences = [\"{AUDIENCE}\"]\nscopes = [\"{scopes}\"]\n{more_rules}",
            emulator.base_url()
        );
        let broker = broker_with(&emulator, &kubelet, "", &rules).await;
        Some(AnnotatedPods {
            broker,
            kubelet,
            emulator,
            api,
            batch,
            third,
        })
    }
}

/// Issue 14 point 4 over the socket: one per-workload identity
/// (`service_account_from = "k8s_service_account_annotation"`) mints, for
/// each pod attested by its cgroup, as the Google account its service
/// account's annotation names (the emulator checks the node's grant on
/// each); a service account without the annotation is refused, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn over_the_socket_each_pod_gets_the_account_its_annotation_names() {
    const API: &str = API_ACCOUNT;
    const BATCH: &str = BATCH_ACCOUNT;
    let Some(AnnotatedPods {
        broker,
        kubelet,
        emulator,
        api,
        batch,
        third: bare,
    }) = AnnotatedPods::start(
        30,
        ("shell-1", "default", None),
        &[
            (API, Permission::OpenIdToken),
            (BATCH, Permission::OpenIdToken),
        ],
        "*",
        "[[policy]]\nk8s_service_accounts = [\"payments/api-sa\"]\nidentities = [\"default\"]\n\
         scopes = [\"https://www.googleapis.com/auth/cloud-platform\"]\n",
    )
    .await
    else {
        return;
    };

    let mut tokens = Vec::new();
    for (cgroup, account) in [(&api, API), (&batch, BATCH)] {
        let (code, token, stderr) = token_as(&broker, cgroup, "pods", AUDIENCE);
        assert_eq!(code, 0, "{account}: {stderr}\n{}", broker.log());
        let claims = support::verify(&emulator, token.trim(), AUDIENCE).await;
        assert_eq!(claims["email"], account);
        tokens.push(token);
    }
    assert_ne!(tokens[0], tokens[1], "two accounts, two tokens");
    let log = broker.log();
    for account in [API, BATCH] {
        assert!(
            log.lines()
                .any(|l| l.contains("minted_as") && l.contains(account)),
            "the audit line names the account minted as:\n{log}"
        );
    }
    let stats = emulator.stats();
    assert_eq!(stats.iam.succeeded, 2);
    assert_eq!(stats.metadata_token, 1, "one base access token for both");
    // `status` shows a pod its own entry of the per-workload identity, not
    // the other pod's (whose audience it names).
    let (code, listed, stderr) = status_in(&broker, &api);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(listed.matches("\"pods\"").count(), 1, "{listed}");
    // Asked again, each pod gets its own token back from the cache.
    let (code, again, _) = token_as(&broker, &batch, "pods", AUDIENCE);
    assert_eq!(code, 0);
    assert_eq!(again, tokens[1]);
    assert_eq!(emulator.stats().iam.total, 2);

    // Access tokens are decided on the attested pod too: the api pod's
    // service account is granted the node's, the batch pod's is not.
    let access = |cgroup| {
        cli_in(
            cgroup,
            &[
                "token",
                "--socket",
                broker.socket.to_str().unwrap(),
                "--access",
            ],
        )
    };
    let (code, _, stderr) = access(&api);
    assert_eq!(code, 0, "the api pod's access token: {stderr}");
    let (code, _, stderr) = access(&batch);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    // The API server is down when its service account is first read (the
    // pod list is still held): UNAVAILABLE, naming the service account.
    kubelet.set_down(true);
    let (code, _, stderr) = token_as(&broker, &bare, "pods", AUDIENCE);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("UNAVAILABLE")
            && stderr.contains("cannot read the annotations of service account batch/default"),
        "{stderr}"
    );
    kubelet.set_down(false);
    let (code, _, stderr) = token_as(&broker, &bare, "pods", AUDIENCE);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("FAILED_PRECONDITION"), "{stderr}");
    assert!(
        stderr.contains("iam.gke.io/gcp-service-account") && stderr.contains("batch/default"),
        "the refusal names the annotation and the service account: {stderr}"
    );
    assert_eq!(emulator.stats().iam.total, 2, "nothing minted for it");
}

/// Python's gRPC (unmodified grpcio, the example's stubs) opening a
/// `WatchAccessToken` stream for `identity`, run in `cgroup` (as root: the
/// venv's interpreter lives under root's home, which other uids cannot
/// reach; the pod is known by its cgroup whatever the uid): (exit code, the
/// first token, stderr).
async fn watch_access_in(
    cgroup: &PodCgroup,
    broker: &Broker,
    identity: &str,
) -> (i32, String, String) {
    const WATCH: &str = r#"
import sys, grpc
sys.path.insert(0, sys.argv[2])
from tokenbroker.v1 import token_broker_pb2, token_broker_pb2_grpc
channel = grpc.insecure_channel(
    "unix://" + sys.argv[1], options=[("grpc.default_authority", "localhost")]
)
stream = token_broker_pb2_grpc.TokenBrokerStub(channel).WatchAccessToken(
    token_broker_pb2.GetAccessTokenRequest(identity=sys.argv[3]), timeout=30
)
try:
    print(next(stream).token)
except grpc.RpcError as e:
    print(f"{e.code().name}: {e.details()}", file=sys.stderr)
    sys.exit(1)
stream.cancel()
"#;
    let (python, stubs) = crate::clients::python_grpc().await;
    let mut command = Command::new(python);
    command
        .arg("-c")
        .arg(WATCH)
        .arg(&broker.socket)
        .arg(stubs)
        .arg(identity)
        .stdin(Stdio::null());
    workloads::place(&mut command, Some(&cgroup.procs()), 0, 0, &[0], || Ok(()));
    let out = tokio::task::spawn_blocking(move || command.output().expect("client runs"))
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 14 point 4 for access tokens, over the socket: gRPC
/// `GetAccessToken` (the CLI's `token --access`) from each pod's cgroup
/// gets an access token of the Google account its service account's
/// annotation names (the emulator's tokeninfo says whose), both minted with
/// the node's one base token; a pod annotated with an account the node may
/// not mint access tokens for gets Google's refusal, naming the missing
/// permission; a pod lists only its own entry.
#[tokio::test(flavor = "multi_thread")]
async fn over_the_socket_each_pod_gets_an_access_token_of_its_own_account() {
    const API: &str = API_ACCOUNT;
    const BATCH: &str = BATCH_ACCOUNT;
    const UNGRANTED: &str = "ungranted@apps.iam.gserviceaccount.com";
    const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";
    let Some(AnnotatedPods {
        broker,
        emulator,
        api,
        batch,
        third: job,
        // Held: the pods' kubelet serves until the test ends.
        kubelet: _kubelet,
    }) = AnnotatedPods::start(
        33,
        ("cron-1", "cron-sa", Some(UNGRANTED)),
        &[
            (API, Permission::AccessToken),
            (BATCH, Permission::AccessToken),
            // The node may mint UNGRANTED's ID tokens, not its access tokens.
            (UNGRANTED, Permission::OpenIdToken),
        ],
        CLOUD,
        "",
    )
    .await
    else {
        return;
    };
    let access = |cgroup| {
        cli_in(
            cgroup,
            &[
                "token",
                "--socket",
                broker.socket.to_str().unwrap(),
                "--identity",
                "pods",
                "--access",
            ],
        )
    };

    let mut tokens = Vec::new();
    for (cgroup, account) in [(&api, API), (&batch, BATCH)] {
        let (code, token, stderr) = access(cgroup);
        assert_eq!(code, 0, "{account}: {stderr}\n{}", broker.log());
        let token = token.trim().to_owned();
        let info = broker.served_access_token_info(&emulator, &token).await;
        assert_eq!(info["email"], account, "{info}");
        assert_eq!(info["scope"], CLOUD, "{info}");
        tokens.push(token);
    }
    assert_ne!(tokens[0], tokens[1], "two accounts, two tokens");
    let stats = emulator.stats();
    assert_eq!(stats.iam_access, 2, "one generateAccessToken per account");
    assert_eq!(stats.metadata_token, 1, "one base access token for both");
    let log = broker.log();
    for account in [API, BATCH] {
        assert!(
            log.lines().any(|l| l.contains("GetAccessToken")
                && l.contains("minted_as")
                && l.contains(account)),
            "the audit line names the account minted as:\n{log}"
        );
    }
    // Asked again, each pod gets its own token back from the cache.
    let (code, again, stderr) = access(&api);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again.trim(), tokens[0]);
    assert_eq!(emulator.stats().iam_access, 2);
    // A `WatchAccessToken` stream from the batch pod opens on the batch
    // pod's own cached token (the key holds the account), not the api
    // pod's, and mints nothing.
    let (code, watched, stderr) = watch_access_in(&batch, &broker, "pods").await;
    assert_eq!(code, 0, "{stderr}\n{}", broker.log());
    assert_eq!(watched.trim(), tokens[1], "the batch pod's own token");
    assert_eq!(emulator.stats().iam_access, 2);
    let log = broker.log();
    assert!(
        log.lines().any(|l| l.contains("WatchAccessToken")
            && l.contains("minted_as")
            && l.contains(BATCH)),
        "the watch's audit line names the account:\n{log}"
    );
    // `status` shows the batch pod its own access entry, not the api pod's.
    let (code, listed, stderr) = status_in(&broker, &batch);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(listed.matches("\"pods\"").count(), 1, "{listed}");

    // An account the node may not mint access tokens for: Google's
    // refusal, checked upstream, naming the account and the permission.
    let (code, out, stderr) = access(&job);
    assert_eq!(code, 1, "{out}{stderr}");
    assert!(
        stderr.contains("FAILED_PRECONDITION")
            && stderr.contains(&format!("generateAccessToken for {UNGRANTED}"))
            && stderr.contains("(HTTP 403)")
            && stderr.contains("missing permission: iam.serviceAccounts.getAccessToken"),
        "{stderr}"
    );
    let stats = emulator.stats();
    assert_eq!(stats.iam_access, 3, "the grant was checked upstream");
    assert_eq!(stats.metadata_token, 1);
}

/// The DaemonSet's setup, for real: the broker in a pod cgroup of its own,
/// in its own pid, mount and cgroup namespaces (a pod without `hostPID`),
/// its `/proc` its own, the host's `/proc` mounted at `proc_root`. A client
/// pod's process, invisible in the broker's `/proc` and shown by the
/// kernel with a cgroup path relative to the broker's cgroup namespace
/// (`/../../../kubepods-burstable.slice/...`), is still found and attested.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_without_host_pid_reads_its_peers_through_the_hosts_proc() {
    let Some((client, uid, cid)) = pod_container(10, Driver::Systemd) else {
        return;
    };
    let (broker_uid, broker_cid) = ids(11);
    let Some(broker_cgroup) = PodCgroup::at(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{broker_cid}.scope",
        broker_uid.replace('-', "_")
    )) else {
        return;
    };
    let emulator = support::emulator().await;
    let kubelet = Kubelet::start(KubeletOptions::default()).await.unwrap();
    kubelet.add_pod(&stand_in_pod(
        "payments",
        "api-7f9c8d6b5-h0stp",
        &uid,
        "api-sa",
        &cid,
    ));
    let dir = support::workdir();
    support::set_mode(dir.path(), 0o755);
    let socket = dir.path().join("broker.sock");
    let host_proc = dir.path().join("host-proc");
    std::fs::create_dir(&host_proc).unwrap();
    let identity = support::metadata_identity("default", &emulator);
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[kubernetes]\nkubelet_url = \"{url}\"\napi_server_url = \"{url}\"\nproc_root = \"{}\"\n\n{}",
            support::config_text(&socket, &identity)
                .replace("[server]\n", "[server]\nsocket_mode = \"0666\"\n"),
            host_proc.display(),
            payments_rule(),
            url = kubelet.url(),
        ),
    )
    .unwrap();
    // As the container runtime would: into the pod's cgroup, then new pid
    // and mount namespaces with the host's /proc kept aside and a /proc of
    // their own, then a cgroup namespace rooted at the pod's cgroup.
    let script = r#"set -e
echo 0 > "$1"
mount --bind /proc "$2"
mount -t proc proc /proc
exec unshare --cgroup -- "$3" serve --config "$4""#;
    let log_path = dir.path().join("broker.log");
    let mut command = Command::new("unshare");
    command
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(broker_cgroup.procs())
        .arg(&host_proc)
        .arg(env!("CARGO_BIN_EXE_token-broker"))
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info,token_broker=trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("SKIPPED: cannot run unshare ({error})");
            return;
        }
    };
    let broker = Broker {
        child,
        socket,
        log_path,
        dir,
        served: Default::default(),
    };
    broker.wait_ready().await;

    let (code, token, stderr) = token_in(&broker, &client, AUDIENCE);
    let log = broker.log();
    assert_eq!(code, 0, "{stderr}\n{log}");
    support::verify(&emulator, token.trim(), AUDIENCE).await;
    let allowed = workloads::audit_lines(&log, "decision=\"allowed\"");
    assert_eq!(allowed.len(), 1, "{log}");
    assert!(
        allowed[0].contains("k8s=payments/api-sa pod=payments/api-7f9c8d6b5-h0stp"),
        "{}",
        allowed[0]
    );
    // The kernel told the broker no pid (the client is outside its pid
    // namespace); the pid it logs is the client's in the host's.
    assert!(allowed[0].contains("peer_pid="), "{}", allowed[0]);
    assert!(!allowed[0].contains("peer_pid=0 "), "{}", allowed[0]);
    eprintln!("{}", allowed[0]);
}

/// `check-config` names every bad `k8s_*` selector and `[kubernetes]` key,
/// and, with no kubelet URL, the missing `NODE_NAME`.
#[test]
fn check_config_names_each_bad_kubernetes_key() {
    let dir = support::workdir();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[kubernetes]\nproc_root = \"/proc\"\n\n[[policy]]\n\
             k8s_namespaces = [\"Payments\"]\nk8s_service_accounts = [\"api-sa\"]\n\
             k8s_pod_labels = [\"app\", \"tier=-x\"]\nidentities = [\"*\"]\naudiences = [\"*\"]\n",
            support::config_text(&dir.path().join("s.sock"), "")
        ),
    )
    .unwrap();
    let (code, _, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    for expected in [
        "policy[0].k8s_namespaces[0]: \"Payments\" is not a namespace name",
        "policy[0].k8s_service_accounts[0]: \"api-sa\" is not `namespace/name`",
        "policy[0].k8s_pod_labels[0]: \"app\" is not `key=value`",
        "policy[0].k8s_pod_labels[1]: \"-x\" in \"tier=-x\" is not a label value",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in {stderr}"
        );
    }
    // The selectors fixed, the kubelet's address is the problem left.
    let fixed = std::fs::read_to_string(&config)
        .unwrap()
        .replace("Payments", "payments")
        .replace("\"api-sa\"", "\"payments/api-sa\"")
        .replace("\"app\", \"tier=-x\"", "\"app=api\"");
    std::fs::write(&config, fixed).unwrap();
    let out = support::base_command(&["check-config", "--config", config.to_str().unwrap()])
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    let (code, stderr) = (out.status.code(), String::from_utf8_lossy(&out.stderr));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("kubernetes.kubelet_url: not set, and NODE_NAME is not in the environment"),
        "{stderr}"
    );
}
