//! Real traffic for the tests: tiny echo servers and clients on std sockets opened inside a
//! netns (either family: addresses are `IpAddr`/`SocketAddr`), and raw ICMP echo with a chosen
//! id. The ICMPv6 and crafted-IPv6 counterparts of the raw helpers are in [`crate::icmp6`].
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::Netns;

pub const TIMEOUT: Duration = Duration::from_secs(3);

/// An echo server that answers "<tag> <peer addr> <request>" and stops on Drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    /// A server whose thread `handle` runs until `stop` is set.
    pub(crate) fn new(stop: Arc<AtomicBool>, handle: JoinHandle<()>) -> Self {
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// TCP echo server on `ip:port` inside `ns` (`::` also hears IPv4, as mapped addresses).
pub fn tcp_server(ns: &Netns, ip: impl Into<IpAddr>, port: u16, tag: &str) -> Server {
    let ip = ip.into();
    let l = ns.enter(move || TcpListener::bind((ip, port)).expect("bind tcp server"));
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let tag = tag.to_string();
    let handle = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut c, peer)) => {
                    c.set_nonblocking(false).ok();
                    c.set_read_timeout(Some(TIMEOUT)).ok();
                    let mut line = String::new();
                    let mut r = BufReader::new(c.try_clone().unwrap());
                    if r.read_line(&mut line).is_ok() {
                        let _ = writeln!(c, "{tag} {peer} {}", line.trim());
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Server {
        stop,
        handle: Some(handle),
    }
}

/// UDP echo server on `ip:port` inside `ns`; answers datagrams of any size with the header line
/// followed by the byte count received.
pub fn udp_server(ns: &Netns, ip: impl Into<IpAddr>, port: u16, tag: &str) -> Server {
    let ip = ip.into();
    let sock = ns.enter(move || UdpSocket::bind((ip, port)).expect("bind udp server"));
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let tag = tag.to_string();
    let handle = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !s.load(Ordering::SeqCst) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let head = String::from_utf8_lossy(&buf[..n.min(16)])
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let _ = sock.send_to(format!("{tag} {peer} {head} {n}").as_bytes(), peer);
            }
        }
    });
    Server {
        stop,
        handle: Some(handle),
    }
}

/// Connects from inside `ns` (optionally from `bind`), sends "hi", returns the echo line.
pub fn tcp_request(
    ns: &Netns,
    dst: impl Into<SocketAddr>,
    bind: Option<SocketAddr>,
) -> Result<String, String> {
    let dst = dst.into();
    ns.enter(move || {
        let mut c = match bind {
            None => TcpStream::connect_timeout(&dst, TIMEOUT).map_err(|e| e.to_string())?,
            Some(b) => connect_from(b, dst)?,
        };
        c.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        c.write_all(b"hi\n").map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(c)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.is_empty() {
            Err("connection closed without a reply".into())
        } else {
            Ok(line.trim().to_string())
        }
    })
}

/// A `sockaddr_in`/`sockaddr_in6` for `a`, as raw bytes with their length.
fn raw_sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    #[allow(unsafe_code)]
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin)
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin6)
            };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

