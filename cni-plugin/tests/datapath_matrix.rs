//! The connectivity matrix of DESIGN.md, proven with real traffic through the real eBPF
//! datapath in network namespaces (root; skipped loudly otherwise). Each test builds its own
//! topology (see tests/support) and fails without the feature its name states.
mod support;

use std::net::{Ipv4Addr, SocketAddrV4};

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::traffic::{
    icmp_responder, ping_with_id, tcp_counter, tcp_request, tcp_server, udp_counter, udp_request,
    udp_sees_port_unreachable, udp_send, udp_server,
};
use support::{NODE_IP, REMOTE_IP, Topology, require_root};

const ANY: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
const A: (u16, u16) = (40000, 40099);
const B: (u16, u16) = (40100, 40199);
const HOST_PORT: u16 = 2222;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The port in "<tag> <ip>:<port> ..." replies.
fn peer(reply: &str) -> SocketAddrV4 {
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad reply {reply:?}"))
}

#[test]
fn row1_remote_reaches_slice_pod_on_node_ip_tcp_and_udp() {
    if !require_root("row1") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    let pod = &t.pods[0];
    let _tcp = tcp_server(&pod.ns, ANY, 40010, "pod");
    let _udp = udp_server(&pod.ns, ANY, 40010, "pod");
    let r =
        tcp_request(&t.remote, sa(NODE_IP, 40010), None).expect("TCP remote -> node IP:slice port");
    assert!(r.starts_with("pod 198.18.0.2:"), "{r}");
    let r = udp_request(&t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, 40010), 10)
        .expect("UDP remote -> slice port");
    assert!(r.starts_with("pod 198.18.0.2:"), "{r}");
}

#[test]
fn row7_remote_reaches_host_ports_outside_every_slice() {
    if !require_root("row7") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    // A host service outside the pool, and one inside the pool but in no slice.
    let _h = tcp_server(&t.node, ANY, HOST_PORT, "host");
    let _p = tcp_server(&t.node, ANY, 45000, "host");
    let _u = udp_server(&t.node, ANY, HOST_PORT, "host");
    for port in [HOST_PORT, 45000] {
        let r = tcp_request(&t.remote, sa(NODE_IP, port), None).expect("remote -> host port");
        assert!(r.starts_with("host 198.18.0.2:"), "{r}");
    }
    let r =
        udp_request(&t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, HOST_PORT), 10).expect("UDP to host");
    assert!(r.starts_with("host "), "{r}");
    // And a slice port the pod does not listen on is the pod's: the host never answers it.
    let _decoy = tcp_server(&t.node, ANY, 40020, "host");
    let err =
        tcp_request(&t.remote, sa(NODE_IP, 40020), None).expect_err("slice port is not the host's");
    assert!(err.contains("refused"), "{err}");
}

fn in_range(port: u16, r: (u16, u16)) -> bool {
    r.0 <= port && port <= r.1
}

#[test]
fn row2_slice_pod_reaches_remote_from_node_ip_and_its_own_ports() {
    if !require_root("row2") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    let _tcp = tcp_server(&t.remote, ANY, 5000, "remote");
    let _udp = udp_server(&t.remote, ANY, 5000, "remote");
    for _ in 0..3 {
        let r = tcp_request(&t.pods[0].ns, sa(REMOTE_IP, 5000), None).expect("TCP pod -> remote");
        let p = peer(&r);
        assert_eq!(*p.ip(), NODE_IP, "{r}");
        assert!(
            in_range(p.port(), A),
            "source port {} outside the slice",
            p.port()
        );
        let r = udp_request(&t.pods[0].ns, sa(ANY, 0), sa(REMOTE_IP, 5000), 10)
            .expect("UDP pod -> remote");
        let p = peer(&r);
        assert_eq!(*p.ip(), NODE_IP, "{r}");
        assert!(in_range(p.port(), A), "{r}");
    }
}

