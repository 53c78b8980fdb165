//! The `tokenbroker.v1.TokenBroker` gRPC service: request checks, the
//! access policy (checked on every call, cache hits included), the per-uid
//! new-audience rate limit, the one place errors become `tonic::Status`, and
//! one audit line per request ([`super::audit`]). Open watch streams run as
//! tasks of their own ([`super::watch_stream`]).

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use prost_types::Timestamp;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{
    admission::{self, Refused},
    audit::Audit,
    live::Live,
    peer::PeerCredentials,
    share::{Full, Place, Shares},
    watch_stream::{self, WatchFeed},
    workload_account::{self, Record},
};
use crate::{
    cache::{CacheError, CacheKey, EntryState, TokenCache},
    config::LimitSettings,
    domain::{validate_requested_identity, LogText},
    kubernetes::PodDirectory,
    proto::{self, token_broker_server::TokenBroker},
    source::{
        access::{AccessOf, CLOUD_PLATFORM_SCOPE},
        SourceError,
    },
    token::{AccessToken, IdToken},
};

/// Longest a request waits for upstream when the client set no deadline.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

pub struct BrokerService {
    cache: TokenCache,
    live: Arc<Live>,
    /// Open `WatchIdToken` streams, in total and per uid.
    streams: Arc<Shares>,
    /// Becomes true when the daemon begins to stop: open watch streams end
    /// with UNAVAILABLE so clients reconnect to the next instance.
    stopping: watch::Receiver<bool>,
    /// The node's pods, for per-workload identities' accounts.
    pods: Option<Arc<PodDirectory>>,
}

impl BrokerService {
    pub fn new(
        cache: TokenCache,
        live: Arc<Live>,
        limits: &LimitSettings,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cache,
            live,
            streams: Shares::new(limits.max_streams, limits.max_streams_per_uid),
            stopping,
            pods: None,
        }
    }

    /// With the node's pods (`[kubernetes]`), which per-workload
    /// identities read their callers' accounts from.
    pub fn with_pods(mut self, pods: Option<Arc<PodDirectory>>) -> Self {
        self.pods = pods;
        self
    }
}

#[tonic::async_trait]
impl TokenBroker for BrokerService {
    async fn get_id_token(
        &self,
        request: Request<proto::GetIdTokenRequest>,
    ) -> Result<Response<proto::IdToken>, Status> {
        let (peer, wait, mut req) = parts(request);
        let peer = peer.attested().await;
        let mut audit = Audit::start("GetIdToken", peer, &mut req);
        let result = self.get(&mut audit, req.min_valid_for, wait).await;
        audit.finish(result.as_ref());
        result.map(Response::new)
    }

    async fn get_access_token(
        &self,
        request: Request<proto::GetAccessTokenRequest>,
    ) -> Result<Response<proto::AccessToken>, Status> {
        let (mut audit, wait, req) = access_parts("GetAccessToken", request).await;
        let result = self
            .get_access(&mut audit, &req.scopes, req.min_valid_for, wait)
            .await;
        audit.finish_access(result.as_ref());
        result.map(Response::new)
    }

    type WatchAccessTokenStream =
        Pin<Box<dyn Stream<Item = Result<proto::AccessToken, Status>> + Send>>;

    async fn watch_access_token(
        &self,
        request: Request<proto::GetAccessTokenRequest>,
    ) -> Result<Response<Self::WatchAccessTokenStream>, Status> {
        let (mut audit, wait, req) = access_parts("WatchAccessToken", request).await;
        let result = self
            .watch_access(&mut audit, &req.scopes, req.min_valid_for, wait)
            .await;
        audit.finish_access(result.as_ref().map(|open| &open.first));
        Ok(Response::new(self.feed(audit, result?)))
    }

    type WatchIdTokenStream = Pin<Box<dyn Stream<Item = Result<proto::IdToken, Status>> + Send>>;

    async fn watch_id_token(
        &self,
        request: Request<proto::GetIdTokenRequest>,
    ) -> Result<Response<Self::WatchIdTokenStream>, Status> {
        let (peer, wait, mut req) = parts(request);
        let peer = peer.attested().await;
        let mut audit = Audit::start("WatchIdToken", peer, &mut req);
        let result = self.watch(&mut audit, req.min_valid_for, wait).await;
        audit.finish(result.as_ref().map(|open| &open.first));
        Ok(Response::new(self.feed(audit, result?)))
    }

