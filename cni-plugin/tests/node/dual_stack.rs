//! A node that shares both of its addresses (`--node-ip 198.18.0.1,2001:2::1`): one slice pod
//! owns its ports on both, from one socket; pods whose primary plugin gave them only one family
//! work on that family; a plain pod of either family is never touched. Plain veths and the CNI
//! chain behind ptp (host-local with an IPv4 and an IPv6 range).

use std::net::{IpAddr, Ipv6Addr};

use portslice_testkit::cni_node::{CniNode, Primary};
use portslice_testkit::rows::{self, A, B, any, sock};
use portslice_testkit::traffic::{tcp_request, tcp_server};
use portslice_testkit::{
    Family, NODE_IP, NODE_IP6, REMOTE_IP, REMOTE_IP6, Stack, Topology, require_root,
};

const BOTH: [Family; 2] = [Family::V4, Family::V6];

/// The dual-stack row: the remote reaches the same pod on both node addresses, and the pod
/// reaches the remote from each address and its own ports.
#[test]
fn one_slice_pod_answers_on_both_node_addresses() {
    if !require_root("dual row") {
        return;
    }
    let mut t = Topology::new_with(Stack::Dual);
    t.add_pod(Some(A));
    for f in BOTH {
        rows::row1_remote_reaches_slice_pod(&t, &t.pods[0].ns, f);
        rows::row2_slice_pod_reaches_remote_from_its_own_ports(&t, &t.pods[0].ns, f);
    }
    // One dual-stack socket ([::], not V6ONLY) serves both addresses.
    let _srv = tcp_server(&t.pods[0].ns, Ipv6Addr::UNSPECIFIED, 40011, "both");
    for (node, remote) in [
        (IpAddr::from(NODE_IP), IpAddr::from(REMOTE_IP)),
        (NODE_IP6.into(), REMOTE_IP6.into()),
    ] {
        let r = tcp_request(&t.remote, sock(node, 40011), None)
            .unwrap_or_else(|e| panic!("remote -> {node}:40011: {e}"));
        assert!(r.starts_with("both "), "{r}");
        let peer = rows::peer_addr(&r).ip().to_canonical();
        assert_eq!(peer, remote, "{r}");
    }
}

/// Through the CNI chain: the slice pod's result carries both node addresses (/32 and /128),
/// and rows 1, 2, 5 and 6 hold on both families.
#[test]
fn the_cni_chain_gives_a_dual_stack_slice_pod_both_node_addresses() {
    if !require_root("dual cni") {
        return;
    }
    let mut n = CniNode::with(Stack::Dual, Primary::Ptp);
    let a = n.add(Some(A));
    let b = n.add(Some(B));
    let ips: Vec<String> = n.pods[a].result.as_ref().expect("result")["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|ip| ip["address"].as_str().map(str::to_string))
        .collect();
    for want in [format!("{NODE_IP}/32"), format!("{NODE_IP6}/128")] {
        assert!(ips.contains(&want), "the result lists {want}: {ips:?}");
    }
    for f in BOTH {
        rows::row1_remote_reaches_slice_pod(&n.t, n.ns(a), f);
        rows::row2_slice_pod_reaches_remote_from_its_own_ports(&n.t, n.ns(a), f);
        rows::row5_host_process_and_slice_pod_reach_each_other(&n.t, n.ns(a), f);
        rows::row6_hairpin_between_two_slices(n.ns(a), n.ns(b), f);
    }
    n.check(a).unwrap_or_else(|e| panic!("CHECK: {e:?}"));
}

/// A dual-stack node whose primary gives pods one family: slice pods hold the node address of
/// that family (and get no other), plain pods keep their result untouched.
#[test]
fn pods_of_one_family_work_on_a_dual_stack_node() {
    if !require_root("dual one family") {
        return;
    }
    for (pods, f, other) in [
        (Stack::V4, Family::V4, Family::V6),
        (Stack::V6, Family::V6, Family::V4),
    ] {
        let mut n = CniNode::with_pods(Stack::Dual, pods, Primary::Ptp);
        let a = n.add(Some(A));
        rows::row1_remote_reaches_slice_pod(&n.t, n.ns(a), f);
        let node_other = portslice_testkit::node_ip(other);
        let text = n.pods[a].result.as_ref().expect("result").to_string();
        assert!(
            !text.contains(&node_other.to_string()),
            "a {f:?}-only pod gets no {other:?} node address: {text}"
        );
        let plain = n.add(None);
        let _srv = tcp_server(n.ns(a), any(f), 40010, "slice");
        let r = tcp_request(
            n.ns(plain),
            sock(portslice_testkit::node_ip(f), 40010),
            None,
        )
        .expect("a plain pod reaches the slice pod on the node address");
        assert!(r.starts_with("slice "), "{r}");
    }
}
