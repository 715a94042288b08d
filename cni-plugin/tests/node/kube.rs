//! Where a pod's slice comes from when Kubernetes is there: the slice annotation passed by the
//! runtime (`io.kubernetes.cri.pod-annotations`, no Pod read) or read from the Pod, and the
//! range read from the PortSlice's status on a real kube-apiserver + etcd
//! (`e2e/scripts/test-datapath.sh` starts one and exports KUBECONFIG). Root. It fails
//! without root or KUBECONFIG unless skipped explicitly (PORTSLICE_SKIP_PRIVILEGED=1,
//! PORTSLICE_SKIP_KUBE=1).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use portslice_crds::{PortRange, PortSlice, PortSliceSpec, SLICE_ANNOTATION};
use portslice_testkit::latency::percentiles;
use portslice_testkit::loopback::Relay;
use portslice_testkit::runtime::{
    CniPod, Conflist, Runtime, TempDir, datapath_has, leftovers, portslice_conf, sysctl_in,
};
use portslice_testkit::traffic::{drain, stream_for, tcp_request, tcp_server};
use portslice_testkit::{NODE_IP, REMOTE_IP, REMOTE_IP2, Topology, require_root};
use serde_json::json;

const CAP: &str = "io.kubernetes.cri.pod-annotations";

/// The API server's kubeconfig. Without one the test fails, unless `PORTSLICE_SKIP_KUBE=1` asks
/// to skip it (and then it says so).
fn kubeconfig() -> Option<String> {
    match std::env::var("KUBECONFIG") {
        Ok(k) if !k.is_empty() => Some(k),
        _ if std::env::var("PORTSLICE_SKIP_KUBE").as_deref() == Ok("1") => {
            eprintln!(
                "\n!!!!! SKIPPED kube: KUBECONFIG is not set and PORTSLICE_SKIP_KUBE=1 !!!!!\n"
            );
            None
        }
        _ => panic!(
            "KUBECONFIG is not set: run e2e/scripts/test-datapath.sh (it starts an API server), \
             or set PORTSLICE_SKIP_KUBE=1 to skip this test"
        ),
    }
}

/// The admin kubeconfig with its server rewritten to the relay inside the node netns, and the
/// API server's address on the host loopback.
fn relayed_kubeconfig(src: &str, port: u16, out: &Path) -> SocketAddr {
    let text = std::fs::read_to_string(src).expect("reading KUBECONFIG");
    let mut target = None;
    let rewritten: Vec<String> = text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("server: https://") {
            Some(addr) => {
                target = addr.trim().parse::<SocketAddr>().ok();
                format!(
                    "{}server: https://127.0.0.1:{port}",
                    &l[..l.len() - l.trim_start().len()]
                )
            }
            None => l.to_string(),
        })
        .collect();
    std::fs::write(out, rewritten.join("\n")).expect("writing the relayed kubeconfig");
    target.expect("the test kubeconfig names https://<ip>:<port>")
}

/// A throwaway namespace with the CRD installed and a `default` ServiceAccount (no controller
/// manager runs to create it), deleted on Drop.
struct KubeNs {
    /// The client's connection tasks live on this runtime: it must outlive every call.
    rt: tokio::runtime::Runtime,
    client: Client,
    name: String,
    /// Names of the ClusterRole and ClusterRoleBinding made for this namespace.
    cluster_objects: std::cell::RefCell<Vec<String>>,
}

impl KubeNs {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let client = rt
            .block_on(Client::try_default())
            .expect("client from KUBECONFIG");
        let name = format!("ps-cni-{}", portslice_testkit::unique());
        rt.block_on(async {
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            let crd = PortSlice::crd();
            let pp = PatchParams::apply("portslice-cni-tests").force();
            crds.patch("portslices.portslice.io", &pp, &Patch::Apply(&crd))
                .await
                .expect("apply CRD");
            for _ in 0..100 {
                let ok = crds
                    .get("portslices.portslice.io")
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if ok {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let nss: Api<Namespace> = Api::all(client.clone());
            let ns = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            nss.create(&PostParams::default(), &ns)
                .await
                .expect("create namespace");
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
            let sa = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("default".into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            sas.create(&PostParams::default(), &sa)
                .await
                .expect("create default ServiceAccount");
        });
        Self {
            rt,
            client,
            name,
            cluster_objects: Default::default(),
        }
    }

    /// A PortSlice with `range` written into its status, as the operator would.
    fn slice(&self, name: &str, range: Option<(u16, u16)>) {
        self.rt.block_on(async {
            let api: Api<PortSlice> = Api::namespaced(self.client.clone(), &self.name);
            let spec = PortSliceSpec::of_size(100);
            api.create(&PostParams::default(), &PortSlice::new(name, spec)).await.expect("create PortSlice");
            if let Some((start, end)) = range {
                let status = json!({"status": {"range": PortRange { start, end }, "rangeText": format!("{start}-{end}"), "sliverCount": 0}});
                api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("set status");
            }
        });
    }

    /// Sets the PortSlice's `spec.allowedSources`, as a tenant's `kubectl edit` would.
    fn set_allowed_sources(&self, name: &str, list: &[&str]) {
        self.rt.block_on(async {
            let api: Api<PortSlice> = Api::namespaced(self.client.clone(), &self.name);
            let patch = json!({"spec": {"allowedSources": list}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("edit allowedSources");
        });
    }

    /// Writes `namedPorts` into the PortSlice's status, as the operator would.
    fn set_named_ports(&self, name: &str, ports: &[(&str, &str, u16)]) {
        self.rt.block_on(async {
            let api: Api<PortSlice> = Api::namespaced(self.client.clone(), &self.name);
            let named: Vec<_> = ports
                .iter()
                .map(|(n, p, port)| json!({"name": n, "protocol": p, "port": port, "count": 1}))
                .collect();
            let patch = json!({"status": {"namedPorts": named}});
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("set namedPorts");
        });
    }

    /// A Pod object named like the CNI pod, with the annotation (or none).
    fn pod(&self, name: &str, slice: Option<&str>) {
        self.pod_on(name, slice, None);
    }

    /// [`Self::pod`], bound to `node` (as the scheduler binds it) when given; returns its uid.
    fn pod_on(&self, name: &str, slice: Option<&str>, node: Option<&str>) -> String {
        self.rt.block_on(async {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.name);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": slice.map(|s| json!({SLICE_ANNOTATION: s})).unwrap_or(json!({}))},
                "spec": {"containers": [{"name": "c", "image": "none"}], "nodeName": node}
            }))
            .expect("pod");
            let made = api.create(&PostParams::default(), &pod).await.expect("create Pod");
            made.metadata.uid.expect("a uid")
        })
    }
}

