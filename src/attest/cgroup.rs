//! What a process's cgroup path says about it: the systemd unit it runs in
//! (a VM service, `nginx.service`), and, on a Kubernetes node, the pod UID
//! and container ID the kubelet and the container runtime gave it.
//!
//! Parsed from the text of `/proc/PID/cgroup`, for cgroup v2
//! (`0::/path`), cgroup v1 (`N:controllers:/path`) and hybrid layouts; the
//! kubelet's cgroupfs driver (`/kubepods/burstable/pod<uid>/<id>`) and
//! systemd driver (`/kubepods.slice/.../kubepods-burstable-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`),
//! with containerd (`cri-containerd-`), CRI-O (`crio-`) and Docker
//! (`docker-`) naming. Nothing here trusts the text: a path that does not
//! have exactly the expected shape yields nothing.

/// A Kubernetes pod (and container) named by a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// The pod's UID, lower case with dashes, as the API server writes it.
    pub uid: String,
    /// The container's ID (64 lower-case hex digits), when the process is
    /// in a container's cgroup rather than the pod's own.
    pub container_id: Option<String>,
}

/// What one `/proc/PID/cgroup` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The unified (v2) path, or on a v1-only host the `name=systemd` one.
    pub path: Option<String>,
    /// The systemd unit (`*.service` or `*.scope`) the process runs in.
    pub systemd_unit: Option<String>,
    pub pod: Option<PodRef>,
}

/// Longest unit name systemd accepts.
const MAX_UNIT_NAME: usize = 255;

impl CgroupInfo {
    /// Parses the whole file. The unit comes from the v2 line when there is
    /// one (`0::/...`), else from the v1 `name=systemd` hierarchy; the pod
    /// from the first line whose path names one.
    pub fn parse(text: &str) -> CgroupInfo {
        let mut unified = None;
        let mut systemd = None;
        let mut paths = Vec::new();
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
            paths.push(path);
        }
        let path = unified.or(systemd);
        CgroupInfo {
            path: path.map(str::to_owned),
            systemd_unit: path.and_then(systemd_unit),
            pod: unified.into_iter().chain(paths).find_map(pod_of_path),
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

/// The pod (and container) a cgroup path names: a component `pod<uid>`
/// (cgroupfs driver) or `<prefix>-pod<uid_with_underscores>.slice`
/// (systemd driver) one or two levels (the QoS class) below the kubelet's
/// `kubepods` cgroup, and the container ID in the component right after it.
///
/// The `kubepods` cgroup must be at the top of the hierarchy (or right
/// below kind's `kubelet.slice`): only root can create cgroups there, while
/// a user with a delegated subtree (`user@1000.service/...`) can create any
/// name below it, so a pod-shaped path lower down is forged and names no
/// pod. A path that starts with `..` is seen from inside a cgroup namespace
/// (the daemon in a pod reading the host's `/proc`): what follows the `..`
/// steps lies above our own cgroup, in directories only the kubelet
/// creates, so there the QoS or pod component may come first.
pub fn pod_of_path(path: &str) -> Option<PodRef> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let escaped = components.iter().take_while(|c| **c == "..").count();
    let components = &components[escaped..];
    let (at, uid) = if escaped == 0 {
        let kubepods = match components {
            [first, ..] if is_kubepods(first) => 0,
            ["kubelet.slice", second, ..] if is_kubepods(second) => 1,
            _ => return None,
        };
        components
            .iter()
            .enumerate()
            .skip(kubepods + 1)
            .take(2)
            .find_map(|(i, c)| pod_uid_of_component(c).map(|uid| (i, uid)))?
    } else {
        // Above our namespace: kubepods and QoS levels, then the pod.
        let at = components
            .iter()
            .take(3)
            .position(|c| pod_uid_of_component(c).is_some())?;
        let above_ok = components[..at]
            .iter()
            .all(|c| is_kubepods(c) || matches!(*c, "burstable" | "besteffort"));
        if !above_ok {
            return None;
        }
        (at, pod_uid_of_component(components[at])?)
    };
    let container_id = components.get(at + 1).and_then(|c| container_id(c));
    Some(PodRef { uid, container_id })
}

/// The kubelet's top cgroup or one of its QoS slices: `kubepods`,
/// `kubepods.slice`, `kubepods-burstable.slice`, kind's `kubelet-kubepods.slice`.
fn is_kubepods(component: &str) -> bool {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    (name == "kubepods" || name.ends_with("-kubepods") || name.starts_with("kubepods-"))
        && pod_uid_of_component(component).is_none()
}

/// `pod<uid>` or `...-pod<uid_with_underscores>.slice`.
fn pod_uid_of_component(component: &str) -> Option<String> {
    let raw = match component.strip_suffix(".slice") {
        Some(slice) => {
            let (_, uid) = slice.rsplit_once("-pod")?;
            uid
        }
        None => component.strip_prefix("pod")?,
    };
    let uid = raw.replace('_', "-").to_ascii_lowercase();
    is_uid(&uid).then_some(uid)
}

/// 8-4-4-4-12 hex digits.
fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A container's cgroup: `<64hex>` (cgroupfs), `crio-<64hex>` (CRI-O under
/// cgroupfs), or `<runtime>-<64hex>.scope` (systemd: `cri-containerd-`,
/// `crio-`, `docker-`). CRI-O's `crio-conmon-<id>.scope` is its monitor, not
/// the container.
fn container_id(component: &str) -> Option<String> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8a7d3e1c-5b2f-4c6d-9e0a-1b2c3d4e5f60";
    const UID_: &str = "8a7d3e1c_5b2f_4c6d_9e0a_1b2c3d4e5f60";
    const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00998877665544332211";

