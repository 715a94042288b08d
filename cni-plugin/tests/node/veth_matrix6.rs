//! The connectivity matrix of DESIGN.md on IPv6: every row of `veth_matrix.rs`, on an IPv6-only
//! node (`--node-ip 2001:2::1`) with pods wired as plain veths (IPv6 only), through the real eBPF
//! datapath. The row checks are the same functions (`portslice_testkit::rows`) with the IPv6
//! family; `cni_matrix6.rs` runs them on pods made by the CNI chain, `dual_stack.rs` on a node
//! with both families.

use std::net::{IpAddr, SocketAddr, SocketAddrV6, UdpSocket};
use std::time::Duration;

use portslice_testkit::icmp6::{PACKET_TOO_BIG, icmp6_error, quoted6, send_icmp6};
use portslice_testkit::rows::{self, A, B, HOST_PORT, HOSTILE, any, in_range, sock};
use portslice_testkit::traffic::{tcp_request, tcp_server, udp_request, udp_server};
use portslice_testkit::{
    Family, NODE_IP6, REMOTE_IP6, Stack, Topology, conntrack_count, eventually, require_root,
};

const V6: Family = Family::V6;

fn topology() -> Topology {
    Topology::new_with(Stack::V6)
}

#[test]
fn row1_remote_reaches_slice_pod_on_node_ipv6_tcp_and_udp() {
    if !require_root("row1 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    rows::row1_remote_reaches_slice_pod(&t, &t.pods[0].ns, V6);
}

#[test]
fn row2_slice_pod_reaches_remote_from_node_ipv6_and_its_own_ports() {
    if !require_root("row2 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    rows::row2_slice_pod_reaches_remote_from_its_own_ports(&t, &t.pods[0].ns, V6);
}

/// Linux has no `net.ipv6.ip_local_port_range`: `net.ipv4.ip_local_port_range` picks the
/// ephemeral ports of IPv6 sockets too, so the one sysctl the plugin sets confines both. A slice
/// pod's IPv6 sockets bound to port 0 (UDP) and its IPv6 connects (TCP) all get ports of its
/// slice.
#[test]
fn ipv6_sockets_of_a_slice_pod_take_ephemeral_ports_from_ip_local_port_range() {
    if !require_root("v6 ephemeral ports") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(HOSTILE)); // 10 ports: a port outside would show at once
    let pod = &t.pods[0].ns;
    let udp: Vec<u16> = pod.enter(|| {
        let socks: Vec<UdpSocket> = (0..8)
            .map(|_| UdpSocket::bind("[::]:0").expect("bind [::]:0"))
            .collect();
        socks
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect()
    });
    assert!(udp.iter().all(|p| in_range(*p, HOSTILE)), "{udp:?}");
    let _srv = tcp_server(&t.remote, any(V6), 5000, "remote");
    for _ in 0..5 {
        let r = tcp_request(pod, sock(REMOTE_IP6, 5000), None).expect("TCP pod -> remote");
        let p = rows::peer_addr(&r);
        assert!(in_range(p.port(), HOSTILE), "{r}");
    }
}

#[test]
fn row4_other_pod_reaches_slice_pod_on_node_ipv6() {
    if !require_root("row4 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    t.add_pod(None);
    let other = &t.pods[1];
    rows::row4_other_pod_reaches_slice_pod(&t.pods[0].ns, &other.ns, other.private(V6), V6);
}

#[test]
fn row5_host_process_and_slice_pod_reach_each_other_on_ipv6() {
    if !require_root("row5 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    rows::row5_host_process_and_slice_pod_reach_each_other(&t, &t.pods[0].ns, V6);
}

#[test]
fn row6_hairpin_between_two_slices_on_node_ipv6() {
    if !require_root("row6 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    t.add_pod(Some(B));
    rows::row6_hairpin_between_two_slices(&t.pods[0].ns, &t.pods[1].ns, V6);
}

#[test]
fn row7_remote_reaches_host_ports_outside_every_slice_on_ipv6() {
    if !require_root("row7 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    rows::row7_remote_reaches_host_ports_outside_every_slice(&t, V6);
}

#[test]
fn row8_ping6_and_icmpv6_errors_reach_the_slice_pod() {
    if !require_root("row8 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    rows::row8_ping_and_icmp_errors_reach_the_slice_pod(&t.pods[0].ns, V6);
}

/// A router on the way reports a 1300-byte MTU for the pod's UDP flow: the Packet Too Big is
/// steered by the quoted header's source port, so the pod lowers its path MTU, and the host's
/// own route to the remote keeps its MTU.
#[test]
fn row8_packet_too_big_reaches_the_slice_pod_so_pmtu_works() {
    if !require_root("row8 v6 pmtu") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    let flow = t.pods[0].ns.enter(|| {
        let s = UdpSocket::bind("[::]:0").unwrap();
        s.connect(SocketAddrV6::new(REMOTE_IP6, 5000, 0, 0))
            .unwrap();
        s
    });
    let local = match flow.local_addr().unwrap() {
        SocketAddr::V6(a) => a,
        other => panic!("{other}"),
    };
    assert_eq!(*local.ip(), NODE_IP6);
    let mtu = 1300u32.to_be_bytes();
    let ptb = icmp6_error(
        PACKET_TOO_BIG,
        0,
        mtu,
        &quoted6(17, local, SocketAddrV6::new(REMOTE_IP6, 5000, 0, 0)),
    );
    send_icmp6(&t.remote, NODE_IP6, ptb, None).expect("sending packet too big");
    let learnt = eventually(Duration::from_secs(3), || {
        let r = t.pods[0]
            .ns
            .ip(&["-6", "route", "get", &REMOTE_IP6.to_string()]);
        r.contains("mtu 1300").then_some(r)
    });
    assert!(learnt.is_some(), "the pod never learnt the path MTU");
    let host = t.node.ip(&["-6", "route", "get", &REMOTE_IP6.to_string()]);
    assert!(!host.contains("mtu 1300"), "{host}");
}

#[test]
fn row9_hostile_pod_gets_nothing_through_outside_its_range_on_ipv6() {
    if !require_root("row9 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    t.add_pod(Some(HOSTILE));
    t.add_pod(None); // a pod without a slice that claims the node's IPv6 address anyway
    rows::row9_hostile_pod_gets_nothing_through_outside_its_range(
        &t,
        &t.pods[1].ns,
        Some(&t.pods[2].ns),
        V6,
    );
    let m = t.metrics_get("/metrics").expect("metrics");
    let counter = |prefix: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{m}"))
    };
    let slice = "portslice_slice_drops_total{slice=\"test/slice-3\",reason=\"source_port\"}";
    assert!(counter(slice) >= 6, "source-port drops were not counted");
    assert!(
        counter("portslice_datapath_packets_total{event=\"drop_spoof\"}") >= 1,
        "the spoofed datagram was not counted"
    );
}

#[test]
fn row10_host_never_picks_a_pool_port_as_ephemeral_on_ipv6() {
    if !require_root("row10 v6") {
        return;
    }
    let t = topology();
    rows::row10_host_never_picks_a_pool_port_as_ephemeral(&t, V6);
}

#[test]
fn row11_fragmented_udp_arrives_whole_both_ways_on_ipv6() {
    if !require_root("row11 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    rows::row11_fragmented_udp_arrives_whole_both_ways(&t, &t.pods[0].ns, V6);
}

#[test]
fn row12_two_slice_pods_ping6_the_same_remote_with_the_same_id() {
    if !require_root("row12 v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    t.add_pod(Some(B));
    rows::row12_two_slice_pods_ping_the_same_remote_with_the_same_id(
        &t,
        &t.pods[0].ns,
        &t.pods[1].ns,
        V6,
    );
}

#[test]
fn ipv6_slice_traffic_creates_no_conntrack_entries() {
    if !require_root("conntrack v6") {
        return;
    }
    let mut t = topology();
    // kube-proxy style rules (ip6tables too) make conntrack track everything the host sees.
    portslice_testkit::drop_conntrack_invalid6(&t.node);
    t.add_pod(Some(A));
    let _pod = tcp_server(&t.pods[0].ns, any(V6), 40010, "pod");
    let _podu = udp_server(&t.pods[0].ns, any(V6), 40010, "pod");
    let _remote = tcp_server(&t.remote, any(V6), 5000, "remote");
    let _host = tcp_server(&t.node, any(V6), HOST_PORT, "host");
    let node: IpAddr = NODE_IP6.into();
    for _ in 0..5 {
        tcp_request(&t.remote, sock(node, 40010), None).expect("remote -> pod");
        udp_request(&t.remote, sock(REMOTE_IP6, 0), sock(node, 40010), 10)
            .expect("remote -> pod udp");
        tcp_request(&t.pods[0].ns, sock(REMOTE_IP6, 5000), None).expect("pod -> remote");
    }
    tcp_request(&t.remote, sock(node, HOST_PORT), None).expect("remote -> host");
    let count = |proto: &str, port: u16| {
        conntrack_count(
            &t.node,
            &["-f", "ipv6", "-p", proto, "--dport", &port.to_string()],
        )
    };
    let slice = count("tcp", 40010) + count("udp", 40010) + count("tcp", 5000);
    assert!(
        count("tcp", HOST_PORT) >= 1,
        "conntrack does not track IPv6 in the node netns; the check would prove nothing"
    );
    assert_eq!(slice, 0, "IPv6 slice traffic left conntrack entries");
}

/// The extension-header chain is walked with a bound: a datagram behind hop-by-hop and
/// destination options headers is steered by its UDP port like any other; one behind more
/// headers than the programs walk (`PS_MAX_EXT_HEADERS`, 6) is never steered (it goes to the
/// host, and is counted), nor is one with a routing header that has segments left (another
/// hop's packet).
#[test]
fn ipv6_extension_headers_are_walked_with_a_bound() {
    use portslice_testkit::icmp6::{
        NH_DSTOPTS, NH_HOPOPTS, pad_options, routing_header, udp6_crafted_request, udp6_with_ext,
    };
    if !require_root("ext headers v6") {
        return;
    }
    let mut t = topology();
    t.add_pod(Some(A));
    let _srv = udp_server(&t.pods[0].ns, any(V6), 40010, "pod");
    let dst = SocketAddrV6::new(NODE_IP6, 40010, 0, 0);
    let ask = |port: u16, ext: Vec<portslice_testkit::icmp6::ExtHeader>| {
        let src = SocketAddrV6::new(REMOTE_IP6, port, 0, 0);
        udp6_crafted_request(&t.remote, src, udp6_with_ext(src, dst, &ext, b"hi\n"))
    };
    let long_chains = |t: &Topology| {
        t.with_datapath(|dp| {
            dp.global_stats()
                .unwrap()
                .into_iter()
                .find(|(n, _)| *n == "ipv6_chain_too_long")
                .map_or(0, |(_, v)| v)
        })
    };

    let r = ask(5601, vec![pad_options(NH_HOPOPTS), pad_options(NH_DSTOPTS)])
        .expect("a datagram behind two extension headers reaches the slice pod");
    assert!(r.starts_with("pod "), "{r}");

    let before = long_chains(&t);
    let mut seven = vec![pad_options(NH_HOPOPTS)];
    seven.extend((0..6).map(|_| pad_options(NH_DSTOPTS)));
    let r = ask(5602, seven);
    assert!(
        r.is_err(),
        "a chain of 7 extension headers was steered to the pod: {r:?}"
    );
    assert!(
        long_chains(&t) > before,
        "the over-long chain was not counted"
    );

    let r = ask(5603, vec![routing_header(1, REMOTE_IP6)]);
    assert!(
        r.is_err(),
        "a packet routed on to another hop was steered to the pod: {r:?}"
    );
}

/// allowedSources on IPv6: a listed IPv6 source reaches the filtered slice pod on the node's
/// IPv6 address, an unlisted one is dropped (and counted); an IPv4-only list admits no IPv6
/// source at all, not even through `0.0.0.0/0`.
#[test]
fn allowed_sources_filter_ipv6_sources_and_never_cross_families() {
    use portslice_datapath::SourceCidr;
    use portslice_testkit::REMOTE_IP6_2;
    use std::net::Ipv6Addr;
    if !require_root("allowed sources v6") {
        return;
    }
    let mut t = topology();
    t.add_remote_address(REMOTE_IP6_2);
    t.add_pod(Some(A));
    let cid = t.pods[0].container_id.clone();
    let _srv = tcp_server(&t.pods[0].ns, any(V6), 40010, "pod");
    let set = |t: &Topology, list: &[&str]| {
        let list: Vec<SourceCidr> = list.iter().map(|c| c.parse().unwrap()).collect();
        let cid = cid.clone();
        t.with_datapath(move |dp| dp.set_allowed_sources(&cid, &list).expect("set"));
    };
    let reaches = |t: &Topology, from: Ipv6Addr| {
        tcp_request(
            &t.remote,
            SocketAddrV6::new(NODE_IP6, 40010, 0, 0),
            Some(SocketAddr::new(from.into(), 0)),
        )
        .is_ok_and(|r| r.starts_with("pod "))
    };
    let dropped = |t: &Topology| {
        t.with_datapath(|dp| {
            dp.global_stats()
                .unwrap()
                .into_iter()
                .find(|(n, _)| *n == "drop_source")
                .map_or(0, |(_, v)| v)
        })
    };
    assert!(
        reaches(&t, REMOTE_IP6) && reaches(&t, REMOTE_IP6_2),
        "no list: anyone"
    );
    set(&t, &["2001:2::2/128"]);
    let before = dropped(&t);
    assert!(reaches(&t, REMOTE_IP6), "the listed IPv6 source is refused");
    assert!(!reaches(&t, REMOTE_IP6_2), "an unlisted IPv6 source got in");
    assert!(dropped(&t) > before, "the refused source was not counted");
    set(&t, &["0.0.0.0/0"]);
    assert!(
        !reaches(&t, REMOTE_IP6),
        "an IPv4 entry admitted an IPv6 source"
    );
    set(&t, &["2001:2::/64"]);
    assert!(
        reaches(&t, REMOTE_IP6) && reaches(&t, REMOTE_IP6_2),
        "a /64 admits both"
    );
}
