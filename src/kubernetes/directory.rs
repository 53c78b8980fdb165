//! [`PodDirectory`]: the node's pods as of the last kubelet fetch, looked up
//! by UID or IP, refetched on a miss (one fetch for all concurrent misses,
//! at most one per `min_fetch_interval`), retried for a starting pod within
//! `start_race_budget`; and service accounts' annotations from the API
//! server, kept for `annotations_ttl`.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    http::{HttpSource, PodSource},
    names, Pod, PodLookupError,
};
use crate::{config::KubernetesSettings, domain::Problem};

/// Most service accounts whose annotations are kept at once.
const MAX_CACHED_ACCOUNTS: usize = 4096;
/// Oldest pod list a match by IP is answered from. A pod UID is never
/// reused, but an IP is: a pod that died frees its address, and the next
/// pod may get it while an older list still names the dead one. A short
/// age keeps that window to seconds (the pod's successor is then listed
/// too, and the address, held by two pods, names none).
pub const POD_IP_MAX_AGE: Duration = Duration::from_secs(2);

/// The node's pods, kept and looked up. Cheap to share (`Arc`).
pub struct PodDirectory {
    source: Box<dyn PodSource>,
    /// Where the pods come from, for logs and errors.
    origin: String,
    proc_root: PathBuf,
    ttl: Duration,
    min_fetch_interval: Duration,
    start_race_budget: Duration,
    annotations_ttl: Duration,
    request_timeout: Duration,
    /// The last pod list fetched.
    listing: Mutex<Option<Arc<Listing>>>,
    /// Held while one fetch runs: the single flight.
    fetch: tokio::sync::Mutex<FetchState>,
    /// Fetch attempts completed (success or not), so a waiter can tell
    /// whether one finished after it looked.
    attempts: AtomicU64,
    annotations: Mutex<HashMap<(String, String), CachedAnnotations>>,
    annotation_fetch: tokio::sync::Mutex<()>,
}

/// A service account's annotations and when they were read.
type CachedAnnotations = (Instant, Arc<BTreeMap<String, String>>);

/// One pod list, indexed.
struct Listing {
    by_uid: HashMap<String, Arc<Pod>>,
    /// Running pods by each of their IPs.
    by_ip: HashMap<IpAddr, Vec<Arc<Pod>>>,
    fetched_at: Instant,
}

#[derive(Default)]
struct FetchState {
    last_start: Option<Instant>,
    last: Option<Result<Arc<Listing>, PodLookupError>>,
}

/// A lookup that found nothing: whether a later pod list might.
struct Miss {
    error: PodLookupError,
    retry: bool,
}

impl PodDirectory {
    /// The directory `[kubernetes]` describes; `env` gives `NODE_NAME`.
    /// Nothing is fetched until the first lookup.
    pub fn new(
        settings: &KubernetesSettings,
        env: &HashMap<String, String>,
    ) -> Result<PodDirectory, Problem> {
        let source = HttpSource::new(settings, env)?;
        let own = settings.proc_root.join("self");
        if !own.exists() {
            return Err(Problem::new(
                "kubernetes.proc_root",
                format!(
                    "{} does not exist: mount the host's /proc there (hostPath /proc, read-only), or use /proc with hostPID",
                    own.display()
                ),
            ));
        }
        let origin = source.pods_url().to_string();
        Ok(Self::with_source(Box::new(source), origin, settings))
    }

    pub(super) fn with_source(
        source: Box<dyn PodSource>,
        origin: String,
        settings: &KubernetesSettings,
    ) -> PodDirectory {
        PodDirectory {
            source,
            origin,
            proc_root: settings.proc_root.clone(),
            ttl: settings.pod_cache_ttl,
            min_fetch_interval: settings.min_fetch_interval,
            start_race_budget: settings.start_race_budget,
            annotations_ttl: settings.annotations_ttl,
            request_timeout: settings.request_timeout,
            listing: Mutex::new(None),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            attempts: AtomicU64::new(0),
            annotations: Mutex::new(HashMap::new()),
            annotation_fetch: tokio::sync::Mutex::new(()),
        }
    }

