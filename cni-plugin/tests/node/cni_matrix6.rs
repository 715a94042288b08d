//! The connectivity matrix of DESIGN.md on IPv6 with every pod created through the real CNI
//! chain: an IPv6-only node (`nodeIP` 2001:2::1), Debian's ptp or bridge with host-local IPv6
//! ranges, then the built `portslice` binary, against the daemon's real eBPF datapath. The same
//! row checks as `cni_matrix.rs` (`portslice_testkit::rows`), with the IPv6 family, behind both
//! primaries: ptp (an L3 veth per pod) and bridge (one L2 segment, where the pods' neighbour
//! discovery from the node address is seen by every pod).

use portslice_testkit::cni_node::{CniNode, Primary};
use portslice_testkit::rows::{self, A, B, HOSTILE, any, peer_addr, sock};
use portslice_testkit::traffic::{tcp_request, tcp_server, udp_request, udp_server};
use portslice_testkit::{Family, Stack, require_root};

const V6: Family = Family::V6;
const PRIMARIES: [Primary; 2] = [Primary::Ptp, Primary::Bridge];

fn node(primary: Primary) -> CniNode {
    CniNode::with(Stack::V6, primary)
}

#[test]
fn row1_remote_reaches_the_cni_slice_pod_on_node_ipv6() {
    if !require_root("matrix6 row1") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        rows::row1_remote_reaches_slice_pod(&n.t, n.ns(a), V6);
        n.check(a).unwrap_or_else(|e| panic!("{p:?}: CHECK: {e:?}"));
    }
}

#[test]
fn row2_cni_slice_pod_reaches_remote_from_node_ipv6_and_its_own_ports() {
    if !require_root("matrix6 row2") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        rows::row2_slice_pod_reaches_remote_from_its_own_ports(&n.t, n.ns(a), V6);
    }
}

#[test]
fn row3_cni_slice_pod_reaches_cluster_ipv6_addresses_from_its_private_address() {
    if !require_root("matrix6 row3") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        let dns = n.add(None);
        let dns_ip = n.pods[dns].private(V6);
        let _t = tcp_server(n.ns(dns), any(V6), 53, "dns");
        let _u = udp_server(n.ns(dns), any(V6), 53, "dns");
        let a_private = n.pods[a].private(V6);
        let r =
            tcp_request(n.ns(a), sock(dns_ip, 53), None).expect("TCP slice pod -> cluster address");
        assert_eq!(peer_addr(&r).ip(), a_private, "{p:?}: {r}");
        let r = udp_request(n.ns(a), sock(any(V6), 0), sock(dns_ip, 53), 10)
            .expect("UDP slice pod -> cluster address");
        assert_eq!(peer_addr(&r).ip(), a_private, "{p:?}: {r}");
    }
}

#[test]
fn row4_other_cni_pod_reaches_the_slice_pod_on_node_ipv6() {
    if !require_root("matrix6 row4") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        let other = n.add(None);
        let other_ip = n.pods[other].private(V6);
        rows::row4_other_pod_reaches_slice_pod(n.ns(a), n.ns(other), other_ip, V6);
    }
}

#[test]
fn row5_host_process_and_cni_slice_pod_reach_each_other_on_ipv6() {
    if !require_root("matrix6 row5") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        rows::row5_host_process_and_slice_pod_reach_each_other(&n.t, n.ns(a), V6);
    }
}

#[test]
fn row6_hairpin_between_two_cni_slice_pods_on_ipv6() {
    if !require_root("matrix6 row6") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        let b = n.add(Some(B));
        rows::row6_hairpin_between_two_slices(n.ns(a), n.ns(b), V6);
    }
}

#[test]
fn row7_remote_reaches_host_ports_outside_every_slice_on_ipv6() {
    if !require_root("matrix6 row7") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let _a = n.add(Some(A));
        rows::row7_remote_reaches_host_ports_outside_every_slice(&n.t, V6);
    }
}

#[test]
fn row8_ping6_and_icmpv6_errors_reach_the_cni_slice_pod() {
    if !require_root("matrix6 row8") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        rows::row8_ping_and_icmp_errors_reach_the_slice_pod(n.ns(a), V6);
    }
}

#[test]
fn row9_a_hostile_cni_pod_gets_nothing_through_outside_its_range_on_ipv6() {
    if !require_root("matrix6 row9") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let _victim = n.add(Some(A));
        let hostile = n.add(Some(HOSTILE));
        rows::row9_hostile_pod_gets_nothing_through_outside_its_range(
            &n.t,
            n.ns(hostile),
            None,
            V6,
        );
    }
}

#[test]
fn row10_host_never_picks_a_pool_port_while_cni_pods_run_on_ipv6() {
    if !require_root("matrix6 row10") {
        return;
    }
    let mut n = node(Primary::Ptp);
    let _a = n.add(Some(A));
    rows::row10_host_never_picks_a_pool_port_as_ephemeral(&n.t, V6);
}

#[test]
fn row11_fragmented_udp_reaches_the_cni_slice_pod_whole_on_ipv6() {
    if !require_root("matrix6 row11") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        rows::row11_fragmented_udp_arrives_whole_both_ways(&n.t, n.ns(a), V6);
    }
}

#[test]
fn row12_two_cni_slice_pods_ping6_the_same_remote_with_the_same_id() {
    if !require_root("matrix6 row12") {
        return;
    }
    for p in PRIMARIES {
        let mut n = node(p);
        let a = n.add(Some(A));
        let b = n.add(Some(B));
        rows::row12_two_slice_pods_ping_the_same_remote_with_the_same_id(
            &n.t,
            n.ns(a),
            n.ns(b),
            V6,
        );
    }
}
