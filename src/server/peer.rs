//! Peer credentials, read once per connection at accept time, and the
//! connection's workload attestation.
//!
//! The kernel records the client's uid, gid and pid when it connects
//! (SO_PEERCRED). At accept the process is also pinned by a pidfd, and its
//! workload (supplementary groups, executable, systemd unit) is read from
//! `/proc` on a blocking thread, off the accept loop ([`crate::attest`]),
//! and a pod its cgroup names is looked up in the kubelet's pod list
//! ([`crate::kubernetes`]); requests wait for that one reading. Only a
//! reading confirmed to describe the connecting process is used by the
//! policy.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UnixStream,
    sync::watch,
};
use tokio_stream::Stream;

use super::{
    accept::{AcceptBackoff, RefusalLog},
    idle::{Activity, IdleTimeout},
    share::{Place, Sharer, Shares},
};
use crate::{
    attest::{process::Pinned, Attestation},
    config::LimitSettings,
    domain::LogText,
    kubernetes::PodDirectory,
    policy::Caller,
};

/// Longest a request waits for its connection's attestation; past it the
/// connection is unattested (its uid and primary gid still count).
const ATTEST_WAIT: Duration = Duration::from_secs(5);

/// Longest the kubelet lookup of a connection's pod may take (inside
/// `ATTEST_WAIT`, so a slow kubelet costs the connection its `k8s_*`
/// selectors, not its other attested selectors).
pub(super) const POD_WAIT: Duration = Duration::from_secs(4);

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Default)]
pub struct PeerCredentials {
    /// `None` for a caller known only by its source address (below).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
    /// The attested executable, for logs.
    pub exe: Option<Arc<str>>,
    /// The connection's workload, once attested ([`PeerCredentials::attested`]).
    pub attestation: Option<Arc<Attestation>>,
    /// The attested executable and selectors as log fields, made once per
    /// connection rather than on every request's audit line.
    texts: Option<Arc<PeerTexts>>,
    /// The attestation under way since accept.
    pending: Option<watch::Receiver<Option<Attested>>>,
    /// The connection's requests in progress, for its idle timeout.
    pub(crate) activity: Option<Arc<Activity>>,
    /// Set for a caller in another network namespace, attested by this
    /// source address alone (a pod reaching the metadata endpoint on a
    /// node address); it has no uid here.
    pub source_address: Option<std::net::IpAddr>,
}

