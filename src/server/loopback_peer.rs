//! Which local user owns the other end of a TCP connection, asked of the
//! kernel when the connection is accepted.
//!
//! A TCP socket carries no SO_PEERCRED, but on this host the client's own
//! socket is one the kernel can name: NETLINK_SOCK_DIAG (inet_diag) looks
//! it up by its exact 4-tuple (its local side is our peer address, its
//! remote side our local address) and reports the uid that created it. When
//! netlink is unavailable (a seccomp filter, an old kernel), the same row is
//! read from `/proc/net/tcp{,6}`. A peer on another host, or in another
//! network namespace, has no such socket here: it is unresolved, and the
//! callers refuse it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};

/// Why a connection's owner is unknown: said to the operator and, in the
/// refusal, to the client.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("cannot tell which local user owns the connection from {peer}: {why}")]
pub struct Unresolved {
    pub peer: SocketAddr,
    pub why: String,
}

/// The client socket of a connection: the uid that created it, and its
/// inode, by which the process holding it is found ([`crate::attest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    /// 0 when the kernel did not say.
    pub inode: u64,
}

/// The uid owning the client socket of the connection `peer` -> `local`
/// (as `accept` reported them).
pub fn owner_uid(peer: SocketAddr, local: SocketAddr) -> Result<u32, Unresolved> {
    owner(peer, local).map(|owner| owner.uid)
}

/// The client socket of the connection `peer` -> `local`.
pub fn owner(peer: SocketAddr, local: SocketAddr) -> Result<SocketOwner, Unresolved> {
    let peer = canonical(peer);
    let local = canonical(local);
    let unresolved = |why: String| Unresolved { peer, why };
    match sock_diag(peer, local) {
        Ok(Some(owner)) => Ok(owner),
        Ok(None) => Err(unresolved(
            "no socket on this host has that address (a remote or namespaced peer)".into(),
        )),
        Err(netlink) => match proc_net_tcp(peer, local) {
            Ok(Some(owner)) => Ok(owner),
            Ok(None) => Err(unresolved(format!(
                "no socket on this host has that address (netlink: {netlink})"
            ))),
            Err(proc) => Err(unresolved(format!(
                "inet_diag failed ({netlink}) and /proc/net/tcp is unreadable ({proc})"
            ))),
        },
    }
}

/// An IPv4 peer on a dual-stack listener is reported as `::ffff:a.b.c.d`;
/// its socket is an IPv4 one.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// `Ok(None)`: the kernel answered that no such socket exists.
fn sock_diag(peer: SocketAddr, local: SocketAddr) -> std::io::Result<Option<SocketOwner>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let family = if peer.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut socket_id = if peer.is_ipv4() {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    socket_id.source_address = peer.ip();
    socket_id.source_port = peer.port();
    socket_id.destination_address = local.ip();
    socket_id.destination_port = local.port();
    // All 0xff: "any cookie", so the 4-tuple alone selects the socket.
    socket_id.cookie = [0xff; 8];
    let mut header = NetlinkHeader::default();
    // No NLM_F_DUMP: an exact lookup of one socket.
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buffer = vec![0u8; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    // The kernel answers inside send(); nothing more will come.
    socket.set_non_blocking(true)?;
    let mut answer = Vec::with_capacity(8192);
    let received = socket.recv(&mut answer, 0)?;
    let bytes = &answer[..received];
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Ok(Some(SocketOwner {
                uid: response.header.uid,
                inode: response.header.inode.into(),
            }))
        }
        NetlinkPayload::Error(error) => match error.code {
            Some(code) if code.get() == -libc_enoent() => Ok(None),
            Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
            None => Err(std::io::Error::other("inet_diag answered with an ACK only")),
        },
        other => Err(std::io::Error::other(format!(
            "unexpected inet_diag answer of type {}",
            other.message_type()
        ))),
    }
}

fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

/// The same lookup in `/proc/net/tcp{,6}`: the row whose local address is
/// the peer's and remote address ours.
fn proc_net_tcp(peer: SocketAddr, local: SocketAddr) -> std::io::Result<Option<SocketOwner>> {
    let table = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table)?;
    Ok(find_owner(&text, peer, local))
}

fn find_owner(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<SocketOwner> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (own, remote, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        if parse_proc_addr(own)? != peer || parse_proc_addr(remote)? != local {
            return None;
        }
        Some(SocketOwner {
            uid: uid.parse().ok()?,
            inode: fields.get(9).and_then(|i| i.parse().ok()).unwrap_or(0),
        })
    })
}

/// `0100007F:1F90`: the address as the kernel's 32-bit words in host
/// order, then the port.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = address.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(canonical(SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real connection made by this process: both lookups name our uid.
    #[test]
    fn finds_this_process_as_the_owner_of_its_own_connection() {
        let me = nix::unistd::geteuid().as_raw();
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(bind) else {
                eprintln!("skipping {bind}: cannot bind here");
                continue;
            };
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, peer) = listener.accept().unwrap();
            let local = accepted.local_addr().unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            // Both name the client's socket by its inode, as /proc/self/fd does.
            let inode = std::fs::metadata(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&client)
            ))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
            let expected = Some(SocketOwner { uid: me, inode });
            assert_eq!(sock_diag(peer, local).unwrap(), expected, "{bind}");
            assert_eq!(proc_net_tcp(peer, local).unwrap(), expected, "{bind}");
            assert_eq!(owner_uid(peer, local), Ok(me));
            // The server's own socket (the reverse tuple) is not the answer's
            // source: a tuple nobody holds is unresolved.
            let nobody = SocketAddr::new(peer.ip(), 1);
            assert_eq!(sock_diag(nobody, local).unwrap(), None);
            assert_eq!(proc_net_tcp(nobody, local).unwrap(), None);
            assert!(owner_uid(nobody, local)
                .unwrap_err()
                .to_string()
                .contains("no socket on this host"));
        }
    }

    #[test]
    fn parses_proc_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000100007F:0050"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_proc_addr("zz:1"), None);
    }
}
