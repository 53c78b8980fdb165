//! Issue 14 (VM part): workload selectors decided on real processes. Each
//! client is placed, before it runs, into a real cgroup v2 directory made
//! for the test under the machine's cgroup2 mount
//! (`tb-test-<pid>-<n>.slice/<unit>`, the shape systemd gives a service), and
//! runs under its own uid and groups. The cgroups are removed afterwards;
//! where cgroup2 is not mounted or not writable the tests say so and skip.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

use nix::sys::signal::Signal;
use token_broker::{
    emulator::Emulator,
    proto::{token_broker_client::TokenBrokerClient, GetIdTokenRequest},
};
use tonic::Code;

use crate::support::{self, Broker};

/// The service's user: every client below runs as it.
pub(crate) const WEB: u32 = 4201;
/// A group some of its processes hold as a supplementary group.
const DEPLOYERS: u32 = 5201;

/// The cgroup2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
/// hybrid host), from `/proc/self/mountinfo`.
pub(crate) fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        mount.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// A test's own cgroup tree: `<cgroup2>/tb-test-<pid>-<n>.slice/<unit>`.
struct TestCgroups {
    mount: PathBuf,
    root: PathBuf,
    units: Vec<PathBuf>,
}

impl TestCgroups {
    /// `None`, with the reason printed, where the kernel will not have it.
    fn create(units: &[&str]) -> Option<TestCgroups> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let Some(mount) = cgroup2_mount() else {
            eprintln!("SKIPPED: no cgroup2 mount on this machine");
            return None;
        };
        let root = mount.join(format!(
            "tb-test-{}-{}.slice",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(error) = std::fs::create_dir(&root) {
            eprintln!("SKIPPED: cannot create {} ({error})", root.display());
            return None;
        }
        let mut cgroups = TestCgroups {
            mount,
            root,
            units: Vec::new(),
        };
        for unit in units {
            let dir = cgroups.root.join(unit);
            if let Err(error) = std::fs::create_dir(&dir) {
                eprintln!("SKIPPED: cannot create {} ({error})", dir.display());
                return None;
            }
            cgroups.units.push(dir);
        }
        Some(cgroups)
    }

    fn procs(&self, unit: &str) -> PathBuf {
        self.root.join(unit).join("cgroup.procs")
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        // Anything still inside goes back to the root, so the tree can go.
        for dir in &self.units {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = std::fs::write(self.mount.join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        if let Err(error) = std::fs::remove_dir(&self.root) {
            eprintln!("could not remove {}: {error}", self.root.display());
        }
    }
}

/// Makes `command`'s process, before it runs anything, move itself into
/// the cgroup whose `cgroup.procs` is `procs` (if any), take `groups` as
/// its supplementary groups, then `gid` and `uid`; then call `before_exec`.
/// Only system calls run in the child: everything is prepared here.
pub(crate) fn place(
    command: &mut Command,
    procs: Option<&Path>,
    uid: u32,
    gid: u32,
    groups: &[u32],
    before_exec: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
) {
    let procs = procs.map(|p| CString::new(p.as_os_str().as_encoded_bytes()).unwrap());
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let check = |result: libc::c_int| {
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: the closure makes only async-signal-safe system calls on
    // values prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd)?;
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                check(written as libc::c_int)?;
            }
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            before_exec()
        });
    }
}

/// A broker whose socket every uid may open, with `rules` as its policy.
pub(crate) async fn broker_with(emulator: &Emulator, rules: String) -> Broker {
    let identity = support::metadata_identity("default", emulator);
    Broker::start(
        move |socket| {
            support::set_mode(socket.parent().unwrap(), 0o755);
            format!(
                "{}\n{rules}",
                support::config_text(socket, &identity)
                    .replace("[server]\n", "[server]\nsocket_mode = \"0666\"\n"),
            )
        },
        "info",
    )
    .await
}

