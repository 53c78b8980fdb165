//! Serving an HTTP router on a TCP listener so that no client can starve it
//! or the daemon: HTTP/1.1 only (no h2c, no prior-knowledge HTTP/2), a
//! header-read timeout, a 64 KiB cap on a request's head, an idle timeout
//! ([`super::idle`]), a cap on open
//! connections (and, when the peer's uid is resolved, a per-uid share of
//! it; for a pod known only by its source address, a share per address),
//! connections over the cap closed at accept, and an accept loop that
//! backs off when descriptors run out. Used by the metadata endpoint and the
//! telemetry listener.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{response::Response, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinSet};
use tower::ServiceExt;

use crate::attest::{process::boottime_ticks, Attestation};

use super::{
    accept::{AcceptBackoff, RefusalLog},
    idle::{Activity, IdleTimeout, Tracked},
    loopback_peer::{self, SocketOwner, Unresolved},
    peer::PeerCredentials,
    pod_peer,
    share::{Sharer, Shares},
};
use crate::kubernetes::PodDirectory;

/// Largest request head (request line and headers) read, in bytes.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Bounds on one listener's connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Per resolved uid (or pod source address); equal to
    /// `max_connections` for no share.
    pub max_connections_per_uid: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// One accepted connection, in every request's extensions.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The client as policy decisions see it (the uid owning its socket and
    /// that uid's primary group), when the listener resolves it.
    pub owner: Option<Result<PeerCredentials, Unresolved>>,
}

/// What a listener answers each request with.
pub trait Answer: Clone + Send + Sync + 'static {
    /// Called on a clone (a reference count) per request.
    fn answer(
        self,
        request: hyper::Request<hyper::body::Incoming>,
        connection: Arc<Connection>,
    ) -> impl Future<Output = Response> + Send + 'static;
}

/// An axum router (telemetry): the [`Connection`] is in each request's
/// extensions.
impl Answer for Router {
    fn answer(
        self,
        request: hyper::Request<hyper::body::Incoming>,
        connection: Arc<Connection>,
    ) -> impl Future<Output = Response> + Send + 'static {
        let mut request = request.map(axum::body::Body::new);
        request
            .extensions_mut()
            .insert(Connection::clone(&connection));
        async move {
            match self.oneshot(request).await {
                Ok(response) => response,
                Err(infallible) => match infallible {},
            }
        }
    }
}

/// A listener's name (for logs), what answers its requests (an axum
/// router, or a plain function where routing layers cost too much), its
/// limits, and whether each peer's owning uid is resolved at accept.
pub struct HttpListener<A: Answer = Router> {
    pub name: &'static str,
    pub listener: TcpListener,
    pub router: A,
    pub limits: ConnectionLimits,
    pub resolve_owner: bool,
    /// With `resolve_owner`: a peer with no socket on this host (another
    /// network namespace) is attested by its source address as a pod.
    pub pods: Option<Arc<PodDirectory>>,
}

impl<A: Answer> HttpListener<A> {
    /// Serves until `stop` resolves, then lets open requests finish.
    pub async fn serve(self, stop: impl Future<Output = ()>) {
        let HttpListener {
            name,
            listener,
            router,
            limits,
            resolve_owner,
            pods,
        } = self;
        let shares = Shares::new(limits.max_connections, limits.max_connections_per_uid);
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let mut connections = JoinSet::new();
        let mut backoff = AcceptBackoff::new(name);
        let mut refusals = RefusalLog::default();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            backoff.failed(&error).await;
                            continue;
                        }
                    };
                    backoff.accepted();
                    let Ok(local) = stream.local_addr() else { continue };
                    // Over the cap nobody is served: skip asking the kernel.
                    let owner = (resolve_owner && !shares.full())
                        .then(|| loopback_peer::owner(peer, local));
                    let uid = owner.as_ref().and_then(|o| o.as_ref().ok().map(|o| o.uid));
                    let accepted = match (owner, &pods) {
                        (None, _) => AcceptedPeer::Unasked,
                        (Some(Ok(owner)), pods) => AcceptedPeer::Owned(owner, pods.clone()),
                        (Some(Err(unresolved)), Some(pods)) => {
                            AcceptedPeer::MaybePod(unresolved, Arc::clone(pods))
                        }
                        (Some(Err(unresolved)), None) => AcceptedPeer::Unresolved(unresolved),
                    };
                    // No socket here: a pod, counted by its address.
                    let sharer = match accepted {
                        AcceptedPeer::MaybePod(..) => {
                            Sharer::Address(pod_peer::canonical(peer.ip()))
                        }
                        _ => Sharer::Uid(uid),
                    };
                    // Processes started after this cannot be the client.
                    let accepted_ticks = boottime_ticks().unwrap_or(0);
                    let place = match shares.take(sharer) {
                        Ok(place) => place,
                        Err(full) => {
                            if refusals.due() {
                                let (limit, key) = full.limit_and_key();
                                tracing::warn!(
                                    listener = name, %peer, peer_uid = uid, limit,
                                    sharer = %sharer,
                                    refused = refusals.take(),
                                    "connections refused: {name}.{key} reached"
                                );
                            }
                            continue;
                        }
                    };
                    connections.spawn(serve_connection(
                        stream,
                        (peer, local, accepted, accepted_ticks),
                        router.clone(),
                        limits.clone(),
                        closing.clone(),
                        place,
                    ));
                }
            }
        }
        drop(listener);
        let _ = closing_tx.send(true);
        while connections.join_next().await.is_some() {}
    }
}

