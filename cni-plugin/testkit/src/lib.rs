//! The test kit of the node side, shared by the tests (`cni-plugin/tests/node/`) and the
//! benchmark (`cni-plugin/tests/bench.rs`):
//! - this module: the netns topology (node, remote, pods) and the daemon running in it;
//! - [`runtime`]: plugins driven exactly as libcni drives them, with conflists at every version;
//! - [`rows`]: the rows of the connectivity matrix (docs/DESIGN.md), each written once;
//! - [`traffic`]: servers and clients in a netns, crafted packets; [`latency`]: CNI timings;
//!   [`loopback`]: a relay to the test API server; [`legacy`]: a node as the first release (datapath
//!   layout 1) left it, for the upgrade tests.
//!
//! Everything lives in namespaces created here and is torn down on Drop, even when a test
//! panics:
//!
//! ```text
//!   remote netns                 node netns                         pod netns (one per pod)
//!   eth0 198.18.0.2/24 ── veth ── up0 198.18.0.1/24 (node IP)
//!                                 vh<N> 10.244.0.1/32 ─── veth ─── eth0 10.244.0.<N>/32
//!                                 daemon (own pin root)             (+ node IP /32 for slice pods)
//! ```
//!
//! Names include the PID and a counter, so concurrent test binaries never collide; addresses
//! exist only inside these namespaces. Run commands in a netns with [`Netns::run`] (`ip -n` /
//! `nsenter --net`, never `ip netns exec`: it remounts /sys and hides /sys/fs/bpf) and open
//! sockets there with [`Netns::enter`] (a fresh thread that setns'd; the socket keeps its netns
//! wherever it is used afterwards).
//!
//! Pods here get a plain veth where the CNI chain would run ptp; a slice pod's netns is then wired
//! by the plugin's own code (`portslice_netns::wiring::apply` with the plan the plugin uses), so
//! the harness cannot drift from the plugin.
#![deny(rust_2018_idioms)]