/// `token-broker token` for `audience`, run in `unit` (or left where the
/// test runs) as `uid`/`gid` with `groups`: (exit code, stdout, stderr).
fn token_from(
    broker: &Broker,
    cgroups: &TestCgroups,
    unit: Option<&str>,
    (uid, gid, groups): (u32, u32, &[u32]),
    audience: &str,
) -> (i32, String, String) {
    let mut command = support::base_command(&[
        "token",
        "--socket",
        broker.socket.to_str().unwrap(),
        "--audience",
        audience,
    ]);
    let procs = unit.map(|u| cgroups.procs(u));
    place(&mut command, procs.as_deref(), uid, gid, groups, || Ok(()));
    let out = command.output().expect("client runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The audience [`demo_service_broker`]'s rule grants.
const DEMO_AUDIENCE: &str = "https://demo.example.com";

/// The units `demo.service` and `other.service`, and a broker whose one
/// rule grants WEB [`DEMO_AUDIENCE`] in `demo.service` only, with `more`
/// config after it. `None` where the cgroups cannot be made.
async fn demo_service_broker(more: &str) -> Option<(TestCgroups, Emulator, Broker)> {
    let cgroups = TestCgroups::create(&["demo.service", "other.service"])?;
    let emulator = support::emulator().await;
    let broker = broker_with(
        &emulator,
        format!(
            "[[policy]]\nuids = [{WEB}]\nsystemd_units = [\"demo.service\"]\n\
             identities = [\"default\"]\naudiences = [\"{DEMO_AUDIENCE}\"]\n{more}"
        ),
    )
    .await;
    Some((cgroups, emulator, broker))
}

pub(crate) fn audit_lines<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains("GetIdToken") && l.contains(needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_systemd_units_rule_admits_its_unit_and_refuses_the_same_uid_outside_it() {
    let Some((cgroups, emulator, broker)) = demo_service_broker("").await else {
        return;
    };
    let audience = DEMO_AUDIENCE;
    let web = (WEB, WEB, &[WEB][..]);

    let (code, token, stderr) = token_from(&broker, &cgroups, Some("demo.service"), web, audience);
    assert_eq!(code, 0, "in demo.service: {stderr}");
    support::verify(&emulator, token.trim(), audience).await;

    // The same uid in another unit, and outside any unit of the test.
    for unit in [Some("other.service"), None] {
        let (code, _, stderr) = token_from(&broker, &cgroups, unit, web, audience);
        assert_eq!(code, 1, "{unit:?}: {stderr}");
        assert!(
            stderr.contains("PERMISSION_DENIED") && stderr.contains(&format!("uid {WEB}")),
            "{unit:?}: {stderr}"
        );
        // The denial names what the rules were matched against.
        assert!(stderr.contains(&format!("caller: gids={WEB}")), "{stderr}");
        assert!(!stderr.contains("demo.service"), "{stderr}");
        if let Some(unit) = unit {
            assert!(stderr.contains(&format!("unit={unit}")), "{stderr}");
        }
    }

    let log = broker.log();
    let allowed = audit_lines(&log, "decision=\"allowed\"");
    assert_eq!(allowed.len(), 1, "{log}");
    assert!(
        allowed[0].contains(&format!("selectors=\"gids={WEB} unit=demo.service\"")),
        "{}",
        allowed[0]
    );
    let denied = audit_lines(&log, "decision=\"denied\"");
    assert_eq!(denied.len(), 2, "{log}");
    assert!(
        denied
            .iter()
            .any(|l| l.contains(&format!("selectors=\"gids={WEB} unit=other.service\""))),
        "{denied:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn supplementary_groups_match_gids_rules() {
    let Some(cgroups) = TestCgroups::create(&["deploy.service"]) else {
        return;
    };
    let emulator = support::emulator().await;
    let audience = "https://deploy.example.com";
    let broker = broker_with(
        &emulator,
        format!(
            "[[policy]]\ngids = [{DEPLOYERS}]\nexe = [\"{}\"]\n\
             identities = [\"default\"]\naudiences = [\"{audience}\"]\n",
            env!("CARGO_BIN_EXE_token-broker")
        ),
    )
    .await;
    let unit = Some("deploy.service");

    // Primary group WEB, DEPLOYERS only as a supplementary group.
    let (code, token, stderr) = token_from(
        &broker,
        &cgroups,
        unit,
        (WEB, WEB, &[WEB, DEPLOYERS]),
        audience,
    );
    assert_eq!(code, 0, "with the supplementary group: {stderr}");
    support::verify(&emulator, token.trim(), audience).await;

    // The same uid and primary group without it.
    let (code, _, stderr) = token_from(&broker, &cgroups, unit, (WEB, WEB, &[WEB]), audience);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("PERMISSION_DENIED") && stderr.contains(&format!("caller: gids={WEB} ")),
        "{stderr}"
    );
    let log = broker.log();
    let allowed = audit_lines(&log, "decision=\"allowed\"");
    assert_eq!(allowed.len(), 1, "{log}");
    assert!(
        allowed[0].contains(&format!("gids={WEB},{DEPLOYERS} unit=deploy.service")),
        "{}",
        allowed[0]
    );
}

/// A socket for the test's end of a connection another process makes.
pub(crate) fn unix_socket() -> OwnedFd {
    // SAFETY: a plain syscall; on success we own the descriptor.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is new and ours.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub(crate) fn sockaddr_un(path: &Path) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    (
        addr,
        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
    )
}

/// A gRPC client on an already connected socket.
pub(crate) async fn client_on(fd: OwnedFd) -> TokenBrokerClient<tonic::transport::Channel> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).unwrap();
    let stream = std::sync::Mutex::new(Some(tokio::net::UnixStream::from_std(stream).unwrap()));
    let stream = std::sync::Arc::new(stream);
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let stream = stream.lock().unwrap().take();
            async move {
                stream
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the one connection is used"))
            }
        }))
        .await
        .expect("gRPC over the connected socket");
    TokenBrokerClient::new(channel)
}

