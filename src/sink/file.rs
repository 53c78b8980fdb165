//! A sink's file: what it holds in each format, and how it is replaced
//! (a temporary file in the same directory, its mode and owner set, synced,
//! then renamed over the old one), so a reader sees the old token or the
//! new one, never a partial file.

use std::{
    fs::{File, Permissions},
    io::{self, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
    time::SystemTime,
};

use zeroize::Zeroizing;

use crate::{
    config::SinkFormat,
    token::{AccessToken, IdToken},
};

/// The token a sink's file holds: an ID token (`audience`) or an access
/// token (`scopes`).
#[derive(Debug, Clone)]
pub enum SinkToken {
    Id(IdToken),
    Access(AccessToken),
}

impl SinkToken {
    pub fn expose(&self) -> &str {
        match self {
            SinkToken::Id(t) => t.expose(),
            SinkToken::Access(t) => t.expose(),
        }
    }

    pub fn expires_at(&self) -> SystemTime {
        match self {
            SinkToken::Id(t) => t.expires_at(),
            SinkToken::Access(t) => t.expires_at(),
        }
    }

    pub fn issued_at(&self) -> SystemTime {
        match self {
            SinkToken::Id(t) => t.issued_at(),
            SinkToken::Access(t) => t.issued_at(),
        }
    }

    pub fn same_token_as(&self, other: &SinkToken) -> bool {
        match (self, other) {
            (SinkToken::Id(a), SinkToken::Id(b)) => a.same_token_as(b),
            (SinkToken::Access(a), SinkToken::Access(b)) => a.same_token_as(b),
            _ => false,
        }
    }
}

/// The file's content for `token`. Zeroized when dropped. `json` names
/// what the token is for: the ID token's `audience`, or the access token's
/// `scopes` (space-separated in `scopes`).
pub fn render(
    format: SinkFormat,
    env_name: &str,
    identity: &str,
    scopes: &str,
    token: &SinkToken,
) -> Zeroizing<String> {
    let text = token.expose();
    Zeroizing::new(match format {
        SinkFormat::Jwt => text.to_owned(),
        SinkFormat::Env => format!("{env_name}={text}\n"),
        SinkFormat::Header => format!("Authorization: Bearer {text}\n"),
        SinkFormat::Json => {
            let mut json = serde_json::json!({
                "token": text,
                "expire_time": humantime::format_rfc3339_seconds(token.expires_at()).to_string(),
                "issue_time": humantime::format_rfc3339_seconds(token.issued_at()).to_string(),
                "identity": identity,
            });
            match token {
                SinkToken::Id(id) => json["audience"] = id.audience().into(),
                SinkToken::Access(_) => {
                    json["scopes"] = scopes.split(' ').collect::<Vec<_>>().into();
                    json["token_type"] = "Bearer".into();
                }
            }
            format!("{json}\n")
        }
    })
}

/// Who the file belongs to; `None` keeps the daemon's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Replaces `path` with `content`, atomically. Blocking: run it off the
/// async threads.
pub fn write_atomically(
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: Ownership,
) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    // Created 0600 by tempfile: nobody else can read it before its mode is set.
    let mut tmp = tempfile::Builder::new()
        .prefix(".token-broker-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(content)?;
    if owner.uid.is_some() || owner.gid.is_some() {
        nix::unistd::fchown(
            tmp.as_file(),
            owner.uid.map(nix::unistd::Uid::from_raw),
            owner.gid.map(nix::unistd::Gid::from_raw),
        )
        .map_err(io::Error::from)?;
    }
    tmp.as_file()
        .set_permissions(Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename itself survives a crash only once the directory is synced.
    File::open(dir)?.sync_all()
}

/// Removes `path`; a file already gone is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn replaces_the_file_whole_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jwt");
        write_atomically(&path, b"one", 0o640, Ownership::default()).unwrap();
        write_atomically(&path, b"two", 0o640, Ownership::default()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_symlink_at_the_path_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "keep").unwrap();
        let path = dir.path().join("t.jwt");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_atomically(&path, b"token", 0o600, Ownership::default()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
    }
}
