//! The plugin chained behind Debian's reference plugins (ptp or bridge + host-local), driven
//! the way a runtime drives it, in network namespaces (root; skipped loudly otherwise). Each
//! test proves one behaviour of ADD/CHECK/DEL/GC/STATUS, including that failures leave nothing
//! behind.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use portslice_testkit::runtime::{
    CNI_VERSIONS, CniPod, Conflist, Runtime, TempDir, cni_path, datapath_has, exec_plugin,
    leftovers, portslice_conf, sysctl_in,
};
use portslice_testkit::traffic::{tcp_request, tcp_server, udp_request, udp_server};
use portslice_testkit::{NODE_IP, REMOTE_IP, Topology, require_root};
use serde_json::{Value, json};

const DEFAULT_RANGE: &str = "32768 60999";

fn runtime<'a>(t: &'a Topology, version: &str, ipam: &TempDir, extra: Value) -> Runtime<'a> {
    let mut ps = portslice_conf(t);
    for (k, v) in extra.as_object().into_iter().flatten() {
        ps[k] = v.clone();
    }
    Runtime {
        node: &t.node,
        list: Conflist::ptp(version, &ipam.0, ps),
    }
}

/// remote -> node IP:port reaches the pod (TCP and UDP).
fn assert_reachable(t: &Topology, pod: &CniPod, port: u16) {
    let _tcp = tcp_server(&pod.ns, Ipv4Addr::UNSPECIFIED, port, "pod");
    let _udp = udp_server(&pod.ns, Ipv4Addr::UNSPECIFIED, port, "pod");
    let r = tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, port), None)
        .expect("TCP remote -> node IP:slice port");
    assert!(r.starts_with(&format!("pod {REMOTE_IP}:")), "{r}");
    let r = udp_request(
        &t.remote,
        SocketAddrV4::new(REMOTE_IP, 0),
        SocketAddrV4::new(NODE_IP, port),
        8,
    )
    .expect("UDP remote -> node IP:slice port");
    assert!(r.starts_with(&format!("pod {REMOTE_IP}:")), "{r}");
}

/// The pod's netns as `ip` and the sysctls show it, to compare before and after.
fn netns_state(ns: &portslice_testkit::Netns) -> [String; 4] {
    [
        ns.ip(&["addr"]),
        ns.ip(&["route", "show", "table", "all"]),
        ns.ip(&["rule"]),
        sysctl_in(ns, "net.ipv4.ip_local_port_range"),
    ]
}

