//! `portslice-e2e-agent`: the e2e workload and probe (std, plus nix for bind-before-connect).
//!
//! - `serve [--tcp PORT]... [--udp PORT]... [--slice-ports N]`: answers every TCP connection and
//!   UDP datagram with one line `<name> <peer-addr>` (name = $POD_NAME or the hostname), and
//!   prints `seen tcp|udp <peer-addr>` for each on stdout. With
//!   `--slice-ports N` it also serves TCP and UDP on the first N ports of the netns'
//!   `ip_local_port_range`, which the PortSlice CNI plugin sets to the pod's slice.
//! - `dial tcp|udp ADDR [--bind IP:PORT] [--timeout-ms MS]`: sends one line, prints the answer.
//!   Exit code 0 when an answer came, 1 otherwise (the e2e suite relies on both outcomes).
//! - `port-range`: prints the netns' `ip_local_port_range` as `START END`.
//! - `dns NAME A|AAAA|SRV [--server IP:PORT]`: asks the server (default: the first `nameserver` of
//!   /etc/resolv.conf) over UDP and prints one answer per line (`A 198.18.0.11`,
//!   `SRV 0 100 40000 <target>`). Exit code 1 when the query fails.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("dial") => dial(&args[1..]),
        Some("port-range") => port_range().map(|(a, b)| println!("{a} {b}")),
        Some("dns") => dns(&args[1..]),
        _ => Err("usage: portslice-e2e-agent serve|dial|port-range|dns ...".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portslice-e2e-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn port_range() -> Result<(u16, u16), String> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .map_err(|e| format!("reading ip_local_port_range: {e}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => Err(format!("unexpected ip_local_port_range {text:?}")),
    }
}

/// Takes the value after `flag` at `i`, advancing `i`.
fn value<'a>(args: &'a [String], i: &mut usize, flag: &str) -> Result<&'a str, String> {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .ok_or_else(|| format!("{flag} needs a value"))
}

fn port(text: &str) -> Result<u16, String> {
    text.parse().map_err(|_| format!("not a port: {text:?}"))
}

fn serve(args: &[String]) -> Result<(), String> {
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--tcp" => tcp.push(port(value(args, &mut i, "--tcp")?)?),
            "--udp" => udp.push(port(value(args, &mut i, "--udp")?)?),
            "--slice-ports" => {
                let n: u16 = value(args, &mut i, "--slice-ports")?
                    .parse()
                    .map_err(|_| "bad --slice-ports")?;
                let (start, end) = port_range()?;
                for p in (start..=end).take(n as usize) {
                    tcp.push(p);
                    udp.push(p);
                }
            }
            other => return Err(format!("unknown serve argument {other:?}")),
        }
        i += 1;
    }
    if tcp.is_empty() && udp.is_empty() {
        return Err("nothing to serve: give --tcp, --udp or --slice-ports".into());
    }
    let me = name();
    let mut threads = Vec::new();
    for p in tcp {
        // [::] serves both families (IPV6_V6ONLY is off by default); a pod without IPv6 has
        // only 0.0.0.0.
        let l = TcpListener::bind(("::", p))
            .or_else(|_| TcpListener::bind(("0.0.0.0", p)))
            .map_err(|e| format!("binding tcp/{p}: {e}"))?;
        let me = me.clone();
        threads.push(std::thread::spawn(move || serve_tcp(l, &me)));
    }
    for p in udp {
        let s = UdpSocket::bind(("::", p))
            .or_else(|_| UdpSocket::bind(("0.0.0.0", p)))
            .map_err(|e| format!("binding udp/{p}: {e}"))?;
        let me = me.clone();
        threads.push(std::thread::spawn(move || serve_udp(s, &me)));
    }
    eprintln!("portslice-e2e-agent: serving as {me}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve_tcp(listener: TcpListener, me: &str) {
    for conn in listener.incoming().flatten() {
        let peer = conn
            .peer_addr()
            .map(|a| canonical(a).to_string())
            .unwrap_or_default();
        // One line per caller on stdout: the e2e suite checks who did (and did not) get here.
        println!("seen tcp {peer}");
        let mut conn = conn;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        // Read the caller's line first so the answer is never lost to an early RST.
        let mut line = String::new();
        let _ = BufReader::new(&conn).read_line(&mut line);
        let _ = writeln!(conn, "{me} {peer}");
    }
}

fn serve_udp(socket: UdpSocket, me: &str) {
    let mut buf = [0u8; 2048];
    while let Ok((_, peer)) = socket.recv_from(&mut buf) {
        let shown = canonical(peer);
        println!("seen udp {shown}");
        let _ = socket.send_to(format!("{me} {shown}\n").as_bytes(), peer);
    }
}

