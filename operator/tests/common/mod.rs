//! Harness for the operator's integration tests against a real kube-apiserver + etcd
//! (`e2e/scripts/test-operator.sh` starts them and exports KUBECONFIG).
//!
//! Each test gets a throwaway namespace (deleted afterwards, even when the test fails) and runs
//! the real operator binary as a child process scoped to that namespace, so tests can run in
//! parallel and kill or restart the operator for real.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use portslice_crds::{PortRange, PortSlice, PortSliceSpec, Protocol};
use serde_json::json;

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A client for the test API server; fails loudly when there is none.
pub async fn client() -> Client {
    if std::env::var_os("KUBECONFIG").is_none() {
        panic!(
            "KUBECONFIG is not set: the operator integration tests need a real kube-apiserver. \
             Run e2e/scripts/test-operator.sh, or start one with e2e/scripts/apiserver.sh and export KUBECONFIG."
        );
    }
    Client::try_default().await.expect("client from KUBECONFIG")
}

/// Installs the CRD from crds/ (server-side apply, idempotent) and waits until it is served.
pub async fn install_crd(client: &Client) {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds/portslice.io_portslices.yaml");
    let text = std::fs::read_to_string(&path).expect("read CRD yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("parse CRD yaml");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    api.patch(
        &name,
        &PatchParams::apply("portslice-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    wait_until("CRD established", TIMEOUT, || async {
        let crd = api.get(&name).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

/// `kubectl apply -f -` of `manifests` against the test API server (cluster-scoped objects such
/// as admission policies, which the typed client has no builder for here).
pub fn kubectl_apply(manifests: &[u8]) {
    let cache = std::env::var("PORTSLICE_CACHE").unwrap_or_else(|_| "/var/cache/portslice".into());
    let version = std::env::var("K8S_VERSION").unwrap_or_else(|_| "1.34.4".into());
    let kubectl = format!("{cache}/k8s-v{version}/bin/kubectl");
    let mut child = Command::new(&kubectl)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {kubectl}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(manifests)
        .expect("writing manifests");
    let out = child.wait_with_output().expect("kubectl apply");
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `probe` until it returns Some, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A throwaway namespace for one test.
pub struct TestNs {
    pub client: Client,
    pub name: String,
}

impl TestNs {
    pub fn slices(&self) -> Api<PortSlice> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Starts an operator scoped to this namespace (its Lease lives here too).
    pub fn operator(&self, extra: &[&str]) -> Operator {
        Operator::start(&self.name, extra)
    }

    /// The operator with a config file (`reservations`, `quotas`, ...), YAML text, that may name
    /// this namespace as `{ns}`.
    pub fn operator_with_config(&self, yaml: &str, extra: &[&str]) -> Operator {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "operator-config-{}-{}.yaml",
            self.name,
            nanos()
        ));
        std::fs::write(&path, yaml.replace("{ns}", &self.name)).expect("write operator config");
        let mut args = vec!["--config", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Operator::start(&self.name, &args)
    }

    /// A reservation rule opening `ports` of this namespace to exact reservations.
    pub fn reservations(&self, ports: &str) -> String {
        format!("reservations:\n- {{ports: \"{ports}\", namespaces: [\"{{ns}}\"]}}\n")
    }

    pub async fn create(&self, name: &str, spec: PortSliceSpec) -> Result<PortSlice, kube::Error> {
        let mut slice = PortSlice::new(name, spec);
        slice.metadata.namespace = Some(self.name.clone());
        self.slices().create(&PostParams::default(), &slice).await
    }

    pub async fn create_size(&self, name: &str, size: u32) -> PortSlice {
        self.create(name, size_spec(size))
            .await
            .unwrap_or_else(|e| panic!("create slice {name}: {e}"))
    }

    pub async fn create_exact(&self, name: &str, start: u16, end: u16) -> PortSlice {
        self.create(name, exact_spec(start, end))
            .await
            .unwrap_or_else(|e| panic!("create slice {name}: {e}"))
    }

    /// Waits until the slice's Ready condition has `reason`; returns the slice.
    pub async fn wait_reason(&self, name: &str, reason: &str) -> PortSlice {
        let api = self.slices();
        wait_until(
            &format!("slice {name} to have reason {reason}"),
            TIMEOUT,
            || async {
                let s = api.get_opt(name).await.ok()??;
                (ready_reason(&s).as_deref() == Some(reason)).then_some(s)
            },
        )
        .await
    }

    /// Waits until the slice holds a range; returns it.
    pub async fn wait_allocated(&self, name: &str) -> PortRange {
        let s = self.wait_reason(name, "Allocated").await;
        range_of(&s).expect("allocated slice has a range")
    }

    pub async fn wait_gone(&self, name: &str, timeout: Duration) {
        let api = self.slices();
        wait_until(&format!("slice {name} to be gone"), timeout, || async {
            matches!(api.get_opt(name).await, Ok(None)).then_some(())
        })
        .await
    }

    pub async fn delete(&self, name: &str) {
        self.slices()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }

    /// Events about `name` with `reason`.
    pub async fn events(&self, name: &str, reason: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.name);
        let list = api.list(&ListParams::default()).await.expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }

    pub async fn wait_event(&self, name: &str, reason: &str) -> Event {
        wait_until(&format!("event {reason} for {name}"), TIMEOUT, || async {
            self.events(name, reason).await.into_iter().next()
        })
        .await
    }

    /// A pod of `slice` bound to `node`, with its phase set (there is no kubelet to run it).
    pub async fn create_pod(&self, name: &str, slice: &str, node: &str, phase: &str) -> Pod {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "annotations": { portslice_crds::SLICE_ANNOTATION: slice } },
            "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "example.invalid/none" }] },
        }))
        .expect("pod json");
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
        self.set_phase(name, phase).await
    }

    pub async fn set_phase(&self, name: &str, phase: &str) -> Pod {
        self.pods()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "phase": phase } })),
            )
            .await
            .unwrap_or_else(|e| panic!("set phase of pod {name}: {e}"))
    }

    /// Deletes a pod at once (there is no kubelet to confirm a graceful deletion).
    pub async fn delete_pod(&self, name: &str) {
        self.pods()
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .expect("delete pod");
    }

    /// Every slice's range, asserting that no two overlap.
    pub async fn assert_no_overlap(&self) -> BTreeMap<String, PortRange> {
        let slices = self
            .slices()
            .list(&ListParams::default())
            .await
            .expect("list slices")
            .items;
        assert_disjoint(
            slices
                .iter()
                .filter_map(|s| Some((s.name_any(), range_of(s)?))),
        )
    }

    async fn cleanup(&self) {
        let slices = self.slices();
        if let Ok(list) = slices.list(&ListParams::default()).await {
            for s in list.items {
                let _ = slices
                    .patch(
                        &s.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
            }
        }
        let _ = slices
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await;
        let _ = self
            .pods()
            .delete_collection(
                &DeleteParams::default().grace_period(0),
                &ListParams::default(),
            )
            .await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

pub fn size_spec(size: u32) -> PortSliceSpec {
    PortSliceSpec::of_size(size)
}

pub fn exact_spec(start: u16, end: u16) -> PortSliceSpec {
    PortSliceSpec {
        protocols: vec![Protocol::UDP],
        ..PortSliceSpec::exact(PortRange { start, end })
    }
}

pub fn range_of(s: &PortSlice) -> Option<PortRange> {
    s.status.as_ref().and_then(|st| st.range)
}

pub fn ready_reason(s: &PortSlice) -> Option<String> {
    let st = s.status.as_ref()?;
    st.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.clone())
}

pub fn condition(s: &PortSlice, type_: &str) -> Option<portslice_crds::Condition> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

/// Asserts the ranges are pairwise disjoint; returns them by name.
pub fn assert_disjoint(
    ranges: impl IntoIterator<Item = (String, PortRange)>,
) -> BTreeMap<String, PortRange> {
    let by_name: BTreeMap<String, PortRange> = ranges.into_iter().collect();
    let mut sorted: Vec<(&String, &PortRange)> = by_name.iter().collect();
    sorted.sort_by_key(|(_, r)| r.start);
    for w in sorted.windows(2) {
        assert!(
            w[0].1.end < w[1].1.start,
            "{} ({}) overlaps {} ({})",
            w[0].0,
            w[0].1,
            w[1].0,
            w[1].1
        );
    }
    by_name
}

/// Runs one test in a fresh namespace, cleaning it up whatever happens.
pub async fn with_namespace<F, Fut>(test: &str, body: F)
where
    F: FnOnce(TestNs) -> Fut,
    Fut: Future<Output = ()>,
{
    let client = client().await;
    install_crd(&client).await;
    let name = format!(
        "{}-{}-{}",
        test.replace('_', "-").chars().take(40).collect::<String>(),
        std::process::id(),
        nanos() % 100_000
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    // Pods need the namespace's default ServiceAccount, which no controller creates here.
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), &name)
        .create(&PostParams::default(), &sa)
        .await
        .expect("create SA");
    let test_ns = TestNs {
        client: client.clone(),
        name: name.clone(),
    };
    let outcome = std::panic::AssertUnwindSafe(body(TestNs { client, name }))
        .catch_unwind()
        .await;
    test_ns.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The operator binary running as a child process. Killed (SIGKILL) when dropped.
pub struct Operator {
    child: Option<Child>,
    pub metrics_addr: SocketAddr,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(namespace: &str, extra: &[&str]) -> Self {
        let metrics_addr = free_addr();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let log = dir.join(format!("operator-{namespace}-{}.log", nanos()));
        let file = File::create(&log).expect("create operator log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portslice-operator"));
        cmd.args([
            "--watch-namespace",
            namespace,
            "--lease-namespace",
            namespace,
            "--lease-name",
            "portslice-operator",
        ])
        .args(["--metrics-addr", &metrics_addr.to_string()])
        .args([
            "--lease-duration",
            "3",
            "--lease-grace",
            "1",
            "--quarantine",
            "1s",
            "--retry-interval",
            "2s",
        ])
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("OPERATOR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone log handle"))
        .stderr(file);
        let child = cmd.spawn().expect("spawn portslice-operator");
        Self {
            child: Some(child),
            metrics_addr,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL: no chance to release the Lease or finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("operator is running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().expect("wait for operator") {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "operator did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal by name (STOP, CONT, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
        assert!(
            status.map(|s| s.success()).unwrap_or(false),
            "kill -{sig} failed"
        );
    }

    /// Waits for the process to exit on its own; returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "operator did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// GET on the admin server: (status code, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_addr, path)
    }

    pub async fn wait_ready(&self) {
        wait_until("operator /readyz", TIMEOUT, || async {
            matches!(self.get("/readyz"), Some((200, _))).then_some(())
        })
        .await
    }

    /// Waits until this replica leads (its /metrics says portslice_leader 1).
    pub async fn wait_leader(&self) {
        wait_until("operator to lead", TIMEOUT, || async {
            let (_, body) = self.get("/metrics")?;
            body.lines()
                .any(|l| l == "portslice_leader 1")
                .then_some(())
        })
        .await
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- operator log {} (tail) ---\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr")
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}
