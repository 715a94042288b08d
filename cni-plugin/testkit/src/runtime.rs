//! Driving the CNI chain exactly as a runtime does: each plugin of a conflist is executed with
//! the CNI_* environment and its config (with `name`, `cniVersion`, `prevResult` and
//! `runtimeConfig` filled in per the spec) on stdin, from inside the node's netns. The primary
//! plugins are Debian's reference plugins in /usr/lib/cni (CNI up to 1.0.0) or, for 1.1.0, a
//! newer release built by e2e/scripts/build-tools.sh; `portslice` is the built binary.
//! Builds on the netns topology of this crate (node + remote + daemon with its own pin root).

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{NODE_IP, NODE_IP6, Netns, Stack, Topology, daemon_binary, unique};

/// Where Debian's containernetworking-plugins live.
pub const REF_PLUGINS: &str = "/usr/lib/cni";
/// Every CNI version a chain is tested at: what kindnet, Flannel and Calico write (0.3.x) up to
/// the newest.
pub const CNI_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The reference plugins that speak `version`: Debian's stop at 1.0.0, so 1.1.0 chains use the
/// release build-tools.sh builds into `$CNI_PLUGINS_DIR`.
pub fn ref_plugins(version: &str) -> PathBuf {
    if version != "1.1.0" {
        return PathBuf::from(REF_PLUGINS);
    }
    let dir = std::env::var_os("CNI_PLUGINS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/portslice/cni-plugins-v1.7.1".into());
    assert!(
        dir.join("ptp").exists(),
        "{} has no reference plugins for CNI 1.1.0: run e2e/scripts/build-tools.sh cni-plugins",
        dir.display()
    );
    dir
}

/// libcni's rule: DEL carries the cached result as `prevResult` from 0.4.0 on, not before.
pub fn del_has_prev_result(version: &str) -> bool {
    !version.starts_with("0.3.")
}

/// CNI_PATH for a chain at `version`: its reference plugins, then the portslice binary.
pub fn cni_path(version: &str) -> String {
    format!(
        "{}:{}",
        ref_plugins(version).display(),
        daemon_binary().parent().expect("bin dir").display()
    )
}
/// Pods' private addresses come from here; the cluster CIDR the slice pods route privately.
pub const POD_SUBNET: &str = "10.245.0.0/24";
pub const CLUSTER_CIDR: &str = "10.245.0.0/16";
/// The same for IPv6 (ULA, inside our namespaces only).
pub const POD_SUBNET6: &str = "fd00:245::/64";
pub const CLUSTER_CIDR6: &str = "fd00:245::/56";

/// One plugin execution.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub plugin: String,
    pub command: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Invocation {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "{} {} printed no JSON ({e}): {self:?}",
                self.plugin, self.command
            )
        })
    }

    /// The spec's error code from stdout (the invocation must have failed).
    pub fn error_code(&self) -> u64 {
        assert_ne!(self.code, 0, "expected a failure: {self:?}");
        self.json()["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {:?}", self.stdout))
    }
}

/// The binary of `plugin_type`, searched along CNI_PATH in `env` as a runtime does.
pub fn plugin_path(plugin_type: &str, env: &[(String, String)]) -> PathBuf {
    if plugin_type == "portslice" {
        return daemon_binary();
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "CNI_PATH")
        .map_or(REF_PLUGINS, |(_, v)| v.as_str());
    path.split(':')
        .map(|d| Path::new(d).join(plugin_type))
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new(REF_PLUGINS).join(plugin_type))
}

/// The plugin's timings switch (`portslice_cni::cni::timing::ENV`; the testkit does not link
/// the plugin crate).
pub const TIMINGS_ENV: &str = "PORTSLICE_TIMINGS";

