//! Who may hold which ports, on the node: the CNI plugin's own line of defence. The node's own
//! ports and its host listeners are never a slice's, whatever a static slice or CNI_ARGS range
//! says; a slice's exact ports outside the pool are reserved on the host while its pod runs; DEL
//! puts back every sysctl ADD changed; concurrent verbs on one node are serialised.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use portslice_cni::node::lock::NodeLock;
use portslice_testkit::runtime::{
    CniPod, Conflist, Runtime, TempDir, datapath_has, leftovers, portslice_conf, sysctl_in,
};
use portslice_testkit::traffic::{tcp_request, tcp_server};
use portslice_testkit::{NODE_IP, POOL, Topology, require_root};
use serde_json::{Value, json};

fn runtime<'a>(t: &'a Topology, ipam: &TempDir, extra: Value) -> Runtime<'a> {
    let mut ps = portslice_conf(t);
    ps["pool"] = json!(POOL);
    for (k, v) in extra.as_object().into_iter().flatten() {
        ps[k] = v.clone();
    }
    Runtime {
        node: &t.node,
        list: Conflist::ptp("1.0.0", &ipam.0, ps),
    }
}

fn reserved(t: &Topology) -> String {
    t.node
        .run("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"])
        .trim()
        .to_string()
}

/// ADD of `pod` fails with `code`, and leaves neither wiring nor a datapath entry behind.
fn refused(t: &Topology, rt: &Runtime<'_>, pod: &mut CniPod, code: u64) -> String {
    let prev = rt.add_primary(pod);
    let inv = rt.exec_last(pod, "ADD", Some(&prev));
    assert_eq!(inv.error_code(), code, "{inv:?}");
    assert!(leftovers(&pod.ns).is_empty(), "{:?}", leftovers(&pod.ns));
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_local_port_range"),
        "32768 60999"
    );
    assert!(!datapath_has(t, &pod.container_id));
    rt.del(pod).expect("DEL after a refused ADD");
    inv.json()["msg"].as_str().unwrap_or_default().to_string()
}

#[test]
fn the_nodes_own_ports_are_refused_from_static_slices_and_ranges() {
    if !require_root("node_ports_critical") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(
        &t,
        &ipam,
        json!({"slices": {"test/kubelet": "10250-10250"}, "nodeCritical": {"apiServerPort": 16443}}),
    );
    let ssh = refused(&t, &rt, &mut CniPod::new("PORTSLICE_RANGE=20-30"), 108);
    assert!(ssh.contains("sshd"), "{ssh}");
    let kubelet = refused(&t, &rt, &mut CniPod::new("PORTSLICE_SLICE=kubelet"), 108);
    assert!(kubelet.contains("kubelet"), "{kubelet}");
    let api = refused(
        &t,
        &rt,
        &mut CniPod::new("PORTSLICE_RANGE=16440-16449"),
        108,
    );
    assert!(
        api.contains("API server"),
        "the cluster's own port, as the daemon writes it: {api}"
    );
    let nodeports = refused(
        &t,
        &rt,
        &mut CniPod::new("PORTSLICE_RANGE=32000-32010"),
        108,
    );
    assert!(nodeports.contains("NodePort"), "{nodeports}");
}

/// A host process listening on a port of a slice keeps its traffic: the node refuses the slice.
#[test]
fn a_host_listener_makes_the_node_refuse_the_slice_and_keeps_its_traffic() {
    if !require_root("node_ports_listener") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(&t, &ipam, json!({}));
    let _host = tcp_server(&t.node, Ipv4Addr::UNSPECIFIED, 41505, "host");
    let msg = refused(
        &t,
        &rt,
        &mut CniPod::new("PORTSLICE_RANGE=41500-41509"),
        109,
    );
    assert!(msg.contains("TCP/41505"), "{msg}");
    let r = tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 41505), None)
        .expect("the host still answers");
    assert!(r.starts_with("host "), "{r}");
    // A listener on another address never sees traffic to the node address (on a kind node,
    // docker's embedded DNS listens on 127.0.0.11 on a random high port): no refusal.
    let _dns = tcp_server(&t.node, Ipv4Addr::new(127, 0, 0, 1), 41515, "loopback");
    let mut p = CniPod::new("PORTSLICE_RANGE=41510-41519");
    rt.add(&mut p)
        .unwrap_or_else(|e| panic!("a loopback listener refused the slice: {e:?}"));
    rt.del(&p).expect("DEL");
}