/// A TCP connect from a chosen local address (std cannot bind before connect).
#[allow(unsafe_code)]
fn connect_from(bind: SocketAddr, dst: SocketAddr) -> Result<TcpStream, String> {
    use std::os::fd::FromRawFd;
    let domain = if bind.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket calls on a fresh fd that the TcpStream then owns.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            4,
        );
        // A blocking connect gives up after SO_SNDTIMEO.
        stream.set_write_timeout(Some(TIMEOUT)).ok();
        let (b, blen) = raw_sockaddr(bind);
        if libc::bind(fd, (&b as *const libc::sockaddr_storage).cast(), blen) < 0 {
            return Err(format!("bind {bind}: {}", std::io::Error::last_os_error()));
        }
        let (d, dlen) = raw_sockaddr(dst);
        if libc::connect(fd, (&d as *const libc::sockaddr_storage).cast(), dlen) < 0 {
            return Err(format!(
                "connect {dst}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(stream)
    }
}

/// Sends one datagram of `size` bytes from `bind` inside `ns` to `dst`; returns the reply.
pub fn udp_request(
    ns: &Netns,
    bind: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
    size: usize,
) -> Result<String, String> {
    let (bind, dst) = (bind.into(), dst.into());
    ns.enter(move || {
        let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut msg = b"hi ".to_vec();
        msg.resize(size.max(3), b'x');
        s.send_to(&msg, dst).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        let (n, _) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// A raw ICMP (or ICMPv6) echo with a chosen id from inside `ns`; Ok(true) when an echo reply
/// with that id and sequence came back from `dst`.
pub fn ping_with_id(ns: &Netns, dst: impl Into<IpAddr>, id: u16, seq: u16) -> Result<bool, String> {
    ping_with_id_waiting(ns, dst, id, seq, TIMEOUT)
}

/// [`ping_with_id`], waiting up to `timeout` for the reply (for a remote that holds it back).
pub fn ping_with_id_waiting(
    ns: &Netns,
    dst: impl Into<IpAddr>,
    id: u16,
    seq: u16,
    timeout: Duration,
) -> Result<bool, String> {
    match dst.into() {
        IpAddr::V4(dst) => ns.enter(move || raw_ping(dst, id, seq, timeout)),
        IpAddr::V6(dst) => ns.enter(move || crate::icmp6::raw_ping6(dst, id, seq, timeout)),
    }
}

pub(crate) fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        s += u32::from(w);
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[allow(unsafe_code)]
fn raw_ping(dst: Ipv4Addr, id: u16, seq: u16, timeout: Duration) -> Result<bool, String> {
    // SAFETY: plain libc socket calls on a socket we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let mut pkt = [0u8; 16];
        pkt[0] = 8;
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..16].copy_from_slice(b"portslc!");
        let c = csum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let sent = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if sent < 0 {
            let e = std::io::Error::last_os_error().to_string();
            libc::close(fd);
            return Err(e);
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        let mut ok = false;
        while std::time::Instant::now() < deadline {
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 28 {
                continue;
            }
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl..n as usize];
            let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            if src == dst
                && icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                ok = csum(icmp) == 0;
                break;
            }
        }
        libc::close(fd);
        Ok(ok)
    }
}

/// Streams bytes over `conn` until told to stop; returns bytes sent. Used by the restart test.
pub fn stream_for(mut conn: TcpStream, stop: Arc<AtomicBool>) -> std::io::Result<u64> {
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0u64;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    while !stop.load(Ordering::SeqCst) {
        conn.write_all(&chunk)?;
        sent += chunk.len() as u64;
        std::thread::sleep(Duration::from_millis(2));
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    Ok(sent)
}

/// Reads until EOF; returns bytes read.
pub fn drain(mut conn: TcpStream) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// A remote that answers ICMP echo requests only once `expect` of them have arrived (the
/// kernel's own replies must be off: `net.ipv4.icmp_echo_ignore_all=1`). This makes two pods'
/// requests both in flight before any reply, deterministically. Returns the (source, id) of
/// each request it answered.
#[allow(unsafe_code)]
pub fn icmp_responder(ns: &Netns, expect: usize) -> JoinHandle<Vec<(Ipv4Addr, u16)>> {
    let fd = ns.enter(|| {
        // SAFETY: a raw socket we own; closed by the responder thread.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            fd
        }
    });
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + TIMEOUT;
        while seen.len() < expect && std::time::Instant::now() < deadline {
            seen.extend(recv_echo_request(fd));
        }
        answer_echoes_and_close(fd, seen)
    })
}

/// One datagram from the raw ICMP socket `fd` (its receive timeout bounds the wait): the
/// sender and the ICMP message, if it is an echo request.
fn recv_echo_request(fd: i32) -> Option<(Ipv4Addr, Vec<u8>)> {
    let mut buf = [0u8; 1500];
    // SAFETY: buf is valid for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 28 {
        return None;
    }
    let ihl = usize::from(buf[0] & 0xf) * 4;
    let icmp = buf[ihl..n as usize].to_vec();
    (icmp[0] == 8).then(|| (Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]), icmp))
}