/// What accept learned of a connection's peer; resolved further off the
/// accept loop.
enum AcceptedPeer {
    /// Not asked (telemetry, or every place taken).
    Unasked,
    /// Its socket is on this host, created by a uid; with the node's pods
    /// (`[kubernetes]`) when its cgroup may name one (a hostNetwork pod).
    Owned(SocketOwner, Option<Arc<PodDirectory>>),
    /// No socket here, and no pods to look it up in.
    Unresolved(Unresolved),
    /// No socket here: perhaps a pod, looked up by its source address.
    MaybePod(Unresolved, Arc<PodDirectory>),
}

async fn serve_connection<A: Answer>(
    stream: tokio::net::TcpStream,
    (peer, local, accepted, accepted_ticks): (SocketAddr, SocketAddr, AcceptedPeer, u64),
    router: A,
    limits: ConnectionLimits,
    mut closing: tokio::sync::watch::Receiver<bool>,
    place: super::share::Place,
) {
    // The user database may be remote (LDAP, sssd) and /proc is searched
    // for the socket's process: once per connection, off the async workers.
    let owner = match accepted {
        AcceptedPeer::Owned(SocketOwner { uid, inode }, pods) => {
            let attested = tokio::task::spawn_blocking(move || {
                let attestation = Attestation::of_tcp_socket(inode, uid, accepted_ticks);
                (PeerCredentials::of_uid(uid), attestation)
            })
            .await;
            Some(Ok(match attested {
                // The pod its cgroup names, as for a Unix-socket peer: a
                // hostNetwork pod reaches this door over loopback.
                Ok((credentials, attestation)) => credentials.with_attestation(
                    attestation
                        .with_pod(pods.as_deref(), super::peer::POD_WAIT)
                        .await,
                ),
                Err(_) => PeerCredentials::of_uid_without_group(uid),
            }))
        }
        // Not this host's: the pod holding the source address, looked up
        // here, off the accept loop, once per connection.
        AcceptedPeer::MaybePod(unresolved, pods) => {
            let address = pod_peer::canonical(peer.ip());
            Some(match pod_peer::attest(&*pods, address).await {
                Ok(attestation) => Ok(PeerCredentials::of_source_address(address, attestation)),
                Err(why) => Err(Unresolved {
                    peer: unresolved.peer,
                    why: format!("{}; as a pod: {why}", unresolved.why),
                }),
            })
        }
        AcceptedPeer::Unresolved(unresolved) => Some(Err(unresolved)),
        AcceptedPeer::Unasked => None,
    };
    let connection = Arc::new(Connection { peer, local, owner });
    let activity = Activity::new();
    let io = IdleTimeout::new(stream, activity.clone(), limits.idle_timeout);
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let busy = activity.begin();
            let answering = router.clone().answer(request, Arc::clone(&connection));
            async move {
                let response = answering.await;
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, Some(busy))))
            }
        });
    let serving = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Requests here are a line and a few headers: a head larger than
        // this is refused (431), so each connection holds little memory.
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(io), service);
    let mut serving = Box::pin(serving);
    let finished = tokio::select! {
        result = serving.as_mut() => Some(result),
        _ = closing.wait_for(|closing| *closing) => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            serving.as_mut().graceful_shutdown();
            serving.as_mut().await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection closed");
    }
    // The place first, then the socket: a client that sees its connection
    // close can connect again at once.
    drop(place);
    drop(serving);
}
