//! What a process's cgroup path says about it: the systemd unit it runs in
//! (a VM service, `nginx.service`).
//!
//! Parsed from the text of `/proc/PID/cgroup`, for cgroup v2
//! (`0::/path`), cgroup v1 (`N:controllers:/path`) and hybrid layouts.
//! Nothing here trusts the text: a path that does not have exactly the
//! expected shape yields nothing.

/// What one `/proc/PID/cgroup` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The unified (v2) path, or on a v1-only host the `name=systemd` one.
    pub path: Option<String>,
    /// The systemd unit (`*.service` or `*.scope`) the process runs in.
    pub systemd_unit: Option<String>,
}

/// Longest unit name systemd accepts.
const MAX_UNIT_NAME: usize = 255;

impl CgroupInfo {
    /// Parses the whole file. The unit comes from the v2 line when there is
    /// one (`0::/...`), else from the v1 `name=systemd` hierarchy.
    pub fn parse(text: &str) -> CgroupInfo {
        let mut unified = None;
        let mut systemd = None;
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if !path.starts_with('/') {
                continue;
            }
            if id == "0" && controllers.is_empty() {
                unified = Some(path);
            } else if controllers.split(',').any(|c| c == "name=systemd") {
                systemd = Some(path);
            }
        }
        let path = unified.or(systemd);
        CgroupInfo {
            path: path.map(str::to_owned),
            systemd_unit: path.and_then(systemd_unit),
        }
    }
}

/// The unit a cgroup path lies in: below the slices (`*.slice`), the first
/// component that is a service or scope. Anything deeper is the unit's own
/// delegated subtree (`/system.slice/app.service/worker` is `app.service`).
pub fn systemd_unit(path: &str) -> Option<String> {
    for component in path.split('/').filter(|c| !c.is_empty()) {
        if component.ends_with(".slice") {
            continue;
        }
        return (is_unit_name(component)
            && (component.ends_with(".service") || component.ends_with(".scope")))
        .then(|| component.to_owned());
    }
    None
}

/// A systemd unit name: the characters systemd allows, a name before the
/// suffix, and a known suffix a process can run in.
pub fn is_unit_name(name: &str) -> bool {
    let Some((stem, _)) = name
        .strip_suffix(".service")
        .map(|s| (s, "service"))
        .or_else(|| name.strip_suffix(".scope").map(|s| (s, "scope")))
    else {
        return false;
    };
    !stem.is_empty()
        && name.len() <= MAX_UNIT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(path: &str) -> CgroupInfo {
        CgroupInfo::parse(&format!("0::{path}\n"))
    }

    #[test]
    fn systemd_units_of_vm_services() {
        for (path, unit) in [
            ("/system.slice/nginx.service", Some("nginx.service")),
            ("/system.slice/nginx.service/worker", Some("nginx.service")),
            (
                "/system.slice/system-getty.slice/getty@tty1.service",
                Some("getty@tty1.service"),
            ),
            (
                "/user.slice/user-1000.slice/session-3.scope",
                Some("session-3.scope"),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/x.service",
                Some("user@1000.service"),
            ),
            ("/", None),
            ("/system.slice", None),
            ("/tb-test/not-a-unit/x.service", None),
            ("/system.slice/.service", None),
            ("/system.slice/bad name.service", None),
        ] {
            assert_eq!(v2(path).systemd_unit.as_deref(), unit, "{path}");
        }
    }

    #[test]
    fn hybrid_hosts_take_the_unit_from_the_unified_line_else_name_systemd() {
        let hybrid = "9:name=systemd:/system.slice/old.service\n\
                      4:memory:/process_api/x\n\
                      0::/system.slice/nginx.service\n";
        assert_eq!(
            CgroupInfo::parse(hybrid).systemd_unit.as_deref(),
            Some("nginx.service")
        );
        let v1 = "9:name=systemd:/system.slice/old.service\n4:memory:/\n";
        assert_eq!(
            CgroupInfo::parse(v1).systemd_unit.as_deref(),
            Some("old.service")
        );
        assert_eq!(CgroupInfo::parse("garbage\n\n::\n"), CgroupInfo::default());
    }

    #[test]
    fn unit_names() {
        assert!(is_unit_name("nginx.service"));
        assert!(is_unit_name("getty@tty1.service"));
        assert!(is_unit_name("session-3.scope"));
        assert!(!is_unit_name("nginx"));
        assert!(!is_unit_name("nginx.socket"));
        assert!(!is_unit_name("a/b.service"));
        assert!(!is_unit_name(&format!("{}.service", "a".repeat(250))));
    }
}