impl Drop for KubeNs {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.name.clone());
        let cluster_objects = self.cluster_objects.take();
        self.rt.block_on(async move {
            for o in &cluster_objects {
                let dp = DeleteParams::default();
                let _ = Api::<ClusterRoleBinding>::all(client.clone())
                    .delete(o, &dp)
                    .await;
                let _ = Api::<ClusterRole>::all(client.clone()).delete(o, &dp).await;
                let _ = Api::<Node>::all(client.clone()).delete(o, &dp).await;
            }
            let nss: Api<Namespace> = Api::all(client);
            let _ = nss.delete(&name, &DeleteParams::default()).await;
        });
    }
}

fn annotated(pod: &mut CniPod, slice: Option<&str>) {
    let annotations = match slice {
        Some(s) => json!({SLICE_ANNOTATION: s, "other": "x"}),
        None => json!({"other": "x"}),
    };
    pod.runtime_config = Some(json!({CAP: annotations}));
}

#[test]
fn slices_come_from_the_api_server_with_the_right_codes_and_latency() {
    if !require_root("kube") {
        return;
    }
    let Some(kc) = kubeconfig() else {
        return;
    };
    let kns = KubeNs::new();
    kns.slice("media", Some((42000, 42099)));
    kns.slice("web", Some((42100, 42199)));
    kns.slice("pending", None);
    kns.slice("bench", Some((42200, 42299)));

    let t = Topology::new();
    let dir = TempDir::new("kube");
    let relay_kc = dir.0.join("kubeconfig");
    let target = relayed_kubeconfig(&kc, 0, &relay_kc);
    let relay = Relay::start(&t.node, target);
    relayed_kubeconfig(&kc, relay.port, &relay_kc);
    let mut ps = portslice_conf(&t);
    ps["kubeconfig"] = json!(relay_kc);
    ps["apiTimeoutMs"] = json!(5000);
    ps["capabilities"] = json!({CAP: true});
    let ipam = TempDir::new("ipam");
    let rt = Runtime {
        node: &t.node,
        list: Conflist::ptp("1.0.0", &ipam.0, ps),
    };

    // 1. The runtime passes the annotation: only the PortSlice is read.
    let mut a = CniPod::in_namespace(&kns.name, "");
    annotated(&mut a, Some("media"));
    let r = rt
        .add(&mut a)
        .unwrap_or_else(|e| panic!("ADD with the annotation from the runtime: {e:?}"));
    assert_eq!(r["ips"][1]["address"], format!("{NODE_IP}/32"));
    assert_eq!(
        sysctl_in(&a.ns, "net.ipv4.ip_local_port_range"),
        "42000 42099"
    );
    let _srv = tcp_server(&a.ns, Ipv4Addr::UNSPECIFIED, 42010, "media");
    let reply = tcp_request(&t.remote, SocketAddrV4::new(NODE_IP, 42010), None)
        .expect("remote -> media pod");
    assert!(reply.starts_with("media "), "{reply}");
    rt.check(&a).expect("CHECK");

    // 2. The runtime passes no annotations: the Pod is read, then its PortSlice.
    let mut b = CniPod::in_namespace(&kns.name, "");
    kns.pod(&b.pod_name(), Some("web"));
    rt.add(&mut b)
        .unwrap_or_else(|e| panic!("ADD with the annotation read from the Pod: {e:?}"));
    assert_eq!(
        sysctl_in(&b.ns, "net.ipv4.ip_local_port_range"),
        "42100 42199"
    );

    // 3. A Pod without the annotation passes through.
    let mut c = CniPod::in_namespace(&kns.name, "");
    kns.pod(&c.pod_name(), None);
    let prev = rt.add_primary(&mut c);
    let inv = rt.exec_last(&c, "ADD", Some(&prev));
    assert!(inv.ok(), "{inv:?}");
    assert_eq!(inv.json(), prev, "unchanged");

    // 4. The slice does not exist (100) / has no range yet (101): nothing left behind.
    for (slice, code) in [("missing", 100), ("pending", 101)] {
        let mut p = CniPod::in_namespace(&kns.name, "");
        annotated(&mut p, Some(slice));
        let prev = rt.add_primary(&mut p);
        let inv = rt.exec_last(&p, "ADD", Some(&prev));
        assert_eq!(inv.error_code(), code, "{slice}: {inv:?}");
        assert!(leftovers(&p.ns).is_empty());
        assert!(!datapath_has(&t, &p.container_id));
        rt.del(&p).expect("DEL");
    }

    // 5. ADD/DEL latency with the API server local (one PortSlice GET per ADD).
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let mut p = CniPod::in_namespace(&kns.name, "");
        annotated(&mut p, Some("bench"));
        let prev = rt.add_primary(&mut p);
        let inv = rt.exec_last(&p, "ADD", Some(&prev));
        assert!(inv.ok(), "{inv:?}");
        adds.push(inv.elapsed);
        p.result = Some(inv.json());
        let inv = rt.exec_last(&p, "DEL", p.result.as_ref());
        assert!(inv.ok(), "{inv:?}");
        dels.push(inv.elapsed);
        rt.del(&p).expect("DEL");
    }
    let (add, del) = (percentiles(adds), percentiles(dels));
    eprintln!(
        "CNI latency with the API server (20 runs, {} build): ADD p50 {:.1} ms p99 {:.1} ms, DEL p50 {:.1} ms p99 {:.1} ms",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        add.p50_ms,
        add.p99_ms,
        del.p50_ms,
        del.p99_ms
    );
    for p in [&a, &b, &c] {
        rt.del(p).expect("DEL");
    }
    drop(relay);
}

