//! The rows of the connectivity matrix (docs/DESIGN.md), each written once and run for each
//! address family: `veth_matrix.rs` runs them on pods wired as plain veths
//! ([`Topology::add_pod`]), `cni_matrix.rs` on pods created through the real CNI chain. The
//! checks take the topology (node + remote), the pods' netns and the family `f` whose node
//! address they use; the caller builds the pods (with an address of `f`). Slice pods own [`A`],
//! [`B`] or [`HOSTILE`].
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::time::Duration;

use portslice_netns::Family;

use super::icmp6::icmp6_responder;
use super::traffic::{
    icmp_responder, ping_with_id, tcp_counter, tcp_request, tcp_server, udp_counter, udp_request,
    udp_sees_port_unreachable, udp_send, udp_server,
};
use super::{NODE_IP6, Netns, POOL, Topology, node_ip, remote_ip};

pub const ANY: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
pub const A: (u16, u16) = (40000, 40099);
pub const B: (u16, u16) = (40100, 40199);
pub const HOSTILE: (u16, u16) = (40200, 40209);
/// A host service outside the pool.
pub const HOST_PORT: u16 = 2222;

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A socket address of either family.
pub fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The wildcard address of `f` (`0.0.0.0`, `::`).
pub fn any(f: Family) -> IpAddr {
    f.unspecified()
}

pub fn in_range(port: u16, r: (u16, u16)) -> bool {
    r.0 <= port && port <= r.1
}

/// The peer in "<tag> <ip>:<port> ..." replies.
pub fn peer(reply: &str) -> SocketAddrV4 {
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad reply {reply:?}"))
}

/// The peer of either family in "<tag> <ip>:<port> ..." replies; an IPv4-mapped peer (a `::`
/// server answering IPv4) as its IPv4 address.
pub fn peer_addr(reply: &str) -> SocketAddr {
    let p: SocketAddr = reply
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad reply {reply:?}"));
    SocketAddr::new(p.ip().to_canonical(), p.port())
}

/// Asserts that `reply` is from a server tagged `tag` and names `from` as its peer.
fn assert_reply(reply: &str, tag: &str, from: IpAddr) {
    assert!(
        reply.starts_with(&format!("{tag} ")) && peer_addr(reply).ip() == from,
        "expected a reply from {tag} that saw {from}: {reply}"
    );
}

/// Row 1: remote -> node IP:slice port reaches the slice pod `pod` (range [`A`]), TCP and UDP.
pub fn row1_remote_reaches_slice_pod(t: &Topology, pod: &Netns, f: Family) {
    let _tcp = tcp_server(pod, any(f), 40010, "pod");
    let _udp = udp_server(pod, any(f), 40010, "pod");
    let r = tcp_request(&t.remote, sock(node_ip(f), 40010), None)
        .expect("TCP remote -> node IP:slice port");
    assert_reply(&r, "pod", remote_ip(f));
    let r = udp_request(
        &t.remote,
        sock(remote_ip(f), 0),
        sock(node_ip(f), 40010),
        10,
    )
    .expect("UDP remote -> slice port");
    assert_reply(&r, "pod", remote_ip(f));
}

/// Row 2: the slice pod `pod` (range [`A`]) reaches the remote from the node IP and a source port
/// of its slice. For IPv6 this also proves that `net.ipv4.ip_local_port_range` governs IPv6
/// sockets: the pod's kernel picks the source ports, and only that sysctl names the slice.
pub fn row2_slice_pod_reaches_remote_from_its_own_ports(t: &Topology, pod: &Netns, f: Family) {
    let _tcp = tcp_server(&t.remote, any(f), 5000, "remote");
    let _udp = udp_server(&t.remote, any(f), 5000, "remote");
    for _ in 0..3 {
        let tcp = tcp_request(pod, sock(remote_ip(f), 5000), None).expect("TCP pod -> remote");
        let udp = udp_request(pod, sock(any(f), 0), sock(remote_ip(f), 5000), 10)
            .expect("UDP pod -> remote");
        for r in [tcp, udp] {
            let p = peer_addr(&r);
            assert_eq!(p.ip(), node_ip(f), "{r}");
            assert!(
                in_range(p.port(), A),
                "source port {} outside the slice: {r}",
                p.port()
            );
        }
    }
}

