//! The one decision every door makes before a token is looked up, gRPC on
//! the socket and the metadata endpoint alike: the audience is valid, the
//! policy allows this caller (as the kernel named it) this identity and
//! audience, the identity exists, and a request that brings a new audience
//! into the cache, or forces a new token with `min_valid_for`, is within its
//! uid's rate (a pod known by its source address: that address's rate).

use std::time::Duration;

use super::{live::Live, peer::PeerCredentials, share::Sharer};
use crate::{
    cache::{AdmitError, CacheError, CacheKey, TokenCache, TokenKind},
    domain::LogText,
    policy::Decision,
};

/// Why a request was not admitted. Each door turns it into its own answer
/// (a gRPC status, an HTTP status) in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// Invalid audience or unknown identity.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Names the caller and the request (quoted, escaped and capped), and
    /// nothing about the rules.
    #[error(
        "{} may not use identity {} for audience {} (caller: {})",
        .uid,
        LogText::new(.identity),
        LogText::new(.audience),
        .selectors
    )]
    Denied {
        uid: Sharer,
        /// The caller's attested selectors (`gids=... unit=...`), or why
        /// it has none: what the rules were matched against.
        selectors: String,
        identity: String,
        audience: String,
    },
    /// An access token whose scopes no rule grants this caller all of.
    #[error(
        "{} may not have access tokens of identity {} for scopes {} (no [[policy]] rule grants them all; access tokens are off until a rule's `scopes` grant them)",
        .uid,
        LogText::new(.identity),
        LogText::new(.scopes)
    )]
    DeniedScopes {
        uid: Sharer,
        identity: String,
        scopes: String,
    },
    #[error(
        "{uid} asked for too many new audiences (limit {per_minute} per minute, burst {burst}); retry in {}s",
        .retry_in.as_secs().max(1)
    )]
    TooManyNewAudiences {
        uid: Sharer,
        per_minute: u32,
        burst: u32,
        retry_in: Duration,
    },
    /// `min_valid_for` forced a new token while the held one serves
    /// everybody else, once too often: these spend the same budget.
    #[error(
        "{uid} forced too many new tokens with min_valid_for, which count as new audiences (limit {per_minute} per minute, burst {burst}); retry in {}s",
        .retry_in.as_secs().max(1)
    )]
    TooManyForcedMints {
        uid: Sharer,
        per_minute: u32,
        burst: u32,
        retry_in: Duration,
    },
    /// A per-workload identity cannot name the caller's account: the caller
    /// is no attested pod, or its service account has no (valid)
    /// annotation. Fixed by the operator, not by retrying.
    #[error("{message}")]
    NoWorkloadAccount { message: String },
    /// The caller's service account could not be read (API server down).
    #[error("{message}")]
    WorkloadAccountUnavailable { message: String },
}

/// Admits `peer`'s request for `key` with `min_valid` (`Duration::ZERO`
/// when none was asked), or says why not: the policy grants the key's
/// identity and its audience or every one of its scopes ([`grant_key`]),
/// and a key new to the cache is within the caller's budget. `decision` is
/// set as soon as the policy has decided, for the audit line. A
/// per-workload identity's requests come through
/// [`super::workload_account::admit`], which reads the caller's account
/// between the two.
pub fn admit_key(
    cache: &TokenCache,
    live: &Live,
    peer: &PeerCredentials,
    key: CacheKey,
    min_valid: Duration,
    decision: &mut Option<Decision>,
) -> Result<CacheKey, Refused> {
    grant_key(cache, live, peer, &key, decision)?;
    spend_for_new_key(cache, live, peer, key, min_valid)
}

/// Whether the policy in force now lets `peer` have `key`: an ID-token
/// key's identity and audience ([`grant`]), an access-token key's identity
/// and every scope ([`grant_access`]).
pub fn grant_key(
    cache: &TokenCache,
    live: &Live,
    peer: &PeerCredentials,
    key: &CacheKey,
    decision: &mut Option<Decision>,
) -> Result<(), Refused> {
    match key.kind() {
        TokenKind::IdToken => grant(cache, live, peer, key.identity(), key.audience(), decision),
        TokenKind::AccessToken(_) => grant_access(cache, live, peer, key, decision),
    }
}

/// Whether the policy in force now lets `peer` have the access-token `key`
/// (one rule granting its identity and every scope), and the identity
/// exists: checked on admission and before each delivery on a stream.
pub fn grant_access(
    cache: &TokenCache,
    live: &Live,
    peer: &PeerCredentials,
    key: &CacheKey,
    decision: &mut Option<Decision>,
) -> Result<(), Refused> {
    let identity = key.identity();
    let set = key.scopes().unwrap_or_default();
    let decided = live
        .policy()
        .decide_access(peer.caller(), identity, set.split(' '));
    *decision = Some(decided);
    if !decided.allowed() {
        return Err(Refused::DeniedScopes {
            uid: peer.sharer(),
            identity: identity.to_owned(),
            scopes: set.to_owned(),
        });
    }
    if !cache.knows(identity) {
        return Err(CacheError::UnknownIdentity(identity.to_owned()).into());
    }
    Ok(())
}

/// The per-uid budget for keys new to the cache and forced mints.
pub(super) fn spend_for_new_key(
    cache: &TokenCache,
    live: &Live,
    peer: &PeerCredentials,
    key: CacheKey,
    min_valid: Duration,
) -> Result<CacheKey, Refused> {
    // Only the request that brings a new audience into the cache spends
    // from its uid's bucket: the cache asks the bucket as it admits the key,
    // so concurrent askers of that key spend once, and a refused request
    // leaves nothing behind.
    let spend = |uid: Sharer| {
        let (limits, limiter) = live.limits();
        limiter
            .check(uid)
            .map_err(|retry_in| (limits.clone(), retry_in))
    };
    let new = match peer.budget() {
        Some(uid) => cache.admit(&key, || spend(uid)).map_err(|err| match err {
            AdmitError::Refused((limits, retry_in)) => Refused::TooManyNewAudiences {
                uid,
                per_minute: limits.new_audiences_per_minute,
                burst: limits.new_audience_burst,
                retry_in,
            },
            AdmitError::Cache(err) => Refused::Cache(err),
        })?,
        None => false,
    };
    // A request whose `min_valid_for` forces a new token, although the held
    // one serves everybody else, spends from the same bucket.
    if !new && cache.forces_mint(&key, min_valid)? {
        if let Some(uid) = peer.budget() {
            spend(uid).map_err(|(limits, retry_in)| Refused::TooManyForcedMints {
                uid,
                per_minute: limits.new_audiences_per_minute,
                burst: limits.new_audience_burst,
                retry_in,
            })?;
        }
    }
    Ok(key)
}

/// Whether the policy in force now lets `peer` have (`identity`,
/// `audience`), and the identity exists: checked on admission and again
/// before each delivery on an open stream.
pub fn grant(
    cache: &TokenCache,
    live: &Live,
    peer: &PeerCredentials,
    identity: &str,
    audience: &str,
    decision: &mut Option<Decision>,
) -> Result<(), Refused> {
    let decided = live.policy().decide(peer.caller(), identity, audience);
    *decision = Some(decided);
    if !decided.allowed() {
        return Err(Refused::Denied {
            uid: peer.sharer(),
            selectors: peer
                .selectors()
                .map_or_else(|| "unattested".to_owned(), |s| s.as_str().to_owned()),
            identity: identity.to_owned(),
            audience: audience.to_owned(),
        });
    }
    if !cache.knows(identity) {
        return Err(CacheError::UnknownIdentity(identity.to_owned()).into());
    }
    Ok(())
}