fn dial(args: &[String]) -> Result<(), String> {
    let (mut proto, mut addr, mut bind, mut timeout) = (None, None, None, Duration::from_secs(3));
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--bind" => {
                bind = Some(
                    value(args, &mut i, "--bind")?
                        .parse::<SocketAddr>()
                        .map_err(|e| e.to_string())?,
                )
            }
            "--timeout-ms" => {
                let ms: u64 = value(args, &mut i, "--timeout-ms")?
                    .parse()
                    .map_err(|_| "bad --timeout-ms")?;
                timeout = Duration::from_millis(ms);
            }
            "tcp" | "udp" if proto.is_none() => proto = Some(args[i].clone()),
            a if addr.is_none() => {
                addr = Some(
                    a.parse::<SocketAddr>()
                        .map_err(|e| format!("address {a:?}: {e}"))?,
                )
            }
            other => return Err(format!("unknown dial argument {other:?}")),
        }
        i += 1;
    }
    let addr = addr.ok_or("dial needs an address")?;
    let answer = match proto.as_deref() {
        Some("tcp") => dial_tcp(addr, bind, timeout),
        Some("udp") => dial_udp(addr, bind, timeout),
        _ => Err("dial needs tcp or udp".into()),
    }?;
    println!("{}", answer.trim_end());
    Ok(())
}

fn dial_tcp(
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> Result<String, String> {
    let mut stream = match bind {
        Some(b) => connect_from(b, addr, timeout)?,
        None => TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?,
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "hello").map_err(|e| format!("send to {addr}: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    if line.is_empty() {
        return Err(format!("{addr} closed without answering"));
    }
    Ok(line)
}

/// std has no bind-before-connect: build the socket by hand. SO_SNDTIMEO bounds connect() too.
fn connect_from(
    bind: SocketAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind as sbind, connect, setsockopt, socket,
        sockopt,
    };
    let (SocketAddr::V4(b), SocketAddr::V4(a)) = (bind, addr) else {
        return Err("only IPv4 is supported".into());
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
    setsockopt(&fd, sockopt::SendTimeout, &tv).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    sbind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(b))
        .map_err(|e| format!("bind {b}: {e}"))?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(a))
        .map_err(|e| format!("connect {addr} from {b}: {e}"))?;
    Ok(TcpStream::from(fd))
}

/// An IPv4 caller of a `[::]` socket arrives as `::ffff:a.b.c.d`: show it as the IPv4 address
/// it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn dial_udp(
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> Result<String, String> {
    let local = bind.unwrap_or_else(|| match addr {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    });
    let socket = UdpSocket::bind(local).map_err(|e| format!("binding {local}: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    // UDP may lose the first datagram while neighbours resolve: try three times.
    for _ in 0..3 {
        socket
            .send_to(b"hello\n", addr)
            .map_err(|e| format!("send to {addr}: {e}"))?;
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    Err(format!("no answer from {addr} over udp"))
}

fn dns(args: &[String]) -> Result<(), String> {
    use portslice_e2e::dns::{RecordType, answers, query};
    let name = args
        .first()
        .ok_or("dns NAME A|AAAA|SRV [--server IP:PORT]")?;
    let rtype = args
        .get(1)
        .and_then(|t| RecordType::parse(t))
        .ok_or("the type is A, AAAA or SRV")?;
    let mut server = None;
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            "--server" => server = Some(value(args, &mut i, "--server")?.to_string()),
            other => return Err(format!("unknown argument {other}")),
        }
        i += 1;
    }
    let server: SocketAddr = match server {
        Some(s) => s.parse().map_err(|e| format!("--server {s}: {e}"))?,
        None => {
            let conf = std::fs::read_to_string("/etc/resolv.conf")
                .map_err(|e| format!("reading /etc/resolv.conf: {e}"))?;
            let ip = conf
                .lines()
                .find_map(|l| l.strip_prefix("nameserver"))
                .map(str::trim)
                .ok_or("no nameserver in /etc/resolv.conf")?;
            format!("{ip}:53")
                .parse()
                .map_err(|e| format!("nameserver {ip}: {e}"))?
        }
    };
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let id = (std::process::id() & 0xffff) as u16;
    sock.send_to(&query(id, name, rtype), server)
        .map_err(|e| format!("query {server}: {e}"))?;
    let mut buf = [0u8; 4096];
    let (n, _) = sock
        .recv_from(&mut buf)
        .map_err(|e| format!("no answer from {server}: {e}"))?;
    for record in answers(&buf[..n], id, rtype)? {
        println!("{record}");
    }
    Ok(())
}