impl PeerCredentials {
    fn of(stream: &UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(cred) => PeerCredentials {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                pid: cred.pid(),
                ..PeerCredentials::default()
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the peer's credentials");
                PeerCredentials::default()
            }
        }
    }

    /// A TCP peer whose socket the kernel says `uid` owns. The kernel
    /// records no group for it; the uid's primary group from the user
    /// database stands in (a group the user always holds), so `gids` rules
    /// apply as they do to that user's processes on the socket. A uid with
    /// no entry has no group: only `uids` rules can match it.
    /// Blocks on the user database.
    pub fn of_uid(uid: u32) -> Self {
        let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|user| user.gid.as_raw());
        PeerCredentials {
            gid,
            ..Self::of_uid_without_group(uid)
        }
    }

    /// A TCP peer whose group could not be looked up: only `uids` rules
    /// can match it.
    pub fn of_uid_without_group(uid: u32) -> Self {
        PeerCredentials {
            uid: Some(uid),
            ..PeerCredentials::default()
        }
    }

    /// With `attestation` done.
    pub fn with_attestation(self, attestation: Attestation) -> Self {
        self.with_attested(&Attested::new(attestation))
    }

    fn with_attested(mut self, attested: &Attested) -> Self {
        self.pid = attested.pid.or(self.pid);
        self.exe = attested.exe.clone();
        self.attestation = Some(Arc::clone(&attested.attestation));
        self.texts = Some(Arc::clone(&attested.texts));
        self
    }

    /// Waits (at most a few seconds) for the attestation started at accept.
    /// Once it is done, each request shares it: nothing is copied or
    /// formatted again.
    pub async fn attested(mut self) -> Self {
        let Some(mut pending) = self.pending.take() else {
            return self;
        };
        let ready = pending.borrow().clone();
        if let Some(attested) = ready {
            return self.with_attested(&attested);
        }
        let done = tokio::time::timeout(ATTEST_WAIT, async {
            pending
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|done| done.clone())
        })
        .await;
        match done {
            Ok(Some(attested)) => self.with_attested(&attested),
            Ok(None) => self.with_attestation(Attestation::Unconfirmed(
                "the attestation task failed".into(),
            )),
            Err(_) => self.with_attestation(Attestation::Unconfirmed(format!(
                "reading /proc took longer than {}s",
                ATTEST_WAIT.as_secs()
            ))),
        }
    }

    /// A caller from another network namespace, attested by its source
    /// address: its workload (the pod holding that address) is all the
    /// policy can match.
    pub fn of_source_address(address: std::net::IpAddr, attestation: Attestation) -> Self {
        PeerCredentials {
            source_address: Some(address),
            ..PeerCredentials::default()
        }
        .with_attestation(attestation)
    }

    /// The identity policy decisions are made on; `None` when the peer is
    /// known neither by uid nor by an attested source address.
    pub fn caller(&self) -> Option<Caller<'_>> {
        if self.uid.is_none() && self.source_address.is_none() {
            return None;
        }
        Some(Caller {
            uid: self.uid,
            gid: self.gid,
            workload: self.attestation.as_deref().and_then(Attestation::workload),
        })
    }

    /// Who refusals name and limits count: the uid, or the source address
    /// of a caller known only by it.
    pub fn sharer(&self) -> Sharer {
        match (self.uid, self.source_address) {
            (None, Some(address)) => Sharer::Address(address),
            (uid, _) => Sharer::Uid(uid),
        }
    }

    /// Whose new-audience budget a request spends: `None` for a peer known
    /// by neither (the policy denies it anyway, or it is open).
    pub fn budget(&self) -> Option<Sharer> {
        (self.uid.is_some() || self.source_address.is_some()).then(|| self.sharer())
    }

    /// The attested selectors (`gids=... unit=...`, or why there are none),
    /// for audit lines and denials; `None` before attestation.
    pub fn selectors(&self) -> Option<LogText> {
        self.texts.as_ref().map(|t| t.selectors.clone())
    }

    /// [`PeerCredentials::selectors`] as a log field, without a copy.
    pub fn selectors_text(&self) -> Option<&str> {
        self.texts.as_ref().map(|t| t.selectors.as_str())
    }

    /// The attested executable as a log field (capped), without a copy.
    pub fn exe_text(&self) -> Option<&str> {
        self.texts
            .as_ref()
            .and_then(|t| t.exe.as_ref())
            .map(LogText::as_str)
    }

    /// The credentials tonic attached to a request.
    pub fn of_request<T>(request: &tonic::Request<T>) -> PeerCredentials {
        request
            .extensions()
            .get::<PeerCredentials>()
            .cloned()
            .unwrap_or_default()
    }
}

/// A connection's finished attestation, shared by its requests.
#[derive(Debug, Clone)]
struct Attested {
    pid: Option<i32>,
    exe: Option<Arc<str>>,
    attestation: Arc<Attestation>,
    texts: Arc<PeerTexts>,
}

/// What every audit line of a connection logs about its peer.
#[derive(Debug)]
struct PeerTexts {
    exe: Option<LogText>,
    selectors: LogText,
}

impl Attested {
    fn new(attestation: Attestation) -> Self {
        let workload = attestation.workload();
        let exe = workload.and_then(|w| w.exe.as_deref());
        Attested {
            pid: workload.map(|w| w.pid),
            exe: exe.map(Arc::from),
            texts: Arc::new(PeerTexts {
                exe: exe.map(LogText::new),
                selectors: LogText::new(&attestation.to_string()),
            }),
            attestation: Arc::new(attestation),
        }
    }
}

