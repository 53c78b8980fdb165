//! The optional `[telemetry]` HTTP listener: Prometheus text at `/metrics`,
//! `/healthz` (the process is alive) and `/readyz` (the socket is bound and,
//! when `[[prefetch]]` is configured, every prefetched audience holds a token).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use super::http_listener::{ConnectionLimits, HttpListener};
use crate::{cache::TokenCache, config::TelemetrySettings};

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    pub serving: AtomicBool,
    pub prefetch_pending: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.serving.load(Ordering::Relaxed) && !self.prefetch_pending.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    cache: TokenCache,
    readiness: Arc<Readiness>,
}

/// A bound telemetry listener, not yet serving.
pub struct Telemetry {
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
}

impl Telemetry {
    pub fn bind(settings: &TelemetrySettings) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(settings.listen)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener: tokio::net::TcpListener::from_std(listener)?,
            // Scrapers are few and trusted to be polite, but not required
            // to be: no per-uid share, a small cap and short timeouts.
            limits: ConnectionLimits {
                max_connections: settings.max_connections,
                max_connections_per_uid: settings.max_connections,
                header_read_timeout: settings.header_read_timeout,
                idle_timeout: settings.idle_timeout,
            },
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop` resolves.
    pub fn spawn(
        self,
        cache: TokenCache,
        readiness: Arc<Readiness>,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(AppState { cache, readiness });
        if let Some(addr) = self.local_addr() {
            tracing::info!(%addr, "telemetry listening (/metrics, /healthz, /readyz)");
        }
        let listener = HttpListener {
            name: "telemetry",
            listener: self.listener,
            router: app,
            limits: self.limits,
            resolve_owner: false,
            pods: None,
        };
        tokio::spawn(listener.serve(stop))
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let metrics = crate::metrics::get();
    // Gauges of the cache's state are read at scrape time.
    metrics.cache_entries.set(state.cache.len() as i64);
    metrics.min_time_to_expiry.set(
        state
            .cache
            .min_time_to_expiry()
            .map_or(0.0, |d| d.as_secs_f64()),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.readiness.ready() {
        (StatusCode::OK, "ready\n")
    } else if state.readiness.prefetch_pending.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: prefetch in progress\n",
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: not serving\n")
    }
}
