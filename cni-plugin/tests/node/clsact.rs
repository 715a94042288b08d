//! The clsact fallback (kernels before 6.6): the same datapath attached through a clsact qdisc
//! and direct-action filters instead of tcx links. The mode is chosen by an environment variable
//! (the daemon child process inherits it), so this suite runs on its own (`clsact::`, as
//! test-datapath.sh does): every test of it sets the same value.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use portslice_testkit::traffic::{
    drain, stream_for, tcp_request, tcp_server, udp_request, udp_seq_counter, udp_seq_stream,
    udp_server,
};
use portslice_testkit::{NODE_IP, Netns, REMOTE_IP, Topology, UPLINK, require_root};

fn clsact_mode() {
    // SAFETY: set before this suite's threads read the environment; every test of the suite
    // sets the same value, and the suite runs alone.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PORTSLICE_ATTACH_MODE", "clsact")
    };
}

/// Our filters (`ps_*` programs) on `dev`'s ingress, as `tc` lists them.
fn our_filters(node: &Netns, dev: &str) -> Vec<String> {
    node.run("tc", &["filter", "show", "dev", dev, "ingress"])
        .lines()
        .filter(|l| l.contains("ps_"))
        .map(str::to_string)
        .collect()
}

/// `Udp: NoPorts` of the netns: datagrams the host stack got for a port nobody holds.
fn udp_no_ports(ns: &Netns) -> u64 {
    let snmp = ns.run("cat", &["/proc/net/snmp"]);
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        panic!("no Udp lines in {snmp}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "NoPorts")
        .and_then(|(_, v)| v.parse().ok())
        .expect("Udp NoPorts")
}

#[test]
fn clsact_fallback_steers_enforces_and_detaches() {
    if !require_root("clsact") {
        return;
    }
    clsact_mode();
    let mut t = Topology::new();
    t.add_pod(Some((40000, 40099)));
    // The pod's egress filter is really there (in clsact mode "attached" cannot be asked, and
    // attach used to trust it and never add the filter).
    let veth = t.pods[0].host_veth.clone();
    let egress = our_filters(&t.node, &veth);
    assert!(
        egress.len() == 1 && egress[0].contains("ps_pod_egress"),
        "{egress:?}"
    );
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

/// A daemon restart in clsact mode replaces the filters in place: a TCP transfer and a datagram
/// stream into the pod cross five restarts without a lost datagram, and nothing meant for the
/// pod reaches the host stack in between (which would answer a TCP segment with a reset and a
/// datagram with port unreachable).
#[test]
fn clsact_daemon_restarts_replace_filters_in_place_and_drop_nothing() {
    if !require_root("clsact-restart") {
        return;
    }
    clsact_mode();
    let mut t = Topology::new();
    t.add_pod(Some((40000, 40099)));
    let veth = t.pods[0].host_veth.clone();
    let listener = t.pods[0]
        .ns
        .enter(|| TcpListener::bind("0.0.0.0:40010").unwrap());
    let receiver = std::thread::spawn(move || drain(listener.accept().unwrap().0));
    let conn = t
        .remote
        .enter(|| {
            TcpStream::connect_timeout(
                &SocketAddrV4::new(NODE_IP, 40010).into(),
                Duration::from_secs(3),
            )
        })
        .expect("connect to the slice pod");
    let (_seq, seen) = udp_seq_counter(&t.pods[0].ns, Ipv4Addr::UNSPECIFIED, 40011);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let s = stop.clone();
        std::thread::spawn(move || stream_for(conn, s))
    };
    let stream = udp_seq_stream(
        &t.remote,
        SocketAddrV4::new(REMOTE_IP, 0),
        SocketAddrV4::new(NODE_IP, 40011),
        Duration::from_micros(50),
        stop.clone(),
    );
    let no_ports = udp_no_ports(&t.node);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        t.daemon.as_mut().unwrap().kill();
        t.start_daemon();
        // One filter each, ours, the same priority and handle: replaced, not added beside.
        for dev in [UPLINK, veth.as_str()] {
            let f = our_filters(&t.node, dev);
            assert_eq!(f.len(), 1, "{dev}: {f:?}");
            assert!(
                f[0].contains("pref 20563") && f[0].contains("handle 0x50530001"),
                "{f:?}"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let datagrams = stream.join().unwrap();
    let sent = sender
        .join()
        .unwrap()
        .expect("the transfer survived the restarts");
    let received = receiver.join().unwrap().expect("receiver saw no error");
    assert!(sent > 1_000_000, "only {sent} bytes sent");
    assert_eq!(sent, received, "bytes lost across the restarts");
    std::thread::sleep(Duration::from_millis(200));
    let got = seen
        .lock()
        .unwrap()
        .get(&REMOTE_IP)
        .map_or(0, |s| s.len() as u64);
    assert!(datagrams > 5_000, "only {datagrams} datagrams sent");
    assert_eq!(got, datagrams, "datagrams lost across the restarts");
    assert_eq!(
        udp_no_ports(&t.node) - no_ports,
        0,
        "datagrams for the pod reached the host stack during a restart"
    );
}
