//! A user or group as an operator writes it: a number or a name, resolved
//! against this system's user and group databases.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A user or group as written in the config: a number or a name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Principal {
    Id(u32),
    Name(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Id(id) => write!(f, "{id}"),
            Principal::Name(name) => write!(f, "{name:?}"),
        }
    }
}

impl Principal {
    /// The numeric id: the number itself, a name that is all digits, or
    /// what `lookup` finds for the name.
    pub fn resolve(&self, lookup: impl Fn(&str) -> Option<u32>) -> Option<u32> {
        match self {
            Principal::Id(id) => Some(*id),
            Principal::Name(name) => name.parse::<u32>().ok().or_else(|| lookup(name)),
        }
    }

    /// As a user: its uid, or an error naming the unknown user.
    pub fn resolve_user(&self) -> Result<u32, String> {
        self.resolve(lookup_user)
            .ok_or_else(|| format!("no such user {self} on this system"))
    }

    /// As a group: its gid, or an error naming the unknown group.
    pub fn resolve_group(&self) -> Result<u32, String> {
        self.resolve(lookup_group)
            .ok_or_else(|| format!("no such group {self} on this system"))
    }
}

/// The uid of the user called `name` on this system.
pub fn lookup_user(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// The gid of the group called `name` on this system.
pub fn lookup_group(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_digit_names() {
        assert_eq!(Principal::Id(7).resolve_group(), Ok(7));
        assert_eq!(Principal::Name("42".into()).resolve_group(), Ok(42));
        assert_eq!(Principal::Name("root".into()).resolve_group(), Ok(0));
        let err = Principal::Name("no-such-group-xyz".into())
            .resolve_group()
            .unwrap_err();
        assert_eq!(err, "no such group \"no-such-group-xyz\" on this system");
    }
}