/// Spawns `sleep` as WEB in `procs`' cgroup, hoping for pid `want` (the
/// next pid after `ns_last_pid`); the child, whatever pid it got.
fn spawn_sleeper_at(procs: &Path, want: i32) -> Option<std::process::Child> {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (want - 1).to_string()).ok()?;
    let mut command = Command::new("sleep");
    command.arg("60").stdin(Stdio::null());
    place(&mut command, Some(procs), WEB, WEB, &[WEB], || Ok(()));
    command.spawn().ok()
}

/// The first half of the pid-reuse race: a client, run as WEB in `procs`'
/// cgroup, connects our socket to the broker at `socket` (the kernel
/// records its pid and uid) and exits at once. Our end of the connection
/// and the client's pid, reaped and free again.
pub(crate) fn connect_from_a_client_that_exits(socket: &Path, procs: &Path) -> (OwnedFd, i32) {
    let ours = unix_socket();
    let raw = ours.as_raw_fd();
    let (addr, len) = sockaddr_un(socket);
    let mut client = Command::new("true");
    place(&mut client, Some(procs), WEB, WEB, &[WEB], move || {
        // SAFETY: addr outlives the call; raw is open in the child.
        let result = unsafe { libc::connect(raw, (&addr as *const libc::sockaddr_un).cast(), len) };
        if result < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    });
    let mut client = client.spawn().expect("client runs");
    let gone = client.id() as i32;
    assert!(client.wait().unwrap().success(), "the client connected");
    (ours, gone)
}