pub mod latency;
pub mod legacy;
pub mod loopback;
pub mod rows;
pub mod runtime;
pub mod traffic;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use portslice_datapath::{PinnedDatapath, PodAttachment, PortRange, Protocol, SliceBinding};
use portslice_netns::{Ipv4Cidr, iface, plan::PodWiring, thread::in_netns, wiring};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Further addresses a test may give the remote ([`Topology::add_remote_address`]).
pub const REMOTE_IP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const REMOTE_IP3: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const UPLINK: &str = "up0";
/// The daemon's metrics server inside the node netns (its own loopback: no clash between tests).
pub const METRICS: &str = "127.0.0.1:9465";
pub const POOL: &str = "40000-49999";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Unique short id for names (interface names are limited to 15 bytes).
pub fn unique() -> String {
    format!(
        "{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// The switch that lets privileged tests skip when not root (e.g. a developer's unprivileged
/// `cargo test`). Without it they fail: a privileged test that passes without running would be
/// worse than none.
pub const SKIP_PRIVILEGED: &str = "PORTSLICE_SKIP_PRIVILEGED";

/// True when privileged tests can run (and bpffs is mounted). When not root: false if
/// `PORTSLICE_SKIP_PRIVILEGED=1` says to skip (printed loudly), a panic otherwise.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        let _ = Command::new("sh")
            .args([
                "-c",
                "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
            ])
            .status();
        return true;
    }
    if std::env::var(SKIP_PRIVILEGED).as_deref() == Ok("1") {
        eprintln!("\n!!!!! SKIPPED {test}: needs root ({SKIP_PRIVILEGED}=1 is set) !!!!!\n");
        return false;
    }
    panic!(
        "{test} needs root (network namespaces, eBPF); run as root, or set {SKIP_PRIVILEGED}=1 to skip it"
    );
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`/run/netns/<name>`), deleted on Drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}{}", unique());
        sh("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Runs a command inside the netns with nsenter (keeps /sys/fs/bpf visible).
    pub fn run(&self, cmd: &str, args: &[&str]) -> String {
        let net = format!("--net={}", self.path().display());
        let mut a = vec![net.as_str(), "--", cmd];
        a.extend_from_slice(args);
        sh("nsenter", &a)
    }

    /// A `Command` that runs inside the netns.
    pub fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(cmd);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.run("sysctl", &["-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a fresh thread inside this netns and returns its result.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).expect("netns file");
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The node daemon, running inside the node netns. Killed on Drop (pins stay; see Topology).
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pod: its netns, the host side of its veth and what was attached.
pub struct Pod {
    pub ns: Netns,
    pub host_veth: String,
    pub host_ifindex: u32,
    pub private_ip: Ipv4Addr,
    pub container_id: String,
    pub range: Option<PortRange>,
}

/// Remote + node (+ pods), with a daemon and a unique pin root. Dropped in reverse: pods, the
/// daemon, pins, namespaces.
pub struct Topology {
    pub pods: Vec<Pod>,
    pub daemon: Option<Daemon>,
    pub pin_root: PathBuf,
    pub id: String,
    next_pod: u32,
    pub remote: Netns,
    pub node: Netns,
}

/// The `portslice` binary under test: `$PORTSLICE_BIN`, else the one cargo built next to the
/// running test binary (`target/<profile>/deps/<test>` -> `target/<profile>/portslice`).
pub fn daemon_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("PORTSLICE_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("portslice"))
        .expect("a test binary lives in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} is missing: build it (cargo test -p portslice-cni does) or set PORTSLICE_BIN",
        bin.display()
    );
    bin
}

impl Topology {
    /// Node and remote joined by the uplink veth; no daemon yet.
    pub fn bare() -> Self {
        let node = Netns::new("psn");
        let remote = Netns::new("psr");
        let id = unique();
        node.ip(&[
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &remote.name,
        ]);
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", UPLINK]);
        node.ip(&["link", "set", UPLINK, "up"]);
        remote.ip(&["addr", "add", &format!("{REMOTE_IP}/24"), "dev", "eth0"]);
        remote.ip(&["link", "set", "eth0", "up"]);
        // A Kubernetes node forwards (bpf_fib_lookup refuses to without it).
        node.sysctl("net.ipv4.ip_forward", "1");
        Self {
            pods: Vec::new(),
            daemon: None,
            pin_root: PathBuf::from(format!("/sys/fs/bpf/portslice-test-{id}")),
            id,
            next_pod: 2,
            remote,
            node,
        }
    }

    /// A topology with the daemon running.
    #[allow(clippy::new_without_default)] // builds namespaces and starts a daemon: not a default
    pub fn new() -> Self {
        let mut t = Self::bare();
        t.start_daemon();
        t
    }

    /// Starts `portslice daemon` in the node netns and waits until the datapath is pinned and
    /// /healthz answers.
    pub fn start_daemon(&mut self) {
        self.start_daemon_with(&["--no-cni-install"]);
    }

    /// Where the daemon's stderr goes (kept when a test fails).
    pub fn daemon_log(&self) -> PathBuf {
        std::env::temp_dir().join(format!("portslice-daemon-{}.log", self.id))
    }

    /// The node's state dir (shared by its daemon and plugin; the node's own, as each node
    /// netns has its own reserved ports and pods).
    pub fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("portslice-state-{}", self.id))
    }

    /// The daemon's common arguments (uplink, node IP, pool, pin root, state dir).
    pub fn daemon_args(&self) -> Vec<String> {
        [
            "daemon",
            "--uplink",
            UPLINK,
            "--node-ip",
            &NODE_IP.to_string(),
            "--pool",
            POOL,
            "--pin-root",
            self.pin_root.to_str().unwrap(),
            "--state-dir",
            self.state_dir().to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Starts the daemon with `extra` arguments after the common ones.
    pub fn start_daemon_with(&mut self, extra: &[&str]) {
        let log = self.daemon_log();
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = self
            .node
            .command(daemon_binary().to_str().unwrap())
            .args(self.daemon_args())
            .args(["--metrics-addr", METRICS, "--reconcile-interval", "1"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawning the daemon");
        self.daemon = Some(Daemon { child });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self
                .metrics_get("/healthz")
                .is_some_and(|b| b.starts_with("ok"))
            {
                return;
            }
            if let Some(d) = &mut self.daemon
                && let Ok(Some(st)) = d.child.try_wait()
            {
                panic!(
                    "daemon exited with {st}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon not healthy after 20s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET on the daemon's HTTP server (inside the node netns); None when it does not answer.
    pub fn metrics_get(&self, path: &str) -> Option<String> {
        let path = path.to_string();
        self.node.enter(move || {
            let mut s =
                TcpStream::connect_timeout(&METRICS.parse().ok()?, Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
        })
    }

    /// Opens the pinned datapath from the node netns (as the CNI plugin does).
    pub fn with_datapath<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut PinnedDatapath) -> T + Send + 'static,
    ) -> T {
        let root = self.pin_root.clone();
        self.node.enter(move || {
            let mut dp = PinnedDatapath::open(&root).expect("opening the pinned datapath");
            f(&mut dp)
        })
    }

    /// Creates a pod netns wired with a plain veth; a slice pod also gets the node address,
    /// routes, rules and `ip_local_port_range`. Attaches it to the datapath.
    pub fn add_pod(&mut self, slice: Option<(u16, u16)>) -> &Pod {
        self.add_pod_unattached(slice);
        let att = self.attachment(self.pods.len() - 1);
        self.with_datapath(move |dp| dp.attach_pod(&att).expect("attach_pod"));
        self.pods.last().unwrap()
    }

    /// The attachment [`add_pod`](Self::add_pod) gives pod `i` (slice key `test/slice-<N>`, N the
    /// last byte of its private address; TCP and UDP).
    pub fn attachment(&self, i: usize) -> PodAttachment {
        let pod = &self.pods[i];
        PodAttachment {
            container_id: pod.container_id.clone(),
            host_veth_ifindex: pod.host_ifindex,
            pod_private_ip: pod.private_ip,
            slice: pod.range.map(|range| SliceBinding {
                slice_key: format!("test/slice-{}", pod.private_ip.octets()[3]),
                range,
                protocols: vec![Protocol::TCP, Protocol::UDP],
            }),
        }
    }

    /// Loads the first release's datapath (layout 1) into the node, as its daemon did; no
    /// daemon of this build runs yet.
    pub fn start_layout1(&mut self) {
        let root = self.pin_root.clone();
        self.node
            .enter(move || legacy::load(&root, NODE_IP, UPLINK))
            .unwrap_or_else(|e| panic!("loading the layout-1 datapath: {e}"));
    }

    /// Like [`add_pod`](Self::add_pod), attached the way the first release did (layout 1).
    pub fn add_pod_layout1(&mut self, slice: Option<(u16, u16)>) -> &Pod {
        self.add_pod_unattached(slice);
        let att = self.attachment(self.pods.len() - 1);
        let root = self.pin_root.clone();
        self.node
            .enter(move || legacy::attach_pod(&root, &att))
            .unwrap_or_else(|e| panic!("attaching under layout 1: {e}"));
        self.pods.last().unwrap()
    }

    /// Gives the remote another address on its uplink (a second source on the same wire).
    pub fn add_remote_address(&self, ip: Ipv4Addr) {
        self.remote
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    }

    /// Like [`add_pod`](Self::add_pod) without attaching it to the datapath (a pod of a node
    /// without PortSlice, e.g. behind the reference portmap plugin).
    pub fn add_pod_unattached(&mut self, slice: Option<(u16, u16)>) -> &Pod {
        let n = self.next_pod;
        self.next_pod += 1;
        let ns = Netns::new("psp");
        let host_veth = format!("vh{n}");
        let private_ip = Ipv4Addr::new(10, 244, 0, n as u8);
        self.node.ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.node
            .ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &host_veth]);
        self.node.ip(&["link", "set", &host_veth, "up"]);
        self.node.ip(&[
            "route",
            "add",
            &format!("{private_ip}/32"),
            "dev",
            &host_veth,
        ]);
        ns.ip(&["addr", "add", &format!("{private_ip}/32"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&[
            "route",
            "add",
            &format!("{GATEWAY}/32"),
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        // What the primary plugin (ptp) leaves: a default route via the gateway.
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &GATEWAY.to_string(),
            "dev",
            "eth0",
        ]);
        let range = slice.map(|(a, b)| PortRange { start: a, end: b });
        if let Some(r) = range {
            wire_slice_pod(&ns, private_ip, r);
        }
        let name = host_veth.clone();
        let host_ifindex = self
            .node
            .enter(move || iface::index_of(&name).expect("host veth"));
        let container_id = format!("ctr-{}-{n}", self.id);
        self.pods.push(Pod {
            ns,
            host_veth,
            host_ifindex,
            private_ip,
            container_id,
            range,
        });
        self.pods.last().unwrap()
    }
}

/// The wiring the CNI plugin gives a slice pod of this topology (docs/DESIGN.md, "The datapath").
pub fn pod_wiring(private_ip: Ipv4Addr, range: PortRange) -> PodWiring {
    PodWiring {
        ifname: "eth0".into(),
        node_ip: NODE_IP,
        private: Ipv4Cidr {
            addr: private_ip,
            prefix: 32,
        },
        gateway: Some(GATEWAY),
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("a CIDR")],
        range,
    }
}

/// Wires a slice pod's netns with the plugin's own code: node address /32, default route from it,
/// cluster CIDR from the private address, policy rules, ephemeral range = slice.
pub fn wire_slice_pod(ns: &Netns, private_ip: Ipv4Addr, range: PortRange) {
    let w = pod_wiring(private_ip, range);
    in_netns(&ns.path(), move || wiring::apply(&w))
        .unwrap_or_else(|e| panic!("wiring the slice pod {private_ip}: {e}"));
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Pods first (their netns go, and with them the veths), then the daemon, then every pin
        // (links detach when their pin goes), then the node and remote namespaces.
        self.pods.clear();
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        let root = self.pin_root.clone();
        let _ = self
            .node
            .enter(move || portslice_datapath::loader::unload(&root, UPLINK));
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = std::fs::remove_dir_all(self.state_dir());
        // The daemon's log is kept only when the test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(self.daemon_log());
        }
    }
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// kube-proxy-style rules in `ns`: drop `ctstate INVALID` in INPUT and FORWARD, so conntrack
/// tracks everything the host stack sees, as on a node (and a flow of which only one direction
/// passes conntrack is dropped).
pub fn drop_conntrack_invalid(ns: &Netns) {
    for chain in ["INPUT", "FORWARD"] {
        ns.run(
            "iptables",
            &[
                "-A",
                chain,
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "DROP",
            ],
        );
    }
}

/// Number of conntrack entries in the netns matching `args` (e.g. `-p tcp --dport 40000`).
pub fn conntrack_count(ns: &Netns, args: &[&str]) -> usize {
    let mut a = vec!["-L"];
    a.extend_from_slice(args);
    let out = ns
        .command("conntrack")
        .args(&a)
        .output()
        .expect("conntrack");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}
