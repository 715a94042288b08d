//! Upgrades of the pinned datapath: a node as each earlier release left it (layout 1; layout 2
//! before dual stack; their own programs, see `portslice_testkit::legacy`) taken over by this
//! build's daemon while a transfer runs, and pins this build must refuse rather than call "not
//! loaded".

use std::{
    net::{SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, links::PinnedLink};
use portslice_datapath::{DatapathError, PinnedDatapath, abi, layout, loader};
use portslice_testkit::Family;
use portslice_testkit::legacy::Release;
use portslice_testkit::rows::{self, A, ANY, B, sa};
use portslice_testkit::traffic::{
    drain, stream_for, tcp_request, tcp_server, udp_request, udp_send, udp_server,
};
use portslice_testkit::{
    METRICS, NODE_IP, REMOTE_IP, Topology, daemon_binary, legacy, require_root,
};

fn open_err(t: &Topology) -> DatapathError {
    let root = t.pin_root.clone();
    match t.node.enter(move || PinnedDatapath::open(&root)) {
        Ok(_) => panic!("opened pins this build must refuse"),
        Err(e) => e,
    }
}

/// Program id behind the tcx link pinned at `pin`.
fn link_program(pin: &std::path::Path) -> u32 {
    let link = PinnedLink::from_pin(pin).expect("pinned link");
    aya::programs::links::FdLink::from(link)
        .info()
        .expect("link info")
        .program_id()
}

#[test]
fn daemon_upgrades_layout_1_pins_under_a_running_transfer_and_old_pods_still_delete() {
    if !require_root("upgrade") {
        return;
    }
    upgrade_under_a_running_transfer(Release::Layout1);
}

/// The release before dual stack (layout 2 with the IPv4-only config, fragment keys and echo
/// slots): the upgrade is a restart on the same pod maps, and the renamed maps' old pins go.
#[test]
fn daemon_takes_over_the_release_before_dual_stack_under_a_running_transfer() {
    if !require_root("upgrade-layout2") {
        return;
    }
    upgrade_under_a_running_transfer(Release::Layout2);
}

fn upgrade_under_a_running_transfer(release: Release) {
    let mut t = Topology::bare();
    t.start_release(release);
    t.add_pod_release(release, Some(A));
    let (old_cid, old_if) = (t.pods[0].container_id.clone(), t.pods[0].host_ifindex);
    let pod_maps = |t: &Topology| {
        aya::maps::MapData::from_pin(layout::map_pin(&t.pin_root, abi::map::PORT_OWNER))
            .map(|m| m.info().unwrap().id())
            .ok()
    };
    let old_table = match release {
        // This build meets layout 1: an error, never "not loaded" (a pod would pass unprotected).
        Release::Layout1 => {
            let err = open_err(&t);
            assert!(
                matches!(&err, DatapathError::Pin { detail, .. } if detail.contains("layout 1")),
                "{err}"
            );
            None
        }
        Release::Layout2 => {
            let retired = release.maps_dir(&t.pin_root).join("config");
            assert!(retired.exists(), "the fixture pins its IPv4-only config");
            pod_maps(&t)
        }
    };

    // The first release serves the pod: a transfer into it starts before the upgrade.
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
        .expect("connect to the layout-1 pod");
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let sender = std::thread::spawn(move || stream_for(conn, s));
    let _remote = udp_server(&t.remote, ANY, 5000, "remote");
    let r = udp_request(&t.pods[0].ns, sa(ANY, 0), sa(REMOTE_IP, 5000), 10)
        .expect("layout-1 pod -> remote");
    assert!(r.starts_with("remote 198.18.0.1:"), "{r}");
    std::thread::sleep(Duration::from_millis(400));

    // The upgrade: this build's daemon starts on the layout-1 pins.
    t.start_daemon();
    std::thread::sleep(Duration::from_millis(600));

    // Layout 1 is gone (migrated), or layout 2's pod maps are the very same maps (a restart)
    // and the maps this build renamed are unpinned; this build's layout holds the old pod.
    assert!(
        !t.pin_root.join(layout::V1_MAPS).exists(),
        "layout 1 maps left"
    );
    assert!(
        !t.pin_root.join(layout::V1_PROGS).exists(),
        "layout 1 programs left"
    );
    assert!(layout::dir(&t.pin_root).is_dir());
    if let Some(id) = old_table {
        assert_eq!(
            pod_maps(&t),
            Some(id),
            "the port table was replaced, not reused"
        );
    }
    for name in abi::map::RETIRED {
        assert!(
            !layout::map_pin(&t.pin_root, name).exists(),
            "the retired map {name} is still pinned"
        );
    }
    let pods = t.with_datapath(|dp| dp.list_pods().unwrap());
    assert!(pods.iter().any(|p| p.container_id == old_cid), "{pods:?}");
    // Its egress link now runs this build's program (not just new pods).
    let pod_link = t.pin_root.join("links").join(format!("pod-{old_if}"));
    let egress = SchedClassifier::from_pin(layout::prog_pin(&t.pin_root, abi::prog::POD_EGRESS))
        .expect("pinned egress program")
        .info()
        .expect("program info")
        .id();
    assert_eq!(
        link_program(&pod_link),
        egress,
        "the old pod kept its old program"
    );
    assert_eq!(
        link_program(&loader::ingress_link_pin(&t.pin_root, "uplink")),
        SchedClassifier::from_pin(layout::prog_pin(&t.pin_root, abi::prog::INGRESS))
            .unwrap()
            .info()
            .unwrap()
            .id()
    );
    // ... and enforces through the new maps: a foreign source port is dropped and counted there.
    udp_send(&t.pods[0].ns, sa(NODE_IP, 45000), sa(REMOTE_IP, 5000)).expect("send");
    let stats = t.with_datapath(move |dp| dp.pod_stats().unwrap().get(&old_if).copied());
    assert!(
        stats.is_some_and(|s| s.drop_src_port >= 1),
        "not enforced by this build: {stats:?}"
    );
    // A new pod attaches beside it, and the two reach each other through the node address.
    t.add_pod(Some(B));
    rows::row6_hairpin_between_two_slices(&t.pods[0].ns, &t.pods[1].ns, Family::V4);
    let _srv = tcp_server(&t.pods[0].ns, ANY, 40011, "old");
    let r = tcp_request(&t.pods[1].ns, sa(NODE_IP, 40011), None).expect("new pod -> old pod");
    assert!(r.starts_with("old 198.18.0.1:"), "{r}");

    // The transfer crossed the upgrade without a lost byte.
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().unwrap().expect("sender saw no error");
    let received = receiver.join().unwrap().expect("receiver saw no error");
    assert!(sent > 1_000_000, "only {sent} bytes sent");
    assert_eq!(sent, received, "bytes lost across the upgrade");

    // DEL of the pod attached by the old release succeeds and frees everything it held.
    t.with_datapath(move |dp| dp.detach_pod(&old_cid, Some(old_if)).expect("DEL"));
    assert!(!pod_link.exists(), "the old pod's link is left");
    let again = t.attachment(0);
    t.with_datapath(move |dp| dp.attach_pod(&again).expect("its ports are free again"));

    // A restart of this build is a plain restart: the same maps, nothing migrated.
    let before = pod_maps(&t);
    t.daemon.as_mut().unwrap().kill();
    t.start_daemon();
    assert_eq!(pod_maps(&t), before);
}

/// Runs the daemon expecting it to refuse to start; returns what it logged.
fn daemon_refuses(t: &Topology) -> String {
    let mut child = t
        .node
        .command(daemon_binary().to_str().unwrap())
        .args(t.daemon_args())
        .args(["--no-cni-install", "--metrics-addr", METRICS])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning the daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut log = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut log);
            }
            assert!(!status.success(), "the daemon accepted the pins: {log}");
            return log;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started on pins it must refuse");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pins_of_another_layout_are_an_error_never_not_loaded_and_the_daemon_refuses_them() {
    if !require_root("upgrade-refuse") {
        return;
    }
    let t = Topology::bare();
    // Nothing pinned: not loaded.
    assert!(
        matches!(open_err(&t), DatapathError::NotLoaded { .. }),
        "an empty root is 'not loaded'"
    );

    // A version record of a newer layout (a downgrade): an error, and the daemon leaves it.
    let newer = layout::version_dir(&t.pin_root, abi::ABI_VERSION + 7);
    std::fs::create_dir_all(&newer).unwrap();
    let err = open_err(&t);
    assert!(
        matches!(&err, DatapathError::Pin { detail, .. } if detail.contains("layout 9")),
        "{err}"
    );
    let log = daemon_refuses(&t);
    assert!(log.contains("layout 9"), "{log}");
    assert!(newer.is_dir(), "the daemon touched a newer layout's pins");
    std::fs::remove_dir(&newer).unwrap();

    // Maps of another shape under this layout's own directory (layout 1's maps pinned there):
    // open() and the daemon both refuse them instead of reading them with the wrong layout.
    let root = t.pin_root.clone();
    t.node
        .enter(move || legacy::load_into(Release::Layout1, &root, &layout::maps_dir(&root), None))
        .expect("pinning layout-1 maps under v2");
    let err = open_err(&t);
    assert!(matches!(err, DatapathError::Pin { .. }), "{err}");
    let log = daemon_refuses(&t);
    assert!(
        log.contains("expects") && log.contains("pod_stats"),
        "the daemon did not name the mismatch: {log}"
    );
    // The topology's Drop uninstalls whatever is pinned.
}