#[test]
fn row4_other_pod_reaches_slice_pod_on_node_ip() {
    if !require_root("row4") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    t.add_pod(None);
    let _tcp = tcp_server(&t.pods[0].ns, ANY, 40010, "slice");
    let _udp = udp_server(&t.pods[0].ns, ANY, 40010, "slice");
    let other = &t.pods[1];
    let r = tcp_request(&other.ns, sa(NODE_IP, 40010), None)
        .expect("TCP other pod -> node IP:slice port");
    assert_eq!(*peer(&r).ip(), other.private_ip, "{r}");
    let r =
        udp_request(&other.ns, sa(ANY, 0), sa(NODE_IP, 40010), 10).expect("UDP other pod -> slice");
    assert_eq!(*peer(&r).ip(), other.private_ip, "{r}");
}

#[test]
fn row5_host_process_and_slice_pod_reach_each_other() {
    if !require_root("row5") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    let _pod_tcp = tcp_server(&t.pods[0].ns, ANY, 40010, "pod");
    let _pod_udp = udp_server(&t.pods[0].ns, ANY, 40010, "pod");
    let _host_tcp = tcp_server(&t.node, ANY, HOST_PORT, "host");
    let _host_udp = udp_server(&t.node, ANY, HOST_PORT, "host");
    // host -> pod (through lo ingress)
    let r = tcp_request(&t.node, sa(NODE_IP, 40010), None).expect("TCP host -> node IP:slice port");
    assert!(r.starts_with("pod 198.18.0.1:"), "{r}");
    let r =
        udp_request(&t.node, sa(NODE_IP, 0), sa(NODE_IP, 40010), 10).expect("UDP host -> slice");
    assert!(r.starts_with("pod 198.18.0.1:"), "{r}");
    // pod -> host (through the host-side veth, accept_local)
    let r = tcp_request(&t.pods[0].ns, sa(NODE_IP, HOST_PORT), None).expect("TCP pod -> host port");
    assert!(
        r.starts_with("host 198.18.0.1:") && in_range(peer(&r).port(), A),
        "{r}"
    );
    let r = udp_request(&t.pods[0].ns, sa(ANY, 0), sa(NODE_IP, HOST_PORT), 10)
        .expect("UDP pod -> host");
    assert!(
        r.starts_with("host 198.18.0.1:") && in_range(peer(&r).port(), A),
        "{r}"
    );
}

#[test]
fn row6_hairpin_between_two_slices_on_node_ip() {
    if !require_root("row6") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    t.add_pod(Some(B));
    let _tcp = tcp_server(&t.pods[1].ns, ANY, 40110, "b");
    let _udp = udp_server(&t.pods[1].ns, ANY, 40110, "b");
    let r = tcp_request(&t.pods[0].ns, sa(NODE_IP, 40110), None).expect("TCP A -> node IP:B port");
    assert!(
        r.starts_with("b 198.18.0.1:") && in_range(peer(&r).port(), A),
        "{r}"
    );
    let r = udp_request(&t.pods[0].ns, sa(ANY, 0), sa(NODE_IP, 40110), 10).expect("UDP A -> B");
    assert!(
        r.starts_with("b 198.18.0.1:") && in_range(peer(&r).port(), A),
        "{r}"
    );
}

#[test]
fn row8_ping_and_icmp_errors_reach_the_slice_pod() {
    if !require_root("row8") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    assert_eq!(
        ping_with_id(&t.pods[0].ns, REMOTE_IP, 777, 1),
        Ok(true),
        "echo reply to the slice pod"
    );
    // Port unreachable from the remote is steered by the quoted header's source port.
    assert_eq!(
        udp_sees_port_unreachable(&t.pods[0].ns, sa(REMOTE_IP, 5999)),
        Ok(true)
    );
}