/// Answers each echo request in `requests` with its reply, closes `fd`, and returns who asked
/// with which id.
fn answer_echoes_and_close(fd: i32, requests: Vec<(Ipv4Addr, Vec<u8>)>) -> Vec<(Ipv4Addr, u16)> {
    let mut out = Vec::new();
    for (src, mut icmp) in requests {
        out.push((src, u16::from_be_bytes([icmp[4], icmp[5]])));
        icmp[0] = 0;
        icmp[2] = 0;
        icmp[3] = 0;
        let c = csum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(src.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and address.
        unsafe {
            libc::sendto(
                fd,
                icmp.as_ptr().cast(),
                icmp.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
        }
    }
    // SAFETY: we own fd.
    unsafe { libc::close(fd) };
    out
}

/// A UDP server that only counts datagrams (to prove something did *not* arrive).
pub fn udp_counter(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
) -> (Server, Arc<std::sync::atomic::AtomicUsize>) {
    let ip = ip.into();
    let sock = ns.enter(move || UdpSocket::bind((ip, port)).expect("bind udp counter"));
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, h) = (stop.clone(), hits.clone());
    let handle = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::SeqCst) {
            if sock.recv_from(&mut buf).is_ok() {
                h.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (
        Server {
            stop,
            handle: Some(handle),
        },
        hits,
    )
}

/// A TCP listener that only counts accepted connections.
pub fn tcp_counter(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
) -> (Server, Arc<std::sync::atomic::AtomicUsize>) {
    let ip = ip.into();
    let l = ns.enter(move || TcpListener::bind((ip, port)).expect("bind tcp counter"));
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, h) = (stop.clone(), hits.clone());
    let handle = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            match l.accept() {
                Ok(_) => {
                    h.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (
        Server {
            stop,
            handle: Some(handle),
        },
        hits,
    )
}

/// Sends one UDP datagram from `bind` (fire and forget); Err when the send itself fails.
pub fn udp_send(
    ns: &Netns,
    bind: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
) -> Result<(), String> {
    let (bind, dst) = (bind.into(), dst.into());
    ns.enter(move || {
        let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        s.send_to(b"hostile", dst)
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

/// A connected UDP socket sends to a closed port; Ok(true) when the ICMP port-unreachable came
/// back to it (recv fails with ECONNREFUSED).
pub fn udp_sees_port_unreachable(ns: &Netns, dst: impl Into<SocketAddr>) -> Result<bool, String> {
    let dst = dst.into();
    ns.enter(move || {
        let any = if dst.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let s = UdpSocket::bind(any).map_err(|e| e.to_string())?;
        s.connect(dst).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.send(b"anyone?").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match s.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(true),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
            Ok(_) => Err("unexpected reply".into()),
        }
    })
}

/// From inside `ns` (the remote, playing a router with a smaller MTU), sends ICMP "fragmentation
/// needed" (type 3 code 4, next-hop MTU `mtu`) to `to`, quoting a UDP datagram `quoted_src` ->
/// `quoted_dst` as the kernel would.
pub fn send_frag_needed(
    ns: &Netns,
    to: Ipv4Addr,
    quoted_src: SocketAddrV4,
    quoted_dst: SocketAddrV4,
    mtu: u16,
) {
    let mut rest = [0u8; 4];
    rest[2..4].copy_from_slice(&mtu.to_be_bytes());
    let icmp = icmp_error(3, 4, rest, &quoted(17, quoted_src, quoted_dst));
    send_icmp(ns, to, icmp).expect("sending fragmentation needed");
}

/// The IPv4 header plus first 8 bytes an ICMP error quotes: a packet of protocol `proto` (6, 17)
/// from `src` to `dst`, as if it had been 1400 bytes.
pub fn quoted(proto: u8, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut l4 = [0u8; 8];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..6].copy_from_slice(&1380u16.to_be_bytes());
    let mut p = ipv4(*src.ip(), *dst.ip(), proto, 0x1234, 0, &l4);
    p[2..4].copy_from_slice(&1400u16.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let c = csum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// The quoted part of an ICMP error about an ICMP echo request `src` -> `dst` with `id`.
pub fn quoted_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut icmp = [8u8, 0, 0, 0, 0, 0, 0, 1];
    icmp[4..6].copy_from_slice(&id.to_be_bytes());
    ipv4(src, dst, 1, 0x4321, 0, &icmp)
}

/// An ICMP error message: `type`, `code`, the 4 bytes after the checksum, the quoted packet.
pub fn icmp_error(ty: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quoted);
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    icmp
}

/// An IPv4 packet (20-byte header, TTL 64) with `frag` as the flags + fragment offset word
/// (host order: 0x2000 = MF, low 13 bits = offset in 8-byte units).
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    let len = (20 + payload.len()) as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&frag.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = csum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A UDP header + `payload` from `src` to `dst`, with its checksum.
pub fn udp_bytes(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(len as usize);
    u.extend_from_slice(&src.port().to_be_bytes());
    u.extend_from_slice(&dst.port().to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + u.len());
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(&u);
    let c = match csum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// A UDP datagram `src` -> `dst` of `size` payload bytes, cut into IPv4 fragments of at most
/// `chunk` payload bytes (a multiple of 8), all with IP id `id`, in order.
pub fn udp_fragments(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    id: u16,
    size: usize,
    chunk: usize,
) -> Vec<Vec<u8>> {
    let mut payload = b"frag ".to_vec();
    payload.resize(size.max(5), b'f');
    let l4 = udp_bytes(src, dst, &payload);
    let mut out = Vec::new();
    let mut off = 0;
    while off < l4.len() {
        let end = (off + chunk).min(l4.len());
        let mf = if end < l4.len() { 0x2000 } else { 0 };
        out.push(ipv4(
            *src.ip(),
            *dst.ip(),
            17,
            id,
            mf | (off / 8) as u16,
            &l4[off..end],
        ));
        off = end;
    }
    out
}

/// Only the first fragment (MF set) of a UDP datagram `src` -> `dst` with IP id `id`: a UDP
/// header claiming 4000 bytes and 64 bytes of them. What a fragment flood is made of.
pub fn udp_first_fragment(src: SocketAddrV4, dst: SocketAddrV4, id: u16) -> Vec<u8> {
    let mut l4 = vec![0u8; 72];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..6].copy_from_slice(&4008u16.to_be_bytes());
    ipv4(*src.ip(), *dst.ip(), 17, id, 0x2000, &l4)
}

/// An ICMP echo request `src` -> `dst` with `id` as a whole IPv4 packet (for [`send_raw_ip`]).
pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8u8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"flood!!!");
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 1, seq, 0, &icmp)
}

/// Sends whole IPv4 packets (headers as given; the kernel fills in the checksum) from inside
/// `ns` with a raw `IPPROTO_RAW` socket: fragments, spoofed sources, forged messages.
#[allow(unsafe_code)]
pub fn send_raw_ip(ns: &Netns, packets: Vec<Vec<u8>>) -> Result<usize, String> {
    ns.enter(move || {
        // SAFETY: a raw socket we own, valid buffers and addresses; closed before returning.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            if fd < 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            let mut sent = 0;
            for p in &packets {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes([p[16], p[17], p[18], p[19]]),
                    },
                    sin_zero: [0; 8],
                };
                let n = libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                if n > 0 {
                    sent += 1;
                }
            }
            libc::close(fd);
            Ok(sent)
        }
    })
}