    fn pod(container: bool) -> Option<PodRef> {
        Some(PodRef {
            uid: UID.into(),
            container_id: container.then(|| ID.into()),
        })
    }

    fn v2(path: &str) -> CgroupInfo {
        CgroupInfo::parse(&format!("0::{path}\n"))
    }

    #[test]
    fn systemd_driver_with_each_runtime_on_cgroup_v2() {
        for runtime in ["cri-containerd", "crio", "docker"] {
            for (qos_dirs, qos) in [
                ("/kubepods-burstable.slice", "kubepods-burstable-"),
                ("/kubepods-besteffort.slice", "kubepods-besteffort-"),
                ("", "kubepods-"),
            ] {
                let path =
                    format!("/kubepods.slice{qos_dirs}/{qos}pod{UID_}.slice/{runtime}-{ID}.scope");
                let info = v2(&path);
                assert_eq!(info.pod, pod(true), "{path}");
                assert_eq!(info.path.as_deref(), Some(path.as_str()));
            }
        }
        // kind and other nested kubelets prefix the slices.
        let nested = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(v2(&nested).pod, pod(true));
    }

    #[test]
    fn cgroupfs_driver_with_each_runtime_on_cgroup_v2() {
        for path in [
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/{ID}"),
            format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
        ] {
            assert_eq!(v2(&path).pod, pod(true), "{path}");
        }
    }

    #[test]
    fn cgroup_v1_lines_name_the_pod() {
        let text = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{ID}\n\
             11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n\
             4:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"
        );
        assert_eq!(CgroupInfo::parse(&text).pod, pod(true));
        let docker_v1 = format!(
            "9:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{ID}.scope\n\
             1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{ID}.scope\n"
        );
        let info = CgroupInfo::parse(&docker_v1);
        assert_eq!(info.pod, pod(true));
        assert_eq!(info.systemd_unit, Some(format!("docker-{ID}.scope")));
    }

    #[test]
    fn a_process_in_the_pod_cgroup_itself_or_crio_conmon_has_no_container() {
        assert_eq!(v2(&format!("/kubepods/burstable/pod{UID}")).pod, pod(false));
        assert_eq!(
            v2(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"
            ))
            .pod,
            pod(false)
        );
    }

    #[test]
    fn pod_paths_below_a_delegated_subtree_are_forged() {
        // A user may create any cgroup below its own service: kubepods
        // names there are not the kubelet's.
        for path in [
            format!(
                "/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/system.slice/app.service/kubepods/burstable/pod{UID}/{ID}"),
            format!("/tb-test-1-0.slice/kubepods/pod{UID}/{ID}"),
            // The pod too far below kubepods.
            format!("/kubepods/burstable/extra/pod{UID}/{ID}"),
            // Seen from a cgroup namespace: what lies above must be the
            // kubelet's levels.
            format!("/../../user.slice/kubepods/pod{UID}/{ID}"),
            format!("/../../../x/y/pod{UID}/{ID}"),
        ] {
            assert_eq!(v2(&path).pod, None, "{path}");
        }
    }

    #[test]
    fn paths_seen_from_the_daemons_own_cgroup_namespace_name_pods() {
        // The broker in a pod reads the host's /proc: a peer's cgroup is
        // shown relative to the broker's own cgroup (its namespace root).
        for path in [
            format!("/../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            format!("/../../../kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            format!("/../../pod{UID}/{ID}"),
            format!("/../../../besteffort/pod{UID}/{ID}"),
        ] {
            assert_eq!(v2(&path).pod, pod(true), "{path}");
        }
    }

    #[test]
    fn paths_that_only_look_like_pods_name_none() {
        for path in [
            // No kubepods ancestor: a user may name a directory anything.
            format!("/user.slice/pod{UID}/{ID}"),
            format!("/system.slice/evil-pod{UID_}.slice/docker-{ID}.scope"),
            // Malformed UIDs.
            "/kubepods/burstable/pod1234/abc".to_owned(),
            format!("/kubepods/burstable/pod{UID}x/{ID}"),
            format!("/kubepods/burstable/pod{}/{ID}", &UID[..35]),
            "/kubepods/burstable".to_owned(),
            "/".to_owned(),
        ] {
            assert_eq!(v2(&path).pod, None, "{path}");
        }
        // A container ID of the wrong shape is no container.
        let short = format!("/kubepods/burstable/pod{UID}/{}", &ID[..63]);
        assert_eq!(v2(&short).pod, pod(false));
        let upper = format!("/kubepods/burstable/pod{UID}/{}", ID.to_uppercase());
        assert_eq!(v2(&upper).pod, pod(false));
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