/// One chain at `version`: a slice pod is wired, answers on the node address, passes CHECK
/// (from 0.4.0) and leaves nothing after DEL (without prevResult before 0.4.0, as libcni
/// sends it); a plain pod gets the primary plugin's result back byte for byte and its netns is
/// exactly as the primary plugin made it. Returns the matrix row.
fn slice_and_plain_pod_through(t: &Topology, rt: &Runtime<'_>, port: u16) -> String {
    let version = rt.list.version.clone();
    let primary = rt.list.plugins[0]["type"].as_str().unwrap().to_string();
    let ctx = format!("{primary} at {version}");
    let mut pod = CniPod::new(&format!("PORTSLICE_RANGE={port}-{}", port + 9));
    let result = rt
        .add(&mut pod)
        .unwrap_or_else(|e| panic!("slice pod ADD, {ctx}: {e:?}"));
    assert_eq!(result["cniVersion"], version.as_str(), "{ctx}: {result}");
    let ips = result["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 2, "{ctx}: {result}");
    assert!(
        ips[0]["address"].as_str().unwrap().starts_with("10.245.0."),
        "{ctx}: private address stays first: {result}"
    );
    assert_eq!(ips[1]["address"], format!("{NODE_IP}/32"), "{ctx}");
    assert_eq!(ips[1]["interface"], ips[0]["interface"], "{ctx}");
    let before_1_0 = version.starts_with("0.");
    assert_eq!(
        ips[1].get("version").is_some(),
        before_1_0,
        "{ctx}: ips carry \"version\" exactly before 1.0.0: {result}"
    );
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_local_port_range"),
        format!("{port} {}", port + 9),
        "{ctx}"
    );
    assert!(datapath_has(t, &pod.container_id), "{ctx}");
    assert_reachable(t, &pod, port + 5);
    let has_check = !version.starts_with("0.3.");
    if has_check {
        rt.check(&pod)
            .unwrap_or_else(|e| panic!("CHECK, {ctx}: {e:?}"));
    }
    rt.del(&pod).unwrap_or_else(|e| panic!("DEL, {ctx}: {e:?}"));
    assert!(
        leftovers(&pod.ns).is_empty(),
        "{ctx}: {:?}",
        leftovers(&pod.ns)
    );
    assert!(!datapath_has(t, &pod.container_id), "{ctx}");
    rt.del(&pod)
        .unwrap_or_else(|e| panic!("second DEL, {ctx}: {e:?}"));

    let mut plain = CniPod::new("");
    plain.runtime_config = Some(json!({"io.kubernetes.cri.pod-annotations": {"app": "web"}}));
    let prev = rt.add_primary(&mut plain);
    let before = netns_state(&plain.ns);
    let inv = rt.exec_last(&plain, "ADD", Some(&prev));
    assert!(inv.ok(), "plain pod ADD, {ctx}: {inv:?}");
    assert_eq!(inv.json(), prev, "{ctx}: prevResult comes back untouched");
    plain.result = Some(inv.json());
    assert_eq!(
        netns_state(&plain.ns),
        before,
        "{ctx}: the plain pod's netns is untouched"
    );
    if has_check {
        rt.check(&plain)
            .unwrap_or_else(|e| panic!("plain pod CHECK, {ctx}: {e:?}"));
    }
    rt.del(&plain)
        .unwrap_or_else(|e| panic!("plain pod DEL, {ctx}: {e:?}"));
    assert!(!datapath_has(t, &plain.container_id), "{ctx}");
    format!("{primary:6} cniVersion {version}: slice pod wired and reachable, plain pod untouched")
}

/// kindnet, Flannel and Calico write 0.3.1 conflists: every version from 0.3.0 to 1.1.0.
#[test]
fn every_cni_version_behind_ptp_wires_slice_pods_and_leaves_plain_pods_untouched() {
    if !require_root("versions_behind_ptp") {
        return;
    }
    let t = Topology::new();
    let mut rows = Vec::new();
    for (i, version) in CNI_VERSIONS.into_iter().enumerate() {
        let ipam = TempDir::new("ipam");
        let rt = runtime(&t, version, &ipam, json!({}));
        rows.push(slice_and_plain_pod_through(&t, &rt, 41000 + 20 * i as u16));
    }
    eprintln!("{}", rows.join("\n"));
}

#[test]
fn every_cni_version_behind_bridge_wires_slice_pods_and_leaves_plain_pods_untouched() {
    if !require_root("versions_behind_bridge") {
        return;
    }
    let t = Topology::new();
    let mut rows = Vec::new();
    for (i, version) in CNI_VERSIONS.into_iter().enumerate() {
        let ipam = TempDir::new("ipam");
        let bridge = format!("psbr{i}");
        let rt = Runtime {
            node: &t.node,
            list: Conflist::bridge(version, &ipam.0, &bridge, portslice_conf(&t)),
        };
        rows.push(slice_and_plain_pod_through(&t, &rt, 41100 + 20 * i as u16));
        let _ = std::process::Command::new("ip")
            .args(["-n", &t.node.name, "link", "del", &bridge])
            .status();
    }
    eprintln!("{}", rows.join("\n"));
}