impl KubeNs {
    /// The node daemon's ServiceAccount, ClusterRole and binding exactly as the chart renders
    /// them (`helm template`, release named after the namespace), so the tests prove the chart's
    /// node rights suffice. Returns the ServiceAccount's name; the cluster-wide objects go with
    /// the namespace on Drop.
    fn node_sa_from_chart(&self) -> String {
        let cache =
            std::env::var("PORTSLICE_CACHE").unwrap_or_else(|_| "/var/cache/portslice".into());
        let helm =
            std::env::var("PORTSLICE_E2E_HELM").unwrap_or_else(|_| format!("{cache}/bin/helm"));
        let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/portslice");
        let out = std::process::Command::new(&helm)
            .args(["template", &self.name, chart, "-n", &self.name])
            .args(["--show-only", "templates/node-rbac.yaml"])
            .output()
            .unwrap_or_else(|e| panic!("running {helm} (e2e/scripts/build-tools.sh helm): {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let docs: Vec<serde_json::Value> = text
            .split("\n---")
            .filter_map(|d| serde_yaml::from_str::<serde_json::Value>(d).ok())
            .filter(|d| d.is_object())
            .collect();
        let of_kind = |kind: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind)
                .cloned()
                .unwrap_or_else(|| panic!("the chart renders no node {kind}"))
        };
        let sa: ServiceAccount = serde_json::from_value(of_kind("ServiceAccount")).expect("sa");
        let role: ClusterRole = serde_json::from_value(of_kind("ClusterRole")).expect("role");
        let binding: ClusterRoleBinding =
            serde_json::from_value(of_kind("ClusterRoleBinding")).expect("binding");
        let name = sa.metadata.name.clone().expect("sa name");
        self.rt.block_on(async {
            let pp = PostParams::default();
            Api::<ServiceAccount>::namespaced(self.client.clone(), &self.name)
                .create(&pp, &sa)
                .await
                .expect("create the node ServiceAccount");
            Api::<ClusterRole>::all(self.client.clone())
                .create(&pp, &role)
                .await
                .expect("create the node ClusterRole");
            Api::<ClusterRoleBinding>::all(self.client.clone())
                .create(&pp, &binding)
                .await
                .expect("create the node ClusterRoleBinding");
        });
        self.cluster_objects
            .borrow_mut()
            .push(role.metadata.name.expect("role name"));
        name
    }