/// Row 4: `other` (a pod without a slice, private address `other_ip` of `f`) reaches the slice
/// pod `slice` (range [`A`]) on the node IP.
pub fn row4_other_pod_reaches_slice_pod(
    slice: &Netns,
    other: &Netns,
    other_ip: impl Into<IpAddr>,
    f: Family,
) {
    let other_ip = other_ip.into();
    let _tcp = tcp_server(slice, any(f), 40010, "slice");
    let _udp = udp_server(slice, any(f), 40010, "slice");
    let r = tcp_request(other, sock(node_ip(f), 40010), None)
        .expect("TCP other pod -> node IP:slice port");
    assert_reply(&r, "slice", other_ip);
    let r = udp_request(other, sock(any(f), 0), sock(node_ip(f), 40010), 10)
        .expect("UDP other pod -> slice port");
    assert_reply(&r, "slice", other_ip);
}

/// Row 5: a host process and the slice pod `pod` (range [`A`]) reach each other.
pub fn row5_host_process_and_slice_pod_reach_each_other(t: &Topology, pod: &Netns, f: Family) {
    let n = node_ip(f);
    let _pod_tcp = tcp_server(pod, any(f), 40010, "pod");
    let _pod_udp = udp_server(pod, any(f), 40010, "pod");
    let _host_tcp = tcp_server(&t.node, any(f), HOST_PORT, "host");
    let _host_udp = udp_server(&t.node, any(f), HOST_PORT, "host");
    // host -> pod (through lo ingress)
    let r = tcp_request(&t.node, sock(n, 40010), None).expect("TCP host -> node IP:slice port");
    assert_reply(&r, "pod", n);
    let r = udp_request(&t.node, sock(n, 0), sock(n, 40010), 10).expect("UDP host -> slice port");
    assert_reply(&r, "pod", n);
    // pod -> host (through the host-side veth, accept_local)
    let r = tcp_request(pod, sock(n, HOST_PORT), None).expect("TCP pod -> host port");
    assert!(
        r.starts_with("host ") && in_range(peer_addr(&r).port(), A),
        "{r}"
    );
    assert_reply(&r, "host", n);
    let r =
        udp_request(pod, sock(any(f), 0), sock(n, HOST_PORT), 10).expect("UDP pod -> host port");
    assert_reply(&r, "host", n);
    assert!(in_range(peer_addr(&r).port(), A), "{r}");
}

/// Row 6: slice pod `a` (range [`A`]) reaches slice pod `b` (range [`B`]) on the node IP.
pub fn row6_hairpin_between_two_slices(a: &Netns, b: &Netns, f: Family) {
    let n = node_ip(f);
    let _tcp = tcp_server(b, any(f), 40110, "b");
    let _udp = udp_server(b, any(f), 40110, "b");
    let r = tcp_request(a, sock(n, 40110), None).expect("TCP A -> node IP:B port");
    assert_reply(&r, "b", n);
    assert!(in_range(peer_addr(&r).port(), A), "{r}");
    let r = udp_request(a, sock(any(f), 0), sock(n, 40110), 10).expect("UDP A -> node IP:B port");
    assert_reply(&r, "b", n);
    assert!(in_range(peer_addr(&r).port(), A), "{r}");
}