/// Runs a plugin binary with `env` and `stdin`, inside the netns at `netns` (setns before exec,
/// the way a runtime runs in the host netns).
pub fn exec_plugin(
    netns: Option<&Path>,
    plugin_type: &str,
    env: &[(String, String)],
    stdin: &str,
) -> Invocation {
    let mut cmd = Command::new(plugin_path(plugin_type, env));
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ns_file = netns.map(|p| File::open(p).expect("opening the node netns"));
    if let Some(f) = &ns_file {
        let fd = f.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd outlives the spawn.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let command = env
        .iter()
        .find(|(k, _)| k == "CNI_COMMAND")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    // Timings asked for: "process start" counts from here (see the plugin's `cni::timing`).
    if env.iter().any(|(k, _)| k == TIMINGS_ENV) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970");
        cmd.env(TIMINGS_ENV, now.as_nanos().to_string());
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {plugin_type}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writing stdin");
    let out = child.wait_with_output().expect("waiting for the plugin");
    let elapsed = start.elapsed();
    drop(ns_file);
    Invocation {
        plugin: plugin_type.to_string(),
        command,
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed,
    }
}

/// A network configuration list.
#[derive(Debug, Clone)]
pub struct Conflist {
    pub name: String,
    pub version: String,
    pub plugins: Vec<Value>,
}

impl Conflist {
    /// `ptp` + `host-local` (IPAM state in `ipam_dir`), then `portslice` with `extra` fields.
    pub fn ptp(version: &str, ipam_dir: &Path, portslice: Value) -> Self {
        Self::ptp_with(version, ipam_dir, portslice, Stack::V4)
    }

    /// [`ptp`](Self::ptp) whose pods get addresses of `stack` ([`POD_SUBNET`], [`POD_SUBNET6`]).
    pub fn ptp_with(version: &str, ipam_dir: &Path, portslice: Value, stack: Stack) -> Self {
        Self::primary_then_portslice(
            version,
            json!({"type": "ptp", "ipMasq": false}),
            ipam_dir,
            portslice,
            stack,
        )
    }

    /// `bridge` + `host-local`, then `portslice`.
    pub fn bridge(version: &str, ipam_dir: &Path, bridge: &str, portslice: Value) -> Self {
        Self::bridge_with(version, ipam_dir, bridge, portslice, Stack::V4)
    }

    /// [`bridge`](Self::bridge) whose pods get addresses of `stack`.
    pub fn bridge_with(
        version: &str,
        ipam_dir: &Path,
        bridge: &str,
        portslice: Value,
        stack: Stack,
    ) -> Self {
        Self::primary_then_portslice(
            version,
            json!({"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false}),
            ipam_dir,
            portslice,
            stack,
        )
    }

    /// `primary` with `host-local` IPAM from [`POD_SUBNET`] and/or [`POD_SUBNET6`] (state in
    /// `ipam_dir`), then `portslice`.
    fn primary_then_portslice(
        version: &str,
        mut primary: Value,
        ipam_dir: &Path,
        portslice: Value,
        stack: Stack,
    ) -> Self {
        let mut ranges = Vec::new();
        let mut routes = Vec::new();
        if stack.has(portslice_netns::Family::V4) {
            ranges.push(json!([{"subnet": POD_SUBNET}]));
            routes.push(json!({"dst": "0.0.0.0/0"}));
        }
        if stack.has(portslice_netns::Family::V6) {
            ranges.push(json!([{"subnet": POD_SUBNET6}]));
            routes.push(json!({"dst": "::/0"}));
        }
        primary["ipam"] = json!({
            "type": "host-local",
            "ranges": ranges,
            "routes": routes,
            "dataDir": ipam_dir,
        });
        Self {
            name: format!("psnet{}", unique()),
            version: version.into(),
            plugins: vec![primary, portslice],
        }
    }

    /// The file cnitool reads.
    pub fn to_json(&self) -> Value {
        json!({"cniVersion": self.version, "name": self.name, "plugins": self.plugins})
    }

    /// Plugin `i`'s stdin, the way libcni builds it.
    pub fn conf_for(
        &self,
        i: usize,
        prev: Option<&Value>,
        runtime_config: Option<&Value>,
    ) -> Value {
        let mut c = self.plugins[i].clone();
        c["name"] = json!(self.name);
        c["cniVersion"] = json!(self.version);
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        if let (Some(rc), Some(caps)) = (runtime_config, c.get("capabilities").cloned()) {
            // Only the capabilities the plugin declares are passed (CONVENTIONS.md).
            let mut out = serde_json::Map::new();
            for (k, v) in rc.as_object().into_iter().flatten() {
                if caps.get(k).and_then(Value::as_bool) == Some(true) {
                    out.insert(k.clone(), v.clone());
                }
            }
            c.as_object_mut()
                .expect("plugin object")
                .remove("capabilities");
            c["runtimeConfig"] = Value::Object(out);
        }
        c
    }
}

/// The portslice entry the node daemon would write, for the topology `t`: its node addresses
/// (one as a string, both as a list) and the cluster CIDRs of its families.
pub fn portslice_conf(t: &Topology) -> Value {
    let node: Vec<String> = t.node_addrs().iter().map(|a| a.to_string()).collect();
    let node_ip = match node.as_slice() {
        [one] => json!(one),
        _ => json!(node),
    };
    let mut cidrs = Vec::new();
    if t.stack.has(portslice_netns::Family::V4) {
        cidrs.push(CLUSTER_CIDR);
    }
    if t.stack.has(portslice_netns::Family::V6) {
        cidrs.push(CLUSTER_CIDR6);
    }
    json!({
        "type": "portslice",
        "nodeIP": node_ip,
        "clusterCIDRs": cidrs,
        "pinRoot": t.pin_root,
        "stateDir": t.state_dir(),
    })
}

/// A pod sandbox: its netns, container id and CNI_ARGS; `result` is the chain's cached result.
pub struct CniPod {
    pub ns: Netns,
    pub container_id: String,
    pub ifname: String,
    pub args: String,
    pub runtime_config: Option<Value>,
    pub result: Option<Value>,
    /// More environment for every plugin it runs (e.g. the benchmark's `PORTSLICE_TIMINGS`).
    pub extra_env: Vec<(String, String)>,
}

impl CniPod {
    /// `args` are extra CNI_ARGS (`KEY=VALUE;...`); kubelet-like identity is always there.
    pub fn new(args: &str) -> Self {
        Self::in_namespace("test", args)
    }

    /// A pod of Kubernetes namespace `namespace`, named `pod-<container id>`.
    pub fn in_namespace(namespace: &str, args: &str) -> Self {
        let ns = Netns::new("psc");
        let container_id = format!("cid{}", unique());
        let mut all = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=pod-{container_id};K8S_POD_INFRA_CONTAINER_ID={container_id}"
        );
        if !args.is_empty() {
            all.push(';');
            all.push_str(args);
        }
        Self {
            ns,
            container_id,
            ifname: "eth0".into(),
            args: all,
            runtime_config: None,
            result: None,
            extra_env: Vec::new(),
        }
    }

    /// The Kubernetes pod name in CNI_ARGS.
    pub fn pod_name(&self) -> String {
        format!("pod-{}", self.container_id)
    }

    /// The environment of `command` for a chain at CNI 1.0.0 (Debian's plugins).
    pub fn env(&self, command: &str) -> Vec<(String, String)> {
        self.env_at(command, "1.0.0")
    }

    /// The environment of `command` for a chain at `version`.
    pub fn env_at(&self, command: &str, version: &str) -> Vec<(String, String)> {
        let path = cni_path(version);
        [
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_NETNS", self.ns.path().display().to_string()),
            ("CNI_IFNAME", self.ifname.clone()),
            ("CNI_ARGS", self.args.clone()),
            ("CNI_PATH", path),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(self.extra_env.iter().cloned())
        .collect()
    }

    /// The addresses of the cached result, in its order.
    fn result_ips(&self) -> Vec<IpAddr> {
        let r = self.result.as_ref().expect("pod has no result");
        r["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
            .collect()
    }

    /// The pod's private IPv4 address from the cached result (the first IPv4 of it).
    pub fn private_ip(&self) -> Ipv4Addr {
        self.result_ips()
            .into_iter()
            .find_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .expect("the pod has an IPv4 address")
    }

    /// The pod's private IPv6 address from the cached result (the first IPv6 of it).
    pub fn private_ip6(&self) -> Ipv6Addr {
        self.result_ips()
            .into_iter()
            .find_map(|a| match a {
                IpAddr::V6(a) => Some(a),
                IpAddr::V4(_) => None,
            })
            .expect("the pod has an IPv6 address")
    }

    /// Its private address of `f`.
    pub fn private(&self, f: portslice_netns::Family) -> IpAddr {
        match f {
            portslice_netns::Family::V4 => self.private_ip().into(),
            portslice_netns::Family::V6 => self.private_ip6().into(),
        }
    }
}

/// A runtime for one conflist, executing plugins in the node netns.
pub struct Runtime<'a> {
    pub node: &'a Netns,
    pub list: Conflist,
}

impl Runtime<'_> {
    /// Plugin `i` of the chain alone, for `pod`, with `prev` as `prevResult`.
    pub fn exec_at(
        &self,
        i: usize,
        pod: &CniPod,
        command: &str,
        prev: Option<&Value>,
    ) -> Invocation {
        let conf = self.list.conf_for(i, prev, pod.runtime_config.as_ref());
        exec_plugin(
            Some(&self.node.path()),
            plugin_type(&self.list.plugins[i]),
            &pod.env_at(command, &self.list.version),
            &conf.to_string(),
        )
    }

    /// ADD through the whole chain; on success caches the final result in `pod.result`. On failure
    /// returns the failing invocation (the runtime would then call DEL, as kubelet does).
    pub fn add(&self, pod: &mut CniPod) -> Result<Value, Invocation> {
        let mut prev: Option<Value> = None;
        for i in 0..self.list.plugins.len() {
            let inv = self.exec_at(i, pod, "ADD", prev.as_ref());
            if !inv.ok() {
                return Err(inv);
            }
            prev = Some(inv.json());
        }
        pod.result = prev.clone();
        Ok(prev.expect("a chain has plugins"))
    }

    /// ADD of the primary plugin alone (the first of the chain, e.g. ptp), which must succeed;
    /// caches its result in `pod.result` and returns it: the `prevResult` portslice sees.
    pub fn add_primary(&self, pod: &mut CniPod) -> Value {
        let inv = self.exec_at(0, pod, "ADD", None);
        assert!(inv.ok(), "{} ADD: {inv:?}", inv.plugin);
        pod.result = Some(inv.json());
        inv.json()
    }

    /// Only the last plugin (portslice), with `prevResult` from the chain before it.
    pub fn exec_last(&self, pod: &CniPod, command: &str, prev: Option<&Value>) -> Invocation {
        self.exec_at(self.list.plugins.len() - 1, pod, command, prev)
    }

    /// CHECK through the chain with the cached result.
    pub fn check(&self, pod: &CniPod) -> Result<(), Invocation> {
        self.each(
            pod,
            "CHECK",
            pod.result.as_ref(),
            0..self.list.plugins.len(),
        )
    }

    /// DEL in reverse order, with the cached result where the version carries it.
    pub fn del(&self, pod: &CniPod) -> Result<(), Invocation> {
        let prev = pod
            .result
            .as_ref()
            .filter(|_| del_has_prev_result(&self.list.version));
        self.each(pod, "DEL", prev, (0..self.list.plugins.len()).rev())
    }

    /// `command` with `prev` for the plugins at `order`; stops at the first failure.
    fn each(
        &self,
        pod: &CniPod,
        command: &str,
        prev: Option<&Value>,
        order: impl Iterator<Item = usize>,
    ) -> Result<(), Invocation> {
        for i in order {
            let inv = self.exec_at(i, pod, command, prev);
            if !inv.ok() {
                return Err(inv);
            }
        }
        Ok(())
    }
}

fn plugin_type(p: &Value) -> &str {
    p["type"].as_str().expect("plugin type")
}

/// A scratch directory removed on Drop (IPAM state, conflists, caches).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!("portslice-{what}-{}", unique()));
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What PortSlice may have left in a pod's netns, IPv4 and IPv6: the node address, rules marked
/// proto 83, a moved local rule, a default route with `src <node IP>`. Empty when clean.
pub fn leftovers(ns: &Netns) -> Vec<String> {
    let mut out = Vec::new();
    for (f, node, bits) in [
        ("-4", NODE_IP.to_string(), 32),
        ("-6", NODE_IP6.to_string(), 128),
    ] {
        let addrs = ns.ip(&[f, "addr"]);
        if addrs.contains(&format!("{node}/{bits}")) {
            out.push(format!("node address still there: {addrs}"));
        }
        let rules = ns.ip(&[f, "rule"]);
        if rules.contains("proto 83")
            || !rules
                .lines()
                .any(|l| l.starts_with("0:") && l.contains("lookup local"))
        {
            out.push(format!("{f} rules not restored: {rules}"));
        }
        let routes = ns.ip(&[f, "route"]);
        if routes.contains(&format!("src {node}")) || routes.contains("proto 83") {
            out.push(format!("{f} routes not restored: {routes}"));
        }
    }
    out
}

/// The datapath's attachments for `container_id` (opened from the node netns).
pub fn datapath_has(t: &Topology, container_id: &str) -> bool {
    let id = container_id.to_string();
    t.with_datapath(move |dp| {
        dp.list_pods()
            .expect("list_pods")
            .iter()
            .any(|p| p.container_id == id)
    })
}

pub fn sysctl_in(ns: &Netns, key: &str) -> String {
    ns.run("cat", &[&format!("/proc/sys/{}", key.replace('.', "/"))])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