    /// A token of `sa` bound to a Pod object `anchor` (created here): it dies with the Pod, as a
    /// projected token dies with its pod or its expiry.
    fn bound_token(&self, sa: &str, anchor: &str) -> String {
        self.rt.block_on(async {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.name);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": anchor},
                "spec": {"serviceAccountName": sa, "containers": [{"name": "c", "image": "none"}]}
            }))
            .expect("pod");
            let uid = pods
                .create(&PostParams::default(), &pod)
                .await
                .expect("create the anchor pod")
                .metadata
                .uid
                .expect("uid");
            let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.name);
            let req: TokenRequest = serde_json::from_value(json!({
                "spec": {"audiences": [], "expirationSeconds": 600,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": anchor, "uid": uid}}
            }))
            .expect("token request");
            sas.create_token_request(sa, &PostParams::default(), &req)
                .await
                .expect("TokenRequest")
                .status
                .expect("token status")
                .token
        })
    }

    /// A Node object `name` with `spec.podCIDRs` (no kubelet behind it: what the daemon reads).
    fn node(&self, name: &str, pod_cidrs: &[&str]) {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs}
        }))
        .expect("node");
        self.rt.block_on(async {
            Api::<Node>::all(self.client.clone())
                .create(&PostParams::default(), &node)
                .await
                .expect("create a Node");
        });
        self.cluster_objects.borrow_mut().push(name.to_string());
    }

    fn delete_pod(&self, name: &str) {
        self.rt.block_on(async {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.name);
            pods.delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect("delete pod");
        });
    }
}

/// A node daemon started in `t`'s node with the chart's node rights on the test API server
/// (through a relay, as a pod reaches it through its Service), writing the plugin's kubeconfig.
struct ApiDaemon {
    _relay: Relay,
    _dir: TempDir,
    /// The plugin's kubeconfig the daemon writes.
    kubeconfig_out: std::path::PathBuf,
    token_file: std::path::PathBuf,
    node_sa: String,
}

impl ApiDaemon {
    fn start(kns: &KubeNs, t: &mut Topology, kc: &str, anchor: &str, extra: &[&str]) -> Self {
        let node_sa = kns.node_sa_from_chart();
        let dir = TempDir::new("api-daemon");
        let target = relayed_kubeconfig(kc, 0, &dir.0.join("relayed"));
        let relay = Relay::start(&t.node, target);
        let token_file = dir.0.join("token");
        std::fs::write(&token_file, kns.bound_token(&node_sa, anchor)).unwrap();
        let out = dir.0.join("cni-kubeconfig");
        let ca = Path::new(kc)
            .parent()
            .expect("kubeconfig dir")
            .join("ca.crt");
        let server = format!("https://127.0.0.1:{}", relay.port);
        let mut args = vec![
            "--kubeconfig-out",
            out.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
            "--api-server",
            &server,
        ];
        args.extend_from_slice(extra);
        t.start_daemon_with(&args);
        Self {
            _relay: relay,
            _dir: dir,
            kubeconfig_out: out,
            token_file,
            node_sa,
        }
    }
}

/// The daemon keeps the plugin's kubeconfig on the current token: when the token it was written
/// from dies (here its bound Pod goes; in a cluster it expires) and the kubelet rotates the file,
/// slice pods' ADD keeps working on the real API server.
#[test]
fn the_daemon_follows_the_rotating_token_and_add_keeps_working() {
    if !require_root("kube_token") {
        return;
    }
    let Some(kc) = kubeconfig() else {
        return;
    };
    let kns = KubeNs::new();
    kns.slice("media", Some((42300, 42399)));
    let mut t = Topology::bare();
    let daemon = ApiDaemon::start(&kns, &mut t, &kc, "anchor-a", &["--no-cni-install"]);
    let out = daemon.kubeconfig_out.clone();
    let written = |want: &str| {
        portslice_testkit::eventually(std::time::Duration::from_secs(15), || {
            std::fs::read_to_string(&out)
                .ok()
                .filter(|k| k.contains(want))
        })
    };
    let first = std::fs::read_to_string(&daemon.token_file).unwrap();
    assert!(
        written(first.trim()).is_some(),
        "the daemon wrote a kubeconfig with the token"
    );
    let mut ps = portslice_conf(&t);
    ps["kubeconfig"] = json!(out);
    let ipam = TempDir::new("ipam");
    let rt = Runtime {
        node: &t.node,
        list: Conflist::ptp("1.0.0", &ipam.0, ps),
    };
    // No annotations from the runtime: every ADD reads the Pod with the kubeconfig's token.
    let add = |name: &str| {
        let mut p = CniPod::in_namespace(&kns.name, "");
        kns.pod(&p.pod_name(), Some("media"));
        let prev = rt.add_primary(&mut p);
        let inv = rt.exec_last(&p, "ADD", Some(&prev));
        p.result = inv.ok().then(|| inv.json());
        let _ = name;
        (p, inv)
    };
    let (a, inv) = add("a");
    assert!(inv.ok(), "ADD with the first token: {inv:?}");
    rt.del(&a).expect("DEL");

    // The token dies: what a kubeconfig written once at start would be left with.
    kns.delete_pod("anchor-a");
    let (b, inv) = portslice_testkit::eventually(std::time::Duration::from_secs(15), || {
        let (p, inv) = add("b");
        if inv.ok() {
            // The API server may take a moment to see the Pod gone.
            rt.del(&p).expect("DEL");
            return None;
        }
        Some((p, inv))
    })
    .expect("the dead token is refused");
    assert_eq!(inv.error_code(), 103, "{inv:?}");
    rt.del(&b).expect("DEL");

    // The kubelet rotates the file; the daemon follows.
    let second = kns.bound_token(&daemon.node_sa, "anchor-b");
    std::fs::write(&daemon.token_file, &second).unwrap();
    assert!(
        written(second.trim()).is_some(),
        "the daemon rewrote the kubeconfig"
    );
    let (c, inv) = add("c");
    assert!(inv.ok(), "ADD with the rotated token: {inv:?}");
    rt.del(&c).expect("DEL");
    drop(daemon);
}