#[test]
fn add_at_1_1_0_then_gc_removes_only_stale_attachments_and_status_reports_ready() {
    if !require_root("gc_and_status") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt11 = runtime(&t, "1.1.0", &ipam, json!({}));
    let mut pods = Vec::new();
    for range in ["41200-41209", "41210-41219"] {
        let mut pod = CniPod::new(&format!("PORTSLICE_RANGE={range}"));
        let result = rt11
            .add(&mut pod)
            .unwrap_or_else(|e| panic!("ADD at 1.1.0: {e:?}"));
        assert_eq!(result["cniVersion"], "1.1.0");
        pods.push(pod);
    }
    // GC and STATUS are about the whole network: no container, no netns.
    let network_wide = |command: &str, c: &Value| {
        let env = [("CNI_COMMAND", command), ("CNI_PATH", "/usr/lib/cni")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        exec_plugin(Some(&t.node.path()), "portslice", &env, &c.to_string())
    };
    let mut c = portslice_conf(&t);
    c["cniVersion"] = json!("1.1.0");
    c["name"] = json!(rt11.list.name);
    c["cni.dev/valid-attachments"] =
        json!([{"containerID": pods[0].container_id, "ifname": "eth0"}]);
    let inv = network_wide("GC", &c);
    assert!(inv.ok() && inv.stdout.trim().is_empty(), "{inv:?}");
    assert!(
        datapath_has(&t, &pods[0].container_id),
        "a valid attachment survives GC"
    );
    assert!(
        !datapath_has(&t, &pods[1].container_id),
        "a stale attachment is removed by GC"
    );
    assert_reachable(&t, &pods[0], 41205);

    let inv = network_wide("STATUS", &c);
    assert!(inv.ok() && inv.stdout.trim().is_empty(), "{inv:?}");
    c["pinRoot"] = json!("/sys/fs/bpf/portslice-no-such-root");
    let inv = network_wide("STATUS", &c);
    assert_eq!(inv.error_code(), 50, "{inv:?}");
    for pod in &pods {
        rt11.del(pod).expect("DEL");
    }
}

#[test]
fn a_pod_without_a_slice_passes_through_unchanged() {
    if !require_root("plain_pod") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(&t, "1.0.0", &ipam, json!({}));
    let mut pod = CniPod::new("");
    let prev = rt.add_primary(&mut pod);
    let inv = rt.exec_last(&pod, "ADD", Some(&prev));
    assert!(inv.ok(), "{inv:?}");
    assert_eq!(inv.json(), prev, "prevResult passes through unchanged");
    pod.result = Some(inv.json());
    assert!(leftovers(&pod.ns).is_empty());
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_local_port_range"),
        DEFAULT_RANGE
    );
    // The datapath knows its host veth (matrix row 4), with no slice.
    let id = pod.container_id.clone();
    let slice = t.with_datapath(move |dp| {
        dp.list_pods()
            .unwrap()
            .into_iter()
            .find(|p| p.container_id == id)
            .map(|p| p.slice)
    });
    assert_eq!(slice, Some(None));
    rt.check(&pod).expect("CHECK of a plain pod");
    let id = pod.container_id.clone();
    t.with_datapath(move |dp| dp.detach_pod(&id, None).expect("detach"));
    // Without its entry the pod only loses reach to slice pods on the node address: CHECK must
    // not make the runtime tear down a pod that is not ours.
    let inv = rt.exec_last(&pod, "CHECK", pod.result.as_ref());
    assert!(inv.ok(), "CHECK of a plain pod never fails: {inv:?}");
    rt.del(&pod).expect("DEL");
    assert!(!datapath_has(&t, &pod.container_id));
}

#[test]
fn check_detects_a_removed_rule_address_sysctl_and_datapath_entry() {
    if !require_root("check_detects") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(&t, "1.0.0", &ipam, json!({}));
    let mut pod = CniPod::new("PORTSLICE_RANGE=41400-41499");
    rt.add(&mut pod).expect("ADD");
    let check = |what: &str| {
        let inv = rt.exec_last(&pod, "CHECK", pod.result.as_ref());
        assert_eq!(inv.error_code(), 106, "CHECK after {what}: {inv:?}");
    };
    let redo = |pod: &CniPod| {
        let inv = rt.exec_last(pod, "ADD", Some(&pod.result.clone().unwrap()));
        assert!(inv.ok(), "re-ADD: {inv:?}");
        let ok = rt.exec_last(pod, "CHECK", pod.result.as_ref());
        assert!(ok.ok(), "CHECK after repair: {ok:?}");
    };
    pod.ns.ip(&["rule", "del", "pref", "101"]);
    check("removing the TCP rule");
    redo(&pod);
    pod.ns
        .ip(&["addr", "del", &format!("{NODE_IP}/32"), "dev", "eth0"]);
    check("removing the node address");
    redo(&pod);
    pod.ns.sysctl("net.ipv4.ip_local_port_range", DEFAULT_RANGE);
    check("resetting ip_local_port_range");
    redo(&pod);
    let id = pod.container_id.clone();
    t.with_datapath(move |dp| dp.detach_pod(&id, None).expect("detach"));
    check("removing the datapath entry");
    rt.del(&pod).expect("DEL");
}

