//! The cache key: a struct of (identity, audience), never a concatenated
//! string, so no audience can collide with another identity's key. A key
//! can only be built from an audience that passed validation.

use std::{fmt, sync::Arc};

use crate::domain::{validate_audience, AudienceError};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    identity: Arc<str>,
    audience: Arc<str>,
}

impl CacheKey {
    /// Validates `audience` and builds the key.
    pub fn new(identity: &str, audience: &str) -> Result<Self, AudienceError> {
        validate_audience(audience)?;
        Ok(Self {
            identity: identity.into(),
            audience: audience.into(),
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({:?}, {:?})", self.identity, self.audience)
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
}