/// A node that refuses a PortSlice (here: a host process listens on one of its ports) says so on
/// the PortSlice, where its owner looks: one Warning Event per node and reason, bumped on every
/// retry, posted with the node's own token and rights.
#[test]
fn a_node_refusing_a_portslice_posts_one_event_on_it_per_node_and_reason() {
    if !require_root("kube_refusal") {
        return;
    }
    let Some(kc) = kubeconfig() else {
        return;
    };
    let kns = KubeNs::new();
    kns.slice("media", Some((42400, 42409)));
    let node_sa = kns.node_sa_from_chart();
    let t = Topology::new();
    let dir = TempDir::new("refusal");
    let relay_kc = dir.0.join("relayed");
    let target = relayed_kubeconfig(&kc, 0, &relay_kc);
    let relay = Relay::start(&t.node, target);
    let ca = std::fs::read(
        Path::new(&kc)
            .parent()
            .expect("kubeconfig dir")
            .join("ca.crt"),
    )
    .expect("the API server's CA");
    let node_kc = dir.0.join("node-kubeconfig");
    let token = kns.bound_token(&node_sa, "anchor");
    std::fs::write(
        &node_kc,
        portslice_cni::daemon::kubeconfig::render_with_ca_data(
            &format!("https://127.0.0.1:{}", relay.port),
            &ca,
            token.trim(),
        ),
    )
    .unwrap();
    let mut ps = portslice_conf(&t);
    ps["kubeconfig"] = json!(node_kc);
    ps["nodeName"] = json!("worker-7");
    ps["capabilities"] = json!({CAP: true});
    let ipam = TempDir::new("ipam");
    let rt = Runtime {
        node: &t.node,
        list: Conflist::ptp("1.0.0", &ipam.0, ps),
    };
    let _host = tcp_server(&t.node, Ipv4Addr::UNSPECIFIED, 42405, "host");
    let refuse = || {
        let mut p = CniPod::in_namespace(&kns.name, "");
        annotated(&mut p, Some("media"));
        let prev = rt.add_primary(&mut p);
        let inv = rt.exec_last(&p, "ADD", Some(&prev));
        assert_eq!(inv.error_code(), 109, "{inv:?}");
        rt.del(&p).expect("DEL");
    };
    refuse();
    refuse();
    let (events, uid) = kns.rt.block_on(async {
        let events: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(kns.client.clone(), &kns.name);
        let slices: Api<PortSlice> = Api::namespaced(kns.client.clone(), &kns.name);
        (
            events
                .list(&Default::default())
                .await
                .expect("events")
                .items,
            slices.get("media").await.expect("slice").metadata.uid,
        )
    });
    let refusals: Vec<_> = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("HostPortInUse"))
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "one Event for both refusals: {events:#?}"
    );
    let e = refusals[0];
    assert_eq!(e.count, Some(2), "the retry bumped it: {e:#?}");
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.involved_object.kind.as_deref(), Some("PortSlice"));
    assert_eq!(e.involved_object.name.as_deref(), Some("media"));
    assert_eq!(e.involved_object.uid, uid);
    let source = e.source.as_ref().expect("source");
    assert_eq!(
        (source.component.as_deref(), source.host.as_deref()),
        (
            Some(portslice_crds::refusal::NODE_REFUSAL_SOURCE),
            Some("worker-7")
        )
    );
    assert!(
        e.message
            .as_deref()
            .unwrap_or_default()
            .contains("TCP/42405"),
        "{e:#?}"
    );
    drop(relay);
}