#[test]
fn del_succeeds_when_the_netns_is_gone() {
    if !require_root("del_netns_gone") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(&t, "1.0.0", &ipam, json!({}));
    let mut pod = CniPod::new("PORTSLICE_RANGE=41500-41509");
    rt.add(&mut pod).expect("ADD");
    std::process::Command::new("ip")
        .args(["netns", "del", &pod.ns.name])
        .status()
        .expect("ip netns del");
    for _ in 0..2 {
        let inv = rt.exec_last(&pod, "DEL", pod.result.as_ref());
        assert!(inv.ok(), "DEL with the netns gone: {inv:?}");
    }
    assert!(!datapath_has(&t, &pod.container_id));
    // And with CNI_NETNS pointing at a file that is no netns (a stale bind mount target).
    let bogus = TempDir::new("notns");
    let file = bogus.0.join("ns");
    std::fs::write(&file, "").unwrap();
    let mut env = pod.env("DEL");
    env.iter_mut()
        .filter(|(k, _)| k == "CNI_NETNS")
        .for_each(|(_, v)| *v = file.display().to_string());
    let c = rt.list.conf_for(1, pod.result.as_ref(), None);
    let inv = exec_plugin(Some(&t.node.path()), "portslice", &env, &c.to_string());
    assert!(inv.ok(), "DEL with a corrupt netns path: {inv:?}");
}

/// After a failed ADD: the spec error, and nothing of ours in the pod or the datapath.
fn assert_failed_cleanly(
    t: &Topology,
    pod: &CniPod,
    inv: &portslice_testkit::runtime::Invocation,
    code: u64,
) {
    assert_eq!(inv.error_code(), code, "{inv:?}");
    assert!(leftovers(&pod.ns).is_empty(), "{:?}", leftovers(&pod.ns));
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_local_port_range"),
        DEFAULT_RANGE
    );
    assert!(!datapath_has(t, &pod.container_id));
}

#[test]
fn a_second_sliver_of_a_slice_on_one_node_is_refused_and_leaves_nothing() {
    if !require_root("second_sliver") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(
        &t,
        "1.0.0",
        &ipam,
        json!({"slices": {"test/media": "41600-41699"}}),
    );
    let mut a = CniPod::new("PORTSLICE_SLICE=media");
    rt.add(&mut a).expect("first sliver");
    let mut b = CniPod::new("PORTSLICE_SLICE=media");
    let prev = rt.add_primary(&mut b);
    let inv = rt.exec_last(&b, "ADD", Some(&prev));
    assert_failed_cleanly(&t, &b, &inv, 102);
    assert!(
        inv.json()["msg"]
            .as_str()
            .unwrap()
            .contains("already has a pod on this node"),
        "{inv:?}"
    );
    // A different slice name claiming overlapping ports is refused the same way.
    let mut c = CniPod::new("PORTSLICE_RANGE=41650-41750");
    let prev = rt.add_primary(&mut c);
    assert_failed_cleanly(&t, &c, &rt.exec_last(&c, "ADD", Some(&prev)), 102);
    assert_reachable(&t, &a, 41610);
    for p in [&a, &b, &c] {
        rt.del(p).expect("DEL");
    }
}

