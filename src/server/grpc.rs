//! The `tokenbroker.v1.TokenBroker` gRPC service: request checks, the
//! access policy (checked on every call, cache hits included), the per-uid
//! new-audience rate limit, the one place errors become `tonic::Status`, and
//! one audit line per decision.

use std::{pin::Pin, sync::Arc, time::Duration};

use prost_types::Timestamp;
use tokio::{
    sync::{watch, Semaphore},
    time::Instant,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{live::Live, peer::PeerCredentials};
use crate::{
    cache::{AdmitError, CacheError, CacheKey, CacheOutcome, EntryState, TokenCache},
    domain::DEFAULT_IDENTITY,
    policy::Decision,
    proto::{self, token_broker_server::TokenBroker},
    source::SourceError,
    token::IdToken,
};

/// Longest a request waits for upstream when the client set no deadline.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

pub struct BrokerService {
    cache: TokenCache,
    live: Arc<Live>,
    streams: Arc<Semaphore>,
    max_streams: usize,
    /// Becomes true when the daemon begins to stop: open watch streams end
    /// with UNAVAILABLE so clients reconnect to the next instance.
    stopping: watch::Receiver<bool>,
}

impl BrokerService {
    pub fn new(
        cache: TokenCache,
        live: Arc<Live>,
        max_streams: usize,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cache,
            live,
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            stopping,
        }
    }
}

/// What one request came to, for its audit line.
struct Audit<'a> {
    method: &'static str,
    peer: &'a PeerCredentials,
    identity: &'a str,
    audience: &'a str,
    decision: Option<Decision>,
    outcome: Option<CacheOutcome>,
    started: Instant,
    /// The identity as a metric label: configured names only, so clients
    /// cannot grow the label set.
    metric_identity: &'a str,
}

impl<'a> Audit<'a> {
    fn start(
        method: &'static str,
        peer: &'a PeerCredentials,
        req: &'a proto::GetIdTokenRequest,
    ) -> Self {
        Audit {
            method,
            peer,
            identity: identity_of(&req.identity),
            audience: &req.audience,
            decision: None,
            outcome: None,
            started: Instant::now(),
            metric_identity: "unknown",
        }
    }

    /// One structured line: who, what, the decision and its rule, the cache
    /// outcome, latency and result. Never token text.
    fn log(&self, result: Result<&proto::IdToken, &Status>) {
        let metrics = crate::metrics::get();
        metrics
            .requests
            .get_or_create(&crate::metrics::RequestLabels {
                method: self.method,
                identity: crate::metrics::identity_label(self.metric_identity),
                result: result.map_or_else(|s| crate::client::code_name(s.code()), |_| "OK"),
                cache: self.outcome.map_or("none", CacheOutcome::as_str),
            })
            .inc();
        if self.decision == Some(Decision::Denied) {
            metrics
                .policy_denials
                .get_or_create(&crate::metrics::IdentityLabels {
                    identity: crate::metrics::identity_label(self.metric_identity),
                })
                .inc();
        }
        let peer = self.peer;
        let decision = self
            .decision
            .map(|d| if d.allowed() { "allowed" } else { "denied" });
        let rule = self.decision.map(Decision::rule);
        let cache = self.outcome.map(CacheOutcome::as_str);
        let latency_us = self.started.elapsed().as_micros() as u64;
        let audience = loggable(self.audience);
        match result {
            Ok(token) => tracing::info!(
                target: crate::logging::SERVED_TARGET,
                peer_uid = peer.uid, peer_gid = peer.gid, peer_pid = peer.pid, peer_exe = peer.exe.as_deref(),
                identity = self.identity, %audience, decision, rule, cache, latency_us,
                expire_time = token.expire_time.as_ref().map_or(0, |t| t.seconds),
                result = "OK", "{}", self.method
            ),
            Err(status) => tracing::info!(
                peer_uid = peer.uid, peer_gid = peer.gid, peer_pid = peer.pid, peer_exe = peer.exe.as_deref(),
                identity = self.identity, %audience, decision, rule, cache, latency_us,
                result = crate::client::code_name(status.code()), error = status.message(), "{}", self.method
            ),
        }
    }
}

