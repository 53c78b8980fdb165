//! Access tokens of base credentials (PROTOCOLS.md §4): what an identity
//! built on another one (impersonation, workload identity federation)
//! presents to Google as `Authorization: Bearer`. They are never shown to
//! clients.
//!
//! A source only knows how to mint one ([`AccessFetcher`]); holding them is
//! the cache engine's job, as for ID tokens (single flight, background
//! refresh, backoff, eviction), keyed by (identity, scope set). The engine
//! sits above this layer, so it hands itself to the sources that need a
//! bearer as an [`AccessTokens`] once it is built ([`EngineLink`]). Until
//! then (`check-config`, a base inside a credential file that is no
//! identity of its own) a [`Bearer`] fetches directly.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use super::SourceError;
pub use crate::token::AccessToken;

/// The scope IAM Credentials and STS need; the only one the broker asks for.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The future an [`AccessFetcher`] or [`AccessTokens`] returns.
pub type AccessFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AccessToken, SourceError>> + Send + 'a>>;

/// Makes the upstream call for one access token (no retries: the engine
/// retries, with backoff); the cache engine decides when.
pub trait AccessFetcher: Send + Sync + 'static {
    /// `scopes` is space-separated.
    fn fetch_access<'a>(&'a self, scopes: &'a str) -> AccessFuture<'a>;

    /// An access token minted as `account` (a per-workload identity's
    /// account resolved for the caller, [`crate::cache::CacheKey::account`]).
    /// Only an impersonation target can; every other fetcher refuses.
    fn fetch_access_as<'a>(&'a self, account: &'a str, scopes: &'a str) -> AccessFuture<'a> {
        let _ = scopes;
        Box::pin(async move {
            Err(SourceError::Rejected {
                upstream: "the identity's token source".into(),
                status: 400,
                message: format!(
                    "this source mints access tokens as its own account and cannot mint as {}",
                    crate::domain::LogText::new(account)
                ),
            })
        })
    }
}

/// Which access token of an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccessOf {
    /// The identity's own (`IdTokenSource::access`): what identities built
    /// on it present.
    Identity,
    /// The credential under it (`IdTokenSource::base_access`): the federated
    /// token of an `external_account`, the source credential of an
    /// impersonated-credentials file.
    Base,
}

/// The cache engine's access tokens, as the sources see them.
pub trait AccessTokens: Send + Sync + 'static {
    /// A token of `identity` for `scopes` (space-separated) with some life
    /// left: from memory, or from the one fetch shared by every asker.
    fn access_token<'a>(
        &'a self,
        identity: &'a str,
        of: AccessOf,
        scopes: &'a str,
    ) -> AccessFuture<'a>;

    /// Drops `refused` if it is still the token held for the key, so the
    /// next ask fetches a new one. Callers that saw the same token refused
    /// drop it once between them.
    fn invalidate(&self, identity: &str, of: AccessOf, scopes: &str, refused: &AccessToken);
}

/// Where a source that needs bearers finds the engine once it is built.
#[derive(Default)]
pub struct EngineLink(OnceLock<Arc<dyn AccessTokens>>);

impl EngineLink {
    /// The first engine attached stays (a reload keeps the same cache).
    pub fn attach(&self, tokens: Arc<dyn AccessTokens>) {
        let _ = self.0.set(tokens);
    }

    fn get(&self) -> Option<&Arc<dyn AccessTokens>> {
        self.0.get()
    }
}

/// A bearer token for an upstream hop: from the engine when one is
/// attached, else straight from the credential.
pub(crate) struct Bearer<'a> {
    pub(crate) link: &'a EngineLink,
    pub(crate) identity: &'a str,
    pub(crate) of: AccessOf,
    pub(crate) fetcher: &'a dyn AccessFetcher,
    /// Names the hop in errors, e.g. `base identity "default"`.
    pub(crate) description: &'a str,
}

impl Bearer<'_> {
    pub(crate) async fn get(&self) -> Result<AccessToken, SourceError> {
        match self.link.get() {
            Some(engine) => {
                engine
                    .access_token(self.identity, self.of, CLOUD_PLATFORM_SCOPE)
                    .await
            }
            None => self.fetcher.fetch_access(CLOUD_PLATFORM_SCOPE).await,
        }
    }

    /// `refused` was answered 401: drop it so the next [`Bearer::get`]
    /// fetches anew.
    pub(crate) fn invalidate(&self, refused: &AccessToken) {
        if let Some(engine) = self.link.get() {
            engine.invalidate(self.identity, self.of, CLOUD_PLATFORM_SCOPE, refused);
        }
    }
}

/// Reads a `{"access_token", "expires_in"}` answer (metadata server, OAuth
/// token endpoint, STS).
pub(crate) fn parse_oauth_access_token(
    body: &[u8],
    now: SystemTime,
) -> Result<AccessToken, String> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
        return Err("the answer is not a JSON object".into());
    };
    let token = fields
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("no `access_token` in the answer")?;
    let expires_in = fields
        .get("expires_in")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .ok_or("no numeric `expires_in` in the answer")?;
    Ok(AccessToken::new(
        token.to_owned(),
        now,
        now + Duration::from_secs(expires_in),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauth_answers_are_read_with_their_lifetime() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let token =
            parse_oauth_access_token(br#"{"access_token":"t","expires_in":"3599"}"#, now).unwrap();
        assert_eq!(token.expose(), "t");
        assert_eq!(token.issued_at(), now);
        assert_eq!(token.remaining(now), Duration::from_secs(3599));
        assert!(parse_oauth_access_token(br#"{"access_token":"","expires_in":1}"#, now).is_err());
        assert!(parse_oauth_access_token(br#"{"access_token":"t"}"#, now).is_err());
        assert!(parse_oauth_access_token(b"[]", now).is_err());
    }
}
