//! The cache key: a struct of (identity, kind, audience or scope set, and
//! for a per-workload identity the account resolved for the caller), never
//! a concatenated string, so no audience can collide with another
//! identity's key or with a scope set, and two pods whose annotations name
//! different accounts never share a token. A key can only be built from an
//! audience that passed validation, or from a checked scope set.

use std::{fmt, sync::Arc};

use crate::{
    domain::{validate_audience, AudienceError},
    source::access::AccessOf,
};

/// Longest scope the broker accepts (Google's are URLs well under this).
pub const MAX_SCOPE_LEN: usize = 256;
/// Most scopes one access token may be asked for.
pub const MAX_SCOPES: usize = 32;

/// Which token an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenKind {
    /// A Google-signed ID token for an audience.
    IdToken,
    /// An OAuth2 access token for a scope set ([`AccessOf`] says whose).
    AccessToken(AccessOf),
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    identity: Arc<str>,
    kind: TokenKind,
    /// The audience, or the scope set sorted, without duplicates, joined by
    /// single spaces (a scope holds no whitespace).
    target: Arc<str>,
    /// The account a per-workload identity mints this token as (the
    /// caller's annotation); `None` for an identity with its own account.
    account: Option<Arc<str>>,
}

impl CacheKey {
    /// Validates `audience` and builds an ID-token key.
    pub fn new(identity: &str, audience: &str) -> Result<Self, AudienceError> {
        validate_audience(audience)?;
        Ok(Self {
            identity: identity.into(),
            kind: TokenKind::IdToken,
            target: audience.into(),
            account: None,
        })
    }

    /// This key, minted as `account` (a per-workload identity's account
    /// resolved for the caller).
    pub fn minted_as(mut self, account: &str) -> Self {
        self.account = Some(account.into());
        self
    }

    /// The account of a per-workload identity's key.
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// An access-token key for `scopes` (whitespace-separated, any order,
    /// duplicates allowed): two requests for the same set share one entry.
    pub fn access(identity: &str, of: AccessOf, scopes: &str) -> Result<Self, String> {
        let mut set: Vec<&str> = scopes.split_whitespace().collect();
        set.sort_unstable();
        set.dedup();
        if set.is_empty() {
            return Err("no scope was given".into());
        }
        if set.len() > MAX_SCOPES {
            return Err(format!(
                "{} scopes were asked for; at most {MAX_SCOPES} are allowed",
                set.len()
            ));
        }
        if let Some(bad) = set
            .iter()
            .find(|s| s.len() > MAX_SCOPE_LEN || !s.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(format!(
                "scope {:?} is not printable ASCII of at most {MAX_SCOPE_LEN} bytes",
                crate::domain::LogText::new(bad).as_str()
            ));
        }
        Ok(Self {
            identity: identity.into(),
            kind: TokenKind::AccessToken(of),
            target: set.join(" ").into(),
            account: None,
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// This key with `identity`'s shared text (the same name), so the many
    /// entries of one identity hold its name once.
    pub(super) fn sharing_identity(&self, identity: &Arc<str>) -> Self {
        let mut key = self.clone();
        if *key.identity == **identity {
            key.identity = identity.clone();
        }
        key
    }

    /// The audience or scope set as the key holds it, for a token to share.
    pub(super) fn shared_target(&self) -> &Arc<str> {
        &self.target
    }

    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    /// The audience of an ID-token key; the scope set (space-separated) of
    /// an access-token key.
    pub fn audience(&self) -> &str {
        &self.target
    }

    /// The scope set of an access-token key, space-separated and sorted.
    pub fn scopes(&self) -> Option<&str> {
        match self.kind {
            TokenKind::IdToken => None,
            TokenKind::AccessToken(_) => Some(&self.target),
        }
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.account) {
            (TokenKind::IdToken, Some(account)) => write!(
                f,
                "({:?} as {:?}, {:?})",
                self.identity, account, self.target
            ),
            (TokenKind::IdToken, None) => write!(f, "({:?}, {:?})", self.identity, self.target),
            (TokenKind::AccessToken(of), Some(account)) => write!(
                f,
                "({:?} as {:?}, {of:?} access, {:?})",
                self.identity, account, self.target
            ),
            (TokenKind::AccessToken(of), None) => {
                write!(f, "({:?}, {of:?} access, {:?})", self.identity, self.target)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_structs_not_strings() {
        let a = CacheKey::new("a:b", "c").unwrap();
        let b = CacheKey::new("a", "b:c").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn per_workload_accounts_never_share_a_key() {
        let plain = CacheKey::new("wi", "https://a").unwrap();
        let a = plain.clone().minted_as("a@p.iam.gserviceaccount.com");
        let b = plain.clone().minted_as("b@p.iam.gserviceaccount.com");
        assert_ne!(a, b);
        assert_ne!(a, plain);
        assert_eq!(a, plain.minted_as("a@p.iam.gserviceaccount.com"));
        assert_eq!(a.account(), Some("a@p.iam.gserviceaccount.com"));
    }

    #[test]
    fn per_workload_access_keys_include_the_account_in_equality_hash_and_order() {
        use std::collections::{BTreeSet, HashSet};
        let plain = CacheKey::access("wi", AccessOf::Identity, "s1 s2").unwrap();
        let a = plain.clone().minted_as("a@p.iam.gserviceaccount.com");
        let b = plain.clone().minted_as("b@p.iam.gserviceaccount.com");
        assert_ne!(a, b);
        assert_ne!(a, plain);
        assert_eq!(a.scopes(), Some("s1 s2"));
        assert_eq!(b.account(), Some("b@p.iam.gserviceaccount.com"));
        let hashed: HashSet<_> = [&a, &b, &plain].into_iter().cloned().collect();
        assert_eq!(hashed.len(), 3);
        let ordered: BTreeSet<_> = [&a, &b, &plain].into_iter().cloned().collect();
        assert_eq!(ordered.len(), 3);
        assert!(format!("{a:?}").contains("a@p.iam.gserviceaccount.com"));
    }

    #[test]
    fn scope_sets_are_sorted_and_kinds_never_collide() {
        let a = CacheKey::access("x", AccessOf::Identity, "s2 s1 s2").unwrap();
        let b = CacheKey::access("x", AccessOf::Identity, "  s1\ts2 ").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.scopes(), Some("s1 s2"));
        let base = CacheKey::access("x", AccessOf::Base, "s1 s2").unwrap();
        assert_ne!(a, base);
        let id = CacheKey::new("x", "s1").unwrap();
        let access = CacheKey::access("x", AccessOf::Identity, "s1").unwrap();
        assert_ne!(id, access);
        assert_eq!(id.scopes(), None);
        assert!(CacheKey::access("x", AccessOf::Identity, " ").is_err());
        assert!(CacheKey::access("x", AccessOf::Identity, &"s".repeat(257)).is_err());
        let many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
        assert!(CacheKey::access("x", AccessOf::Identity, &many.join(" ")).is_err());
    }
}