/// Exact ports outside the pool are reserved on the host while the slice pod runs (matrix row
/// 10 holds for them too), and given back at DEL; the pool's own reservation is untouched.
#[test]
fn exact_ports_outside_the_pool_are_reserved_while_the_pod_runs() {
    if !require_root("node_ports_reserved") {
        return;
    }
    let t = Topology::new();
    let before = reserved(&t);
    assert!(
        before.contains(POOL),
        "the daemon reserves the pool: {before}"
    );
    let ipam = TempDir::new("ipam");
    let rt = runtime(&t, &ipam, json!({}));
    let mut sip = CniPod::new("PORTSLICE_RANGE=5060-5061");
    rt.add(&mut sip).expect("ADD of an exact slice");
    let during = reserved(&t);
    assert!(during.split(',').any(|r| r == "5060-5061"), "{during}");
    let mut inside = CniPod::new("PORTSLICE_RANGE=40100-40109");
    rt.add(&mut inside).expect("ADD of a pool slice");
    rt.del(&inside).expect("DEL");
    assert_eq!(
        reserved(&t),
        during,
        "a pool slice's DEL leaves the pool reserved"
    );
    rt.del(&sip).expect("DEL");
    assert_eq!(reserved(&t), before, "DEL gives the exact ports back");
}

/// DEL puts back every sysctl ADD changed, to the values the pod had (not the kernel's defaults).
#[test]
fn del_restores_every_sysctl_add_changed() {
    if !require_root("node_ports_sysctls") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(&t, &ipam, json!({}));
    let mut pod = CniPod::new("PORTSLICE_RANGE=1000-1009");
    let prev = rt.add_primary(&mut pod);
    pod.ns.sysctl("net.ipv4.ip_local_port_range", "20000 29999");
    pod.ns.sysctl("net.ipv4.ip_unprivileged_port_start", "2000");
    let inv = rt.exec_last(&pod, "ADD", Some(&prev));
    assert!(inv.ok(), "{inv:?}");
    pod.result = Some(inv.json());
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_local_port_range"),
        "1000 1009"
    );
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_unprivileged_port_start"),
        "1000"
    );
    assert_eq!(sysctl_in(&pod.ns, "net.ipv4.conf.eth0.arp_announce"), "2");
    rt.exec_last(&pod, "DEL", pod.result.as_ref());
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_local_port_range"),
        "20000 29999"
    );
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_unprivileged_port_start"),
        "2000"
    );
    assert_eq!(sysctl_in(&pod.ns, "net.ipv4.conf.eth0.arp_announce"), "0");
    assert!(leftovers(&pod.ns).is_empty(), "{:?}", leftovers(&pod.ns));
    rt.del(&pod).expect("DEL through the chain");
}

/// Many pods of one slice landing on the node at once: exactly one is wired, every other gets
/// 102 and leaves nothing; pods of different slices added and deleted at once all succeed.
#[test]
fn concurrent_adds_of_one_slice_wire_exactly_one_pod() {
    if !require_root("node_ports_lock") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(&t, &ipam, json!({"slices": {"test/media": "41600-41699"}}));
    let mut pods: Vec<CniPod> = (0..6)
        .map(|_| CniPod::new("PORTSLICE_SLICE=media"))
        .collect();
    let prevs: Vec<Value> = pods.iter_mut().map(|p| rt.add_primary(p)).collect();
    // While something else holds the node lock, no ADD gets anywhere: each verb takes it for
    // its whole run, so they cannot interleave once it is free.
    let held = NodeLock::acquire(&t.pin_root, Duration::from_secs(1)).expect("the node lock");
    let done = AtomicUsize::new(0);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .zip(&prevs)
            .map(|(p, prev)| {
                s.spawn(|| {
                    let inv = rt.exec_last(p, "ADD", Some(prev));
                    done.fetch_add(1, Ordering::SeqCst);
                    inv
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "an ADD ran while the node lock was held"
        );
        drop(held);
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let winners: Vec<usize> = (0..pods.len()).filter(|&i| results[i].ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one sliver: {results:?}");
    for (i, inv) in results.iter().enumerate() {
        if i == winners[0] {
            continue;
        }
        assert_eq!(inv.error_code(), 102, "{inv:?}");
        assert!(
            leftovers(&pods[i].ns).is_empty(),
            "loser {i}: {:?}",
            leftovers(&pods[i].ns)
        );
        assert!(!datapath_has(&t, &pods[i].container_id));
    }
    let winner = &mut pods[winners[0]];
    winner.result = Some(results[winners[0]].json());
    let _srv = tcp_server(&winner.ns, Ipv4Addr::UNSPECIFIED, 41610, "winner");
    assert!(
        tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 41610), None)
            .is_ok_and(|r| r.starts_with("winner"))
    );
    // Deleting the losers (the runtime does) never strips the winner's steering.
    for (i, p) in pods.iter().enumerate() {
        if i != winners[0] {
            rt.del(p).expect("DEL of a loser");
        }
    }
    assert!(
        tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 41610), None)
            .is_ok_and(|r| r.starts_with("winner"))
    );

    // Different slices, added and deleted at once.
    let mut others: Vec<CniPod> = (0..4)
        .map(|i| {
            CniPod::new(&format!(
                "PORTSLICE_RANGE={}-{}",
                41700 + 10 * i,
                41709 + 10 * i
            ))
        })
        .collect();
    let prevs: Vec<Value> = others.iter_mut().map(|p| rt.add_primary(p)).collect();
    std::thread::scope(|s| {
        let adds: Vec<_> = others
            .iter()
            .zip(&prevs)
            .map(|(p, prev)| s.spawn(|| rt.exec_last(p, "ADD", Some(prev))))
            .collect();
        let del = s.spawn(|| rt.del(&pods[winners[0]]));
        for a in adds {
            let inv = a.join().expect("ADD thread");
            assert!(inv.ok(), "{inv:?}");
        }
        del.join().expect("DEL thread").expect("DEL of the winner");
    });
    for p in &others {
        assert!(datapath_has(&t, &p.container_id));
        rt.del(p).expect("DEL");
    }
}