/// The second half: pid `gone` goes to a `sleep` as WEB in `procs`'
/// cgroup (`owner`, which the rule grants), where the kernel lets the
/// test choose the next pid; the sleeper, if it got the pid.
pub(crate) fn give_pid_to_a_sleeper_in(
    procs: &Path,
    gone: i32,
    owner: &str,
) -> Option<std::process::Child> {
    let mut sleeper = None;
    for _ in 0..50 {
        match spawn_sleeper_at(procs, gone) {
            Some(child) if child.id() as i32 == gone => {
                sleeper = Some(child);
                break;
            }
            Some(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            None => break,
        }
    }
    match &sleeper {
        Some(_) => eprintln!("pid {gone} was given to a process in {owner}"),
        None => eprintln!(
            "the kernel did not let this test reuse pid {gone} (ns_last_pid); \
             checking only that the exited client is not attested as {owner}"
        ),
    }
    sleeper
}

/// The race's end: the broker, stopped since the client connected, goes
/// on, and the exited client's connection `ours` asks for `audience`. It
/// must be refused as unattested (the client exited), whoever holds its
/// pid now; the refusal, for the test's own checks. Ends the sleeper.
pub(crate) async fn refusal_of_the_exited_client(
    broker: &Broker,
    ours: OwnedFd,
    sleeper: Option<std::process::Child>,
    audience: &str,
    owner: &str,
) -> tonic::Status {
    support::signal(&broker.child, Signal::SIGCONT);
    let mut client = client_on(ours).await;
    let status = match client
        .get_id_token(GetIdTokenRequest {
            identity: String::new(),
            audience: audience.into(),
            min_valid_for: None,
        })
        .await
    {
        // Not the response itself: it would print the token.
        Ok(_) => panic!("the exited client's connection was admitted as {owner}"),
        Err(status) => status,
    };
    if let Some(mut child) = sleeper {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("caller: unattested (the client exited"),
        "{status:?}"
    );
    status
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_before_attestation_gets_no_selectors_not_its_pids_next_owners() {
    let Some((cgroups, _emulator, broker)) = demo_service_broker("").await else {
        return;
    };
    let audience = DEMO_AUDIENCE;

    // Stopped, the broker accepts and attests nothing until told.
    support::signal(&broker.child, Signal::SIGSTOP);
    // The client: as WEB in other.service, it connects and exits.
    let (ours, gone) =
        connect_from_a_client_that_exits(&broker.socket, &cgroups.procs("other.service"));
    // Its pid, reaped, goes to a process as the same uid in the unit the
    // rule grants, where the kernel lets the test choose the next pid.
    let sleeper = give_pid_to_a_sleeper_in(&cgroups.procs("demo.service"), gone, "demo.service");
    let status =
        refusal_of_the_exited_client(&broker, ours, sleeper, audience, "demo.service").await;
    assert!(!status.message().contains("demo.service"), "{status:?}");
    let log = broker
        .wait_for_log("the denial's audit line", |log| {
            !audit_lines(log, "decision=\"denied\"").is_empty()
        })
        .await;
    let denied = audit_lines(&log, "decision=\"denied\"");
    assert_eq!(denied.len(), 1, "{log}");
    assert!(
        denied[0].contains("selectors=\"unattested (the client exited"),
        "{}",
        denied[0]
    );
}

/// `curl` for `url`, run in `unit` as WEB: (HTTP status, body).
fn curl_from(cgroups: &TestCgroups, unit: &str, url: &str) -> (u16, String) {
    curl_in(&cgroups.procs(unit), url)
}

/// `curl` for `url` with `Metadata-Flavor: Google`, run as WEB in the
/// cgroup whose `cgroup.procs` is `procs`: (HTTP status, body).
pub fn curl_in(procs: &Path, url: &str) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args([
            "-s",
            "-i",
            "--max-time",
            "20",
            "-H",
            "Metadata-Flavor: Google",
            url,
        ])
        .stdin(Stdio::null());
    place(&mut command, Some(procs), WEB, WEB, &[WEB], || Ok(()));
    let out = command.output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metadata_endpoint_finds_the_process_behind_a_tcp_connection() {
    let port = support::free_port();
    let Some((cgroups, emulator, broker)) = demo_service_broker(&format!(
        "\n[metadata_endpoint]\nlisten = \"127.0.0.1:{port}\"\n"
    ))
    .await
    else {
        return;
    };
    let audience = DEMO_AUDIENCE;
    let url = format!(
        "http://127.0.0.1:{port}/computeMetadata/v1/instance/service-accounts/default/identity?audience={audience}"
    );
    // The listener comes up beside the socket: wait for it (startup, not
    // a timing assertion).
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let (status, token) = curl_from(&cgroups, "demo.service", &url);
    assert_eq!(status, 200, "{token}");
    support::verify(&emulator, token.trim(), audience).await;

    let (status, body) = curl_from(&cgroups, "other.service", &url);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(&format!("uid {WEB} may not use identity"))
            && body.contains(&format!("caller: gids={WEB} unit=other.service")),
        "{body}"
    );
    let log = broker.log();
    assert!(
        log.lines().any(|l| l.contains("metadata endpoint")
            && l.contains("status=200")
            && l.contains(&format!("selectors=\"gids={WEB} unit=demo.service\""))),
        "{log}"
    );
}
