//! Paths the daemon trusts with a secret (a key file) or with its front
//! door (the socket's directory), resolved one component at a time so that
//! no user but root and the daemon's own can change where they lead.
//!
//! Every directory on the way, from `/` down, must be owned by root or the
//! daemon's user and writable by nobody else: not by others, nor by a group
//! other than root's or the daemon's, unless it is sticky like `/tmp` (where
//! others cannot rename or remove what is not theirs). Symlinks are followed
//! (Kubernetes mounts Secrets through root-owned `..data` links) only when
//! owned by root or the daemon's user, and the targets are checked the same
//! way. A user who owns any component could otherwise swap what lies below
//! it, which is why checking only the last link or the last directory is
//! not enough.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

/// Most symlinks followed in one path, as the kernel's `ELOOP` limit.
const MAX_LINKS: usize = 40;

/// Why a path cannot be trusted, or could not be inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("{}: {why}", .component.display())]
    Untrusted { component: PathBuf, why: String },
    #[error("{}: {source}", .component.display())]
    Io {
        component: PathBuf,
        source: io::Error,
    },
}

impl PathError {
    /// Whether a component does not exist (as opposed to being unsafe).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PathError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Whom the daemon trusts besides root: its effective uid and gid.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    fn this_process() -> Self {
        Self {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    fn trusts_user(self, uid: u32) -> bool {
        uid == 0 || uid == self.uid
    }

    fn trusts_group(self, gid: u32) -> bool {
        gid == 0 || gid == self.gid
    }

    /// A directory nobody else can change entries of.
    fn check_directory(self, dir: &Path, meta: &std::fs::Metadata) -> Result<(), PathError> {
        let untrusted = |why: String| PathError::Untrusted {
            component: dir.to_path_buf(),
            why,
        };
        if !self.trusts_user(meta.uid()) {
            return Err(untrusted(format!(
                "directory owned by uid {}, not by root or this daemon's user ({})",
                meta.uid(),
                self.uid
            )));
        }
        let mode = meta.mode();
        let sticky = mode & 0o1000 != 0;
        if !sticky && mode & 0o002 != 0 {
            return Err(untrusted(format!(
                "directory writable by others and not sticky (mode {:04o})",
                mode & 0o7777
            )));
        }
        if !sticky && mode & 0o020 != 0 && !self.trusts_group(meta.gid()) {
            return Err(untrusted(format!(
                "directory writable by group {} and not sticky (mode {:04o})",
                meta.gid(),
                mode & 0o7777
            )));
        }
        Ok(())
    }
}

/// Resolves `path` (relative to the current directory if relative) to a
/// path without symlinks, checking each directory and each link on the way,
/// the last component included when it is a directory or a link. The last
/// component itself, when it is a file, is for the caller to check (open it
/// with `O_NOFOLLOW`: nothing on the way can change any more).
pub fn resolve(path: &Path) -> Result<PathBuf, PathError> {
    resolve_as(path, Owner::this_process())
}

fn resolve_as(path: &Path, owner: Owner) -> Result<PathBuf, PathError> {
    let io_error = |component: &Path| {
        let component = component.to_path_buf();
        move |source| PathError::Io { component, source }
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io_error(Path::new(".")))?
            .join(path)
    };
    // Components still to walk, the next one last.
    let mut pending: Vec<PathBuf> = components_of(&absolute);
    let mut resolved = PathBuf::from("/");
    let root = std::fs::symlink_metadata(&resolved).map_err(io_error(&resolved))?;
    owner.check_directory(&resolved, &root)?;
    let mut links = 0;
    while let Some(component) = pending.pop() {
        match component.components().next() {
            Some(Component::RootDir) => resolved = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                // `resolved` holds no links, so its parent is the real one,
                // already checked on the way down.
                resolved.pop();
            }
            Some(Component::Normal(name)) => {
                let next = resolved.join(name);
                let meta = std::fs::symlink_metadata(&next).map_err(io_error(&next))?;
                if meta.file_type().is_symlink() {
                    if !owner.trusts_user(meta.uid()) {
                        return Err(PathError::Untrusted {
                            component: next,
                            why: format!(
                                "symlink owned by uid {}, not by root or this daemon's user ({}); \
                                 refusing to follow it",
                                meta.uid(),
                                owner.uid
                            ),
                        });
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(PathError::Untrusted {
                            component: next,
                            why: format!("more than {MAX_LINKS} symlinks on the way"),
                        });
                    }
                    let target = std::fs::read_link(&next).map_err(io_error(&next))?;
                    pending.extend(components_of(&target));
                    continue;
                }
                if meta.is_dir() {
                    owner.check_directory(&next, &meta)?;
                }
                resolved = next;
            }
            // `.` and prefixes (none on Unix).
            _ => {}
        }
    }
    Ok(resolved)
}

/// `path`'s components, one per `PathBuf`, in reverse order (a stack).
fn components_of(path: &Path) -> Vec<PathBuf> {
    let mut components: Vec<PathBuf> = path
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    components.reverse();
    components
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/file"), b"x").unwrap();
        dir
    }

    #[test]
    fn follows_links_and_dot_dots_to_the_real_path() {
        let dir = tree();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        symlink("a", dir.path().join("link")).unwrap();
        symlink(base.join("link/file"), dir.path().join("abs")).unwrap();
        let me = Owner::this_process();
        assert_eq!(
            resolve_as(&dir.path().join("abs"), me).unwrap(),
            base.join("a/file")
        );
        assert_eq!(
            resolve_as(&dir.path().join("link/../a/./file"), me).unwrap(),
            base.join("a/file")
        );
        assert!(resolve_as(&dir.path().join("missing"), me)
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn refuses_links_and_directories_another_user_owns_anywhere_on_the_way() {
        let dir = tree();
        symlink("a/file", dir.path().join("link")).unwrap();
        // As a daemon whose uid owns none of this (unless the tests run as
        // root, which everything is trusted as), nothing resolves.
        let stranger = Owner {
            uid: 4242,
            gid: 4242,
        };
        let file_owner = std::fs::metadata(dir.path()).unwrap().uid();
        if file_owner != 0 {
            let err = resolve_as(&dir.path().join("a/file"), stranger).unwrap_err();
            assert!(err.to_string().contains("owned by uid"), "{err}");
        }
        // A directory writable by everyone, without the sticky bit.
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        let me = Owner::this_process();
        let err = resolve_as(&dir.path().join("link"), me).unwrap_err();
        assert!(
            err.to_string()
                .contains("writable by others and not sticky (mode 0777)"),
            "{err}"
        );
        std::fs::set_permissions(
            dir.path().join("a"),
            std::fs::Permissions::from_mode(0o1777),
        )
        .unwrap();
        assert!(resolve_as(&dir.path().join("link"), me).is_ok());
    }

    #[test]
    fn link_loops_end() {
        let dir = tempfile::tempdir().unwrap();
        symlink("b", dir.path().join("a")).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        let err = resolve(&dir.path().join("a")).unwrap_err();
        assert!(err.to_string().contains("more than 40 symlinks"), "{err}");
    }
}