#[test]
fn failed_adds_get_their_code_and_leave_nothing_behind() {
    if !require_root("failed_adds") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    // Datapath not loaded on the node.
    let rt_nodp = runtime(
        &t,
        "1.0.0",
        &ipam,
        json!({"pinRoot": "/sys/fs/bpf/portslice-no-such-root"}),
    );
    let mut p = CniPod::new("PORTSLICE_RANGE=41700-41709");
    let prev = rt_nodp.add_primary(&mut p);
    assert_failed_cleanly(&t, &p, &rt_nodp.exec_last(&p, "ADD", Some(&prev)), 105);
    rt_nodp.del(&p).expect("DEL");

    let rt = runtime(&t, "1.0.0", &ipam, json!({}));
    // A static slice that does not exist.
    let mut p = CniPod::new("PORTSLICE_SLICE=nope");
    let prev = rt.add_primary(&mut p);
    assert_failed_cleanly(&t, &p, &rt.exec_last(&p, "ADD", Some(&prev)), 100);
    rt.del(&p).expect("DEL");
    // A range that is no range.
    let mut p = CniPod::new("PORTSLICE_RANGE=70000-70001");
    let prev = rt.add_primary(&mut p);
    assert_failed_cleanly(&t, &p, &rt.exec_last(&p, "ADD", Some(&prev)), 4);
    rt.del(&p).expect("DEL");

    // The API server does not answer: a listener in the node netns that accepts and stays mute.
    let listener = t
        .node
        .enter(|| TcpListener::bind("127.0.0.1:0").expect("bind"));
    let port = listener.local_addr().unwrap().port();
    let dir = TempDir::new("kubeconfig");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: x\n"
    )).unwrap();
    let rt_api = runtime(
        &t,
        "1.0.0",
        &ipam,
        json!({"kubeconfig": kubeconfig, "apiTimeoutMs": 300}),
    );
    let mut p = CniPod::new("");
    let prev = rt_api.add_primary(&mut p);
    let inv = rt_api.exec_last(&p, "ADD", Some(&prev));
    assert_failed_cleanly(&t, &p, &inv, 11);
    assert!(
        inv.elapsed.as_millis() < 3000,
        "the timeout bounds ADD: {:?}",
        inv.elapsed
    );
    rt_api.del(&p).expect("DEL");
    // Nobody listens at all: connection refused is transient too.
    drop(listener);
    let mut p = CniPod::new("");
    let prev = rt_api.add_primary(&mut p);
    assert_failed_cleanly(&t, &p, &rt_api.exec_last(&p, "ADD", Some(&prev)), 11);
    rt_api.del(&p).expect("DEL");
}

#[test]
fn a_late_failure_undoes_the_pod_netns_wiring() {
    if !require_root("late_failure") {
        return;
    }
    // A veth whose peer stays inside the pod: the wiring inside the pod succeeds, then there is
    // no host side to attach to the datapath, and everything done inside the pod must be undone.
    let t = Topology::new();
    let pod = CniPod::new("PORTSLICE_RANGE=41800-41809");
    pod.ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    pod.ns.ip(&["link", "set", "eth1", "up"]);
    pod.ns.ip(&["addr", "add", "10.245.9.2/24", "dev", "eth0"]);
    pod.ns.ip(&["link", "set", "eth0", "up"]);
    pod.ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.245.9.1",
        "dev",
        "eth0",
    ]);
    let before = (
        pod.ns.ip(&["-4", "addr"]),
        pod.ns.ip(&["-4", "route"]),
        pod.ns.ip(&["-4", "rule"]),
    );
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.ns.path()}],
        "ips": [{"address": "10.245.9.2/24", "gateway": "10.245.9.1", "interface": 0}],
    });
    let mut c = portslice_conf(&t);
    c["cniVersion"] = json!("1.0.0");
    c["name"] = json!("late");
    c["prevResult"] = prev;
    let inv = exec_plugin(
        Some(&t.node.path()),
        "portslice",
        &pod.env("ADD"),
        &c.to_string(),
    );
    assert_eq!(inv.error_code(), 107, "{inv:?}");
    assert!(!datapath_has(&t, &pod.container_id));
    let after = (
        pod.ns.ip(&["-4", "addr"]),
        pod.ns.ip(&["-4", "route"]),
        pod.ns.ip(&["-4", "rule"]),
    );
    assert_eq!(before, after, "the pod's netns is as it was");
    assert_eq!(
        sysctl_in(&pod.ns, "net.ipv4.ip_local_port_range"),
        DEFAULT_RANGE
    );
}

