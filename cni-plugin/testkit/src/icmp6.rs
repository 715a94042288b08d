//! ICMPv6 and crafted IPv6 packets for the tests: echo with a chosen id, a remote that answers
//! echoes only when told, a log of every ICMPv6 message a netns receives, forged errors and
//! neighbour solicitations, and whole IPv6 packets (extension headers, fragments) sent raw.
//!
//! An ICMPv6 raw socket carries no IPv6 header in either direction, and the kernel computes the
//! ICMPv6 checksum itself (RFC 3542 §3.1), so messages here are built with a zero checksum.
#![allow(unsafe_code)] // raw sockets through libc; each call says why it is sound

use std::{
    net::{Ipv6Addr, SocketAddrV6, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::Netns;
use super::traffic::{Server, TIMEOUT, csum};

/// ICMPv6 types the tests use.
pub const ECHO_REQUEST: u8 = 128;
pub const ECHO_REPLY: u8 = 129;
pub const DEST_UNREACH: u8 = 1;
pub const PACKET_TOO_BIG: u8 = 2;
pub const TIME_EXCEEDED: u8 = 3;
pub const PARAM_PROBLEM: u8 = 4;
pub const NEIGHBOUR_SOLICIT: u8 = 135;
pub const NEIGHBOUR_ADVERT: u8 = 136;
/// IPv6 next-header values.
pub const NH_HOPOPTS: u8 = 0;
pub const NH_TCP: u8 = 6;
pub const NH_UDP: u8 = 17;
pub const NH_ROUTING: u8 = 43;
pub const NH_FRAGMENT: u8 = 44;
pub const NH_ICMPV6: u8 = 58;
pub const NH_DSTOPTS: u8 = 60;

fn sin6(ip: Ipv6Addr) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as u16,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: 0,
    }
}

/// A raw ICMPv6 socket with a receive timeout, or the error.
fn icmp6_socket(timeout_us: i64) -> Result<i32, String> {
    // SAFETY: a fresh socket; the options are plain values of the sizes given.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: timeout_us,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        Ok(fd)
    }
}

/// Receives one ICMPv6 message on `fd` into `buf`: its length and source, or None on timeout.
fn recv_from(fd: i32, buf: &mut [u8]) -> Option<(usize, Ipv6Addr)> {
    let mut from = sin6(Ipv6Addr::UNSPECIFIED);
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as u32;
    // SAFETY: buf and from are valid for the lengths given.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut from as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    (n > 0).then(|| (n as usize, Ipv6Addr::from(from.sin6_addr.s6_addr)))
}

/// Sends `msg` to `to` on `fd`; Err with the reason when nothing was sent.
fn send_to(fd: i32, to: Ipv6Addr, msg: &[u8]) -> Result<(), String> {
    let sa = sin6(to);
    // SAFETY: valid buffer and address of the lengths given.
    let n = unsafe {
        libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        )
    };
    if n > 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

fn close(fd: i32) {
    // SAFETY: the caller owns fd and never uses it again.
    unsafe { libc::close(fd) };
}

/// An echo request with `id` and `seq` (checksum left to the kernel).
pub fn echo6(ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(b"portslc!");
    m
}

/// The ICMPv6 side of [`crate::traffic::ping_with_id`]: Ok(true) when an echo reply with `id`
/// and `seq` came back from `dst` within `timeout`. Runs in the calling thread's netns.
pub fn raw_ping6(dst: Ipv6Addr, id: u16, seq: u16, timeout: Duration) -> Result<bool, String> {
    let fd = icmp6_socket(200_000)?;
    if let Err(e) = send_to(fd, dst, &echo6(ECHO_REQUEST, id, seq)) {
        close(fd);
        return Err(e);
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    let mut ok = false;
    while Instant::now() < deadline {
        let Some((n, src)) = recv_from(fd, &mut buf) else {
            continue;
        };
        let m = &buf[..n];
        if src == dst && n >= 8 && m[0] == ECHO_REPLY && m[4..6] == id.to_be_bytes() {
            ok = m[6..8] == seq.to_be_bytes();
            if ok {
                break;
            }
        }
    }
    close(fd);
    Ok(ok)
}

/// A remote that answers ICMPv6 echo requests only once `expect` of them have arrived (the
/// kernel's own replies must be off: `net.ipv6.icmp.echo_ignore_all=1`), so two pods' requests
/// are both in flight before any reply. Returns the (source, id) of each request it answered.
pub fn icmp6_responder(ns: &Netns, expect: usize) -> JoinHandle<Vec<(Ipv6Addr, u16)>> {
    let fd = ns
        .enter(|| icmp6_socket(100_000))
        .expect("raw ICMPv6 socket");
    std::thread::spawn(move || {
        let mut seen: Vec<(Ipv6Addr, Vec<u8>)> = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 1500];
        while seen.len() < expect && Instant::now() < deadline {
            if let Some((n, src)) = recv_from(fd, &mut buf)
                && n >= 8
                && buf[0] == ECHO_REQUEST
            {
                seen.push((src, buf[..n].to_vec()));
            }
        }
        let mut out = Vec::new();
        for (src, mut m) in seen {
            out.push((src, u16::from_be_bytes([m[4], m[5]])));
            m[0] = ECHO_REPLY;
            m[2] = 0;
            m[3] = 0;
            let _ = send_to(fd, src, &m);
        }
        close(fd);
        out
    })
}

