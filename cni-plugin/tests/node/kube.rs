//! Where a pod's slice comes from when Kubernetes is there: the slice annotation passed by the
//! runtime (`io.kubernetes.cri.pod-annotations`, no Pod read) or read from the Pod, and the
//! range read from the PortSlice's status on a real kube-apiserver + etcd
//! (`e2e/scripts/test-datapath.sh` starts one and exports KUBECONFIG). Root. It fails
//! without root or KUBECONFIG unless skipped explicitly (PORTSLICE_SKIP_PRIVILEGED=1,
//! PORTSLICE_SKIP_KUBE=1).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use portslice_crds::{PortRange, PortSlice, PortSliceSpec, Protocol, SLICE_ANNOTATION};
use portslice_testkit::latency::percentiles;
use portslice_testkit::loopback::Relay;
use portslice_testkit::runtime::{
    CniPod, Conflist, Runtime, TempDir, datapath_has, leftovers, portslice_conf, sysctl_in,
};
use portslice_testkit::traffic::{tcp_request, tcp_server};
use portslice_testkit::{NODE_IP, Topology, require_root};
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
        Self { rt, client, name }
    }

    /// A PortSlice with `range` written into its status, as the operator would.
    fn slice(&self, name: &str, range: Option<(u16, u16)>) {
        self.rt.block_on(async {
            let api: Api<PortSlice> = Api::namespaced(self.client.clone(), &self.name);
            let spec = PortSliceSpec { size: Some(100), ports: None, protocols: vec![Protocol::TCP, Protocol::UDP] };
            api.create(&PostParams::default(), &PortSlice::new(name, spec)).await.expect("create PortSlice");
            if let Some((start, end)) = range {
                let status = json!({"status": {"range": PortRange { start, end }, "rangeText": format!("{start}-{end}"), "sliverCount": 0}});
                api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("set status");
            }
        });
    }

    /// A Pod object named like the CNI pod, with the annotation (or none).
    fn pod(&self, name: &str, slice: Option<&str>) {
        self.rt.block_on(async {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.name);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": slice.map(|s| json!({SLICE_ANNOTATION: s})).unwrap_or(json!({}))},
                "spec": {"containers": [{"name": "c", "image": "none"}]}
            }))
            .expect("pod");
            api.create(&PostParams::default(), &pod).await.expect("create Pod");
        });
    }
}

impl Drop for KubeNs {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.name.clone());
        self.rt.block_on(async move {
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