/// An accepted connection with its credentials, its place under
/// `max_connections` and its uid's share (released when the connection
/// closes), closed once idle for `limits.idle_timeout`.
pub struct PeerStream {
    // Declared first so it is released before the socket closes: a client
    // that sees its connection close can connect again at once.
    _place: Place,
    stream: IdleTimeout<UnixStream>,
    credentials: PeerCredentials,
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        crate::metrics::get().connected_clients.dec();
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerCredentials;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.credentials.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepted connections with their credentials. Beyond `max_connections`,
/// or beyond the peer's uid's `max_connections_per_uid`, a new connection is
/// closed at once (and logged, at most every few seconds) rather than
/// queued, so a client gets a prompt error instead of a hang. Accepting runs
/// on its own task and ends when the server stops taking connections.
pub fn incoming(
    listener: tokio::net::UnixListener,
    limits: &LimitSettings,
    pods: Option<Arc<PodDirectory>>,
) -> impl Stream<Item = io::Result<PeerStream>> {
    let shares = Shares::new(limits.max_connections, limits.max_connections_per_uid);
    let idle_timeout = limits.idle_timeout;
    let (accepted_tx, accepted) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::new("socket");
        let mut refusals = RefusalLog::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = accepted_tx.closed() => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => {
                    backoff.accepted();
                    stream
                }
                Err(error) => {
                    backoff.failed(&error).await;
                    continue;
                }
            };
            let mut credentials = PeerCredentials::of(&stream);
            let place = match shares.take(credentials.uid) {
                Ok(place) => place,
                Err(full) => {
                    if refusals.due() {
                        let (limit, key) = full.limit_and_key();
                        tracing::warn!(
                            peer_uid = credentials.uid,
                            peer_pid = credentials.pid,
                            limit,
                            refused = refusals.take(),
                            "connections refused: limits.{key} reached"
                        );
                    }
                    continue;
                }
            };
            credentials.pending = credentials.uid.map(|uid| {
                // The pidfd now (system calls only); /proc off this loop.
                let pinned = Pinned::unix_peer(&stream, credentials.pid);
                let (done, pending) = watch::channel(None);
                let pods = pods.clone();
                tokio::spawn(async move {
                    let proc_root = pods.as_ref().map_or_else(
                        || std::path::PathBuf::from("/proc"),
                        |p| p.proc_root().to_owned(),
                    );
                    let attestation = tokio::task::spawn_blocking(move || {
                        Attestation::of_pinned_in(pinned, uid, &proc_root)
                    })
                    .await
                    .unwrap_or_else(|_| {
                        Attestation::Unconfirmed("the attestation task failed".into())
                    });
                    // The pod its cgroup names, from the kubelet: async,
                    // bounded, and off the accept loop like the /proc read.
                    let attestation = attestation.with_pod(pods.as_deref(), POD_WAIT).await;
                    let _ = done.send(Some(Attested::new(attestation)));
                });
                pending
            });
            let activity = Activity::new();
            credentials.activity = Some(activity.clone());
            crate::metrics::get().connected_clients.inc();
            let peer = PeerStream {
                stream: IdleTimeout::new(stream, activity, idle_timeout),
                credentials,
                _place: place,
            };
            if accepted_tx.send(Ok(peer)).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_of_one_connection_share_its_attestation() {
        let (done, pending) = watch::channel(None);
        let connection = PeerCredentials {
            uid: Some(1000),
            pid: Some(7),
            pending: Some(pending),
            ..PeerCredentials::default()
        };
        done.send(Some(Attested::new(Attestation::Unconfirmed(
            "the client exited".into(),
        ))))
        .unwrap();
        let first = connection.clone().attested().await;
        let second = connection.attested().await;
        // Shared, not copied and formatted again per request.
        assert!(Arc::ptr_eq(
            first.attestation.as_ref().unwrap(),
            second.attestation.as_ref().unwrap()
        ));
        let (a, b) = (
            first.selectors_text().unwrap(),
            second.selectors_text().unwrap(),
        );
        assert_eq!(a, "unattested (the client exited)");
        assert!(std::ptr::eq(a, b));
        assert_eq!(first.selectors().unwrap().as_str(), a);
        assert_eq!((first.pid, first.exe_text()), (Some(7), None));
    }
}