/// Sends one ICMP message (type, code, checksum and body as given) to `to` from inside `ns`;
/// the kernel writes the IP header with the address its route picks as source.
#[allow(unsafe_code)]
pub fn send_icmp(ns: &Netns, to: Ipv4Addr, icmp: Vec<u8>) -> Result<(), String> {
    ns.enter(move || {
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a raw socket we own, valid buffer and address.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            if fd < 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            let n = libc::sendto(
                fd,
                icmp.as_ptr().cast(),
                icmp.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            if n > 0 { Ok(()) } else { Err(e.to_string()) }
        }
    })
}

/// One ICMP message a [`icmp_log`] saw: its source, type, code and the packet it quotes (for
/// errors: the quoted IPv4 header and first bytes).
#[derive(Clone, Debug)]
pub struct IcmpSeen {
    pub src: Ipv4Addr,
    pub ty: u8,
    pub code: u8,
    pub quoted: Vec<u8>,
}

impl IcmpSeen {
    /// (protocol, source, destination) of the quoted packet, ports for TCP/UDP (0 otherwise).
    pub fn quoted_flow(&self) -> Option<(u8, SocketAddrV4, SocketAddrV4)> {
        let q = &self.quoted;
        if q.len() < 24 {
            return None;
        }
        let ihl = usize::from(q[0] & 0xf) * 4;
        let ip = |o: usize| Ipv4Addr::new(q[o], q[o + 1], q[o + 2], q[o + 3]);
        let port = |o: usize| {
            q.get(ihl + o..ihl + o + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .unwrap_or(0)
        };
        let (sp, dp) = if q[9] == 6 || q[9] == 17 {
            (port(0), port(2))
        } else {
            (0, 0)
        };
        Some((
            q[9],
            SocketAddrV4::new(ip(12), sp),
            SocketAddrV4::new(ip(16), dp),
        ))
    }
}

/// Records every ICMP message arriving in `ns` (a raw ICMP socket gets a copy of each) until the
/// returned [`Server`] is dropped.
#[allow(unsafe_code)]
pub fn icmp_log(ns: &Netns) -> (Server, Arc<std::sync::Mutex<Vec<IcmpSeen>>>) {
    let fd = ns.enter(|| {
        // SAFETY: a raw socket we own; closed by the recording thread.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            fd
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (s, out) = (stop.clone(), seen.clone());
    let handle = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::SeqCst) {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 28 {
                continue;
            }
            let n = n as usize;
            let ihl = usize::from(buf[0] & 0xf) * 4;
            if n < ihl + 8 {
                continue;
            }
            let icmp = &buf[ihl..n];
            if let Ok(mut v) = out.lock() {
                v.push(IcmpSeen {
                    src: Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]),
                    ty: icmp[0],
                    code: icmp[1],
                    quoted: icmp[8..].to_vec(),
                });
            }
        }
        // SAFETY: we own fd.
        unsafe { libc::close(fd) };
    });
    (
        Server {
            stop,
            handle: Some(handle),
        },
        seen,
    )
}