/// `spec.allowedSources` on a real API server: ADD filters from the first packet, and the daemon
/// follows edits of the PortSlice while a transfer from a listed source keeps running.
#[test]
fn a_portslices_allowed_sources_filter_from_add_and_follow_edits() {
    if !require_root("kube_sources") {
        return;
    }
    let Some(kc) = kubeconfig() else {
        return;
    };
    let kns = KubeNs::new();
    kns.slice("media", Some((42500, 42599)));
    kns.set_allowed_sources("media", &[&format!("{REMOTE_IP}/32")]);
    let mut t = Topology::bare();
    t.add_remote_address(REMOTE_IP2);
    let daemon = ApiDaemon::start(&kns, &mut t, &kc, "anchor", &["--no-cni-install"]);
    let out = daemon.kubeconfig_out.clone();
    let mut ps = portslice_conf(&t);
    ps["kubeconfig"] = json!(out);
    ps["capabilities"] = json!({CAP: true});
    let ipam = TempDir::new("ipam");
    let rt = Runtime {
        node: &t.node,
        list: Conflist::ptp("1.0.0", &ipam.0, ps),
    };
    let mut pod = CniPod::in_namespace(&kns.name, "");
    annotated(&mut pod, Some("media"));
    rt.add(&mut pod).expect("ADD of a filtered slice pod");
    let _srv = tcp_server(&pod.ns, Ipv4Addr::UNSPECIFIED, 42510, "media");
    let reaches = |from: Ipv4Addr| {
        tcp_request(
            &t.remote,
            SocketAddrV4::new(NODE_IP, 42510),
            Some(SocketAddrV4::new(from, 0).into()),
        )
        .is_ok_and(|r| r.starts_with("media "))
    };
    assert!(reaches(REMOTE_IP), "the listed source is refused");
    assert!(!reaches(REMOTE_IP2), "ADD left the pod open to anyone");

    // A transfer from the listed source runs across the edits.
    let listener = pod
        .ns
        .enter(|| std::net::TcpListener::bind("0.0.0.0:42520").unwrap());
    let receiver = std::thread::spawn(move || drain(listener.accept().unwrap().0));
    let conn = t
        .remote
        .enter(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddrV4::new(NODE_IP, 42520).into(),
                std::time::Duration::from_secs(3),
            )
        })
        .expect("connect from the listed source");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let s = stop.clone();
        std::thread::spawn(move || stream_for(conn, s))
    };
    let follows = |what: &str, from: Ipv4Addr, want: bool| {
        portslice_testkit::eventually(std::time::Duration::from_secs(10), || {
            (reaches(from) == want).then_some(())
        })
        .unwrap_or_else(|| panic!("the daemon did not follow the edit: {what}"));
    };
    kns.set_allowed_sources(
        "media",
        &[&format!("{REMOTE_IP}/32"), &format!("{REMOTE_IP2}/32")],
    );
    follows("a second source added", REMOTE_IP2, true);
    kns.set_allowed_sources("media", &[]);
    follows("the list emptied (anyone)", REMOTE_IP2, true);
    assert!(reaches(REMOTE_IP));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = sender
        .join()
        .unwrap()
        .expect("the transfer ran through every edit");
    let received = receiver.join().unwrap().expect("the receiving end");
    assert_eq!(sent, received, "bytes lost across the edits");
    kns.set_allowed_sources("media", &[&format!("{REMOTE_IP2}/32")]);
    follows("the first source removed", REMOTE_IP, false);
    assert!(reaches(REMOTE_IP2));
    rt.del(&pod).expect("DEL");
    drop(daemon);
}

/// TCPMUX (RFC 1078) on port 1 of the node address: `HELP` lists the named TCP ports of the
/// slices with a pod on this node, a known name is spliced to the pod, an unknown one refused.
#[test]
fn tcpmux_lists_and_splices_the_named_ports_of_slices_on_the_node() {
    if !require_root("kube_tcpmux") {
        return;
    }
    let Some(kc) = kubeconfig() else {
        return;
    };
    let kns = KubeNs::new();
    kns.slice("voice", Some((42700, 42709)));
    kns.set_named_ports("voice", &[("ctl", "TCP", 42703), ("rtp", "UDP", 42704)]);
    kns.slice("elsewhere", Some((42800, 42809)));
    kns.set_named_ports("elsewhere", &[("ctl", "TCP", 42803)]);
    let mut t = Topology::bare();
    let daemon = ApiDaemon::start(
        &kns,
        &mut t,
        &kc,
        "anchor",
        &["--no-cni-install", "--tcpmux"],
    );
    let out = daemon.kubeconfig_out.clone();
    let mut ps = portslice_conf(&t);
    ps["kubeconfig"] = json!(out);
    ps["capabilities"] = json!({CAP: true});
    let ipam = TempDir::new("ipam");
    let rt = Runtime {
        node: &t.node,
        list: Conflist::ptp("1.0.0", &ipam.0, ps),
    };
    let mut pod = CniPod::in_namespace(&kns.name, "");
    annotated(&mut pod, Some("voice"));
    rt.add(&mut pod).expect("ADD");
    let _srv = tcp_server(&pod.ns, Ipv4Addr::UNSPECIFIED, 42703, "voice-ctl");
    let ask = |line: &str| -> String {
        let line = line.to_string();
        t.remote.enter(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect_timeout(
                &SocketAddrV4::new(NODE_IP, 1).into(),
                std::time::Duration::from_secs(3),
            )
            .expect("connect to TCPMUX");
            c.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .unwrap();
            c.write_all(line.as_bytes()).unwrap();
            // A spliced connection: the pod's server answers a line of ours.
            if line.to_ascii_lowercase().contains("/voice/ctl") {
                std::thread::sleep(std::time::Duration::from_millis(200));
                c.write_all(b"hello\n").unwrap();
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                // The daemon closes after HELP and refusals; a splice stays open, so stop at
                // the pod's whole answer line.
                if got.starts_with(b"+\r\n") && got[3..].contains(&b'\n') {
                    break;
                }
            }
            String::from_utf8_lossy(&got).into_owned()
        })
    };
    let contact = format!("{}/voice/ctl", kns.name);
    let help = portslice_testkit::eventually(std::time::Duration::from_secs(10), || {
        let h = ask("HELP\r\n");
        h.contains(&contact).then_some(h)
    })
    .expect("HELP lists the slice's named TCP port");
    assert_eq!(
        help.lines().count(),
        1,
        "only TCP names of slices on this node: {help}"
    );
    let hit = ask(&format!("{}\r\n", contact.to_uppercase()));
    assert!(
        hit.starts_with("+\r\n") && hit.contains("voice-ctl "),
        "a hit is spliced to the pod: {hit:?}"
    );
    let miss = ask(&format!("{}/elsewhere/ctl\r\n", kns.name));
    assert!(
        miss.starts_with('-'),
        "a slice without a pod here: {miss:?}"
    );
    rt.del(&pod).expect("DEL");
    drop(daemon);
}