#[test]
fn row9_hostile_pod_gets_nothing_through_outside_its_range() {
    if !require_root("row9") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A)); // the victim owns 40000-40099
    t.add_pod(Some((40200, 40209))); // the hostile pod
    t.add_pod(None); // a pod without a slice that claims the node address anyway
    let (_u, udp_hits) = udp_counter(&t.remote, ANY, 6000);
    let (_t, tcp_hits) = tcp_counter(&t.remote, ANY, 6000);
    let hostile = &t.pods[1];
    // Binds and sends from a port of another slice and from an unowned pool port.
    for port in [40010, 45000, 2222] {
        udp_send(&hostile.ns, sa(NODE_IP, port), sa(REMOTE_IP, 6000)).expect("send");
        let err = tcp_request(&hostile.ns, sa(REMOTE_IP, 6000), Some(sa(NODE_IP, port)));
        assert!(
            err.is_err(),
            "TCP from foreign port {port} got through: {err:?}"
        );
    }
    // Spoofing: a pod without a slice sends from the node address.
    let spoofer = &t.pods[2];
    spoofer
        .ns
        .ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "eth0"]);
    udp_send(&spoofer.ns, sa(NODE_IP, 40005), sa(REMOTE_IP, 6000)).expect("send");
    // Receives nothing for ports outside its range, even when it listens on them.
    let (_l, hostile_hits) = tcp_counter(&hostile.ns, ANY, 40050);
    let _ = tcp_request(&t.remote, sa(NODE_IP, 40050), None);
    // Its own range works (so the drops above are the datapath, not a broken pod).
    let _ok = udp_server(&t.remote, ANY, 6001, "remote");
    let r = udp_request(&hostile.ns, sa(ANY, 0), sa(REMOTE_IP, 6001), 10).expect("own range works");
    assert!(in_range(peer(&r).port(), (40200, 40209)), "{r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        udp_hits.load(Ordering::SeqCst),
        0,
        "UDP from foreign ports reached the remote"
    );
    assert_eq!(
        tcp_hits.load(Ordering::SeqCst),
        0,
        "TCP from foreign ports reached the remote"
    );
    assert_eq!(
        hostile_hits.load(Ordering::SeqCst),
        0,
        "hostile pod received a foreign port"
    );
    let m = t.metrics_get("/metrics").expect("metrics");
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("portslice_slice_drops_total")
                && l.contains("test/slice-3")
                && l.contains("source_port")
        })
        .unwrap_or_else(|| panic!("no drop counter in\n{m}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 6, "{line}");
    let spoofed: u64 = m
        .lines()
        .find(|l| l.starts_with("portslice_datapath_packets_total{event=\"drop_spoof\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no spoof counter in\n{m}"));
    assert!(spoofed >= 1, "the spoofed datagram was not counted");
}

#[test]
fn row10_host_never_picks_a_pool_port_as_ephemeral() {
    if !require_root("row10") {
        return;
    }
    let t = Topology::new();
    let reserved = t
        .node
        .run("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    assert_eq!(reserved.trim(), support::POOL);
    // Squeeze the host's ephemeral range across the pool's edge: only 39990-39999 may be used.
    t.node.sysctl("net.ipv4.ip_local_port_range", "39990 40010");
    let ports: Vec<u16> = t.node.enter(|| {
        let socks: Vec<_> = (0..10)
            .filter_map(|_| std::net::UdpSocket::bind("0.0.0.0:0").ok())
            .collect();
        socks
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect()
    });
    assert_eq!(ports.len(), 10);
    assert!(ports.iter().all(|p| *p < 40000), "{ports:?}");
}

#[test]
fn row11_fragmented_udp_arrives_whole_both_ways() {
    if !require_root("row11") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    let _pod = udp_server(&t.pods[0].ns, ANY, 40010, "pod");
    let _remote = udp_server(&t.remote, ANY, 5000, "remote");
    let r = udp_request(&t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, 40010), 4000)
        .expect("4000-byte datagram to the pod");
    assert!(r.starts_with("pod ") && r.ends_with(" 4000"), "{r}");
    let r = udp_request(&t.pods[0].ns, sa(ANY, 0), sa(REMOTE_IP, 5000), 4000)
        .expect("4000-byte datagram from the pod");
    assert!(
        r.starts_with("remote 198.18.0.1:") && r.ends_with(" 4000"),
        "{r}"
    );
}

#[test]
fn row12_two_slice_pods_ping_the_same_remote_with_the_same_id() {
    if !require_root("row12") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    t.add_pod(Some(B));
    t.remote.sysctl("net.ipv4.icmp_echo_ignore_all", "1");
    // The remote answers only when both requests are in: both are in flight at once.
    let responder = icmp_responder(&t.remote, 2);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| ping_with_id(&t.pods[0].ns, REMOTE_IP, 4242, 9));
        let b = s.spawn(|| ping_with_id(&t.pods[1].ns, REMOTE_IP, 4242, 9));
        (a.join().unwrap(), b.join().unwrap())
    });
    let seen = responder.join().unwrap();
    assert_eq!((a, b), (Ok(true), Ok(true)), "remote saw {seen:?}");
    // On the wire each pod's id lies in its own range, so they cannot collide.
    let ids: Vec<u16> = seen.iter().map(|(_, id)| *id).collect();
    assert!(
        ids.iter().any(|i| in_range(*i, A)) && ids.iter().any(|i| in_range(*i, B)),
        "{ids:?}"
    );
}

