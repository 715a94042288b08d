//! The connectivity matrix of DESIGN.md, with every pod created through the real CNI chain:
//! Debian's ptp + host-local, then the built `portslice` binary, invoked as a runtime invokes
//! them, against the node daemon's real eBPF datapath (root; skipped loudly otherwise). The
//! datapath's own tests (`datapath_matrix.rs`) prove the rows with hand-wired veths; these prove
//! that what the plugin wires gives the same.
mod cni_common;
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cni_common::{CniPod, Conflist, Runtime, TempDir, portslice_conf};
use support::traffic::{ping_with_id, tcp_request, tcp_server, udp_request, udp_server};
use support::{NODE_IP, Netns, REMOTE_IP, Topology, require_root};

const ANY: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
const A: (u16, u16) = (40000, 40099);
const B: (u16, u16) = (40100, 40199);
const HOSTILE: (u16, u16) = (40200, 40209);
const HOST_PORT: u16 = 2222;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn in_range(port: u16, r: (u16, u16)) -> bool {
    r.0 <= port && port <= r.1
}

/// The peer in "<tag> <ip>:<port> ..." replies.
fn peer(reply: &str) -> SocketAddrV4 {
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad reply {reply:?}"))
}

/// A node whose pods are all created by the CNI chain.
struct CniNode {
    ipam: TempDir,
    list: Conflist,
    pods: Vec<CniPod>,
    t: Topology,
}

impl CniNode {
    fn new() -> Self {
        let t = Topology::new();
        let ipam = TempDir::new("ipam");
        let list = Conflist::ptp("1.0.0", &ipam.0, portslice_conf(&t));
        Self {
            ipam,
            list,
            pods: Vec::new(),
            t,
        }
    }

    /// ADD a pod through the chain; `slice` as the runtime would give it (CNI_ARGS).
    fn add(&mut self, slice: Option<(u16, u16)>) -> usize {
        let args = slice
            .map(|(a, b)| format!("PORTSLICE_RANGE={a}-{b}"))
            .unwrap_or_default();
        let mut pod = CniPod::new(&args);
        let rt = Runtime {
            node: &self.t.node,
            list: self.list.clone(),
        };
        rt.add(&mut pod)
            .unwrap_or_else(|e| panic!("CNI ADD: {e:?}"));
        self.pods.push(pod);
        self.pods.len() - 1
    }

    fn ns(&self, i: usize) -> &Netns {
        &self.pods[i].ns
    }
}

impl Drop for CniNode {
    fn drop(&mut self) {
        let rt = Runtime {
            node: &self.t.node,
            list: self.list.clone(),
        };
        for pod in &self.pods {
            let _ = rt.del(pod);
        }
        let _ = &self.ipam;
    }
}

/// Counts UDP datagrams and TCP connections arriving at `port` inside `ns`.
struct Counter {
    hits: Arc<AtomicUsize>,
    _threads: Vec<std::thread::JoinHandle<()>>,
}