#[test]
fn slices_with_low_ports_or_ending_at_65535_are_wired() {
    if !require_root("edge_ranges") {
        return;
    }
    let t = Topology::new();
    let ipam = TempDir::new("ipam");
    let rt = runtime(&t, "1.0.0", &ipam, json!({}));
    let mut low = CniPod::new("PORTSLICE_RANGE=80-89");
    rt.add(&mut low)
        .unwrap_or_else(|e| panic!("ADD of 80-89: {e:?}"));
    assert_eq!(
        sysctl_in(&low.ns, "net.ipv4.ip_unprivileged_port_start"),
        "80"
    );
    assert_eq!(sysctl_in(&low.ns, "net.ipv4.ip_local_port_range"), "80 89");
    rt.check(&low).expect("CHECK 80-89");
    let mut high = CniPod::new("PORTSLICE_RANGE=65530-65535");
    rt.add(&mut high)
        .unwrap_or_else(|e| panic!("ADD of 65530-65535: {e:?}"));
    let rules = high.ns.ip(&["rule"]);
    assert!(
        !rules.contains("65535"),
        "no fib-rule range ends at 65535: {rules}"
    );
    assert!(rules.contains("dport 1-65529 lookup main"), "{rules}");
    rt.check(&high).expect("CHECK 65530-65535");
    for p in [&low, &high] {
        rt.del(p).expect("DEL");
    }
}

/// cnitool (libcni, the library containerd and podman use) drives one ptp chain per CNI
/// version, the slice named by the pod annotation it passes as a capability: a slice pod and a
/// plain pod each.
#[test]
fn cnitool_drives_a_chain_at_every_cni_version() {
    if !require_root("cnitool") {
        return;
    }
    let cnitool = std::path::PathBuf::from(
        std::env::var("TOOLS_BIN").unwrap_or_else(|_| "/var/cache/portslice/bin".into()),
    )
    .join("cnitool");
    if !cnitool.exists() {
        panic!(
            "{} is missing: run e2e/scripts/build-tools.sh cnitool",
            cnitool.display()
        );
    }
    let t = Topology::new();
    for (i, version) in CNI_VERSIONS.into_iter().enumerate() {
        let ipam = TempDir::new("ipam");
        let range = format!("{}-{}", 41900 + 10 * i, 41909 + 10 * i);
        let mut ps = portslice_conf(&t);
        ps["slices"] = json!({ "test/media": range });
        ps["capabilities"] = json!({"io.kubernetes.cri.pod-annotations": true});
        let list = Conflist::ptp(version, &ipam.0, ps);
        let netdir = TempDir::new("netconf");
        std::fs::write(
            netdir.0.join("10-test.conflist"),
            list.to_json().to_string(),
        )
        .unwrap();
        let run = |verb: &str, pod: &portslice_testkit::Netns, annotations: &Value| {
            let out = t
                .node
                .command(cnitool.to_str().unwrap())
                .args([verb, &list.name, pod.path().to_str().unwrap()])
                .env("NETCONFPATH", &netdir.0)
                .env("CNI_PATH", cni_path(version))
                .env(
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=test;K8S_POD_NAME=web",
                )
                .env(
                    "CAP_ARGS",
                    json!({ "io.kubernetes.cri.pod-annotations": annotations }).to_string(),
                )
                .output()
                .expect("cnitool");
            let text = format!(
                "cnitool {verb} at {version}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                text,
            )
        };
        for annotations in [
            json!({"portslice.io/slice": "media"}),
            json!({"app": "web"}),
        ] {
            let slice_pod = annotations.get("portslice.io/slice").is_some();
            let pod = portslice_testkit::Netns::new("pst");
            // DEL runs whatever happens below: it also clears libcni's result cache.
            struct DelOnDrop<'a>(&'a dyn Fn());
            impl Drop for DelOnDrop<'_> {
                fn drop(&mut self) {
                    (self.0)();
                }
            }
            let del = || {
                let _ = run("del", &pod, &annotations);
            };
            let guard = DelOnDrop(&del);
            let (ok, out, text) = run("add", &pod, &annotations);
            assert!(ok, "{text}");
            let result: Value = serde_json::from_str(&out).expect("cnitool prints the result");
            assert_eq!(result["cniVersion"], version, "{text}");
            let ips = result["ips"].as_array().unwrap();
            let expected_range = if slice_pod {
                assert_eq!(ips.len(), 2, "{text}");
                assert_eq!(ips[1]["address"], format!("{NODE_IP}/32"), "{text}");
                range.replace('-', " ")
            } else {
                assert_eq!(ips.len(), 1, "a plain pod keeps ptp's result: {text}");
                DEFAULT_RANGE.to_string()
            };
            assert_eq!(
                sysctl_in(&pod, "net.ipv4.ip_local_port_range"),
                expected_range,
                "{text}"
            );
            if !version.starts_with("0.3.") {
                let (ok, _, text) = run("check", &pod, &annotations);
                assert!(ok, "{text}");
            }
            let (ok, _, text) = run("del", &pod, &annotations);
            assert!(ok, "{text}");
            drop(guard);
            let left = t.with_datapath(|dp| dp.list_pods().unwrap().len());
            assert_eq!(
                left, 0,
                "cnitool del at {version} removed the datapath entry"
            );
        }
    }
}