#[test]
fn slice_traffic_creates_no_conntrack_entries() {
    if !require_root("conntrack") {
        return;
    }
    let mut t = Topology::new();
    // kube-proxy style rules make conntrack track everything the host stack sees.
    t.node.run(
        "iptables",
        &[
            "-A",
            "INPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ],
    );
    t.node.run(
        "iptables",
        &[
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ],
    );
    t.add_pod(Some(A));
    let _pod = tcp_server(&t.pods[0].ns, ANY, 40010, "pod");
    let _podu = udp_server(&t.pods[0].ns, ANY, 40010, "pod");
    let _remote = tcp_server(&t.remote, ANY, 5000, "remote");
    let _host = tcp_server(&t.node, ANY, HOST_PORT, "host");
    for _ in 0..5 {
        tcp_request(&t.remote, sa(NODE_IP, 40010), None).expect("remote -> pod");
        udp_request(&t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, 40010), 10)
            .expect("remote -> pod udp");
        tcp_request(&t.pods[0].ns, sa(REMOTE_IP, 5000), None).expect("pod -> remote");
    }
    tcp_request(&t.remote, sa(NODE_IP, HOST_PORT), None).expect("remote -> host");
    let slice = support::conntrack_count(&t.node, &["-p", "tcp", "--dport", "40010"])
        + support::conntrack_count(&t.node, &["-p", "udp", "--dport", "40010"])
        + support::conntrack_count(&t.node, &["-p", "tcp", "--dport", "5000"]);
    let host = support::conntrack_count(&t.node, &["-p", "tcp", "--dport", &HOST_PORT.to_string()]);
    assert!(
        host >= 1,
        "conntrack is not active in the node netns; the check would prove nothing"
    );
    assert_eq!(slice, 0, "slice traffic left conntrack entries");
}

#[test]
fn row8_fragmentation_needed_reaches_the_slice_pod_so_pmtu_works() {
    if !require_root("row8-pmtu") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    // The pod has a UDP flow to the remote; a router on the way reports a 1200-byte MTU.
    let flow = t.pods[0].ns.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(sa(REMOTE_IP, 5000)).unwrap();
        s
    });
    let local = match flow.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    assert_eq!(*local.ip(), NODE_IP);
    support::traffic::send_frag_needed(&t.remote, NODE_IP, local, sa(REMOTE_IP, 5000), 1200);
    // Steered by the quoted header's source port, the error lowers the pod's path MTU.
    let learnt = support::eventually(Duration::from_secs(3), || {
        let r = t.pods[0].ns.ip(&["route", "get", &REMOTE_IP.to_string()]);
        r.contains("mtu 1200").then_some(r)
    });
    assert!(learnt.is_some(), "the pod never learnt the path MTU");
    // The host did not take it: its own route to the remote is unchanged.
    let host = t.node.ip(&["route", "get", &REMOTE_IP.to_string()]);
    assert!(!host.contains("mtu 1200"), "{host}");
}