/// Row 7: the remote reaches host ports outside every slice. A slice pod of [`A`] must exist
/// (and not listen on 40020).
pub fn row7_remote_reaches_host_ports_outside_every_slice(t: &Topology, f: Family) {
    let n = node_ip(f);
    // A host service outside the pool, and one inside the pool but in no slice.
    let _h = tcp_server(&t.node, any(f), HOST_PORT, "host");
    let _p = tcp_server(&t.node, any(f), 45000, "host");
    let _u = udp_server(&t.node, any(f), HOST_PORT, "host");
    for port in [HOST_PORT, 45000] {
        let r = tcp_request(&t.remote, sock(n, port), None).expect("TCP remote -> host port");
        assert_reply(&r, "host", remote_ip(f));
    }
    let r = udp_request(&t.remote, sock(remote_ip(f), 0), sock(n, HOST_PORT), 10)
        .expect("UDP remote -> host port");
    assert_reply(&r, "host", remote_ip(f));
    // And a slice port the pod does not listen on is the pod's: the host never answers it.
    let _decoy = tcp_server(&t.node, any(f), 40020, "host");
    let err =
        tcp_request(&t.remote, sock(n, 40020), None).expect_err("slice port is not the host's");
    assert!(err.contains("refused"), "{err}");
}

/// Row 8: the slice pod `pod` gets its echo reply and the ICMP errors for its flows.
pub fn row8_ping_and_icmp_errors_reach_the_slice_pod(pod: &Netns, f: Family) {
    assert_eq!(
        ping_with_id(pod, remote_ip(f), 777, 1),
        Ok(true),
        "echo reply to the slice pod"
    );
    // Port unreachable from the remote is steered by the quoted header's source port.
    assert_eq!(
        udp_sees_port_unreachable(pod, sock(remote_ip(f), 5999)),
        Ok(true)
    );
}

/// Row 9: the slice pod `hostile` (range [`HOSTILE`]) gets nothing through outside its range,
/// while a slice pod of [`A`] exists. `spoofer`, when given, is a pod without a slice that
/// claims the node address anyway: what it sends from there must not leave the node either.
pub fn row9_hostile_pod_gets_nothing_through_outside_its_range(
    t: &Topology,
    hostile: &Netns,
    spoofer: Option<&Netns>,
    f: Family,
) {
    let n = node_ip(f);
    let (_u, udp_hits) = udp_counter(&t.remote, any(f), 6000);
    let (_t, tcp_hits) = tcp_counter(&t.remote, any(f), 6000);
    // Binds and sends from a port of another slice, an unowned pool port and a host port.
    for port in [40010, 45000, HOST_PORT] {
        udp_send(hostile, sock(n, port), sock(remote_ip(f), 6000)).expect("send");
        let err = tcp_request(hostile, sock(remote_ip(f), 6000), Some(sock(n, port)));
        assert!(
            err.is_err(),
            "TCP from foreign port {port} got through: {err:?}"
        );
    }
    // Spoofing: a pod without a slice sends from the node address.
    if let Some(spoofer) = spoofer {
        match f {
            Family::V4 => spoofer.ip(&["addr", "add", &format!("{n}/32"), "dev", "eth0"]),
            Family::V6 => spoofer.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{NODE_IP6}/128"),
                "dev",
                "eth0",
                "nodad",
            ]),
        };
        udp_send(spoofer, sock(n, 40005), sock(remote_ip(f), 6000)).expect("send");
    }
    // Receives nothing for ports outside its range, even when it listens on them.
    let (_lu, listen_udp) = udp_counter(hostile, any(f), 40050);
    let (_lt, listen_tcp) = tcp_counter(hostile, any(f), 40050);
    let _ = tcp_request(&t.remote, sock(n, 40050), None);
    let _ = udp_send(&t.remote, sock(remote_ip(f), 0), sock(n, 40050));
    // Its own range works (so the drops above are the datapath, not a broken pod).
    let _ok = udp_server(&t.remote, any(f), 6001, "remote");
    let r = udp_request(hostile, sock(any(f), 0), sock(remote_ip(f), 6001), 10)
        .expect("own range works");
    assert!(in_range(peer_addr(&r).port(), HOSTILE), "{r}");
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
        listen_udp.load(Ordering::SeqCst) + listen_tcp.load(Ordering::SeqCst),
        0,
        "the hostile pod received a foreign port"
    );
}