/// One ICMPv6 message an [`icmp6_log`] saw: its source, type, code and what follows the first
/// 8 bytes (for errors: the quoted packet).
#[derive(Clone, Debug)]
pub struct Icmp6Seen {
    pub src: Ipv6Addr,
    pub ty: u8,
    pub code: u8,
    pub body: Vec<u8>,
}

impl Icmp6Seen {
    /// (next header, source, destination) of the quoted packet of an error; ports for TCP/UDP
    /// right after the IPv6 header (0 otherwise).
    pub fn quoted_flow(&self) -> Option<(u8, SocketAddrV6, SocketAddrV6)> {
        let q = &self.body;
        if q.len() < 40 {
            return None;
        }
        let addr = |o: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&q[o..o + 16]);
            Ipv6Addr::from(b)
        };
        let port = |o: usize| {
            q.get(40 + o..42 + o)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .unwrap_or(0)
        };
        let (sp, dp) = if q[6] == NH_TCP || q[6] == NH_UDP {
            (port(0), port(2))
        } else {
            (0, 0)
        };
        Some((
            q[6],
            SocketAddrV6::new(addr(8), sp, 0, 0),
            SocketAddrV6::new(addr(24), dp, 0, 0),
        ))
    }
}

/// Records every ICMPv6 message arriving in `ns` until the returned [`Server`] is dropped.
pub fn icmp6_log(ns: &Netns) -> (Server, Arc<Mutex<Vec<Icmp6Seen>>>) {
    let fd = ns
        .enter(|| icmp6_socket(50_000))
        .expect("raw ICMPv6 socket");
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s, out) = (stop.clone(), seen.clone());
    let handle = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::SeqCst) {
            if let Some((n, src)) = recv_from(fd, &mut buf)
                && n >= 8
                && let Ok(mut v) = out.lock()
            {
                v.push(Icmp6Seen {
                    src,
                    ty: buf[0],
                    code: buf[1],
                    body: buf[8..n].to_vec(),
                });
            }
        }
        close(fd);
    });
    (Server::new(stop, handle), seen)
}

/// Sends one ICMPv6 message to `to` from inside `ns` (the kernel writes the IPv6 header and the
/// checksum), with hop limit `hops` when given (neighbour discovery wants 255).
pub fn send_icmp6(ns: &Netns, to: Ipv6Addr, msg: Vec<u8>, hops: Option<i32>) -> Result<(), String> {
    ns.enter(move || {
        let fd = icmp6_socket(0)?;
        if let Some(h) = hops {
            // SAFETY: an int option on a socket we own.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_UNICAST_HOPS,
                    (&h as *const i32).cast(),
                    4,
                );
            }
        }
        let r = send_to(fd, to, &msg);
        close(fd);
        r
    })
}

/// An ICMPv6 error: `type`, `code`, the 4 bytes after the checksum (MTU, pointer), the quoted
/// packet.
pub fn icmp6_error(ty: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quoted);
    m
}

/// The start of a packet an ICMPv6 error quotes: the IPv6 header of a `next_header` packet from
/// `src` to `dst`, as if 1400 bytes long, then 8 bytes of its TCP/UDP header.
pub fn quoted6(next_header: u8, src: SocketAddrV6, dst: SocketAddrV6) -> Vec<u8> {
    let mut l4 = [0u8; 8];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..6].copy_from_slice(&1360u16.to_be_bytes());
    let mut p = ipv6(*src.ip(), *dst.ip(), next_header, 64, &l4);
    p[4..6].copy_from_slice(&1360u16.to_be_bytes());
    p
}

/// The quoted part of an error about an ICMPv6 echo request `src` -> `dst` with `id`.
pub fn quoted_echo6(src: Ipv6Addr, dst: Ipv6Addr, id: u16) -> Vec<u8> {
    ipv6(src, dst, NH_ICMPV6, 64, &echo6(ECHO_REQUEST, id, 1)[..8])
}

/// A neighbour solicitation for `target` with the sender's link-layer address option.
pub fn neighbour_solicitation(target: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut m = vec![NEIGHBOUR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[1, 1]);
    m.extend_from_slice(&mac);
    m
}

