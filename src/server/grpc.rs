//! The `tokenbroker.v1.TokenBroker` gRPC service: request checks, the one
//! place errors become `tonic::Status`, and a log line per request.

use std::{pin::Pin, time::Duration};

use prost_types::Timestamp;
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    cache::{CacheError, CacheKey, EntryState, TokenCache},
    config::DEFAULT_IDENTITY,
    proto::{self, token_broker_server::TokenBroker},
    source::SourceError,
    token::IdToken,
};

/// Longest a request waits for upstream when the client set no deadline.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Longest `min_valid_for` that can make sense: Google's tokens live 1h.
const MAX_MIN_VALID: Duration = Duration::from_secs(3600);

pub struct BrokerService {
    cache: TokenCache,
}

impl BrokerService {
    pub fn new(cache: TokenCache) -> Self {
        Self { cache }
    }
}

/// Who is calling, from SO_PEERCRED, read when the connection was accepted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Peer {
    pub fn of<T>(request: &Request<T>) -> Self {
        let cred = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        match cred {
            Some(c) => Peer {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                pid: c.pid(),
            },
            None => Peer::default(),
        }
    }
}

#[tonic::async_trait]
impl TokenBroker for BrokerService {
    async fn get_id_token(
        &self,
        request: Request<proto::GetIdTokenRequest>,
    ) -> Result<Response<proto::IdToken>, Status> {
        let peer = Peer::of(&request);
        let wait = client_deadline(request.metadata()).unwrap_or(DEFAULT_WAIT);
        let started = Instant::now();
        let req = request.into_inner();
        let identity = if req.identity.is_empty() {
            DEFAULT_IDENTITY
        } else {
            req.identity.as_str()
        };
        let result = self
            .lookup(identity, &req.audience, req.min_valid_for, wait)
            .await;
        let latency_us = started.elapsed().as_micros() as u64;
        let audience = loggable(&req.audience);
        match &result {
            Ok((token, outcome)) => tracing::info!(
                peer_uid = peer.uid,
                peer_gid = peer.gid,
                peer_pid = peer.pid,
                identity,
                %audience,
                cache = outcome,
                latency_us,
                expire_time = token.expire_time.as_ref().map_or(0, |t| t.seconds),
                result = "ok",
                "GetIdToken"
            ),
            Err(status) => tracing::info!(
                peer_uid = peer.uid, peer_gid = peer.gid, peer_pid = peer.pid,
                identity, %audience, latency_us,
                result = ?status.code(), error = status.message(), "GetIdToken"
            ),
        }
        result.map(|(token, _)| Response::new(token))
    }

    type WatchIdTokenStream = Pin<Box<dyn Stream<Item = Result<proto::IdToken, Status>> + Send>>;

    async fn watch_id_token(
        &self,
        request: Request<proto::GetIdTokenRequest>,
    ) -> Result<Response<Self::WatchIdTokenStream>, Status> {
        let peer = Peer::of(&request);
        let wait = client_deadline(request.metadata()).unwrap_or(DEFAULT_WAIT);
        let req = request.into_inner();
        let identity = if req.identity.is_empty() {
            DEFAULT_IDENTITY.to_owned()
        } else {
            req.identity
        };
        let min_valid = min_valid(req.min_valid_for)?;
        let key = CacheKey::new(&identity, &req.audience).map_err(|e| to_status(e.into()))?;
        let (first, receiver) = tokio::time::timeout(wait, self.cache.watch(&key, min_valid))
            .await
            .map_err(|_| deadline_exceeded(&identity, wait))?
            .map_err(to_status)?;
        tracing::info!(
            peer_uid = peer.uid, peer_gid = peer.gid, peer_pid = peer.pid,
            identity, audience = %loggable(&req.audience), cache = first.outcome.as_str(),
            result = "ok", "WatchIdToken started"
        );
        let first = to_proto(&first.token, key.identity(), key.audience());
        // Each refreshed token for this key, for as long as the client listens;
        // dropping the stream drops the receiver and releases the key.
        let updates =
            tokio_stream::wrappers::WatchStream::from_changes(receiver).filter_map(move |token| {
                token.map(|t| Ok(to_proto(&t, key.identity(), key.audience())))
            });
        let stream = tokio_stream::once(Ok(first)).chain(updates);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_tokens(
        &self,
        request: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        let peer = Peer::of(&request);
        let tokens: Vec<proto::TokenInfo> = self
            .cache
            .list()
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
            entries = tokens.len(),
            result = "ok",
            "ListTokens"
        );
        Ok(Response::new(proto::ListTokensResponse { tokens }))
    }
}

impl BrokerService {
    async fn lookup(
        &self,
        identity: &str,
        audience: &str,
        min_valid_for: Option<prost_types::Duration>,
        wait: Duration,
    ) -> Result<(proto::IdToken, &'static str), Status> {
        let min_valid = min_valid(min_valid_for)?;
        let key = CacheKey::new(identity, audience).map_err(|e| to_status(e.into()))?;
        let lookup = tokio::time::timeout(wait, self.cache.get(&key, min_valid))
            .await
            .map_err(|_| deadline_exceeded(identity, wait))?
            .map_err(to_status)?;
        Ok((
            to_proto(&lookup.token, identity, audience),
            lookup.outcome.as_str(),
        ))
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

fn min_valid(requested: Option<prost_types::Duration>) -> Result<Duration, Status> {
    match requested {
        None => Ok(Duration::ZERO),
        Some(d) => Duration::try_from(d)
            .ok()
            .filter(|d| *d <= MAX_MIN_VALID)
            .ok_or_else(|| Status::invalid_argument("min_valid_for must be between 0s and 1h")),
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

/// Client input echoed into logs is cut short; `{:?}` escapes the rest.
fn loggable(audience: &str) -> String {
    let cut: String = audience.chars().take(256).collect();
    format!("{cut:?}")
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