fn counter(ns: &Netns, port: u16) -> Counter {
    let hits = Arc::new(AtomicUsize::new(0));
    let (udp, tcp) = ns.enter(move || {
        (
            UdpSocket::bind((ANY, port)).expect("bind udp counter"),
            TcpListener::bind((ANY, port)).expect("bind tcp counter"),
        )
    });
    udp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    tcp.set_nonblocking(true).unwrap();
    let h1 = hits.clone();
    let h2 = hits.clone();
    let t1 = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..40 {
            if udp.recv_from(&mut buf).is_ok() {
                h1.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let t2 = std::thread::spawn(move || {
        for _ in 0..40 {
            if tcp.accept().is_ok() {
                h2.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Counter {
        hits,
        _threads: vec![t1, t2],
    }
}

/// One datagram from `bind` (inside `ns`) to `dst`; no reply expected.
fn udp_send(ns: &Netns, bind: SocketAddrV4, dst: SocketAddrV4) -> Result<(), String> {
    ns.enter(move || {
        let s = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
        s.send_to(b"spoof", dst)
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

/// A connected UDP socket that sends to a closed port sees the ICMP port unreachable as
/// ECONNREFUSED on the next receive.
fn udp_sees_port_unreachable(ns: &Netns, dst: SocketAddrV4) -> Result<bool, String> {
    ns.enter(move || {
        let s = UdpSocket::bind((ANY, 0)).map_err(|e| e.to_string())?;
        s.connect(dst).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        s.send(b"x").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 16];
        match s.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(true),
            other => Err(format!("no port unreachable: {other:?}")),
        }
    })
}

#[test]
fn row1_remote_reaches_the_cni_slice_pod_on_node_ip() {
    if !require_root("matrix row1") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let _t = tcp_server(n.ns(a), ANY, 40010, "pod");
    let _u = udp_server(n.ns(a), ANY, 40010, "pod");
    let r = tcp_request(&n.t.remote, sa(NODE_IP, 40010), None)
        .expect("TCP remote -> node IP:slice port");
    assert!(r.starts_with("pod 198.18.0.2:"), "{r}");
    let r = udp_request(&n.t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, 40010), 10)
        .expect("UDP remote -> slice port");
    assert!(r.starts_with("pod 198.18.0.2:"), "{r}");
}

#[test]
fn row2_cni_slice_pod_reaches_remote_from_node_ip_and_its_own_ports() {
    if !require_root("matrix row2") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let _t = tcp_server(&n.t.remote, ANY, 5000, "remote");
    let _u = udp_server(&n.t.remote, ANY, 5000, "remote");
    for _ in 0..3 {
        let p = peer(&tcp_request(n.ns(a), sa(REMOTE_IP, 5000), None).expect("TCP pod -> remote"));
        assert_eq!(*p.ip(), NODE_IP);
        assert!(
            in_range(p.port(), A),
            "source port {} outside the slice",
            p.port()
        );
        let p = peer(
            &udp_request(n.ns(a), sa(ANY, 0), sa(REMOTE_IP, 5000), 10).expect("UDP pod -> remote"),
        );
        assert_eq!(*p.ip(), NODE_IP);
        assert!(
            in_range(p.port(), A),
            "source port {} outside the slice",
            p.port()
        );
    }
}

#[test]
fn row3_cni_slice_pod_reaches_cluster_addresses_from_its_private_address() {
    if !require_root("matrix row3") {
        return;
    }
    // A pod IP in the cluster CIDR stands in for a Service endpoint / cluster DNS: what matters
    // is the route with `src <private IP>` the plugin installed.
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let dns = n.add(None);
    let dns_ip = n.pods[dns].private_ip();
    let _t = tcp_server(n.ns(dns), ANY, 53, "dns");
    let _u = udp_server(n.ns(dns), ANY, 53, "dns");
    let a_private = n.pods[a].private_ip();
    let r = tcp_request(n.ns(a), sa(dns_ip, 53), None).expect("TCP slice pod -> cluster address");
    assert_eq!(*peer(&r).ip(), a_private, "{r}");
    let r = udp_request(n.ns(a), sa(ANY, 0), sa(dns_ip, 53), 10)
        .expect("UDP slice pod -> cluster address");
    assert_eq!(*peer(&r).ip(), a_private, "{r}");
}

#[test]
fn row4_other_cni_pod_reaches_the_slice_pod_on_node_ip() {
    if !require_root("matrix row4") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let other = n.add(None);
    let _t = tcp_server(n.ns(a), ANY, 40010, "slice");
    let _u = udp_server(n.ns(a), ANY, 40010, "slice");
    let other_ip = n.pods[other].private_ip();
    let r = tcp_request(n.ns(other), sa(NODE_IP, 40010), None)
        .expect("TCP other pod -> node IP:slice port");
    assert!(r.starts_with("slice ") && *peer(&r).ip() == other_ip, "{r}");
    let r = udp_request(n.ns(other), sa(ANY, 0), sa(NODE_IP, 40010), 10)
        .expect("UDP other pod -> slice port");
    assert!(r.starts_with("slice ") && *peer(&r).ip() == other_ip, "{r}");
}

#[test]
fn row5_host_process_and_cni_slice_pod_reach_each_other() {
    if !require_root("matrix row5") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let _pt = tcp_server(n.ns(a), ANY, 40010, "pod");
    let _pu = udp_server(n.ns(a), ANY, 40010, "pod");
    let _ht = tcp_server(&n.t.node, ANY, HOST_PORT, "host");
    let _hu = udp_server(&n.t.node, ANY, HOST_PORT, "host");
    let r =
        tcp_request(&n.t.node, sa(NODE_IP, 40010), None).expect("TCP host -> node IP:slice port");
    assert!(r.starts_with("pod 198.18.0.1:"), "{r}");
    let r = udp_request(&n.t.node, sa(NODE_IP, 0), sa(NODE_IP, 40010), 10)
        .expect("UDP host -> slice port");
    assert!(r.starts_with("pod 198.18.0.1:"), "{r}");
    let r = tcp_request(n.ns(a), sa(NODE_IP, HOST_PORT), None).expect("TCP pod -> host port");
    assert!(
        r.starts_with("host 198.18.0.1:") && in_range(peer(&r).port(), A),
        "{r}"
    );
    let r =
        udp_request(n.ns(a), sa(ANY, 0), sa(NODE_IP, HOST_PORT), 10).expect("UDP pod -> host port");
    assert!(
        r.starts_with("host 198.18.0.1:") && in_range(peer(&r).port(), A),
        "{r}"
    );
}

#[test]
fn row6_hairpin_between_two_cni_slice_pods() {
    if !require_root("matrix row6") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let b = n.add(Some(B));
    let _t = tcp_server(n.ns(b), ANY, 40110, "b");
    let _u = udp_server(n.ns(b), ANY, 40110, "b");
    let r = tcp_request(n.ns(a), sa(NODE_IP, 40110), None).expect("TCP A -> node IP:B port");
    assert!(
        r.starts_with("b 198.18.0.1:") && in_range(peer(&r).port(), A),
        "{r}"
    );
    let r =
        udp_request(n.ns(a), sa(ANY, 0), sa(NODE_IP, 40110), 10).expect("UDP A -> node IP:B port");
    assert!(
        r.starts_with("b 198.18.0.1:") && in_range(peer(&r).port(), A),
        "{r}"
    );
}

#[test]
fn row7_remote_reaches_host_ports_outside_every_slice() {
    if !require_root("matrix row7") {
        return;
    }
    let mut n = CniNode::new();
    let _a = n.add(Some(A));
    let _t = tcp_server(&n.t.node, ANY, HOST_PORT, "host");
    let _u = udp_server(&n.t.node, ANY, HOST_PORT, "host");
    let r =
        tcp_request(&n.t.remote, sa(NODE_IP, HOST_PORT), None).expect("TCP remote -> host port");
    assert!(r.starts_with("host 198.18.0.2:"), "{r}");
    let r = udp_request(&n.t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, HOST_PORT), 10)
        .expect("UDP remote -> host port");
    assert!(r.starts_with("host 198.18.0.2:"), "{r}");
}

#[test]
fn row8_ping_and_icmp_errors_reach_the_cni_slice_pod() {
    if !require_root("matrix row8") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    assert_eq!(
        ping_with_id(n.ns(a), REMOTE_IP, 777, 1),
        Ok(true),
        "echo reply to the slice pod"
    );
    assert_eq!(
        udp_sees_port_unreachable(n.ns(a), sa(REMOTE_IP, 5999)),
        Ok(true)
    );
}

#[test]
fn row9_a_hostile_cni_pod_gets_nothing_through_outside_its_range() {
    if !require_root("matrix row9") {
        return;
    }
    let mut n = CniNode::new();
    let _victim = n.add(Some(A));
    let hostile = n.add(Some(HOSTILE));
    let remote = counter(&n.t.remote, 6000);
    // Sends from a port of another slice, an unowned pool port and a host port.
    for port in [40010, 45000, HOST_PORT] {
        udp_send(n.ns(hostile), sa(NODE_IP, port), sa(REMOTE_IP, 6000)).expect("send");
        let r = tcp_request(n.ns(hostile), sa(REMOTE_IP, 6000), Some(sa(NODE_IP, port)));
        assert!(
            r.is_err(),
            "TCP from foreign port {port} got through: {r:?}"
        );
    }
    // Listens outside its range: nothing arrives.
    let listening = counter(n.ns(hostile), 40050);
    let _ = tcp_request(&n.t.remote, sa(NODE_IP, 40050), None);
    let _ = udp_send(&n.t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, 40050));
    // Its own range works, so the silence above is the datapath and not a broken pod.
    let _ok = udp_server(&n.t.remote, ANY, 6001, "remote");
    let r =
        udp_request(n.ns(hostile), sa(ANY, 0), sa(REMOTE_IP, 6001), 10).expect("own range works");
    assert!(in_range(peer(&r).port(), HOSTILE), "{r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        remote.hits.load(Ordering::SeqCst),
        0,
        "traffic from foreign ports reached the remote"
    );
    assert_eq!(
        listening.hits.load(Ordering::SeqCst),
        0,
        "the hostile pod received a foreign port"
    );
}

#[test]
fn row10_host_never_picks_a_pool_port_while_cni_pods_run() {
    if !require_root("matrix row10") {
        return;
    }
    let mut n = CniNode::new();
    let _a = n.add(Some(A));
    let reserved =
        n.t.node
            .run("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    assert_eq!(reserved.trim(), support::POOL);
    let _srv = tcp_server(&n.t.remote, ANY, 5000, "remote");
    n.t.node
        .sysctl("net.ipv4.ip_local_port_range", "39990 40010");
    for _ in 0..5 {
        let p = peer(&tcp_request(&n.t.node, sa(REMOTE_IP, 5000), None).expect("host -> remote"));
        assert!(p.port() < 40000, "host used pool port {}", p.port());
    }
}

#[test]
fn row11_fragmented_udp_reaches_the_cni_slice_pod_whole() {
    if !require_root("matrix row11") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let _u = udp_server(n.ns(a), ANY, 40010, "pod");
    let _r = udp_server(&n.t.remote, ANY, 5000, "remote");
    let r = udp_request(&n.t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, 40010), 4000)
        .expect("4000-byte datagram to the pod");
    assert!(r.starts_with("pod ") && r.ends_with(" 4000"), "{r}");
    let r = udp_request(n.ns(a), sa(ANY, 0), sa(REMOTE_IP, 5000), 4000)
        .expect("4000-byte datagram from the pod");
    assert!(
        r.starts_with("remote 198.18.0.1:") && r.ends_with(" 4000"),
        "{r}"
    );
}

#[test]
fn row12_two_cni_slice_pods_ping_the_same_remote_with_the_same_id() {
    if !require_root("matrix row12") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let b = n.add(Some(B));
    let (ra, rb) = std::thread::scope(|s| {
        let ra = s.spawn(|| ping_with_id(n.ns(a), REMOTE_IP, 4242, 9));
        let rb = s.spawn(|| ping_with_id(n.ns(b), REMOTE_IP, 4242, 9));
        (ra.join().unwrap(), rb.join().unwrap())
    });
    assert_eq!((ra, rb), (Ok(true), Ok(true)));
}

#[test]
fn a_transfer_to_a_cni_slice_pod_survives_a_daemon_restart() {
    if !require_root("daemon restart") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let listener = n
        .ns(a)
        .enter(|| TcpListener::bind((ANY, 40020)).expect("bind"));
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut total = 0u64;
        let mut buf = [0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(k) => total += k as u64,
            }
        }
    });
    let mut conn = n.t.remote.enter(|| {
        TcpStream::connect_timeout(&SocketAddr::V4(sa(NODE_IP, 40020)), Duration::from_secs(3))
            .expect("connect")
    });
    conn.set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0u64;
    for i in 0..60 {
        if i == 20
            && let Some(d) = &mut n.t.daemon
        {
            d.kill();
        }
        if i == 40 {
            n.t.start_daemon();
        }
        conn.write_all(&chunk)
            .expect("the transfer keeps flowing across the restart");
        sent += chunk.len() as u64;
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(conn);
    assert_eq!(server.join().unwrap(), sent);
    // And CNI keeps working against the restarted daemon.
    let b = n.add(Some(B));
    let _t = tcp_server(n.ns(b), ANY, 40110, "b");
    assert!(tcp_request(&n.t.remote, sa(NODE_IP, 40110), None).is_ok());
}
