//! The node daemon and the pinned-state API, against the real kernel: restarts keep traffic
//! flowing, install/uninstall round-trips, reconcile, idempotent attach/detach.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::MapData;
use portslice_datapath::{DatapathError, PodAttachment, PortRange, Protocol, SliceBinding};
use portslice_testkit::traffic::{drain, stream_for, tcp_request, tcp_server};
use portslice_testkit::{NODE_IP, Topology, eventually, require_root};

fn map_id(t: &Topology, name: &str) -> u32 {
    let p = portslice_datapath::layout::map_pin(&t.pin_root, name);
    MapData::from_pin(&p).unwrap().info().unwrap().id()
}

#[test]
fn daemon_killed_and_restarted_during_a_tcp_transfer_loses_no_connection() {
    if !require_root("restart") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some((40000, 40099)));
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
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let sender = std::thread::spawn(move || stream_for(conn, s));
    let before = map_id(&t, "port_owner");

    std::thread::sleep(Duration::from_millis(500));
    t.daemon.as_mut().unwrap().kill(); // SIGKILL: no chance to clean up
    std::thread::sleep(Duration::from_millis(700)); // traffic keeps flowing with no daemon
    t.start_daemon(); // reloads, reuses pinned maps, swaps programs under the pinned links
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);

    let sent = sender.join().unwrap().expect("sender saw no error");
    let received = receiver.join().unwrap().expect("receiver saw no error");
    assert!(sent > 1_000_000, "only {sent} bytes sent");
    assert_eq!(sent, received, "bytes lost across the restart");
    assert_eq!(
        map_id(&t, "port_owner"),
        before,
        "restart created a new port table instead of reusing the pin"
    );
    // State kept, new connections still work.
    let pods = t.with_datapath(|dp| dp.list_pods().unwrap());
    assert_eq!(pods.len(), 1);
    let _srv = tcp_server(&t.pods[0].ns, Ipv4Addr::UNSPECIFIED, 40011, "pod");
    assert!(tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 40011), None).is_ok());
}

#[test]
fn daemon_installs_itself_and_uninstall_undoes_everything() {
    if !require_root("install") {
        return;
    }
    let mut t = Topology::bare();
    let dir = std::env::temp_dir().join(format!("portslice-install-{}", t.id));
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let original = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.0.0/24"}]]}}]}"#;
    std::fs::write(conf.join("10-ptp.conflist"), original).unwrap();
    // 40005 lies in the pool: uninstall must still put it back, exactly as found.
    t.node.run(
        "sh",
        &[
            "-c",
            "echo 22,40005 > /proc/sys/net/ipv4/ip_local_reserved_ports",
        ],
    );
    t.start_daemon_with(&[
        "--cni-bin-dir",
        bin.to_str().unwrap(),
        "--cni-conf-dir",
        conf.to_str().unwrap(),
    ]);

    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("10-ptp.conflist")).unwrap())
            .unwrap();
    assert_eq!(list["plugins"][1]["type"], "portslice", "{list}");
    assert_eq!(list["plugins"][1]["nodeIP"], NODE_IP.to_string());
    assert!(bin.join("portslice").exists());
    let reserved = t
        .node
        .run("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    assert_eq!(reserved.trim(), format!("22,{}", portslice_testkit::POOL));

    // A restart is idempotent: one entry, same file.
    t.daemon.as_mut().unwrap().kill();
    t.start_daemon_with(&[
        "--cni-bin-dir",
        bin.to_str().unwrap(),
        "--cni-conf-dir",
        conf.to_str().unwrap(),
    ]);
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("10-ptp.conflist")).unwrap())
            .unwrap();
    assert_eq!(again, list);

    t.daemon.as_mut().unwrap().kill();
    let out = t
        .node
        .command(portslice_testkit::daemon_binary().to_str().unwrap())
        .args(t.daemon_args())
        .args([
            "--cni-bin-dir",
            bin.to_str().unwrap(),
            "--cni-conf-dir",
            conf.to_str().unwrap(),
            "--uninstall",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("10-ptp.conflist")).unwrap())
            .unwrap();
    assert_eq!(
        after,
        serde_json::from_str::<serde_json::Value>(original).unwrap()
    );
    assert!(!bin.join("portslice").exists());
    assert!(!t.pin_root.exists(), "pins left behind");
    let reserved = t
        .node
        .run("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    assert_eq!(reserved.trim(), "22,40005", "restored exactly as found");
    let attached = t.node.enter(|| {
        aya::programs::SchedClassifier::query_tcx(
            portslice_testkit::UPLINK,
            aya::programs::TcAttachType::Ingress,
        )
        .map(|(_, progs)| progs.len())
    });
    assert_eq!(attached.unwrap(), 0, "program still attached to the uplink");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reconcile_removes_attachments_of_pods_that_are_gone() {
    if !require_root("reconcile") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some((40000, 40099)));
    t.pods.clear(); // the pod's netns (and its veth) disappear without a CNI DEL
    let gone = eventually(Duration::from_secs(5), || {
        t.with_datapath(|dp| dp.list_pods().unwrap())
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "stale attachment not reconciled");
    // Its ports are free again for a new pod.
    t.add_pod(Some((40000, 40099)));
}

fn attachment(pod: &portslice_testkit::Pod, range: (u16, u16)) -> PodAttachment {
    PodAttachment {
        container_id: pod.container_id.clone(),
        host_veth_ifindex: pod.host_ifindex,
        pod_private_ip: pod.private_ip,
        slice: Some(SliceBinding {
            slice_key: "test/x".into(),
            range: PortRange {
                start: range.0,
                end: range.1,
            },
            protocols: vec![Protocol::TCP, Protocol::UDP],
        }),
    }
}

#[test]
fn attach_is_idempotent_checkable_and_detach_tolerates_anything() {
    if !require_root("api") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some((40000, 40099)));
    t.add_pod(None);
    let a = attachment(&t.pods[0], (40000, 40099));
    let mut conflicting = attachment(&t.pods[1], (40050, 40060));
    conflicting.container_id = "other".into();
    let r = t.with_datapath(move |dp| {
        // The harness attached `a` with another slice key: attaching the new one replaces it.
        dp.attach_pod(&a).unwrap();
        dp.attach_pod(&a).unwrap();
        dp.check_pod(&a).unwrap();
        let listed = dp.list_pods().unwrap();
        assert!(listed.contains(&a), "{listed:?}");
        let err = dp.attach_pod(&conflicting).unwrap_err();
        assert!(
            matches!(err, DatapathError::PortTaken { port: 40050, .. }),
            "{err}"
        );
        // A refused attach leaves nothing behind, and did not disturb the owner.
        assert!(
            !dp.list_pods()
                .unwrap()
                .iter()
                .any(|p| p.container_id == "other")
        );
        dp.check_pod(&a).unwrap();
        dp.detach_pod(&a.container_id, Some(a.host_veth_ifindex))
            .unwrap();
        dp.detach_pod(&a.container_id, Some(a.host_veth_ifindex))
            .unwrap();
        dp.detach_pod("never-seen", None).unwrap();
        assert!(dp.check_pod(&a).is_err());
        let removed = dp.gc(&[]).unwrap();
        (removed, dp.list_pods().unwrap().len())
    });
    assert_eq!(r.1, 0);
    assert_eq!(
        r.0.len(),
        1,
        "GC removes the non-slice pod's attachment: {:?}",
        r.0
    );
    // Detached: remote traffic to the old slice port now reaches the host, not the pod.
    let _pod = tcp_server(&t.pods[0].ns, Ipv4Addr::UNSPECIFIED, 40010, "pod");
    assert!(tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 40010), None).is_err());
}

