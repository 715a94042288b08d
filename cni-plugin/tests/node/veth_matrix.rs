//! The connectivity matrix of DESIGN.md, proven with real traffic through the real eBPF
//! datapath in network namespaces (root; skipped loudly otherwise). Each test builds its own
//! topology (see portslice-testkit) and fails without the feature its name states. The row checks
//! themselves live in `portslice_testkit::rows`; `cni_matrix.rs` runs the same ones on pods the CNI chain
//! created.

use std::time::Duration;

use portslice_testkit::Family;
use portslice_testkit::rows::{self, A, ANY, B, HOST_PORT, HOSTILE, sa};
use portslice_testkit::traffic::{tcp_request, tcp_server, udp_request, udp_server};
use portslice_testkit::{NODE_IP, REMOTE_IP, Topology, require_root};

#[test]
fn row1_remote_reaches_slice_pod_on_node_ip_tcp_and_udp() {
    if !require_root("row1") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    rows::row1_remote_reaches_slice_pod(&t, &t.pods[0].ns, Family::V4);
}

#[test]
fn row7_remote_reaches_host_ports_outside_every_slice() {
    if !require_root("row7") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    rows::row7_remote_reaches_host_ports_outside_every_slice(&t, Family::V4);
}

#[test]
fn row2_slice_pod_reaches_remote_from_node_ip_and_its_own_ports() {
    if !require_root("row2") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    rows::row2_slice_pod_reaches_remote_from_its_own_ports(&t, &t.pods[0].ns, Family::V4);
}

#[test]
fn row4_other_pod_reaches_slice_pod_on_node_ip() {
    if !require_root("row4") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    t.add_pod(None);
    let other = &t.pods[1];
    rows::row4_other_pod_reaches_slice_pod(&t.pods[0].ns, &other.ns, other.private_ip, Family::V4);
}

#[test]
fn row5_host_process_and_slice_pod_reach_each_other() {
    if !require_root("row5") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    rows::row5_host_process_and_slice_pod_reach_each_other(&t, &t.pods[0].ns, Family::V4);
}

#[test]
fn row6_hairpin_between_two_slices_on_node_ip() {
    if !require_root("row6") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    t.add_pod(Some(B));
    rows::row6_hairpin_between_two_slices(&t.pods[0].ns, &t.pods[1].ns, Family::V4);
}

#[test]
fn row8_ping_and_icmp_errors_reach_the_slice_pod() {
    if !require_root("row8") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    rows::row8_ping_and_icmp_errors_reach_the_slice_pod(&t.pods[0].ns, Family::V4);
}

#[test]
fn row9_hostile_pod_gets_nothing_through_outside_its_range() {
    if !require_root("row9") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A)); // the victim owns 40000-40099
    t.add_pod(Some(HOSTILE)); // the hostile pod
    t.add_pod(None); // a pod without a slice that claims the node address anyway
    rows::row9_hostile_pod_gets_nothing_through_outside_its_range(
        &t,
        &t.pods[1].ns,
        Some(&t.pods[2].ns),
        Family::V4,
    );
    // The datapath counted the drops (the hostile pod is 10.244.0.3: slice key test/slice-3).
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
    rows::row10_host_never_picks_a_pool_port_as_ephemeral(&t, Family::V4);
}

#[test]
fn row11_fragmented_udp_arrives_whole_both_ways() {
    if !require_root("row11") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    rows::row11_fragmented_udp_arrives_whole_both_ways(&t, &t.pods[0].ns, Family::V4);
}

#[test]
fn row12_two_slice_pods_ping_the_same_remote_with_the_same_id() {
    if !require_root("row12") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A));
    t.add_pod(Some(B));
    rows::row12_two_slice_pods_ping_the_same_remote_with_the_same_id(
        &t,
        &t.pods[0].ns,
        &t.pods[1].ns,
        Family::V4,
    );
}

#[test]
fn slice_traffic_creates_no_conntrack_entries() {
    if !require_root("conntrack") {
        return;
    }
    let mut t = Topology::new();
    // kube-proxy style rules make conntrack track everything the host stack sees.
    portslice_testkit::drop_conntrack_invalid(&t.node);
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
    let slice = portslice_testkit::conntrack_count(&t.node, &["-p", "tcp", "--dport", "40010"])
        + portslice_testkit::conntrack_count(&t.node, &["-p", "udp", "--dport", "40010"])
        + portslice_testkit::conntrack_count(&t.node, &["-p", "tcp", "--dport", "5000"]);
    let host = portslice_testkit::conntrack_count(
        &t.node,
        &["-p", "tcp", "--dport", &HOST_PORT.to_string()],
    );
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
    portslice_testkit::traffic::send_frag_needed(
        &t.remote,
        NODE_IP,
        local,
        sa(REMOTE_IP, 5000),
        1200,
    );
    // Steered by the quoted header's source port, the error lowers the pod's path MTU.
    let learnt = portslice_testkit::eventually(Duration::from_secs(3), || {
        let r = t.pods[0].ns.ip(&["route", "get", &REMOTE_IP.to_string()]);
        r.contains("mtu 1200").then_some(r)
    });
    assert!(learnt.is_some(), "the pod never learnt the path MTU");
    // The host did not take it: its own route to the remote is unchanged.
    let host = t.node.ip(&["route", "get", &REMOTE_IP.to_string()]);
    assert!(!host.contains("mtu 1200"), "{host}");
}
