//! The sockets of the calling thread's netns, from the kernel's sock_diag netlink interface
//! (`NETLINK_SOCK_DIAG`, `inet_diag_req_v2`, see sock_diag(7)).
//!
//! Why not `/proc/net/tcp`: reading it walks the whole established-socket hash table, whose
//! size follows the machine's memory and not its socket count; on a 24 GB node `tcp` and `tcp6`
//! cost about 4 ms each however idle the node, on every CNI ADD. A dump asking for listening TCP
//! sockets only walks the listening hash. The encoding is the kernel's fixed C layout, built and
//! read here byte by byte so nothing else needs to know it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte socket id.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` up to the end of the local address: family, state, timer, retrans,
/// then the id's sport, dport, src[16].
const MSG_MIN_LEN: usize = 24;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`), as a mask.
pub const LISTEN: u32 = 1 << 10;
/// Every state: UDP sockets are "close" (7) when only bound and "established" (1) when
/// connected.
pub const ANY_STATE: u32 = u32::MAX;

/// Local address and port of every socket of `protocol` (`libc::IPPROTO_TCP` or `IPPROTO_UDP`)
/// and address family `v6` in one of `states`.
pub fn local_addrs(v6: bool, protocol: u8, states: u32) -> io::Result<Vec<(IpAddr, u16)>> {
    let fd = socket(
        nix::sys::socket::AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
    send(
        fd.as_raw_fd(),
        &request(family, protocol, states),
        MsgFlags::empty(),
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Ok(out);
        }
        if parse_reply(&buf[..n], &mut out)? {
            return Ok(out);
        }
    }
}

/// The dump request: a netlink header and an `inet_diag_req_v2` with a zero socket id (all).
fn request(family: u8, protocol: u8, states: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns ours
    m.extend_from_slice(&[family, protocol, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.resize(len, 0);
    m
}

/// Appends the sockets of one datagram of the reply to `out`; `true` once the dump is done.
fn parse_reply(mut buf: &[u8], out: &mut Vec<(IpAddr, u16)>) -> io::Result<bool> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    while buf.len() >= NLMSG_HDR_LEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().map_err(|_| bad("header"))?) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().map_err(|_| bad("header"))?);
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return Err(bad("message length"));
        }
        let body = &buf[NLMSG_HDR_LEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .and_then(|b| b.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .ok_or_else(|| bad("error message"))?;
                return match errno {
                    0 => Ok(true),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(local) = local_of(body) {
                    out.push(local);
                }
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    Ok(false)
}

/// The local address and port of one `inet_diag_msg` (the port is big-endian, the address in
/// network order).
fn local_of(msg: &[u8]) -> Option<(IpAddr, u16)> {
    if msg.len() < MSG_MIN_LEN {
        return None;
    }
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    let src = &msg[8..24];
    let addr = match msg[0] as i32 {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(src).ok()?)),
        _ => return None,
    };
    Some((addr, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_the_kernels_layout() {
        let r = request(libc::AF_INET as u8, libc::IPPROTO_TCP as u8, LISTEN);
        assert_eq!(r.len(), 72);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes(r[6..8].try_into().unwrap()), 0x301);
        assert_eq!(&r[16..20], &[2, 6, 0, 0]);
        assert_eq!(u32::from_ne_bytes(r[20..24].try_into().unwrap()), 1 << 10);
        assert!(
            r[24..].iter().all(|b| *b == 0),
            "the socket id is zero: all sockets"
        );
    }

    fn message(family: u8, port: u16, addr: &[u8]) -> Vec<u8> {
        let mut body = vec![family, 10, 0, 0];
        body.extend_from_slice(&port.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        let mut a = addr.to_vec();
        a.resize(16, 0);
        body.extend_from_slice(&a);
        body.resize(72, 0);
        let mut m = ((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn a_reply_gives_each_sockets_local_address_until_done() {
        let mut buf = message(libc::AF_INET as u8, 22, &[198, 18, 0, 1]);
        let v6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
        buf.extend(message(libc::AF_INET6 as u8, 10250, &v6.octets()));
        let mut out = Vec::new();
        assert!(!parse_reply(&buf, &mut out).unwrap(), "no DONE yet");
        assert_eq!(
            out,
            vec![
                (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 22),
                (IpAddr::V6(v6), 10250)
            ]
        );
        let mut done = (NLMSG_HDR_LEN as u32 + 4).to_ne_bytes().to_vec();
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        assert!(parse_reply(&done, &mut out).unwrap());
        let mut err = (NLMSG_HDR_LEN as u32 + 4).to_ne_bytes().to_vec();
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        let e = parse_reply(&err, &mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(
            parse_reply(&[16, 0, 0, 0, 99], &mut out).is_ok(),
            "a short tail is ignored"
        );
    }
}