    /// The kubelet's pod-list URL.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Where the host's `/proc` is read (`kubernetes.proc_root`).
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// Pod-list fetches attempted so far (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// The pod with UID `pod_uid`; with `container_id`, only if that is one
    /// of its containers. A pod or container not listed yet is waited for
    /// (refetching) up to `start_race_budget`.
    pub async fn by_uid(
        &self,
        pod_uid: &str,
        container_id: Option<&str>,
    ) -> Result<Arc<Pod>, PodLookupError> {
        if !names::is_pod_uid(pod_uid) || !container_id.is_none_or(names::is_container_id) {
            // The cgroup parser only yields well-formed values; anything
            // else is refused without asking the kubelet.
            return Err(PodLookupError::UnknownPod {
                uid: pod_uid.chars().take(64).collect(),
                waited: Duration::ZERO,
            });
        }
        self.lookup(|listing, waited| {
            let Some(pod) = listing.by_uid.get(pod_uid) else {
                return Err(Miss {
                    error: PodLookupError::UnknownPod {
                        uid: pod_uid.to_owned(),
                        waited,
                    },
                    retry: true,
                });
            };
            match container_id {
                Some(id) if !pod.containers.iter().any(|c| c == id) => Err(Miss {
                    error: PodLookupError::UnknownContainer {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        container_id: id.to_owned(),
                        waited,
                    },
                    retry: true,
                }),
                _ => Ok(pod.clone()),
            }
        })
        .await
    }

    /// The one running pod whose IP is `ip`. An IP no running pod has is
    /// waited for like a starting pod; an IP several pods share (the node's
    /// own, which every hostNetwork pod reports) names none of them.
    pub async fn by_ip(&self, ip: IpAddr) -> Result<Arc<Pod>, PodLookupError> {
        self.lookup_within(self.ttl.min(POD_IP_MAX_AGE), |listing, _| {
            let pods = listing.by_ip.get(&ip).map(Vec::as_slice).unwrap_or(&[]);
            match pods {
                [] => Err(Miss {
                    error: PodLookupError::UnknownIp { ip },
                    retry: true,
                }),
                [one] if !one.host_network => Ok(one.clone()),
                many => Err(Miss {
                    error: PodLookupError::SharedIp {
                        ip,
                        pods: many.len(),
                        host_network: many.iter().any(|p| p.host_network),
                    },
                    retry: false,
                }),
            }
        })
        .await
    }

    /// The annotations of service account `namespace/name`, from the API
    /// server, kept for `annotations_ttl`.
    pub async fn service_account_annotations(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<BTreeMap<String, String>>, PodLookupError> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(found) = self.cached_annotations(&key) {
            return Ok(found);
        }
        // One API call at a time; whoever waited finds the answer cached.
        let _one = self.annotation_fetch.lock().await;
        if let Some(found) = self.cached_annotations(&key) {
            return Ok(found);
        }
        let fetched = tokio::time::timeout(
            self.request_timeout,
            self.source.annotations(namespace, name),
        )
        .await
        .unwrap_or_else(|_| {
            Err(PodLookupError::Unavailable {
                url: format!("the API server (service account {namespace}/{name})"),
                message: format!("no answer within {}ms", self.request_timeout.as_millis()),
            })
        })?;
        let fetched = Arc::new(fetched);
        let mut cache = self
            .annotations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if cache.len() >= MAX_CACHED_ACCOUNTS {
            cache.retain(|_, (at, _)| now.duration_since(*at) < self.annotations_ttl);
            if cache.len() >= MAX_CACHED_ACCOUNTS {
                cache.clear();
            }
        }
        cache.insert(key, (now, fetched.clone()));
        Ok(fetched)
    }