/// Nothing to set (issue 13): with `--uplink auto` and no CIDR flags, the daemon finds the
/// interface that holds the node address, takes the pod CIDRs from the Nodes' `spec.podCIDRs`
/// and the service CIDR from the ServiceCIDR API, writes them into its conflist entry, follows
/// a Node that joins, and says what it chose on /metrics.
#[test]
fn the_daemon_detects_its_uplink_and_the_cluster_cidrs_and_follows_new_nodes() {
    if !require_root("kube_detect") {
        return;
    }
    let Some(kc) = kubeconfig() else {
        return;
    };
    let kns = KubeNs::new();
    // Cluster-scoped: named after the namespace, gone with it (KubeNs's Drop).
    let first = format!("{}-a", kns.name);
    let second = format!("{}-b", kns.name);
    kns.node(&first, &["10.244.0.0/24", "fd00:10:244::/64"]);
    kns.node(&second, &["10.244.1.0/24"]);
    let mut t = Topology::bare();
    let conf = TempDir::new("detect-conf");
    let bin = TempDir::new("detect-bin");
    let original = r#"{"cniVersion":"0.3.1","name":"kindnet","plugins":[{"type":"ptp","ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.0.0/24"}]]}}]}"#;
    std::fs::write(conf.0.join("10-kindnet.conflist"), original).unwrap();
    let _daemon = ApiDaemon::start(
        &kns,
        &mut t,
        &kc,
        "anchor",
        &[
            "--uplink",
            "auto",
            "--cni-bin-dir",
            bin.0.to_str().unwrap(),
            "--cni-conf-dir",
            conf.0.to_str().unwrap(),
        ],
    );
    let entry = |want: &[&str]| {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        portslice_testkit::eventually(std::time::Duration::from_secs(15), || {
            let list: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(conf.0.join("10-kindnet.conflist")).ok()?,
            )
            .ok()?;
            let got: Vec<String> =
                serde_json::from_value(list["plugins"][1]["clusterCIDRs"].clone()).ok()?;
            (got == want).then_some(list)
        })
    };
    // The two /24s in a row become one /23; the API server's service range is 10.0.0.0/24.
    let list = entry(&["10.244.0.0/23", "fd00:10:244::/64", "10.0.0.0/24"]).unwrap_or_else(|| {
        panic!(
            "the conflist entry carries the detected CIDRs: {}",
            std::fs::read_to_string(conf.0.join("10-kindnet.conflist")).unwrap_or_default()
        )
    });
    assert_eq!(list["plugins"][1]["type"], "portslice");
    kns.node(&format!("{}-c", kns.name), &["10.244.7.0/24"]);
    assert!(
        entry(&[
            "10.244.0.0/23",
            "10.244.7.0/24",
            "fd00:10:244::/64",
            "10.0.0.0/24"
        ])
        .is_some(),
        "a Node that joins is followed into the entry: {}",
        std::fs::read_to_string(conf.0.join("10-kindnet.conflist")).unwrap_or_default()
    );
    let metrics = t.metrics_get("/metrics").unwrap_or_default();
    assert!(
        metrics.contains(&format!(
            "portslice_node_uplink_info{{uplink=\"{}\",node_ip=\"{NODE_IP}\",source=\"detected\"}} 1",
            portslice_testkit::UPLINK
        )),
        "the chosen uplink is exposed: {metrics}"
    );
    assert!(
        metrics.contains("portslice_cluster_cidr_info{cidr=\"10.0.0.0/24\",source=\"detected\"} 1"),
        "the detected CIDRs are exposed: {metrics}"
    );
}

