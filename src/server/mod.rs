//! Running the daemon: turn validated settings into sources and a cache,
//! bind the socket, serve gRPC (TokenBroker, health, reflection) until told
//! to stop, then drain and remove the socket.

mod accept;
mod admission;
mod audit;
pub mod grpc;
pub mod http_listener;
mod idle;
mod listing;
mod live;
pub mod loopback_peer;
pub mod metadata_endpoint;
mod metadata_paths;
pub mod peer;
pub mod pod_peer;
mod rate_limit;
mod reload;
mod share;
pub mod socket;
pub mod systemd;
pub mod telemetry;
mod watch_stream;
mod workload_account;

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    sync::Arc,
    time::Duration,
};

use crate::{
    cache::{CacheKey, TokenCache},
    clock::Clock,
    config::{ConfigError, IdentitySettings, LimitSettings, Settings},
    domain::Problem,
    kubernetes::PodDirectory,
    policy::Policy,
    proto::token_broker_server::TokenBrokerServer,
    source::{build_sources, IdTokenSource},
};

/// How long in-flight calls may take to finish after a stop signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The wire contract's descriptor set, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tokenbroker_descriptor.bin"));

/// Settings checked and turned into live parts, ready to serve.
pub struct Prepared {
    pub settings: Settings,
    pub policy: Arc<Policy>,
    /// The socket's group, resolved.
    pub socket_group: Option<u32>,
    pub identities: Vec<(IdentitySettings, Arc<dyn IdTokenSource>)>,
    pub socket_path: PathBuf,
    pub socket_mode: u32,
    pub clock: Clock,
    /// The node's pods (`[kubernetes]`), for attesting connections from pods.
    pub pods: Option<Arc<PodDirectory>>,
}

