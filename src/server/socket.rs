//! The Unix socket: the first gate of the security model.
//!
//! The socket is bound under a temporary name, given `socket_mode`, then
//! renamed into place, so it is never reachable with wider permissions. A
//! leftover socket nobody answers on is replaced; a live one, or a path that
//! is not a socket, stops startup with a message saying which.

use std::{
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    #[error("socket {}: another process is already serving on it; stop it or choose another server.socket_path", .0.display())]
    InUse(PathBuf),
    #[error("socket {}: the path exists and is not a socket; remove it or choose another server.socket_path", .0.display())]
    NotASocket(PathBuf),
    #[error("socket {}: {why}", path.display())]
    Unsafe { why: String, path: PathBuf },
    #[error("socket {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// Removes the socket file when dropped, if it is still the one we bound.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the socket file");
            }
        }
    }
}

/// Binds `path` with permission bits `mode` and, if given, group `group`.
/// Must run inside a tokio runtime.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let io_err = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| SocketError::Io { path, what, source }
    };
    check_directory(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => return Err(SocketError::Unsafe {
            why:
                "the path is a symlink; refusing to follow it (another user could have planted it)"
                    .into(),
            path: path.to_path_buf(),
        }),
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale socket nobody answers on");
                }
                Err(e) => return Err(io_err("cannot probe the existing socket")(e)),
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect the path")(e)),
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| {
            io_err("is not a file path")(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no file name",
            ))
        })?
        .to_string_lossy();
    let staging = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(io_err("cannot bind"))?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set socket_mode"))
        .and_then(|()| match group {
            Some(gid) => std::os::unix::fs::lchown(&staging, None, Some(gid))
                .map_err(io_err("cannot set socket_group")),
            None => Ok(()),
        })
        .and_then(|()| {
            std::fs::rename(&staging, path).map_err(io_err("cannot move the socket into place"))
        })
        .and_then(|()| {
            std::fs::symlink_metadata(path).map_err(io_err("cannot inspect the bound socket"))
        });
    match placed {
        Ok(meta) => Ok((
            listener,
            SocketFile {
                path: path.to_path_buf(),
                inode: meta.ino(),
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            Err(e)
        }
    }
}

/// The socket's directory, and every directory and link above it, must
/// not let another user replace the socket (see `trusted_path`). A missing
/// directory is created (mode 0750) only below an existing one that passes.
fn check_directory(path: &Path) -> Result<(), SocketError> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_path_buf(),
        None => PathBuf::from("."),
    };
    let refuse = |e: crate::domain::trusted_path::PathError| SocketError::Unsafe {
        why: format!("its directory cannot be trusted: {e}"),
        path: path.to_path_buf(),
    };
    match crate::domain::trusted_path::resolve(&dir) {
        Ok(_) => return Ok(()),
        Err(e) if !e.is_not_found() => return Err(refuse(e)),
        Err(_) => {}
    }
    let existing = dir
        .ancestors()
        .find(|a| std::fs::symlink_metadata(a).is_ok())
        .unwrap_or(Path::new("/"));
    crate::domain::trusted_path::resolve(existing).map_err(refuse)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&dir)
        .map_err(|source| SocketError::Io {
            path: path.to_path_buf(),
            what: "cannot create its directory",
            source,
        })?;
    crate::domain::trusted_path::resolve(&dir).map_err(refuse)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_with_mode_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/broker.sock");
        let (listener, file) = bind(&path, 0o600, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.path().join("sub"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o750
        );
        // A live socket is refused.
        assert!(matches!(
            bind(&path, 0o600, None),
            Err(SocketError::InUse(_))
        ));
        drop(listener);
        drop(file);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn replaces_a_stale_socket_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (_listener, _file) = bind(&path, 0o660, None).unwrap();
        let other = dir.path().join("plain");
        std::fs::write(&other, b"x").unwrap();
        assert!(matches!(
            bind(&other, 0o660, None),
            Err(SocketError::NotASocket(_))
        ));
    }
}