/// The port table is written and freed in whole runs (one bpf(2) batch call per protocol):
/// every key of a 10,000-port slice ending at 65535 points at its pod (CHECK reads each key on
/// its own), a slice overlapping it by one port is refused before anything is written, and
/// freeing one slice leaves its neighbour's keys, right next to it, untouched.
#[test]
fn the_port_table_is_written_and_freed_in_runs_key_for_key() {
    if !require_root("port_runs") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod_unattached(Some((55536, 65535)));
    t.add_pod_unattached(Some((45536, 55535)));
    t.add_pod_unattached(Some((45000, 45536)));
    let (a, b, overlap) = (t.attachment(0), t.attachment(1), t.attachment(2));
    t.with_datapath(move |dp| {
        dp.attach_pod(&a)
            .expect("attach the 10,000 ports up to 65535");
        dp.check_pod(&a).expect("every key points at the pod");
        dp.attach_pod(&b)
            .expect("attach the 10,000 ports right below");
        dp.check_pod(&b).expect("every key of the neighbour too");
        let refused = dp
            .attach_pod(&overlap)
            .expect_err("one port of b's is taken");
        assert!(
            matches!(refused, portslice_datapath::DatapathError::PortTaken { .. }),
            "{refused}"
        );
        dp.check_pod(&b)
            .expect("the refused attach wrote nothing over b");
        dp.detach_pod(&a.container_id, Some(a.host_veth_ifindex))
            .expect("detach a");
        dp.check_pod(&b).expect("freeing a left b's keys alone");
        // a's keys are free again: a slice of exactly those ports attaches.
        dp.attach_pod(&a).expect("a's ports were all freed");
        dp.check_pod(&a).expect("and written again");
    });
}

/// A pod detached and attached again at once (a retried ADD after one that undid itself, DEL
/// then ADD of the same veth) attaches every time, and its ports steer to it: detaching leaves
/// nothing of the old link that the next attach could trip over (with tcx, the release must be
/// over when detach returns, or the kernel refuses the program as already attached).
#[test]
fn a_pod_detached_and_attached_again_at_once_attaches_every_time() {
    if !require_root("node_ports_reattach") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some((41600, 41609)));
    let att = t.attachment(0);
    t.with_datapath(move |dp| {
        for i in 0..30 {
            dp.detach_pod(&att.container_id, Some(att.host_veth_ifindex))
                .unwrap_or_else(|e| panic!("detach {i}: {e}"));
            dp.attach_pod(&att)
                .unwrap_or_else(|e| panic!("attach {i} right after detach: {e}"));
        }
    });
    let _srv = tcp_server(&t.pods[0].ns, Ipv4Addr::UNSPECIFIED, 41605, "again");
    let r = tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 41605), None)
        .expect("remote -> the re-attached pod");
    assert!(r.starts_with("again "), "{r}");
}