#[tonic::async_trait]
impl TokenBroker for BrokerService {
    async fn get_id_token(
        &self,
        request: Request<proto::GetIdTokenRequest>,
    ) -> Result<Response<proto::IdToken>, Status> {
        let (peer, wait, req) = parts(request);
        let mut audit = Audit::start("GetIdToken", &peer, &req);
        let result = self.get(&mut audit, req.min_valid_for, wait).await;
        audit.log(result.as_ref());
        result.map(Response::new)
    }

    type WatchIdTokenStream = Pin<Box<dyn Stream<Item = Result<proto::IdToken, Status>> + Send>>;

    async fn watch_id_token(
        &self,
        request: Request<proto::GetIdTokenRequest>,
    ) -> Result<Response<Self::WatchIdTokenStream>, Status> {
        let (peer, wait, req) = parts(request);
        let mut audit = Audit::start("WatchIdToken", &peer, &req);
        let result = self.watch(&mut audit, req.min_valid_for, wait).await;
        audit.log(result.as_ref().map(|(first, _)| first));
        let (first, rest) = result?;
        let stream = tokio_stream::once(Ok(first)).chain(rest);
        Ok(Response::new(Box::pin(UntilStopping::new(
            stream,
            self.stopping.clone(),
        ))))
    }

    async fn list_tokens(
        &self,
        request: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        let peer = PeerCredentials::of_request(&request);
        let caller = peer.caller();
        let policy = self.live.policy();
        let size = super::listing::page_size(request.get_ref().page_size)?;
        let after = super::listing::decode_token(&request.get_ref().page_token)?;
        // A caller sees only the entries it may read, and pages through those.
        let readable: Vec<_> = self
            .cache
            .list()
            .into_iter()
            .filter(|info| {
                policy
                    .decide(caller, info.key.identity(), info.key.audience())
                    .allowed()
            })
            .collect();
        let (page, next_page_token) = super::listing::page(readable, after.as_ref(), size);
        let tokens: Vec<proto::TokenInfo> = page
            .into_iter()
            .map(|info| proto::TokenInfo {
                identity: info.key.identity().to_owned(),
                audience: info.key.audience().to_owned(),
                expire_time: info.expires_at.map(Timestamp::from),
                issue_time: info.issued_at.map(Timestamp::from),
                state: token_state(info.state) as i32,
                last_error: info.last_error.unwrap_or_default(),
            })
            .collect();
        tracing::info!(
            peer_uid = peer.uid,
            peer_gid = peer.gid,
            peer_pid = peer.pid,
            peer_exe = peer.exe.as_deref(),
            entries = tokens.len(),
            result = "OK",
            "ListTokens"
        );
        Ok(Response::new(proto::ListTokensResponse {
            tokens,
            next_page_token,
        }))
    }
}