/// An IPv6 packet: header (hop limit `hops`, payload length filled in) and `payload`, whose
/// first header is `next_header`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, hops: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = next_header;
    p[7] = hops;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An extension header as [`chain`] takes it: its own type and its bytes (the next-header byte
/// is filled in when chained).
pub type ExtHeader = (u8, Vec<u8>);

/// A hop-by-hop (`NH_HOPOPTS`) or destination options (`NH_DSTOPTS`) header of 8 bytes: one PadN.
pub fn pad_options(ty: u8) -> ExtHeader {
    (ty, vec![0, 0, 1, 4, 0, 0, 0, 0])
}

/// A type-0 routing header with `segments_left` and one address.
pub fn routing_header(segments_left: u8, hop: Ipv6Addr) -> ExtHeader {
    let mut h = vec![0, 2, 0, segments_left, 0, 0, 0, 0];
    h.extend_from_slice(&hop.octets());
    (NH_ROUTING, h)
}

/// Chains extension headers before a `last` header: each header's next-header byte names the
/// one after it. Returns the first header's type (for the IPv6 header) and the chained bytes.
pub fn chain(ext: &[ExtHeader], last: u8) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, (_, h)) in ext.iter().enumerate() {
        let mut h = h.clone();
        h[0] = ext.get(i + 1).map_or(last, |(t, _)| *t);
        out.extend_from_slice(&h);
    }
    (ext.first().map_or(last, |(t, _)| *t), out)
}

/// A UDP header + `payload` from `src` to `dst`, with its checksum (IPv6 pseudo header).
pub fn udp6_bytes(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(len as usize);
    u.extend_from_slice(&src.port().to_be_bytes());
    u.extend_from_slice(&dst.port().to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(40 + u.len());
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, NH_UDP]);
    pseudo.extend_from_slice(&u);
    let c = match csum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// A UDP datagram `src` -> `dst` whose IPv6 header is followed by the extension headers `ext`.
pub fn udp6_with_ext(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    ext: &[ExtHeader],
    payload: &[u8],
) -> Vec<u8> {
    let (first, mut body) = chain(ext, NH_UDP);
    body.extend_from_slice(&udp6_bytes(src, dst, payload));
    ipv6(*src.ip(), *dst.ip(), first, 64, &body)
}

/// A UDP datagram `src` -> `dst` of `size` payload bytes in IPv6 fragments of at most `chunk`
/// bytes of fragmentable part (a multiple of 8), all with Fragment id `id`, in order.
pub fn udp6_fragments(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    id: u32,
    size: usize,
    chunk: usize,
) -> Vec<Vec<u8>> {
    let mut payload = b"frag ".to_vec();
    payload.resize(size.max(5), b'f');
    let l4 = udp6_bytes(src, dst, &payload);
    let mut out = Vec::new();
    let mut off = 0;
    while off < l4.len() {
        let end = (off + chunk).min(l4.len());
        let more = u16::from(end < l4.len());
        let mut body = fragment_header(NH_UDP, off as u16 | more, id);
        body.extend_from_slice(&l4[off..end]);
        out.push(ipv6(*src.ip(), *dst.ip(), NH_FRAGMENT, 64, &body));
        off = end;
    }
    out
}

/// A Fragment header: next header, offset-and-M word (offset in bytes, a multiple of 8, | M),
/// id.
pub fn fragment_header(next: u8, offset_and_more: u16, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&offset_and_more.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// Only the first fragment (M set) of a UDP datagram `src` -> `dst` with Fragment id `id`: a UDP
/// header claiming 4000 bytes and 64 bytes of them. What a fragment flood is made of.
pub fn udp6_first_fragment(src: SocketAddrV6, dst: SocketAddrV6, id: u32) -> Vec<u8> {
    let mut l4 = vec![0u8; 72];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..6].copy_from_slice(&4008u16.to_be_bytes());
    let mut body = fragment_header(NH_UDP, 1, id);
    body.extend_from_slice(&l4);
    ipv6(*src.ip(), *dst.ip(), NH_FRAGMENT, 64, &body)
}

/// Sends whole IPv6 packets (headers as given) from inside `ns` with a raw `IPPROTO_RAW` socket,
/// which includes the header on IPv6 too: extension headers, fragments, spoofed sources.
pub fn send_raw_ip6(ns: &Netns, packets: Vec<Vec<u8>>) -> Result<usize, String> {
    ns.enter(move || {
        // SAFETY: a raw socket we own, closed before returning.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mut sent = 0;
        for p in &packets {
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&p[24..40]);
            if send_to(fd, Ipv6Addr::from(dst), p).is_ok() {
                sent += 1;
            }
        }
        close(fd);
        Ok(sent)
    })
}

/// Sends the crafted UDP datagram `packet` (from `src`) out of `ns` and waits for the answer on
/// a UDP socket bound to `src`: the reply's text, or the error.
pub fn udp6_crafted_request(
    ns: &Netns,
    src: SocketAddrV6,
    packet: Vec<u8>,
) -> Result<String, String> {
    let sock = ns.enter(move || UdpSocket::bind(src).map_err(|e| e.to_string()))?;
    sock.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    send_raw_ip6(ns, vec![packet])?;
    let mut buf = [0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