    fn cached_annotations(&self, key: &(String, String)) -> Option<Arc<BTreeMap<String, String>>> {
        let cache = self
            .annotations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.annotations_ttl)
            .map(|(_, found)| found.clone())
    }

    /// Answers `find` from a pod list: the one held if younger than the
    /// TTL, else (and on a miss worth retrying) a newer one, until the
    /// start-race budget is spent.
    async fn lookup<T>(
        &self,
        find: impl Fn(&Listing, Duration) -> Result<T, Miss>,
    ) -> Result<T, PodLookupError> {
        self.lookup_within(self.ttl, find).await
    }

    /// [`Self::lookup`], answering from a held list only when it is
    /// younger than `max_age`.
    async fn lookup_within<T>(
        &self,
        max_age: Duration,
        find: impl Fn(&Listing, Duration) -> Result<T, Miss>,
    ) -> Result<T, PodLookupError> {
        let started = Instant::now();
        let deadline = started + self.start_race_budget;
        let mut seen = self.attempts.load(Ordering::Acquire);
        let held = self
            .listing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut listing = held.filter(|l| l.fetched_at.elapsed() < max_age);
        loop {
            if let Some(listing) = &listing {
                match find(listing, started.elapsed()) {
                    Ok(found) => return Ok(found),
                    Err(miss) if !miss.retry => return Err(miss.error),
                    // Only a list fetched since this lookup began can end it.
                    Err(miss) if listing.fetched_at >= started && Instant::now() >= deadline => {
                        return Err(miss.error)
                    }
                    Err(_) => {}
                }
            }
            let (outcome, attempt) = self.refresh(seen).await;
            seen = attempt;
            listing = Some(outcome?);
        }
    }

    /// The outcome of the first fetch attempt completed after attempt
    /// `seen`: one that finished while this caller waited, or a new one,
    /// started no sooner than `min_fetch_interval` after the last.
    async fn refresh(&self, seen: u64) -> (Result<Arc<Listing>, PodLookupError>, u64) {
        let mut state = self.fetch.lock().await;
        let done = self.attempts.load(Ordering::Acquire);
        if done > seen {
            if let Some(last) = &state.last {
                return (last.clone(), done);
            }
        }
        if let Some(last) = state.last_start {
            tokio::time::sleep_until(last + self.min_fetch_interval).await;
        }
        state.last_start = Some(Instant::now());
        let outcome = match tokio::time::timeout(self.request_timeout, self.source.pods()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(PodLookupError::Unavailable {
                url: self.origin.clone(),
                message: format!("no answer within {}ms", self.request_timeout.as_millis()),
            }),
        };
        let outcome = match outcome {
            Ok((pods, skipped)) => {
                if skipped > 0 {
                    tracing::warn!(
                        kubelet = %self.origin,
                        skipped,
                        "pods with malformed names, namespaces or UIDs in the pod list were ignored"
                    );
                }
                let listing = Arc::new(Listing::new(pods));
                *self.listing.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(listing.clone());
                Ok(listing)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the kubelet's pod list");
                Err(error)
            }
        };
        crate::metrics::get()
            .kubelet_fetches
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: if outcome.is_ok() { "ok" } else { "error" },
            })
            .inc();
        state.last = Some(outcome.clone());
        let attempt = self.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        (outcome, attempt)
    }
}

