//! The clsact fallback (kernels before 6.6): the same datapath attached through a clsact qdisc
//! and direct-action filters instead of tcx links. Its own test binary, because the mode is
//! chosen by an environment variable the daemon child process inherits.

use std::net::{Ipv4Addr, SocketAddrV4};

use portslice_testkit::traffic::{tcp_request, tcp_server, udp_request, udp_server};
use portslice_testkit::{NODE_IP, REMOTE_IP, Topology, require_root};

#[test]
fn clsact_fallback_steers_enforces_and_detaches() {
    if !require_root("clsact") {
        return;
    }
    // SAFETY: the only test in this binary; set before any thread reads the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PORTSLICE_ATTACH_MODE", "clsact")
    };
    let mut t = Topology::new();
    t.add_pod(Some((40000, 40099)));
    let filters = t.node.run(
        "tc",
        &[
            "filter",
            "show",
            "dev",
            portslice_testkit::UPLINK,
            "ingress",
        ],
    );
    assert!(
        filters.contains("ps_ingress") && filters.contains("direct-action"),
        "{filters}"
    );
    let any = Ipv4Addr::UNSPECIFIED;
    let _tcp = tcp_server(&t.pods[0].ns, any, 40010, "pod");
    let _remote = udp_server(&t.remote, any, 5000, "remote");
    let r = tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 40010), None).expect("remote -> pod");
    assert!(r.starts_with("pod "), "{r}");
    let r = udp_request(
        &t.pods[0].ns,
        SocketAddrV4::new(any, 0),
        SocketAddrV4::new(REMOTE_IP, 5000),
        10,
    )
    .expect("pod -> remote");
    let src: SocketAddrV4 = r
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("reply");
    assert!(
        *src.ip() == NODE_IP && (40000..=40099).contains(&src.port()),
        "{r}"
    );

    let (cid, ifx, veth) = (
        t.pods[0].container_id.clone(),
        t.pods[0].host_ifindex,
        t.pods[0].host_veth.clone(),
    );
    t.with_datapath(move |dp| dp.detach_pod(&cid, Some(ifx)).unwrap());
    let filters = t
        .node
        .run("tc", &["filter", "show", "dev", &veth, "ingress"]);
    assert!(
        !filters.contains("ps_pod_egress"),
        "filter left on the pod veth: {filters}"
    );
}