impl BrokerService {
    /// Validates, checks the policy and the rate limit: the key to look up.
    fn admit<'a>(&self, audit: &mut Audit<'a>, min_valid: Duration) -> Result<CacheKey, Status> {
        let known = self.cache.knows(audit.identity);
        if known {
            audit.metric_identity = audit.identity;
        }
        let key = CacheKey::new(audit.identity, audit.audience).map_err(|e| to_status(e.into()))?;
        let decision =
            self.live
                .policy()
                .decide(audit.peer.caller(), audit.identity, audit.audience);
        audit.decision = Some(decision);
        if !decision.allowed() {
            // Name the caller and the request, and nothing about the rules.
            return Err(Status::permission_denied(format!(
                "uid {} may not use identity {:?} for audience {:?}",
                audit
                    .peer
                    .uid
                    .map_or_else(|| "unknown".to_owned(), |u| u.to_string()),
                audit.identity,
                audit.audience
            )));
        }
        if !known {
            return Err(to_status(CacheError::UnknownIdentity(
                audit.identity.to_owned(),
            )));
        }
        // A request that brings a new audience into the cache spends from its
        // uid's bucket (concurrent askers of that key join it and spend
        // nothing); a refused one leaves nothing behind in the cache. A
        // request whose `min_valid_for` forces a new token, although the
        // held one serves everybody else, spends from the same bucket.
        let new = match audit.peer.uid {
            Some(uid) => self
                .cache
                .admit(&key, || self.spend(uid, "asked for too many new audiences"))
                .map_err(|err| match err {
                    AdmitError::Refused(status) => status,
                    AdmitError::Cache(err) => to_status(err),
                })?,
            None => false,
        };
        if !new && self.cache.forces_mint(&key, min_valid).map_err(to_status)? {
            if let Some(uid) = audit.peer.uid {
                self.spend(
                    uid,
                    "forced too many new tokens with min_valid_for, which count as new audiences",
                )?;
            }
        }
        Ok(key)
    }

    /// Spends one unit of `uid`'s new-audience budget, or says why not.
    fn spend(&self, uid: u32, what: &str) -> Result<(), Status> {
        let (limits, limiter) = self.live.limits();
        limiter.check(uid).map_err(|retry_in| {
            Status::resource_exhausted(format!(
                "uid {uid} {what} (limit {} per minute, burst {}); retry in {}s",
                limits.new_audiences_per_minute,
                limits.new_audience_burst,
                retry_in.as_secs().max(1)
            ))
        })
    }

    async fn get(
        &self,
        audit: &mut Audit<'_>,
        min_valid_for: Option<prost_types::Duration>,
        wait: Duration,
    ) -> Result<proto::IdToken, Status> {
        let min_valid = min_valid(min_valid_for, self.cache.max_min_valid())?;
        let key = self.admit(audit, min_valid)?;
        let lookup = tokio::time::timeout(wait, self.cache.get(&key, min_valid))
            .await
            .map_err(|_| deadline_exceeded(audit.identity, wait))?
            .map_err(to_status)?;
        audit.outcome = Some(lookup.outcome);
        Ok(to_proto(&lookup.token, key.identity(), key.audience()))
    }

    async fn watch(
        &self,
        audit: &mut Audit<'_>,
        min_valid_for: Option<prost_types::Duration>,
        wait: Duration,
    ) -> Result<
        (
            proto::IdToken,
            impl Stream<Item = Result<proto::IdToken, Status>> + Send + 'static,
        ),
        Status,
    > {
        let min_valid = min_valid(min_valid_for, self.cache.max_min_valid())?;
        let key = self.admit(audit, min_valid)?;
        let slot = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many open WatchIdToken streams (limits.max_streams = {})",
                self.max_streams
            ))
        })?;
        let (first, receiver) = tokio::time::timeout(wait, self.cache.watch(&key, min_valid))
            .await
            .map_err(|_| deadline_exceeded(audit.identity, wait))?
            .map_err(to_status)?;
        audit.outcome = Some(first.outcome);
        let first = to_proto(&first.token, key.identity(), key.audience());
        // Each refreshed token for this key, for as long as the client
        // listens; the stream owns the receiver (keeping the key from idle
        // eviction) and its place under max_streams, both released when the
        // client goes away.
        let rest =
            tokio_stream::wrappers::WatchStream::from_changes(receiver).filter_map(move |token| {
                let _held = &slot;
                token.map(|t| Ok(to_proto(&t, key.identity(), key.audience())))
            });
        Ok((first, rest))
    }
}

/// Ends a watch stream with UNAVAILABLE once the daemon starts stopping,
/// instead of leaving it open until the drain timeout cuts it.
struct UntilStopping {
    inner: Pin<Box<dyn Stream<Item = Result<proto::IdToken, Status>> + Send>>,
    stop: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    done: bool,
}

impl UntilStopping {
    fn new(
        inner: impl Stream<Item = Result<proto::IdToken, Status>> + Send + 'static,
        mut stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Box::pin(inner),
            stop: Box::pin(async move {
                // An error means the server is gone: stop too.
                let _ = stopping.wait_for(|stopping| *stopping).await;
            }),
            done: false,
        }
    }
}