#[test]
fn metrics_count_per_slice_traffic() {
    if !require_root("metrics") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some((40000, 40099)));
    let _pod = tcp_server(&t.pods[0].ns, Ipv4Addr::UNSPECIFIED, 40010, "pod");
    for _ in 0..3 {
        tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 40010), None).unwrap();
    }
    let m = t.metrics_get("/metrics").unwrap();
    let rx: u64 = m
        .lines()
        .find(|l| l.starts_with("portslice_slice_rx_packets_total{slice=\"test/slice-2\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{m}"));
    assert!(rx >= 9, "3 connections are at least 9 packets in: {rx}");
    assert!(m.contains("portslice_attached_pods 1"), "{m}");
}

#[test]
fn daemon_chains_behind_a_single_plugin_conf_and_uninstall_restores_it() {
    if !require_root("install-conf") {
        return;
    }
    let mut t = Topology::bare();
    let dir = std::env::temp_dir().join(format!("portslice-conf-{}", t.id));
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    let original = r#"{"cniVersion":"0.4.0","name":"br","type":"bridge","bridge":"cni0"}"#;
    std::fs::write(conf.join("10-bridge.conf"), original).unwrap();
    let dirs = [
        "--cni-bin-dir",
        bin.to_str().unwrap(),
        "--cni-conf-dir",
        conf.to_str().unwrap(),
    ];
    t.start_daemon_with(&dirs);
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("10-bridge.conflist")).unwrap())
            .unwrap();
    assert_eq!(list["plugins"][0]["type"], "bridge");
    assert_eq!(list["plugins"][1]["type"], "portslice");
    assert!(
        !conf.join("10-bridge.conf").exists(),
        "the .conf would shadow nothing but confuse readers"
    );
    t.daemon.as_mut().unwrap().kill();
    let out = t
        .node
        .command(portslice_testkit::daemon_binary().to_str().unwrap())
        .args(t.daemon_args())
        .args(dirs)
        .arg("--uninstall")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(conf.join("10-bridge.conf")).unwrap(),
        original
    );
    assert!(!conf.join("10-bridge.conflist").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// kind's kindnet (like Flannel and Calico) writes a 0.3.1 conflist: the daemon joins it, and
/// logs and exports what it found.
#[test]
fn daemon_joins_a_kindnet_0_3_1_conflist_and_exports_what_it_found() {
    if !require_root("install-kindnet") {
        return;
    }
    let mut t = Topology::bare();
    let dir = std::env::temp_dir().join(format!("portslice-kindnet-{}", t.id));
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    let kindnet = r#"{"cniVersion":"0.3.1","name":"kindnet","plugins":[{"type":"ptp","ipMasq":false,"ipam":{"type":"host-local","dataDir":"/run/cni-ipam-state","routes":[{"dst":"0.0.0.0/0"}],"ranges":[[{"subnet":"10.244.1.0/24"}]]},"mtu":1500},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
    std::fs::write(conf.join("10-kindnet.conflist"), kindnet).unwrap();
    t.start_daemon_with(&[
        "--cni-bin-dir",
        bin.to_str().unwrap(),
        "--cni-conf-dir",
        conf.to_str().unwrap(),
    ]);
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("10-kindnet.conflist")).unwrap())
            .unwrap();
    assert_eq!(
        list["cniVersion"], "0.3.1",
        "the primary CNI's version stays"
    );
    assert_eq!(list["plugins"][2]["type"], "portslice");
    let m = t.metrics_get("/metrics").unwrap();
    assert!(m.contains("portslice_cni_conflist_found 1"), "{m}");
    assert!(
        m.contains(r#"portslice_cni_conflist_info{file="10-kindnet.conflist",cni_version="0.3.1",plugins="ptp,portmap,portslice",supported="true"} 1"#),
        "{m}"
    );
    t.daemon.as_mut().unwrap().kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rolling update runs the old daemon beside the new one for its grace period, and the old
/// one's token dies with its pod: once the new daemon has written the plugin's kubeconfig, the
/// old one must not put its token back (it did, and every slice pod's ADD then got 401).
#[test]
fn an_old_daemon_in_its_grace_period_does_not_overwrite_the_new_ones_kubeconfig() {
    if !require_root("daemon_kubeconfig_handover") {
        return;
    }
    let dir = portslice_testkit::runtime::TempDir::new("handover");
    let out = dir.0.join("cni-kubeconfig");
    let ca = dir.0.join("ca.crt");
    std::fs::write(&ca, "PEM").unwrap();
    let start = |t: &mut Topology, token: &str| {
        let file = dir.0.join(token);
        std::fs::write(&file, token).unwrap();
        t.start_daemon_with(&[
            "--no-cni-install",
            "--kubeconfig-out",
            out.to_str().unwrap(),
            "--token-file",
            file.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
            "--api-server",
            "https://198.18.0.1:6443",
            // No API server answers there: nothing to detect the CIDRs from.
            "--cluster-cidrs",
            "10.244.0.0/16",
        ]);
    };
    let has = |token: &str| {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains(&format!("token: \"{token}\""))
    };
    let (mut old, mut new) = (Topology::bare(), Topology::bare());
    start(&mut old, "old-token");
    assert!(has("old-token"));
    start(&mut new, "new-token");
    assert!(has("new-token"), "the new daemon writes at start");
    // Both reconcile every second: give the old one several chances, and look often (the new
    // one would put its token back a moment later too).
    let watch = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < watch {
        assert!(
            has("new-token"),
            "the old daemon put its token back: {}",
            std::fs::read_to_string(&out).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A deleted file is written again, by whichever daemon still runs.
    drop(old);
    std::fs::remove_file(&out).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || has("new-token").then_some(())).is_some(),
        "the new daemon rewrites a deleted kubeconfig"
    );
}

/// `--uplink auto` on a node whose shared address sits on no interface (a cloud 1:1 NAT public
/// address): the daemon stops before touching anything, with an error that names the address
/// and the chart values to set instead.
#[test]
fn an_address_on_no_interface_stops_the_daemon_naming_the_values_to_set() {
    if !require_root("daemon_uplink_auto") {
        return;
    }
    let t = Topology::bare();
    let mut args = t.daemon_args();
    // The topology's own address and uplink out; a public address this node does not hold in.
    let at = args
        .iter()
        .position(|a| a == "--node-ip")
        .expect("--node-ip");
    args.drain(at..at + 2);
    let at = args.iter().position(|a| a == "--uplink").expect("--uplink");
    args.drain(at..at + 2);
    let mut child = t
        .node
        .command(portslice_testkit::daemon_binary().to_str().unwrap())
        .args(&args)
        .args([
            "--uplink",
            "auto",
            "--node-ip",
            "198.18.99.99",
            "--no-cni-install",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running the daemon");
    // A daemon that does not refuse runs on: give it 10 s, then stop it and fail.
    let status = eventually(Duration::from_secs(10), || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("the daemon's output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some_and(|s| !s.success()),
        "the daemon started on an address no interface holds: {log}"
    );
    for want in ["198.18.99.99", "node.uplink", "node.ip"] {
        assert!(log.contains(want), "the error names {want}: {log}");
    }
    assert!(
        !t.pin_root.join("links").exists(),
        "the daemon attached something before refusing"
    );
}