/// Keeps the latency helper the datapath benchmark uses from rotting, and prints its numbers
/// (`PORTSLICE_CNI_LATENCY_RUNS`, default 5; run with `--release -- --nocapture` to measure).
#[test]
fn cni_add_and_del_latency_is_measurable() {
    if !require_root("cni_latency") {
        return;
    }
    let t = Topology::new();
    let runs = std::env::var("PORTSLICE_CNI_LATENCY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let l = portslice_testkit::latency::measure(&t, runs, None);
    eprintln!(
        "CNI latency, {runs} runs: portslice ADD p50 {:.1} ms p99 {:.1} ms, DEL p50 {:.1} ms p99 {:.1} ms; \
         whole chain ADD p50 {:.1} ms p99 {:.1} ms, DEL p50 {:.1} ms p99 {:.1} ms",
        l.add.p50_ms,
        l.add.p99_ms,
        l.del.p50_ms,
        l.del.p99_ms,
        l.chain_add.p50_ms,
        l.chain_add.p99_ms,
        l.chain_del.p50_ms,
        l.chain_del.p99_ms
    );
    eprintln!("{}", portslice_testkit::latency::breakdown_table(&l));
    assert!(l.add.p50_ms > 0.0 && l.add.p99_ms >= l.add.p50_ms);
    // The plugin's breakdown names the phases the benchmark reports.
    let phases: Vec<&str> = l.add_phases.iter().map(|(p, _)| p.as_str()).collect();
    for want in [
        "process start",
        "host listeners check",
        "pod netlink and sysctls",
        "map writes",
    ] {
        assert!(phases.contains(&want), "{want} missing from {phases:?}");
    }
    assert!(
        phases.contains(&"tcx link") || phases.contains(&"clsact filter"),
        "{phases:?}"
    );
}

/// Podman (Debian's, CNI backend), as it really calls us: it passes only
/// `IgnoreUnknown=1;K8S_POD_NAME=<container name>`, and drops any network whose cniVersion a
/// plugin's VERSION answer does not list. A container joins a slice by its name, or every
/// container of a network joins the network's slice.
#[test]
fn podman_puts_containers_into_slices_by_name_and_by_network() {
    if !require_root("podman") {
        return;
    }
    let t = Topology::new();
    let podman = Podman::new(&t);
    let mut ps = portslice_conf(&t);
    ps["slices"] = json!({"sip": "41960-41969", "media": "41970-41979"});
    podman.network("psbyname", "0.3.1", "psbr20", "10.246.20.0/24", ps.clone());
    ps["slice"] = json!("media");
    podman.network("psbynet", "1.0.0", "psbr21", "10.246.21.0/24", ps);
    let networks = podman.run(&["network", "ls", "--format", "{{.Name}}"]);
    assert!(
        networks.contains("psbyname") && networks.contains("psbynet"),
        "podman keeps both networks (it drops those whose version a plugin refuses): {networks}"
    );
    for (network, container, range) in [
        ("psbyname", "sip", Some((41960, 41969))),
        ("psbyname", "web", None),
        ("psbynet", "anything", Some((41970, 41979))),
        ("psbynet", "sip", Some((41960, 41969))),
    ] {
        let ctx = format!("container {container} on {network}");
        let port = range.map_or(41999, |r| r.0 + 1).to_string();
        podman.run(&[
            "run",
            "-d",
            "--network",
            network,
            "--name",
            container,
            "--hostname",
            container,
            "localhost/portslice-podman-test:1",
            "nc",
            "-ll",
            "-p",
            &port,
            "-e",
            "/bin/hello",
        ]);
        let inside = |cmd: &[&str]| {
            let mut a = vec!["exec", container];
            a.extend_from_slice(cmd);
            podman.run(&a)
        };
        let ports = inside(&["cat", "/proc/sys/net/ipv4/ip_local_port_range"]);
        let addrs = inside(&["ip", "-4", "addr", "show", "eth0"]);
        match range {
            Some((lo, hi)) => {
                assert_eq!(
                    ports.split_whitespace().collect::<Vec<_>>(),
                    [lo.to_string(), hi.to_string()],
                    "{ctx}"
                );
                assert!(addrs.contains(&format!("{NODE_IP}/32")), "{ctx}: {addrs}");
                let r = tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, lo + 1), None)
                    .unwrap_or_else(|e| panic!("{ctx}: remote -> node IP:{}: {e}", lo + 1));
                assert_eq!(r, format!("container {container}"), "{ctx}");
            }
            None => {
                assert_eq!(
                    ports.split_whitespace().collect::<Vec<_>>(),
                    ["32768", "60999"],
                    "{ctx}"
                );
                assert!(!addrs.contains(&NODE_IP.to_string()), "{ctx}: {addrs}");
            }
        }
        podman.run(&["rm", "-f", "-t", "0", container]);
        assert!(!datapath_has_any(&t), "{ctx}: podman rm ran our DEL");
    }
}