impl Stream for UntilStopping {
    type Item = Result<proto::IdToken, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if self.stop.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(Status::unavailable(
                "token-broker is shutting down; reconnect to watch again",
            ))));
        }
        self.inner.as_mut().poll_next(cx)
    }
}

/// A token request's caller, deadline and message.
fn parts(
    request: Request<proto::GetIdTokenRequest>,
) -> (PeerCredentials, Duration, proto::GetIdTokenRequest) {
    let peer = PeerCredentials::of_request(&request);
    let wait = client_deadline(request.metadata()).unwrap_or(DEFAULT_WAIT);
    (peer, wait, request.into_inner())
}

fn identity_of(requested: &str) -> &str {
    if requested.is_empty() {
        DEFAULT_IDENTITY
    } else {
        requested
    }
}

fn to_proto(token: &IdToken, identity: &str, audience: &str) -> proto::IdToken {
    proto::IdToken {
        token: token.expose().to_owned(),
        expire_time: Some(token.expires_at().into()),
        issue_time: Some(token.issued_at().into()),
        identity: identity.to_owned(),
        audience: audience.to_owned(),
    }
}

/// `min_valid_for`, refused above `max`: a fresh token's usable life
/// ([`TokenCache::max_min_valid`]). More could never be served from the
/// cache and would make every call mint a token.
fn min_valid(requested: Option<prost_types::Duration>, max: Duration) -> Result<Duration, Status> {
    match requested {
        None => Ok(Duration::ZERO),
        Some(d) => Duration::try_from(d)
            .ok()
            .filter(|d| *d <= max)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "min_valid_for must be between 0s and {}s: a fresh token lives {}s and is \
                     refreshed in its last {}s (refresh.refresh_before_expiry)",
                    max.as_secs(),
                    crate::cache::GOOGLE_TOKEN_LIFETIME.as_secs(),
                    crate::cache::GOOGLE_TOKEN_LIFETIME
                        .saturating_sub(max)
                        .as_secs()
                ))
            }),
    }
}

fn deadline_exceeded(identity: &str, wait: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "no token for identity {identity:?} within {}ms; the upstream fetch continues",
        wait.as_millis()
    ))
}

/// The one mapping from broker errors to gRPC statuses (DESIGN.md).
pub fn to_status(err: CacheError) -> Status {
    match &err {
        CacheError::InvalidAudience(_) => Status::invalid_argument(err.to_string()),
        CacheError::UnknownIdentity(_) => Status::not_found(err.to_string()),
        CacheError::TooShortLived { .. } => Status::failed_precondition(err.to_string()),
        CacheError::Full { .. } => Status::resource_exhausted(err.to_string()),
        CacheError::Upstream(source) => match source {
            SourceError::Rejected { .. } => Status::failed_precondition(err.to_string()),
            _ => Status::unavailable(err.to_string()),
        },
    }
}

fn token_state(state: EntryState) -> proto::TokenState {
    match state {
        EntryState::Fresh => proto::TokenState::Fresh,
        EntryState::Stale => proto::TokenState::Stale,
        EntryState::Expired => proto::TokenState::Expired,
        EntryState::Failed => proto::TokenState::Failed,
        EntryState::Pending => proto::TokenState::Unspecified,
    }
}

/// Client input echoed into logs: cut to 256 characters, with whitespace
/// and control characters escaped so no audience can forge a log line.
fn loggable(audience: &str) -> String {
    audience
        .chars()
        .take(256)
        .flat_map(|c| {
            let escape = c.is_control() || c.is_whitespace();
            let (plain, escaped) = if escape {
                (None, Some(c.escape_default()))
            } else {
                (Some(c), None)
            };
            plain.into_iter().chain(escaped.into_iter().flatten())
        })
        .collect()
}

/// The client's deadline from the `grpc-timeout` header ("100m", "5S", ...).
fn client_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(client_deadline(&md), None);
        md.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(client_deadline(&md), Some(Duration::from_millis(250)));
        md.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(client_deadline(&md), Some(Duration::from_secs(2)));
        md.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(client_deadline(&md), None);
    }
}