impl Listing {
    fn new(pods: Vec<Pod>) -> Listing {
        let mut by_uid = HashMap::with_capacity(pods.len());
        let mut by_ip: HashMap<IpAddr, Vec<Arc<Pod>>> = HashMap::new();
        for pod in pods {
            let pod = Arc::new(pod);
            if pod.running {
                for ip in &pod.pod_ips {
                    by_ip.entry(*ip).or_default().push(pod.clone());
                }
            }
            by_uid.insert(pod.uid.clone(), pod);
        }
        Listing {
            by_uid,
            by_ip,
            fetched_at: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::super::http::BoxFuture;
    use super::*;

    const UID: &str = "8a7d3e1c-5b2f-4c6d-9e0a-1b2c3d4e5f60";

    fn cid(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn pod(uid: &str, name: &str, ip: &str, host_network: bool) -> Pod {
        Pod {
            namespace: "payments".into(),
            name: name.into(),
            uid: uid.into(),
            service_account: "api-sa".into(),
            labels: BTreeMap::from([("app".into(), "api".into())]),
            pod_ips: vec![ip.parse().unwrap()],
            host_network,
            containers: vec![cid(1)],
            running: true,
        }
    }

    /// A kubelet stand-in on the paused clock: a settable pod list, an
    /// answer delay, a failure switch and a call counter.
    #[derive(Default)]
    struct FakeKubelet {
        pods: Mutex<Vec<Pod>>,
        calls: AtomicUsize,
        annotation_calls: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    impl PodSource for Arc<FakeKubelet> {
        fn pods(&self) -> BoxFuture<'_, Result<(Vec<Pod>, usize), PodLookupError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                if self.down.load(Ordering::SeqCst) {
                    return Err(PodLookupError::Unavailable {
                        url: "fake".into(),
                        message: "connection refused".into(),
                    });
                }
                Ok((self.pods.lock().unwrap().clone(), 0))
            })
        }

        fn annotations<'a>(
            &'a self,
            _namespace: &'a str,
            name: &'a str,
        ) -> BoxFuture<'a, Result<BTreeMap<String, String>, PodLookupError>> {
            Box::pin(async move {
                self.annotation_calls.fetch_add(1, Ordering::SeqCst);
                Ok(BTreeMap::from([("sa".to_owned(), name.to_owned())]))
            })
        }
    }

    fn directory(kubelet: &Arc<FakeKubelet>) -> Arc<PodDirectory> {
        Arc::new(PodDirectory::with_source(
            Box::new(kubelet.clone()),
            "fake".into(),
            &KubernetesSettings::default(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn many_concurrent_misses_share_one_fetch() {
        let kubelet = Arc::new(FakeKubelet::default());
        kubelet
            .pods
            .lock()
            .unwrap()
            .push(pod(UID, "api-1", "10.0.0.7", false));
        let pods = directory(&kubelet);
        let lookups: Vec<_> = (0..200)
            .map(|_| {
                let pods = pods.clone();
                tokio::spawn(async move { pods.by_uid(UID, Some(&cid(1))).await })
            })
            .collect();
        for lookup in lookups {
            assert_eq!(lookup.await.unwrap().unwrap().name, "api-1");
        }
        assert_eq!(kubelet.calls.load(Ordering::SeqCst), 1);
        // Within the TTL, hits by UID cost nothing; a match by IP wants a
        // list younger than POD_IP_MAX_AGE (an IP is reused, a UID never).
        tokio::time::advance(Duration::from_secs(10)).await;
        pods.by_uid(UID, None).await.unwrap();
        assert_eq!(kubelet.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            pods.by_ip("10.0.0.7".parse().unwrap()).await.unwrap().uid,
            UID
        );
        assert_eq!(kubelet.calls.load(Ordering::SeqCst), 2);
        // Past the TTL, one refetch.
        tokio::time::advance(Duration::from_secs(35)).await;
        pods.by_uid(UID, None).await.unwrap();
        assert_eq!(kubelet.calls.load(Ordering::SeqCst), 3);
    }

    /// A pod dies and another gets its IP while the held list (well inside
    /// `pod_cache_ttl`) still names the dead one: a match by IP is never
    /// answered from a list older than POD_IP_MAX_AGE, so the new pod is
    /// not taken for the old.
    #[tokio::test(start_paused = true)]
    async fn a_reused_ip_is_not_answered_from_an_old_list() {
        let kubelet = Arc::new(FakeKubelet::default());
        kubelet
            .pods
            .lock()
            .unwrap()
            .push(pod(UID, "api-1", "10.0.0.7", false));
        let pods = directory(&kubelet);
        let ip = "10.0.0.7".parse().unwrap();
        assert_eq!(pods.by_ip(ip).await.unwrap().name, "api-1");
        let successor = "99999999-8888-4777-8666-555555555555";
        *kubelet.pods.lock().unwrap() = vec![pod(successor, "batch-1", "10.0.0.7", false)];
        tokio::time::advance(POD_IP_MAX_AGE).await;
        assert_eq!(pods.by_ip(ip).await.unwrap().name, "batch-1");
        // By UID, the held list still answers (UIDs are not reused).
        assert_eq!(pods.by_uid(successor, None).await.unwrap().name, "batch-1");
        assert_eq!(kubelet.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_unknown_uids_is_bounded_by_the_fetch_interval() {
        let kubelet = Arc::new(FakeKubelet::default());
        let pods = directory(&kubelet);
        let started = Instant::now();
        let lookups: Vec<_> = (0..1000u32)
            .map(|i| {
                let pods = pods.clone();
                tokio::spawn(async move {
                    let uid = format!("{i:08x}-0000-4000-8000-000000000000");
                    pods.by_uid(&uid, None).await
                })
            })
            .collect();
        for lookup in lookups {
            let err = lookup.await.unwrap().unwrap_err();
            assert!(matches!(err, PodLookupError::UnknownPod { .. }), "{err}");
        }
        let elapsed = started.elapsed();
        let calls = kubelet.calls.load(Ordering::SeqCst);
        // 2 s of budget at one fetch per 500 ms: about five fetches, for
        // 1000 lookups.
        assert!((2..=6).contains(&calls), "{calls} fetches");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_listed_late_is_found_within_the_budget() {
        let kubelet = Arc::new(FakeKubelet::default());
        let pods = directory(&kubelet);
        let lookup = {
            let pods = pods.clone();
            tokio::spawn(async move { pods.by_uid(UID, Some(&cid(1))).await })
        };
        tokio::time::sleep(Duration::from_millis(700)).await;
        // The pod is listed, its container status not yet.
        let mut starting = pod(UID, "api-1", "10.0.0.7", false);
        starting.containers.clear();
        kubelet.pods.lock().unwrap().push(starting);
        tokio::time::sleep(Duration::from_millis(600)).await;
        kubelet.pods.lock().unwrap()[0].containers.push(cid(1));
        let found = lookup.await.unwrap().unwrap();
        assert_eq!(found.name, "api-1");
        // A container the pod never lists is refused once the budget is spent.
        let started = Instant::now();
        let err = pods.by_uid(UID, Some(&cid(9))).await.unwrap_err();
        assert!(
            matches!(err, PodLookupError::UnknownContainer { ref name, .. } if name == "api-1"),
            "{err}"
        );
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert!(err.to_string().contains("has no container"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn shared_and_unknown_ips_name_no_pod() {
        let kubelet = Arc::new(FakeKubelet::default());
        {
            let mut list = kubelet.pods.lock().unwrap();
            list.push(pod(UID, "api-1", "10.0.0.7", false));
            list.push(pod(
                "11111111-2222-4333-8444-555555555555",
                "proxy",
                "10.128.0.5",
                true,
            ));
            list.push(pod(
                "21111111-2222-4333-8444-555555555555",
                "cni",
                "10.128.0.5",
                true,
            ));
            list.push(pod(
                "31111111-2222-4333-8444-555555555555",
                "solo-host",
                "10.128.0.6",
                true,
            ));
            let mut done = pod(
                "41111111-2222-4333-8444-555555555555",
                "job",
                "10.0.0.9",
                false,
            );
            done.running = false;
            list.push(done);
        }
        let pods = directory(&kubelet);
        let shared = pods.by_ip("10.128.0.5".parse().unwrap()).await.unwrap_err();
        assert!(
            matches!(
                shared,
                PodLookupError::SharedIp {
                    pods: 2,
                    host_network: true,
                    ..
                }
            ),
            "{shared}"
        );
        let host = pods.by_ip("10.128.0.6".parse().unwrap()).await.unwrap_err();
        assert!(
            matches!(
                host,
                PodLookupError::SharedIp {
                    host_network: true,
                    ..
                }
            ),
            "{host}"
        );
        for unknown in ["10.0.0.9", "10.9.9.9"] {
            let err = pods.by_ip(unknown.parse().unwrap()).await.unwrap_err();
            assert!(matches!(err, PodLookupError::UnknownIp { .. }), "{err}");
        }
        assert_eq!(
            pods.by_ip("10.0.0.7".parse().unwrap()).await.unwrap().name,
            "api-1"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_kubelet_that_is_down_fails_lookups_at_once_with_its_reason() {
        let kubelet = Arc::new(FakeKubelet::default());
        kubelet.down.store(true, Ordering::SeqCst);
        let pods = directory(&kubelet);
        let started = Instant::now();
        let err = pods.by_uid(UID, None).await.unwrap_err();
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // Malformed input never reaches the kubelet.
        let calls = kubelet.calls.load(Ordering::SeqCst);
        assert!(pods.by_uid("../../etc", None).await.is_err());
        assert!(pods.by_uid(UID, Some("xyz")).await.is_err());
        assert_eq!(kubelet.calls.load(Ordering::SeqCst), calls);
    }

    #[tokio::test(start_paused = true)]
    async fn annotations_are_cached_for_their_ttl() {
        let kubelet = Arc::new(FakeKubelet::default());
        let pods = directory(&kubelet);
        for _ in 0..5 {
            let found = pods
                .service_account_annotations("payments", "api-sa")
                .await
                .unwrap();
            assert_eq!(found["sa"], "api-sa");
        }
        assert_eq!(kubelet.annotation_calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(61)).await;
        pods.service_account_annotations("payments", "api-sa")
            .await
            .unwrap();
        assert_eq!(kubelet.annotation_calls.load(Ordering::SeqCst), 2);
    }
}