/// Row 10: the pool is reserved on the node, and with the host's ephemeral range squeezed
/// across the pool's edge neither UDP binds nor TCP connects get a pool port. The IPv4 sysctls
/// (`ip_local_reserved_ports`, `ip_local_port_range`) govern IPv6 sockets too: Linux has no IPv6
/// counterparts, so the same reservation protects both.
pub fn row10_host_never_picks_a_pool_port_as_ephemeral(t: &Topology, f: Family) {
    let reserved = t
        .node
        .run("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    assert_eq!(reserved.trim(), POOL);
    // Squeeze the host's ephemeral range across the pool's edge: only 39990-39999 may be used.
    t.node.sysctl("net.ipv4.ip_local_port_range", "39990 40010");
    let wildcard = sock(any(f), 0);
    let ports: Vec<u16> = t.node.enter(move || {
        let socks: Vec<_> = (0..10)
            .filter_map(|_| std::net::UdpSocket::bind(wildcard).ok())
            .collect();
        socks
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect()
    });
    assert_eq!(ports.len(), 10);
    assert!(ports.iter().all(|p| *p < 40000), "{ports:?}");
    let _srv = tcp_server(&t.remote, any(f), 5000, "remote");
    for _ in 0..5 {
        let p = peer_addr(
            &tcp_request(&t.node, sock(remote_ip(f), 5000), None).expect("host -> remote"),
        );
        assert!(p.port() < 40000, "host used pool port {}", p.port());
    }
}

/// Row 11: fragmented UDP reaches the slice pod `pod` (range [`A`]) whole, and leaves it whole.
pub fn row11_fragmented_udp_arrives_whole_both_ways(t: &Topology, pod: &Netns, f: Family) {
    let _pod = udp_server(pod, any(f), 40010, "pod");
    let _remote = udp_server(&t.remote, any(f), 5000, "remote");
    let r = udp_request(
        &t.remote,
        sock(remote_ip(f), 0),
        sock(node_ip(f), 40010),
        4000,
    )
    .expect("4000-byte datagram to the pod");
    assert!(r.starts_with("pod ") && r.ends_with(" 4000"), "{r}");
    let r = udp_request(pod, sock(any(f), 0), sock(remote_ip(f), 5000), 4000)
        .expect("4000-byte datagram from the pod");
    assert!(r.ends_with(" 4000"), "{r}");
    assert_reply(&r, "remote", node_ip(f));
}

/// Row 12: slice pods `a` (range [`A`]) and `b` (range [`B`]) ping the remote with the same
/// ICMP id at once, and both get their replies.
pub fn row12_two_slice_pods_ping_the_same_remote_with_the_same_id(
    t: &Topology,
    a: &Netns,
    b: &Netns,
    f: Family,
) {
    // The remote answers only when both requests are in: both are in flight at once.
    let ids: Vec<u16>;
    let (ra, rb) = match f {
        Family::V4 => {
            t.remote.sysctl("net.ipv4.icmp_echo_ignore_all", "1");
            let responder = icmp_responder(&t.remote, 2);
            let r = ping_both(a, b, f);
            ids = responder
                .join()
                .unwrap()
                .iter()
                .map(|(_, id)| *id)
                .collect();
            r
        }
        Family::V6 => {
            t.remote.sysctl("net.ipv6.icmp.echo_ignore_all", "1");
            let responder = icmp6_responder(&t.remote, 2);
            let r = ping_both(a, b, f);
            ids = responder
                .join()
                .unwrap()
                .iter()
                .map(|(_, id)| *id)
                .collect();
            r
        }
    };
    assert_eq!((ra, rb), (Ok(true), Ok(true)), "remote saw ids {ids:?}");
    // On the wire each pod's id lies in its own range, so they cannot collide.
    assert!(
        ids.iter().any(|i| in_range(*i, A)) && ids.iter().any(|i| in_range(*i, B)),
        "{ids:?}"
    );
}

type PingResult = Result<bool, String>;

fn ping_both(a: &Netns, b: &Netns, f: Family) -> (PingResult, PingResult) {
    std::thread::scope(|s| {
        let ra = s.spawn(|| ping_with_id(a, remote_ip(f), 4242, 9));
        let rb = s.spawn(|| ping_with_id(b, remote_ip(f), 4242, 9));
        (ra.join().unwrap(), rb.join().unwrap())
    })
}