    async fn list_tokens(
        &self,
        request: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        let peer = PeerCredentials::of_request(&request).attested().await;
        let caller = peer.caller();
        let policy = self.live.policy();
        let size = super::listing::page_size(request.get_ref().page_size)?;
        let after = super::listing::decode_token(&request.get_ref().page_token)?;
        let entries = self.cache.list();
        // A per-workload identity's entries are the caller's only when
        // minted as its own account: other pods' audiences are theirs.
        let mut own_accounts: HashMap<String, Option<String>> = HashMap::new();
        for info in &entries {
            let identity = info.key.identity();
            if info.key.account().is_some() && !own_accounts.contains_key(identity) {
                let own =
                    workload_account::resolve(&self.cache, self.pods.as_deref(), &peer, identity)
                        .await
                        .ok()
                        .flatten();
                own_accounts.insert(identity.to_owned(), own);
            }
        }
        let minted_for_caller = |key: &CacheKey| match key.account() {
            None => true,
            Some(account) => {
                own_accounts.get(key.identity()).and_then(Option::as_deref) == Some(account)
            }
        };
        // A caller sees only the entries it may read, and pages through those.
        let readable: Vec<_> = entries
            .into_iter()
            .filter(|info| minted_for_caller(&info.key))
            .filter(|info| match info.key.scopes() {
                Some(scopes) => policy
                    .decide_access(caller, info.key.identity(), scopes.split(' '))
                    .allowed(),
                None => policy
                    .decide(caller, info.key.identity(), info.key.audience())
                    .allowed(),
            })
            .collect();
        let (page, next_page_token) = super::listing::page(readable, after.as_ref(), size);
        let tokens: Vec<proto::TokenInfo> = page
            .into_iter()
            .map(|info| proto::TokenInfo {
                identity: info.key.identity().to_owned(),
                audience: match info.key.scopes() {
                    Some(_) => String::new(),
                    None => info.key.audience().to_owned(),
                },
                scopes: info
                    .key
                    .scopes()
                    .map(|s| s.split(' ').map(str::to_owned).collect())
                    .unwrap_or_default(),
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
            peer_exe = peer.exe_text(),
            selectors = peer.selectors_text(),
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

/// A watch stream admitted and holding its first token.
struct OpenWatch<K: watch_stream::Kind> {
    first: K::Proto,
    key: CacheKey,
    tokens: watch::Receiver<Option<K::Token>>,
    /// Its place under `limits.max_streams` and its uid's share, released
    /// when the stream ends.
    slot: Place,
}

impl BrokerService {
    /// Hands an opened watch to a task of its own, which re-checks the grant
    /// before every delivery; the client reads what it sends.
    fn feed<K: watch_stream::Kind>(
        &self,
        audit: Audit,
        open: OpenWatch<K>,
    ) -> Pin<Box<dyn Stream<Item = Result<K::Proto, Status>> + Send>> {
        // Before the first token: a reload announced from now on is seen.
        let reloads = self.live.reloads();
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        let watch = WatchFeed {
            audit,
            cache: self.cache.clone(),
            live: self.live.clone(),
            key: open.key,
            tokens: open.tokens,
            reloads,
            stopping: self.stopping.clone(),
            sender,
            _slot: open.slot,
            _kind: std::marker::PhantomData::<K>,
        };
        tokio::spawn(watch.run(open.first));
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
    }

    /// Validates, checks the policy and the rate limit: the key to look up
    /// (for a per-workload identity, minted as the caller's account).
    async fn admit(&self, audit: &mut Audit, min_valid: Duration) -> Result<CacheKey, Status> {
        validate_requested_identity(&audit.identity).map_err(|e| to_status(e.into()))?;
        audit.known = self.cache.knows(&audit.identity);
        let key = CacheKey::new(&audit.identity, &audit.audience)
            .map_err(|e| to_status(CacheError::from(e)))?;
        workload_account::admit(
            &self.cache,
            &self.live,
            self.pods.as_deref(),
            &audit.peer,
            key,
            min_valid,
            Record {
                decision: &mut audit.decision,
                minted_as: &mut audit.minted_as,
            },
        )
        .await
        .map_err(|refused| refused_status(&refused))
    }

    async fn get(
        &self,
        audit: &mut Audit,
        min_valid_for: Option<prost_types::Duration>,
        wait: Duration,
    ) -> Result<proto::IdToken, Status> {
        let min_valid = min_valid(min_valid_for, self.cache.max_min_valid())?;
        let key = self.admit(audit, min_valid).await?;
        let lookup = tokio::time::timeout(wait, self.cache.get(&key, min_valid))
            .await
            .map_err(|_| deadline_exceeded(key.identity(), wait))?
            .map_err(to_status)?;
        audit.outcome = Some(lookup.outcome);
        Ok(to_proto(&lookup.token, key.identity(), key.audience()))
    }

    async fn get_access(
        &self,
        audit: &mut Audit,
        requested: &[String],
        min_valid_for: Option<prost_types::Duration>,
        wait: Duration,
    ) -> Result<proto::AccessToken, Status> {
        let min_valid = min_valid(min_valid_for, self.cache.max_min_valid())?;
        let key = self.admit_access(audit, requested, min_valid).await?;
        let lookup = tokio::time::timeout(wait, self.cache.get_access(&key, min_valid))
            .await
            .map_err(|_| deadline_exceeded(key.identity(), wait))?
            .map_err(to_status)?;
        audit.outcome = Some(lookup.outcome);
        Ok(access_to_proto(&lookup.token, &key))
    }

    async fn watch_access(
        &self,
        audit: &mut Audit,
        requested: &[String],
        min_valid_for: Option<prost_types::Duration>,
        wait: Duration,
    ) -> Result<OpenWatch<watch_stream::AccessTokens>, Status> {
        let min_valid = min_valid(min_valid_for, self.cache.max_min_valid())?;
        let key = self.admit_access(audit, requested, min_valid).await?;
        let slot = self
            .streams
            .take(audit.peer.uid)
            .map_err(|full| streams_full_status(full, audit.peer.uid))?;
        let (first, tokens) = tokio::time::timeout(wait, self.cache.watch_access(&key, min_valid))
            .await
            .map_err(|_| deadline_exceeded(key.identity(), wait))?
            .map_err(to_status)?;
        audit.outcome = Some(first.outcome);
        Ok(OpenWatch {
            first: access_to_proto(&first.token, &key),
            key,
            tokens,
            slot,
        })
    }

    /// [`BrokerService::admit`] for an access token: the scopes as sent are
    /// checked, then the set against the policy and the rate limit (for a
    /// per-workload identity, minted as the caller's account).
    async fn admit_access(
        &self,
        audit: &mut Audit,
        requested: &[String],
        min_valid: Duration,
    ) -> Result<CacheKey, Status> {
        validate_requested_identity(&audit.identity).map_err(|e| to_status(e.into()))?;
        // A scope with whitespace inside would split into others: refuse it.
        if let Some(bad) = requested
            .iter()
            .find(|s| s.is_empty() || s.chars().any(char::is_whitespace))
        {
            return Err(to_status(CacheError::InvalidScopes(format!(
                "scope {:?} is empty or holds whitespace",
                LogText::new(bad).as_str()
            ))));
        }
        audit.known = self.cache.knows(&audit.identity);
        let scopes = audit.scopes.clone().unwrap_or_default();
        let key = CacheKey::access(&audit.identity, AccessOf::Identity, &scopes)
            .map_err(|e| to_status(CacheError::InvalidScopes(e)))?;
        workload_account::admit(
            &self.cache,
            &self.live,
            self.pods.as_deref(),
            &audit.peer,
            key,
            min_valid,
            Record {
                decision: &mut audit.decision,
                minted_as: &mut audit.minted_as,
            },
        )
        .await
        .map_err(|refused| refused_status(&refused))
    }

    async fn watch(
        &self,
        audit: &mut Audit,
        min_valid_for: Option<prost_types::Duration>,
        wait: Duration,
    ) -> Result<OpenWatch<watch_stream::IdTokens>, Status> {
        let min_valid = min_valid(min_valid_for, self.cache.max_min_valid())?;
        let key = self.admit(audit, min_valid).await?;
        let slot = self
            .streams
            .take(audit.peer.uid)
            .map_err(|full| streams_full_status(full, audit.peer.uid))?;
        let (first, tokens) = tokio::time::timeout(wait, self.cache.watch(&key, min_valid))
            .await
            .map_err(|_| deadline_exceeded(key.identity(), wait))?
            .map_err(to_status)?;
        audit.outcome = Some(first.outcome);
        Ok(OpenWatch {
            first: to_proto(&first.token, key.identity(), key.audience()),
            key,
            tokens,
            slot,
        })
    }
}

/// Whether the policy in force now lets the caller have the key, and the
/// identity still exists: PERMISSION_DENIED, then NOT_FOUND, as on a new
/// request. Records the decision for the audit line.
pub(super) fn check_grant(
    live: &Live,
    cache: &TokenCache,
    audit: &mut Audit,
) -> Result<(), Status> {
    audit.known = cache.knows(&audit.identity);
    admission::grant(
        cache,
        live,
        &audit.peer,
        &audit.identity,
        &audit.audience,
        &mut audit.decision,
    )
    .map_err(|refused| refused_status(&refused))
}

/// An access-token request's audit (its scopes as sent, cloud-platform
/// when none), deadline and message.
async fn access_parts(
    method: &'static str,
    request: Request<proto::GetAccessTokenRequest>,
) -> (Audit, Duration, proto::GetAccessTokenRequest) {
    // The workload selectors (units, exe, groups, pods) apply to access
    // tokens too: wait for the connection's attestation as ID tokens do.
    let peer = PeerCredentials::of_request(&request).attested().await;
    let wait = client_deadline(request.metadata()).unwrap_or(DEFAULT_WAIT);
    let req = request.into_inner();
    let scopes = if req.scopes.is_empty() {
        CLOUD_PLATFORM_SCOPE.to_owned()
    } else {
        req.scopes.join(" ")
    };
    (
        Audit::start_access(method, &peer, &req.identity, scopes),
        wait,
        req,
    )
}

/// A token request's caller, deadline and message.
fn parts(
    request: Request<proto::GetIdTokenRequest>,
) -> (PeerCredentials, Duration, proto::GetIdTokenRequest) {
    let peer = PeerCredentials::of_request(&request);
    let wait = client_deadline(request.metadata()).unwrap_or(DEFAULT_WAIT);
    (peer, wait, request.into_inner())
}

pub(super) fn access_to_proto(token: &AccessToken, key: &CacheKey) -> proto::AccessToken {
    proto::AccessToken {
        token: token.expose().to_owned(),
        expire_time: Some(token.expires_at().into()),
        scopes: key
            .scopes()
            .unwrap_or_default()
            .split(' ')
            .map(str::to_owned)
            .collect(),
        identity: key.identity().to_owned(),
    }
}

/// [`check_grant`] for an access-token stream's key.
pub(super) fn check_access_grant(
    live: &Live,
    cache: &TokenCache,
    audit: &mut Audit,
    key: &CacheKey,
) -> Result<(), Status> {
    audit.known = cache.knows(&audit.identity);
    admission::grant_access(cache, live, &audit.peer, key, &mut audit.decision)
        .map_err(|refused| refused_status(&refused))
}

pub(super) fn to_proto(token: &IdToken, identity: &str, audience: &str) -> proto::IdToken {
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
        "no token for identity {} within {}ms; the upstream fetch continues",
        LogText::new(identity),
        wait.as_millis()
    ))
}

/// The one mapping from broker errors to gRPC statuses (DESIGN.md).
fn refused_status(refused: &Refused) -> Status {
    match refused {
        Refused::Cache(err) => cache_status(err),
        Refused::Denied { .. } | Refused::DeniedScopes { .. } => {
            Status::permission_denied(refused.to_string())
        }
        Refused::TooManyNewAudiences { .. } | Refused::TooManyForcedMints { .. } => {
            Status::resource_exhausted(refused.to_string())
        }
        Refused::NoWorkloadAccount { .. } => Status::failed_precondition(refused.to_string()),
        Refused::WorkloadAccountUnavailable { .. } => Status::unavailable(refused.to_string()),
    }
}

fn streams_full_status(full: Full, uid: Option<u32>) -> Status {
    Status::resource_exhausted(match full {
        Full::Total(limit) => {
            format!("too many open watch streams (WatchIdToken and WatchAccessToken; limits.max_streams = {limit})")
        }
        Full::Share(limit) => format!(
            "uid {} has too many open watch streams (WatchIdToken and WatchAccessToken; limits.max_streams_per_uid = {limit})",
            uid.map_or_else(|| "unknown".to_owned(), |u| u.to_string())
        ),
    })
}

pub fn to_status(err: CacheError) -> Status {
    cache_status(&err)
}

fn cache_status(err: &CacheError) -> Status {
    match err {
        CacheError::InvalidAudience(_)
        | CacheError::InvalidIdentity(_)
        | CacheError::InvalidScopes(_) => Status::invalid_argument(err.to_string()),
        CacheError::UnknownIdentity(_) => Status::not_found(err.to_string()),
        CacheError::TooShortLived { .. } => Status::failed_precondition(err.to_string()),
        CacheError::NoFreshToken { .. } => Status::unavailable(err.to_string()),
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
