//! Real traffic for the tests: tiny echo servers and clients on std sockets opened inside a
//! netns, and raw ICMP echo with a chosen id.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
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

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// TCP echo server on `ip:port` inside `ns`.
pub fn tcp_server(ns: &Netns, ip: Ipv4Addr, port: u16, tag: &str) -> Server {
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
pub fn udp_server(ns: &Netns, ip: Ipv4Addr, port: u16, tag: &str) -> Server {
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
    dst: SocketAddrV4,
    bind: Option<SocketAddrV4>,
) -> Result<String, String> {
    ns.enter(move || {
        let mut c = match bind {
            None => TcpStream::connect_timeout(&SocketAddr::V4(dst), TIMEOUT)
                .map_err(|e| e.to_string())?,
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

/// A TCP connect from a chosen local address (std cannot bind before connect).
#[allow(unsafe_code)]
fn connect_from(bind: SocketAddrV4, dst: SocketAddrV4) -> Result<TcpStream, String> {
    use std::os::fd::FromRawFd;
    let sin = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a fresh fd that the TcpStream then owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
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
        let b = sin(bind);
        if libc::bind(fd, (&b as *const libc::sockaddr_in).cast(), len) < 0 {
            return Err(format!("bind {bind}: {}", std::io::Error::last_os_error()));
        }
        let d = sin(dst);
        if libc::connect(fd, (&d as *const libc::sockaddr_in).cast(), len) < 0 {
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
    bind: SocketAddrV4,
    dst: SocketAddrV4,
    size: usize,
) -> Result<String, String> {
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

/// Reads `/proc/net`-independent: a raw ICMP echo with a chosen id from inside `ns`; Ok(true)
/// when an echo reply with that id and sequence came back from `dst`.
pub fn ping_with_id(ns: &Netns, dst: Ipv4Addr, id: u16, seq: u16) -> Result<bool, String> {
    ns.enter(move || raw_ping(dst, id, seq))
}

fn csum(b: &[u8]) -> u16 {
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
fn raw_ping(dst: Ipv4Addr, id: u16, seq: u16) -> Result<bool, String> {
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
        let deadline = std::time::Instant::now() + TIMEOUT;
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
        let mut seen: Vec<(Ipv4Addr, Vec<u8>)> = Vec::new();
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut buf = [0u8; 1500];
        while seen.len() < expect && std::time::Instant::now() < deadline {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 28 {
                continue;
            }
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = buf[ihl..n as usize].to_vec();
            if icmp[0] == 8 {
                seen.push((Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]), icmp));
            }
        }
        let mut out = Vec::new();
        for (src, mut icmp) in seen {
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
    })
}

/// A UDP server that only counts datagrams (to prove something did *not* arrive).
pub fn udp_counter(
    ns: &Netns,
    ip: Ipv4Addr,
    port: u16,
) -> (Server, Arc<std::sync::atomic::AtomicUsize>) {
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
    ip: Ipv4Addr,
    port: u16,
) -> (Server, Arc<std::sync::atomic::AtomicUsize>) {
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
pub fn udp_send(ns: &Netns, bind: SocketAddrV4, dst: SocketAddrV4) -> Result<(), String> {
    ns.enter(move || {
        let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        s.send_to(b"hostile", dst)
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

/// A connected UDP socket sends to a closed port; Ok(true) when the ICMP port-unreachable came
/// back to it (recv fails with ECONNREFUSED).
pub fn udp_sees_port_unreachable(ns: &Netns, dst: SocketAddrV4) -> Result<bool, String> {
    ns.enter(move || {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
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
#[allow(unsafe_code)]
pub fn send_frag_needed(
    ns: &Netns,
    to: Ipv4Addr,
    quoted_src: SocketAddrV4,
    quoted_dst: SocketAddrV4,
    mtu: u16,
) {
    ns.enter(move || {
        let mut inner = [0u8; 28];
        inner[0] = 0x45;
        inner[2..4].copy_from_slice(&1400u16.to_be_bytes());
        inner[8] = 64;
        inner[9] = 17;
        inner[12..16].copy_from_slice(&quoted_src.ip().octets());
        inner[16..20].copy_from_slice(&quoted_dst.ip().octets());
        let c = csum(&inner[..20]);
        inner[10..12].copy_from_slice(&c.to_be_bytes());
        inner[20..22].copy_from_slice(&quoted_src.port().to_be_bytes());
        inner[22..24].copy_from_slice(&quoted_dst.port().to_be_bytes());
        inner[24..26].copy_from_slice(&1380u16.to_be_bytes());
        let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&mtu.to_be_bytes());
        icmp.extend_from_slice(&inner);
        let c = csum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
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
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let n = libc::sendto(
                fd,
                icmp.as_ptr().cast(),
                icmp.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            assert!(n > 0, "sendto: {}", std::io::Error::last_os_error());
            libc::close(fd);
        }
    });
}