fn datapath_has_any(t: &Topology) -> bool {
    t.with_datapath(|dp| !dp.list_pods().unwrap().is_empty())
}

/// Rootful podman run inside the node netns (nsenter keeps /sys/fs/bpf visible) with storage,
/// networks and containers.conf of its own, all removed on Drop.
struct Podman<'a> {
    t: &'a Topology,
    dir: TempDir,
}

impl<'a> Podman<'a> {
    fn new(t: &'a Topology) -> Self {
        let dir = TempDir::new("podman");
        let bin_dir = portslice_testkit::daemon_binary()
            .parent()
            .unwrap()
            .display()
            .to_string();
        // This machine withholds CAP_SYS_RESOURCE: podman's default rlimits (raised to the
        // maximum) cannot be applied, so they are set to values any process may set.
        std::fs::write(
            dir.0.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"/usr/lib/cni\", \"{bin_dir}\"]\n\
                 network_config_dir = \"{}\"\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n",
                dir.0.join("net.d").display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.0.join("net.d")).unwrap();
        let p = Self { t, dir };
        // A busybox image made here (no registry): `hello` prints who answers.
        let rootfs = p.dir.0.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "cat", "ip", "nc", "hostname", "sleep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(
            rootfs.join("bin/hello"),
            "#!/bin/sh\necho \"container $(hostname)\"\n",
        )
        .unwrap();
        std::fs::set_permissions(
            rootfs.join("bin/hello"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let tar = p.dir.0.join("rootfs.tar");
        portslice_testkit::sh(
            "tar",
            &[
                "-C",
                rootfs.to_str().unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ],
        );
        p.run(&[
            "import",
            tar.to_str().unwrap(),
            "localhost/portslice-podman-test:1",
        ]);
        p
    }

    /// A conflist of `bridge` + host-local on `subnet`, then portslice as `ps`.
    fn network(&self, name: &str, version: &str, bridge: &str, subnet: &str, ps: Value) {
        let list = json!({"cniVersion": version, "name": name, "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": self.dir.0.join("ipam")}},
            ps]});
        std::fs::write(
            self.dir.0.join("net.d").join(format!("{name}.conflist")),
            list.to_string(),
        )
        .unwrap();
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self
            .t
            .node
            .command("podman")
            .args(["--root", self.dir.0.join("root").to_str().unwrap()])
            .args(["--runroot", self.dir.0.join("runroot").to_str().unwrap()])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.0.join("containers.conf"))
            .output()
            .expect("podman");
        assert!(
            out.status.success(),
            "podman {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let _ = self
            .t
            .node
            .command("podman")
            .args(["--root", self.dir.0.join("root").to_str().unwrap()])
            .args(["--runroot", self.dir.0.join("runroot").to_str().unwrap()])
            .args(["rm", "-a", "-f", "-t", "0"])
            .env("CONTAINERS_CONF", self.dir.0.join("containers.conf"))
            .output();
        let _ = std::process::Command::new("umount")
            .args(["-R", self.dir.0.join("root").to_str().unwrap()])
            .output();
    }
}