/// A remote that holds every ICMP echo request it gets until [`EchoHolder::release`], then
/// answers them all (the kernel's own replies must be off: `net.ipv4.icmp_echo_ignore_all=1`).
/// Lets a test keep a pod's echo state waiting while it floods.
pub struct EchoHolder {
    release: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<(Ipv4Addr, u16)>>>,
}

impl EchoHolder {
    /// Answers what it holds; returns the (source, id) of each request answered.
    pub fn release(mut self) -> Vec<(Ipv4Addr, u16)> {
        self.release.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for EchoHolder {
    fn drop(&mut self) {
        self.release.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[allow(unsafe_code)]
pub fn echo_holder(ns: &Netns) -> EchoHolder {
    let fd = ns.enter(|| {
        // SAFETY: a raw socket we own; closed by the holder thread.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 20_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            fd
        }
    });
    let release = Arc::new(AtomicBool::new(false));
    let r = release.clone();
    let handle = std::thread::spawn(move || {
        let mut held = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !r.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            held.extend(recv_echo_request(fd));
        }
        answer_echoes_and_close(fd, held)
    });
    EchoHolder {
        release,
        handle: Some(handle),
    }
}

/// A UDP server that records the size of every datagram it receives.
pub fn udp_sizes(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
) -> (Server, Arc<std::sync::Mutex<Vec<usize>>>) {
    let ip = ip.into();
    let sock = ns.enter(move || UdpSocket::bind((ip, port)).expect("bind udp sizes"));
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (s, out) = (stop.clone(), sizes.clone());
    let handle = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !s.load(Ordering::SeqCst) {
            if let Ok((n, _)) = sock.recv_from(&mut buf)
                && let Ok(mut v) = out.lock()
            {
                v.push(n);
            }
        }
    });
    (
        Server {
            stop,
            handle: Some(handle),
        },
        sizes,
    )
}

/// Sequence numbers seen per source address, by [`udp_seq_counter`].
pub type SeqSeen =
    Arc<std::sync::Mutex<std::collections::BTreeMap<Ipv4Addr, std::collections::BTreeSet<u64>>>>;

/// Counts the distinct sequence numbers (first 8 bytes of each datagram) arriving on `ip:port`
/// in `ns`, per source address. Pairs with [`udp_seq_stream`].
pub fn udp_seq_counter(ns: &Netns, ip: Ipv4Addr, port: u16) -> (Server, SeqSeen) {
    let sock = ns.enter(move || {
        let s = UdpSocket::bind((ip, port)).expect("bind udp seq counter");
        set_rcvbuf(&s, 8 << 20);
        s
    });
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let (s, out) = (stop.clone(), seen.clone());
    let handle = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::SeqCst) {
            if let Ok((n, SocketAddr::V4(peer))) = sock.recv_from(&mut buf)
                && n >= 8
                && let Ok(mut m) = out.lock()
            {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[..8]);
                m.entry(*peer.ip())
                    .or_insert_with(std::collections::BTreeSet::new)
                    .insert(u64::from_be_bytes(b));
            }
        }
    });
    (
        Server {
            stop,
            handle: Some(handle),
        },
        seen,
    )
}

#[allow(unsafe_code)]
fn set_rcvbuf(s: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket fd and an int option.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
}

/// Sends sequence-numbered datagrams from `bind` in `ns` to `dst`, one every `gap`, until `stop`;
/// returns how many were sent. Send errors (e.g. an ICMP error reported back) are not fatal.
pub fn udp_seq_stream(
    ns: &Netns,
    bind: SocketAddrV4,
    dst: SocketAddrV4,
    gap: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    let sock = ns.enter(move || UdpSocket::bind(bind).expect("bind udp seq stream"));
    std::thread::spawn(move || {
        let mut seq = 0u64;
        let mut msg = [0u8; 64];
        while !stop.load(Ordering::SeqCst) {
            msg[..8].copy_from_slice(&seq.to_be_bytes());
            if sock.send_to(&msg, dst).is_ok() {
                seq += 1;
            }
            std::thread::sleep(gap);
        }
        seq
    })
}
