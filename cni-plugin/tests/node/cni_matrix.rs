//! The connectivity matrix of DESIGN.md, with every pod created through the real CNI chain:
//! Debian's ptp + host-local, then the built `portslice` binary, invoked as a runtime invokes
//! them, against the node daemon's real eBPF datapath (root; skipped loudly otherwise). The
//! datapath's own tests (`veth_matrix.rs`) prove the rows with hand-wired veths; these prove
//! that what the plugin wires gives the same, with the same row checks (`portslice_testkit::rows`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use portslice_testkit::Family;
use portslice_testkit::cni_node::CniNode;
use portslice_testkit::rows::{self, A, ANY, B, HOSTILE, peer, sa};
use portslice_testkit::traffic::{tcp_request, tcp_server, udp_request, udp_server};
use portslice_testkit::{NODE_IP, require_root};

#[test]
fn row1_remote_reaches_the_cni_slice_pod_on_node_ip() {
    if !require_root("matrix row1") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    rows::row1_remote_reaches_slice_pod(&n.t, n.ns(a), Family::V4);
}

#[test]
fn row2_cni_slice_pod_reaches_remote_from_node_ip_and_its_own_ports() {
    if !require_root("matrix row2") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    rows::row2_slice_pod_reaches_remote_from_its_own_ports(&n.t, n.ns(a), Family::V4);
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
    rows::row4_other_pod_reaches_slice_pod(
        n.ns(a),
        n.ns(other),
        n.pods[other].private_ip(),
        Family::V4,
    );
}

#[test]
fn row5_host_process_and_cni_slice_pod_reach_each_other() {
    if !require_root("matrix row5") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    rows::row5_host_process_and_slice_pod_reach_each_other(&n.t, n.ns(a), Family::V4);
}

#[test]
fn row6_hairpin_between_two_cni_slice_pods() {
    if !require_root("matrix row6") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let b = n.add(Some(B));
    rows::row6_hairpin_between_two_slices(n.ns(a), n.ns(b), Family::V4);
}

#[test]
fn row7_remote_reaches_host_ports_outside_every_slice() {
    if !require_root("matrix row7") {
        return;
    }
    let mut n = CniNode::new();
    let _a = n.add(Some(A));
    rows::row7_remote_reaches_host_ports_outside_every_slice(&n.t, Family::V4);
}

#[test]
fn row8_ping_and_icmp_errors_reach_the_cni_slice_pod() {
    if !require_root("matrix row8") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    rows::row8_ping_and_icmp_errors_reach_the_slice_pod(n.ns(a), Family::V4);
}

#[test]
fn row9_a_hostile_cni_pod_gets_nothing_through_outside_its_range() {
    if !require_root("matrix row9") {
        return;
    }
    let mut n = CniNode::new();
    let _victim = n.add(Some(A));
    let hostile = n.add(Some(HOSTILE));
    rows::row9_hostile_pod_gets_nothing_through_outside_its_range(
        &n.t,
        n.ns(hostile),
        None,
        Family::V4,
    );
}

#[test]
fn row10_host_never_picks_a_pool_port_while_cni_pods_run() {
    if !require_root("matrix row10") {
        return;
    }
    let mut n = CniNode::new();
    let _a = n.add(Some(A));
    rows::row10_host_never_picks_a_pool_port_as_ephemeral(&n.t, Family::V4);
}

#[test]
fn row11_fragmented_udp_reaches_the_cni_slice_pod_whole() {
    if !require_root("matrix row11") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    rows::row11_fragmented_udp_arrives_whole_both_ways(&n.t, n.ns(a), Family::V4);
}

#[test]
fn row12_two_cni_slice_pods_ping_the_same_remote_with_the_same_id() {
    if !require_root("matrix row12") {
        return;
    }
    let mut n = CniNode::new();
    let a = n.add(Some(A));
    let b = n.add(Some(B));
    rows::row12_two_slice_pods_ping_the_same_remote_with_the_same_id(
        &n.t,
        n.ns(a),
        n.ns(b),
        Family::V4,
    );
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