/// ADD asks the node daemon's slice cache (it watches the Pods of its node and the PortSlices)
/// before the API server: a pod the cache knows is wired with no API request at all, here with
/// the plugin's kubeconfig pointing at a dead server. What the cache does not know (here a pod
/// not on its node; another pod of the same name is `node_cache::decide`'s unit tests) goes to
/// the API server, which stays the authority.
#[test]
fn add_finds_the_slice_in_the_nodes_cache_and_asks_the_api_server_for_the_rest() {
    use portslice_cni::slice_source::node_cache::{self, CacheRequest};
    if !require_root("kube_node_cache") {
        return;
    }
    let Some(kc) = kubeconfig() else {
        return;
    };
    let kns = KubeNs::new();
    kns.slice("media", Some((42900, 42949)));
    kns.slice("voice", Some((42950, 42999)));
    let node = format!("node-{}", portslice_testkit::unique());
    let mut t = Topology::bare();
    let daemon = ApiDaemon::start(
        &kns,
        &mut t,
        &kc,
        "anchor",
        &["--no-cni-install", "--node-name", &node],
    );
    let (mut cached, mut plain) = (
        CniPod::in_namespace(&kns.name, ""),
        CniPod::in_namespace(&kns.name, ""),
    );
    let uid = kns.pod_on(&cached.pod_name(), Some("media"), Some(&node));
    kns.pod_on(&plain.pod_name(), None, Some(&node));
    cached.args.push_str(&format!(";K8S_POD_UID={uid}"));
    let socket = node_cache::socket_path(&t.state_dir());
    let synced = portslice_testkit::eventually(std::time::Duration::from_secs(20), || {
        let a = node_cache::ask(
            &socket,
            &CacheRequest {
                namespace: kns.name.clone(),
                pod: Some(cached.pod_name()),
                slice: None,
            },
        )?;
        (a.synced && a.slice.is_some()).then_some(a)
    })
    .expect("the daemon's cache syncs and knows the pod and its slice");
    assert_eq!(synced.pod.and_then(|p| p.uid), Some(uid));

    // A kubeconfig whose server answers nothing: whatever works below worked without it.
    let dead = TempDir::new("dead-api");
    let dead_kc = dead.0.join("kubeconfig");
    relayed_kubeconfig(&kc, 1, &dead_kc);
    let ipam = TempDir::new("ipam");
    let runtime = |kubeconfig: &Path| {
        let mut ps = portslice_conf(&t);
        ps["kubeconfig"] = json!(kubeconfig);
        ps["apiTimeoutMs"] = json!(2000);
        Runtime {
            node: &t.node,
            list: Conflist::ptp("1.0.0", &ipam.0, ps),
        }
    };
    let offline = runtime(&dead_kc);
    offline
        .add(&mut cached)
        .unwrap_or_else(|e| panic!("ADD from the cache, API server unreachable: {e:?}"));
    assert_eq!(
        sysctl_in(&cached.ns, "net.ipv4.ip_local_port_range"),
        "42900 42949"
    );
    let prev = offline.add_primary(&mut plain);
    let inv = offline.exec_last(&plain, "ADD", Some(&prev));
    assert!(inv.ok(), "a plain pod the cache knows: {inv:?}");
    assert_eq!(inv.json(), prev, "passes through untouched");

    // Not on this node (so not in the cache): the API server is asked, and here it is dead.
    let mut elsewhere = CniPod::in_namespace(&kns.name, "");
    kns.pod_on(&elsewhere.pod_name(), Some("voice"), Some("another-node"));
    let prev = offline.add_primary(&mut elsewhere);
    let inv = offline.exec_last(&elsewhere, "ADD", Some(&prev));
    assert_eq!(inv.error_code(), 11, "the API server was asked: {inv:?}");
    offline.del(&elsewhere).expect("DEL");
    // With a live API server the same pod is wired from it.
    let online = runtime(&daemon.kubeconfig_out);
    let mut elsewhere = CniPod::in_namespace(&kns.name, "");
    kns.pod_on(&elsewhere.pod_name(), Some("voice"), Some("another-node"));
    online
        .add(&mut elsewhere)
        .unwrap_or_else(|e| panic!("ADD from the API server: {e:?}"));
    assert_eq!(
        sysctl_in(&elsewhere.ns, "net.ipv4.ip_local_port_range"),
        "42950 42999"
    );
    for (rt, p) in [
        (&offline, &cached),
        (&offline, &plain),
        (&online, &elsewhere),
    ] {
        rt.del(p).expect("DEL");
    }

    // ADD latency through the real binary, slice from the cache vs from the API server
    // (`PORTSLICE_CACHE_LATENCY_RUNS`, default 10; the datapath benchmark runs 50 in release).
    let runs: usize = std::env::var("PORTSLICE_CACHE_LATENCY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let timed = |rt: &Runtime, on: Option<&str>| {
        let mut samples = Vec::new();
        for _ in 0..runs {
            let mut p = CniPod::in_namespace(&kns.name, "");
            kns.pod_on(&p.pod_name(), Some("media"), on);
            if on.is_some() {
                // The watch delivers the pod in milliseconds; wait for it, not for the API.
                portslice_testkit::eventually(std::time::Duration::from_secs(10), || {
                    let req = CacheRequest {
                        namespace: kns.name.clone(),
                        pod: Some(p.pod_name()),
                        slice: None,
                    };
                    node_cache::ask(&socket, &req)?.pod
                })
                .expect("the cache sees the new pod");
            }
            let prev = rt.add_primary(&mut p);
            let inv = rt.exec_last(&p, "ADD", Some(&prev));
            assert!(inv.ok(), "{inv:?}");
            samples.push(inv.elapsed);
            p.result = Some(inv.json());
            rt.del(&p).expect("DEL");
        }
        percentiles(samples)
    };
    let (from_cache, from_api) = (timed(&offline, Some(&node)), timed(&online, None));
    eprintln!(
        "CNI ADD with the pod's slice from the node's cache: p50 {:.1} ms p99 {:.1} ms; from the API server: p50 {:.1} ms p99 {:.1} ms ({runs} runs each, {} build)",
        from_cache.p50_ms,
        from_cache.p99_ms,
        from_api.p50_ms,
        from_api.p99_ms,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    drop(daemon);
}