impl Prepared {
    /// Validates `settings` and builds every identity's source (reading key
    /// files), reporting all problems at once.
    pub fn new(
        settings: Settings,
        env: &HashMap<String, String>,
        clock: Clock,
    ) -> Result<Self, ConfigError> {
        // The config's own problems and the policy's, reported together.
        let mut problems = settings.problems();
        let policy = Policy::compile(&settings.policy).unwrap_or_else(|policy_problems| {
            problems.extend(policy_problems);
            Policy::default()
        });
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let policy = Arc::new(policy);
        let socket_group =
            match &settings.server.socket_group {
                Some(group) => Some(group.resolve_group().map_err(|m| {
                    ConfigError::Invalid(vec![Problem::new("server.socket_group", m)])
                })?),
                None => None,
            };
        let (identities, mut problems) =
            build_sources(&settings.effective_identities(env), env, &clock);
        let configured = |name: &str| identities.iter().any(|(id, _)| id.name == name);
        let mut require = |key: String, name: &str| {
            if !configured(name) {
                problems.push(Problem::new(
                    key,
                    format!("no identity named {name:?} is configured"),
                ));
            }
        };
        for (i, prefetch) in settings.prefetch.iter().enumerate() {
            require(format!("prefetch[{i}].identity"), &prefetch.identity);
        }
        if let Some(endpoint) = &settings.metadata_endpoint {
            require("metadata_endpoint.identity".into(), &endpoint.identity);
        }
        for (i, sink) in settings.sinks.iter().enumerate() {
            require(format!("sinks[{i}].identity"), &sink.identity);
        }
        let pods = match &settings.kubernetes {
            Some(k) => match PodDirectory::new(k, env) {
                Ok(pods) => Some(Arc::new(pods)),
                Err(problem) => {
                    problems.push(problem);
                    None
                }
            },
            None => None,
        };
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Self {
            pods,
            policy,
            socket_group,
            socket_path: settings.socket_path(env),
            socket_mode: settings.socket_mode(),
            settings,
            identities,
            clock,
        })
    }

    /// A human summary of what `serve` would run, for `check-config`.
    pub fn describe(&self) -> String {
        let r = &self.settings.refresh;
        let mut out = format!(
            "socket: {} (mode {:04o})\nrefresh: window {}, jitter {}, retry {}..{}, idle eviction {}, max {} entries, {} upstream calls per identity, at most {}/s{}\nlog: {:?}, filter {:?}\nidentities:\n",
            self.socket_path.display(),
            self.socket_mode,
            humantime::format_duration(r.refresh_before_expiry),
            humantime::format_duration(r.jitter),
            humantime::format_duration(r.retry_initial),
            humantime::format_duration(r.retry_max),
            humantime::format_duration(r.idle_evict_after),
            r.max_entries,
            r.upstream_concurrency,
            r.upstream_qps,
            budget_shortfall(r)
                .map(|need| format!(" (WARNING: {} entries refreshed need {need:.1}/s)", r.max_entries))
                .unwrap_or_default(),
            self.settings.log.format,
            self.settings.log.filter,
        );
        for (identity, source) in &self.identities {
            if let Some(chain) = source.chain() {
                out.push_str(&format!("  {}: {chain}\n", identity.name));
                continue;
            }
            out.push_str(&format!(
                "  {}: {} via {}",
                identity.name,
                identity.source,
                source.upstream()
            ));
            if let Some(account) = source.account() {
                out.push_str(&format!(" as {account}"));
            }
            out.push('\n');
        }
        for prefetch in &self.settings.prefetch {
            out.push_str(&format!(
                "prefetch ({}): {}\n",
                prefetch.identity,
                prefetch.audiences.join(", ")
            ));
        }
        if self.settings.server.ready_after_prefetch {
            out.push_str("readiness waits for prefetch\n");
        }
        if self.policy.is_open() {
            out.push_str(
                "policy: none, so any process that can open the socket may get any token\n",
            );
            let pods_reach_endpoint = self.pods.is_some()
                && self
                    .settings
                    .metadata_endpoint
                    .as_ref()
                    .is_some_and(|e| !e.listen.ip().is_loopback());
            if pods_reach_endpoint {
                out.push_str(
                    "policy: none, so every pod the kubelet lists on this node may get any token \
                     through the metadata endpoint\n",
                );
            }
        } else {
            out.push_str(&format!(
                "policy: {} rule(s); requests no rule allows are denied\n",
                self.settings.policy.len()
            ));
        }
        if let Some(endpoint) = &self.settings.metadata_endpoint {
            out.push_str(&format!(
                "metadata endpoint: http://{} serving identity {:?}\n",
                endpoint.listen, endpoint.identity
            ));
        }
        if let Some(telemetry) = &self.settings.telemetry {
            out.push_str(&format!(
                "telemetry: http://{}/metrics, /healthz, /readyz\n",
                telemetry.listen
            ));
        }
        if let Some(pods) = &self.pods {
            out.push_str(&format!(
                "kubernetes: pods from {}, /proc at {}\n",
                pods.origin(),
                pods.proc_root().display()
            ));
        }
        out
    }

    /// The `[[prefetch]]` keys.
    pub fn prefetch_keys(&self) -> Vec<CacheKey> {
        self.settings
            .prefetch
            .iter()
            .flat_map(|p| {
                p.audiences
                    .iter()
                    .filter_map(|a| CacheKey::new(&p.identity, a).ok())
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error(transparent)]
    MetadataEndpoint(#[from] metadata_endpoint::BindError),
    #[error("telemetry.listen {addr}: {source}")]
    Telemetry {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The calls per second `max_entries` keys need at steady state (one
/// refresh per token's usable life: Google's hour less the refresh window),
/// when that is more than `upstream_qps` grants.
fn budget_shortfall(r: &crate::config::RefreshSettings) -> Option<f64> {
    let usable = std::time::Duration::from_secs(3600).saturating_sub(r.refresh_before_expiry);
    let need = crate::cache::budget::steady_state_qps(r.max_entries, usable);
    (need > f64::from(r.upstream_qps)).then_some(need)
}

pub(crate) fn warn_if_open(policy: &Policy, socket: &Path) {
    if policy.is_open() {
        tracing::warn!(
            socket = %socket.display(),
            "no [[policy]] configured: any process that can open the socket may get any token"
        );
    }
}

/// A bound, ready daemon. Dropping it without [`Server::run`] removes the socket.
pub struct Server {
    listener: tokio::net::UnixListener,
    socket: socket::SocketFile,
    cache: TokenCache,
    prefetch: Vec<CacheKey>,
    ready_after_prefetch: bool,
    /// The bound `[metadata_endpoint]`, when configured.
    metadata_endpoint: Option<metadata_endpoint::MetadataEndpoint>,
    /// The bound `[telemetry]` listener, when configured.
    telemetry: Option<telemetry::Telemetry>,
    live: Arc<live::Live>,
    limits: LimitSettings,
    /// What a reload compares against.
    running: Running,
    reload: Option<Reload>,
    /// Installed at bind so a SIGHUP never hits the default action (exit).
    hangup: Option<tokio::signal::unix::Signal>,
    /// The clock token files are timed by.
    clock: crate::clock::Clock,
    /// The node's pods, for attesting connections from pods.
    pods: Option<Arc<PodDirectory>>,
}

pub use accept::raise_descriptor_limit;
pub use reload::Reload;
use reload::Running;

impl Server {
    /// Binds the socket; fails if it is live or not a socket.
    pub fn bind(prepared: Prepared) -> Result<Self, ServeError> {
        let cache = TokenCache::new(
            prepared
                .identities
                .iter()
                .map(|(identity, source)| (identity.name.clone(), source.clone())),
            prepared.settings.refresh.clone(),
            prepared.clock.clone(),
        );
        let (listener, socket) = socket::bind(
            &prepared.socket_path,
            prepared.socket_mode,
            prepared.socket_group,
        )?;
        let live = Arc::new(live::Live::new(
            prepared.policy.clone(),
            prepared.settings.limits.clone(),
        ));
        // Bound now, so a busy port fails startup rather than the first client.
        let metadata_endpoint = prepared
            .settings
            .metadata_endpoint
            .as_ref()
            .map(|settings| {
                metadata_endpoint::MetadataEndpoint::bind(
                    settings,
                    cache.clone(),
                    live.clone(),
                    prepared.pods.clone(),
                )
            })
            .transpose()?;
        let telemetry = match &prepared.settings.telemetry {
            Some(t) => {
                Some(
                    telemetry::Telemetry::bind(t).map_err(|source| ServeError::Telemetry {
                        addr: t.listen,
                        source,
                    })?,
                )
            }
            None => None,
        };
        warn_if_open(&prepared.policy, &prepared.socket_path);
        let r = &prepared.settings.refresh;
        if let Some(need) = budget_shortfall(r) {
            tracing::warn!(
                max_entries = r.max_entries,
                upstream_qps = r.upstream_qps,
                needed_qps = format!("{need:.1}"),
                "refresh.max_entries keys cannot all be kept fresh within refresh.upstream_qps: \
                 raise upstream_qps or lower max_entries"
            );
        }
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(
                |e| tracing::warn!(error = %e, "cannot listen for SIGHUP; reload is unavailable"),
            )
            .ok();
        Ok(Self {
            listener,
            socket,
            cache,
            prefetch: prepared.prefetch_keys(),
            ready_after_prefetch: prepared.settings.server.ready_after_prefetch,
            metadata_endpoint,
            telemetry,
            live,
            limits: prepared.settings.limits.clone(),
            running: Running {
                fingerprints: prepared
                    .identities
                    .iter()
                    .map(|(id, source)| (id.name.clone(), source.fingerprint()))
                    .collect(),
                settings: prepared.settings,
            },
            reload: None,
            hangup,
            clock: prepared.clock,
            pods: prepared.pods,
        })
    }

    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Enables SIGHUP reload: `reload` re-reads and validates the config.
    pub fn with_reload(mut self, reload: Reload) -> Self {
        self.reload = Some(reload);
        self
    }

    /// Where the telemetry listener listens, when configured.
    pub fn telemetry_addr(&self) -> Option<std::net::SocketAddr> {
        self.telemetry
            .as_ref()
            .and_then(telemetry::Telemetry::local_addr)
    }

    /// Where the metadata-compatible endpoint listens, when configured.
    pub fn metadata_endpoint_addr(&self) -> Option<std::net::SocketAddr> {
        self.metadata_endpoint
            .as_ref()
            .map(metadata_endpoint::MetadataEndpoint::local_addr)
    }

    /// Serves until `shutdown` completes, then lets in-flight calls finish
    /// (up to [`DRAIN_TIMEOUT`]) and removes the socket file.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server {
            listener,
            socket,
            cache,
            prefetch,
            ready_after_prefetch,
            metadata_endpoint,
            telemetry,
            live,
            limits,
            running,
            reload,
            hangup,
            clock,
            pods,
        } = self;
        // Token files, kept from the same cache; a reload applies `[[sinks]]`.
        let mut sinks = Some(crate::sink::SinkSet::start(
            cache.clone(),
            clock,
            &running.settings.refresh,
            &running.settings.sinks,
        ));
        let readiness = Arc::new(telemetry::Readiness::default());
        readiness
            .prefetch_pending
            .store(!prefetch.is_empty(), Ordering::Relaxed);
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let telemetry = telemetry.map(|t| {
            let mut stopped = stopping.clone();
            t.spawn(cache.clone(), readiness.clone(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
        });
        if let Some(hangup) = hangup {
            tokio::spawn(reload::reload_on_hangup(
                hangup,
                reload,
                running,
                cache.clone(),
                live.clone(),
                sinks.take(),
            ));
        }
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let health_after_prefetch = health_reporter.clone();
        let prefetch_readiness = readiness.clone();
        let prefetching = cache.clone();
        let wait_for_prefetch = ready_after_prefetch && !prefetch.is_empty();
        if wait_for_prefetch {
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            health_reporter
                .set_not_serving::<TokenBrokerServer<grpc::BrokerService>>()
                .await;
        } else {
            health_reporter
                .set_serving::<TokenBrokerServer<grpc::BrokerService>>()
                .await;
        }
        if !prefetch.is_empty() {
            tokio::spawn(async move {
                let count = prefetch.len();
                let started = tokio::time::Instant::now();
                prefetching.prefetch(prefetch).await;
                prefetch_readiness
                    .prefetch_pending
                    .store(false, Ordering::Relaxed);
                tracing::info!(
                    audiences = count,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "prefetch complete"
                );
                if wait_for_prefetch {
                    health_after_prefetch
                        .set_service_status("", tonic_health::ServingStatus::Serving)
                        .await;
                    health_after_prefetch
                        .set_serving::<TokenBrokerServer<grpc::BrokerService>>()
                        .await;
                }
            });
        }
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let broker = TokenBrokerServer::new(
            grpc::BrokerService::new(cache, live, &limits, stopping).with_pods(pods.clone()),
        )
        .max_decoding_message_size(limits.max_request_bytes);

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(
            tonic::transport::Server::builder()
                // Bounds each connection's concurrent calls (HTTP/2 streams).
                .max_concurrent_streams(128)
                // Each call keeps its connection from the idle timeout.
                .layer(idle::InFlightLayer)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(broker)
                .serve_with_incoming_shutdown(peer::incoming(listener, &limits, pods), async {
                    let _ = stop_rx.await;
                }),
        );
        let mut metadata_endpoint =
            metadata_endpoint.map(metadata_endpoint::MetadataEndpoint::spawn);
        tracing::info!(socket = %socket.path().display(), "serving");
        readiness.serving.store(true, Ordering::Relaxed);
        systemd::notify("READY=1");
        tokio::pin!(serving);
        let result = tokio::select! {
            result = &mut serving => result,
            () = shutdown => {
                tracing::info!("stopping: no new connections, finishing in-flight calls");
                systemd::notify("STOPPING=1");
                readiness.serving.store(false, Ordering::Relaxed);
                // Watch streams end with UNAVAILABLE; unary calls finish.
                let _ = stopping_tx.send(true);
                health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                health_reporter.set_not_serving::<TokenBrokerServer<grpc::BrokerService>>().await;
                let _ = stop_tx.send(());
                if let Some(endpoint) = metadata_endpoint.as_mut() {
                    endpoint.stop();
                }
                match tokio::time::timeout(DRAIN_TIMEOUT, &mut serving).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(timeout_s = DRAIN_TIMEOUT.as_secs(), "calls still running after the drain timeout; stopping anyway");
                        serving.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        if let Some(endpoint) = metadata_endpoint {
            endpoint.finish().await;
        }
        let _ = stopping_tx.send(true);
        if let Some(telemetry) = telemetry {
            let _ = telemetry.await;
        }
        drop(socket);
        tracing::info!("stopped");
        match result {
            Ok(served) => served.map_err(ServeError::from),
            Err(join) => {
                tracing::error!(error = %join, "gRPC server task failed");
                Ok(())
            }
        }
    }
}

/// Installs SIGTERM and SIGINT handlers now, and returns a future that
/// resolves when either arrives. Install before binding the socket: a client
/// can connect as soon as it exists, and a stop signal sent then must stop
/// the daemon gracefully rather than kill it.
pub fn stop_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
