//! The test kit of the node side, shared by the tests (`cni-plugin/tests/node/`) and the
//! benchmark (`cni-plugin/tests/bench.rs`):
//! - this module: the netns topology (node, remote, pods) and the daemon running in it;
//! - [`runtime`]: plugins driven exactly as libcni drives them, with conflists at every version;
//!   [`cni_node`]: a node whose pods all come through the chain (ptp or bridge, either family);
//! - [`rows`]: the rows of the connectivity matrix (docs/DESIGN.md), each written once;
//! - [`traffic`]: servers and clients in a netns, crafted packets; [`icmp6`]: their ICMPv6 and
//!   crafted-IPv6 counterparts; [`latency`]: CNI timings;
//!   [`loopback`]: a relay to the test API server; [`legacy`]: a node as the first release (datapath
//!   layout 1) left it, for the upgrade tests.
//!
//! Everything lives in namespaces created here and is torn down on Drop, even when a test
//! panics:
//!
//! ```text
//!   remote netns                 node netns                         pod netns (one per pod)
//!   eth0 198.18.0.2/24 ── veth ── up0 198.18.0.1/24 (node IP)
//!        2001:2::2/64                 2001:2::1/64 (node IPv6)
//!                                 vh<N> 10.244.0.1/32 ─── veth ─── eth0 10.244.0.<N>/32
//!                                       fd00:244::1/128                 fd00:244::<N>/128
//!                                 daemon (own pin root)             (+ node IP /32, /128 for slice pods)
//! ```
//!
//! A topology has a [`Stack`]: IPv4 only (the default, as before dual stack), IPv6 only, or both;
//! the node, the remote, the daemon's `--node-ip` and the pods get the addresses of its families
//! (a pod may have fewer: [`Topology::add_pod_with`]). IPv6 addresses are from the benchmarking
//! range 2001:2::/48 (RFC 5180) on the uplink, ULA fd00::/8 for pods.
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

pub mod cni_node;
pub mod icmp6;
pub mod latency;
pub mod legacy;
pub mod loopback;
pub mod rows;
pub mod runtime;
pub mod traffic;

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use portslice_datapath::{PinnedDatapath, PodAttachment, PortRange, Protocol, SliceBinding};
pub use portslice_netns::Family;
use portslice_netns::plan::{PodWiring, PrivateAddress};
use portslice_netns::{IpCidr, NodeAddrs, iface, thread::in_netns, wiring};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Further addresses a test may give the remote ([`Topology::add_remote_address`]).
pub const REMOTE_IP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const REMOTE_IP3: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The node's IPv6 address, on the uplink (benchmarking range, RFC 5180).
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const REMOTE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// Further IPv6 addresses a test may give the remote.
pub const REMOTE_IP6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 3);
pub const REMOTE_IP6_3: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 4);
/// The pods' IPv6 gateway (on every host veth) and their addresses, `fd00:244::<N>`.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
/// The pods' cluster CIDRs of the veth topology.
pub const CLUSTER_CIDR4: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR6: &str = "fd00:244::/64";

/// The address families of a topology or a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    V4,
    V6,
    Dual,
}

impl Stack {
    pub fn has(self, f: Family) -> bool {
        match self {
            Self::V4 => f == Family::V4,
            Self::V6 => f == Family::V6,
            Self::Dual => true,
        }
    }

    /// Its families, IPv4 first.
    pub fn families(self) -> Vec<Family> {
        [Family::V4, Family::V6]
            .into_iter()
            .filter(|f| self.has(*f))
            .collect()
    }

    /// The stack of just `f`.
    pub fn of(f: Family) -> Self {
        match f {
            Family::V4 => Self::V4,
            Family::V6 => Self::V6,
        }
    }

    /// The node addresses a node of this stack shares.
    pub fn node_addrs(self) -> NodeAddrs {
        NodeAddrs {
            v4: self.has(Family::V4).then_some(NODE_IP),
            v6: self.has(Family::V6).then_some(NODE_IP6),
        }
    }
}

/// The node's address of `f`.
pub fn node_ip(f: Family) -> IpAddr {
    match f {
        Family::V4 => NODE_IP.into(),
        Family::V6 => NODE_IP6.into(),
    }
}

/// The remote's (first) address of `f`.
pub fn remote_ip(f: Family) -> IpAddr {
    match f {
        Family::V4 => REMOTE_IP.into(),
        Family::V6 => REMOTE_IP6.into(),
    }
}

/// The remote's second address of `f` (see [`Topology::add_remote_address`]).
pub fn remote_ip2(f: Family) -> IpAddr {
    match f {
        Family::V4 => REMOTE_IP2.into(),
        Family::V6 => REMOTE_IP6_2.into(),
    }
}

/// Pod `n`'s private IPv6 address.
pub fn pod_ip6(n: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, n as u16)
}
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
    /// Its number on the node (`vh<N>`, `10.244.0.<N>`, `fd00:244::<N>`).
    pub n: u32,
    /// Its private IPv4 address; `0.0.0.0` for an IPv6-only pod.
    pub private_ip: Ipv4Addr,
    /// Its private IPv6 address, if it has IPv6.
    pub private_ip6: Option<Ipv6Addr>,
    pub container_id: String,
    pub range: Option<PortRange>,
}

impl Pod {
    /// Its private address of `f` (panics when it has none: a test asked for the wrong family).
    pub fn private(&self, f: Family) -> IpAddr {
        match f {
            Family::V4 => {
                assert!(
                    !self.private_ip.is_unspecified(),
                    "pod {} has no IPv4",
                    self.n
                );
                self.private_ip.into()
            }
            Family::V6 => self
                .private_ip6
                .unwrap_or_else(|| panic!("pod {} has no IPv6", self.n))
                .into(),
        }
    }
}

/// Remote + node (+ pods), with a daemon and a unique pin root. Dropped in reverse: pods, the
/// daemon, pins, namespaces.
pub struct Topology {
    /// The families of the node, the remote and (by default) the pods.
    pub stack: Stack,
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
    /// Node and remote joined by the uplink veth, IPv4 only; no daemon yet.
    pub fn bare() -> Self {
        Self::bare_with(Stack::V4)
    }

    /// Node and remote joined by the uplink veth, with the addresses of `stack`; no daemon yet.
    pub fn bare_with(stack: Stack) -> Self {
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
        if stack.has(Family::V4) {
            node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", UPLINK]);
            remote.ip(&["addr", "add", &format!("{REMOTE_IP}/24"), "dev", "eth0"]);
        }
        if stack.has(Family::V6) {
            // nodad: the addresses are usable at once (no duplicate detection on our own wire).
            node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{NODE_IP6}/64"),
                "dev",
                UPLINK,
                "nodad",
            ]);
            remote.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{REMOTE_IP6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            // A Kubernetes node forwards (bpf_fib_lookup refuses to without it).
            node.sysctl("net.ipv6.conf.all.forwarding", "1");
        }
        node.ip(&["link", "set", UPLINK, "up"]);
        remote.ip(&["link", "set", "eth0", "up"]);
        // A Kubernetes node forwards (bpf_fib_lookup refuses to without it).
        node.sysctl("net.ipv4.ip_forward", "1");
        Self {
            stack,
            pods: Vec::new(),
            daemon: None,
            pin_root: PathBuf::from(format!("/sys/fs/bpf/portslice-test-{id}")),
            id,
            next_pod: 2,
            remote,
            node,
        }
    }

    /// An IPv4 topology with the daemon running.
    #[allow(clippy::new_without_default)] // builds namespaces and starts a daemon: not a default
    pub fn new() -> Self {
        Self::new_with(Stack::V4)
    }

    /// A topology of `stack` with the daemon running (sharing the node addresses of `stack`).
    pub fn new_with(stack: Stack) -> Self {
        let mut t = Self::bare_with(stack);
        t.start_daemon();
        t
    }

    /// The node addresses the daemon shares.
    pub fn node_addrs(&self) -> NodeAddrs {
        self.stack.node_addrs()
    }

    /// Starts `portslice daemon` in the node netns and waits until the datapath is pinned and
    /// /readyz answers.
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

    /// The daemon's common arguments (uplink, node IPs, pool, pin root, state dir).
    pub fn daemon_args(&self) -> Vec<String> {
        [
            "daemon",
            "--uplink",
            UPLINK,
            "--node-ip",
            &self.node_addrs().to_string(),
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
                .metrics_get("/readyz")
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

    /// Creates a pod netns wired with a plain veth, with the topology's families; a slice pod
    /// also gets the node addresses, routes, rules and `ip_local_port_range`. Attaches it to the
    /// datapath.
    pub fn add_pod(&mut self, slice: Option<(u16, u16)>) -> &Pod {
        self.add_pod_with(slice, self.stack)
    }

    /// [`add_pod`](Self::add_pod) with the families of `stack` only (e.g. an IPv4-only pod on a
    /// dual-stack node).
    pub fn add_pod_with(&mut self, slice: Option<(u16, u16)>, stack: Stack) -> &Pod {
        self.add_pod_unattached_with(slice, stack);
        let att = self.attachment(self.pods.len() - 1);
        self.with_datapath(move |dp| dp.attach_pod(&att).expect("attach_pod"));
        self.pods.last().unwrap()
    }

    /// The attachment [`add_pod`](Self::add_pod) gives pod `i` (slice key `test/slice-<N>`, N its
    /// number, the last byte of its private addresses; TCP and UDP).
    pub fn attachment(&self, i: usize) -> PodAttachment {
        let pod = &self.pods[i];
        PodAttachment {
            container_id: pod.container_id.clone(),
            host_veth_ifindex: pod.host_ifindex,
            pod_private_ip: pod.private_ip,
            slice: pod.range.map(|range| SliceBinding {
                slice_key: format!("test/slice-{}", pod.n),
                range,
                protocols: vec![Protocol::TCP, Protocol::UDP],
            }),
        }
    }

    /// Loads the first release's datapath (layout 1) into the node, as its daemon did; no
    /// daemon of this build runs yet.
    /// Loads the datapath of an earlier `release` (no daemon), as that release's daemon did.
    pub fn start_release(&mut self, release: legacy::Release) {
        let root = self.pin_root.clone();
        self.node
            .enter(move || legacy::load(release, &root, NODE_IP, UPLINK))
            .unwrap_or_else(|e| panic!("loading the {release:?} datapath: {e}"));
    }

    /// Like [`add_pod`](Self::add_pod), attached the way an earlier `release` did.
    pub fn add_pod_release(&mut self, release: legacy::Release, slice: Option<(u16, u16)>) -> &Pod {
        self.add_pod_unattached(slice);
        let att = self.attachment(self.pods.len() - 1);
        let root = self.pin_root.clone();
        self.node
            .enter(move || legacy::attach_pod(release, &root, &att))
            .unwrap_or_else(|e| panic!("attaching under {release:?}: {e}"));
        self.pods.last().unwrap()
    }

    /// Gives the remote another address on its uplink (a second source on the same wire).
    pub fn add_remote_address(&self, ip: impl Into<IpAddr>) {
        match ip.into() {
            IpAddr::V4(ip) => self
                .remote
                .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]),
            IpAddr::V6(ip) => self.remote.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "eth0",
                "nodad",
            ]),
        };
    }

    /// Like [`add_pod`](Self::add_pod) without attaching it to the datapath (a pod of a node
    /// without PortSlice, e.g. behind the reference portmap plugin).
    pub fn add_pod_unattached(&mut self, slice: Option<(u16, u16)>) -> &Pod {
        self.add_pod_unattached_with(slice, self.stack)
    }

    /// [`add_pod_unattached`](Self::add_pod_unattached) with the families of `stack`.
    pub fn add_pod_unattached_with(&mut self, slice: Option<(u16, u16)>, stack: Stack) -> &Pod {
        let n = self.next_pod;
        self.next_pod += 1;
        let ns = Netns::new("psp");
        let host_veth = format!("vh{n}");
        self.node.ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.node.ip(&["link", "set", &host_veth, "up"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let mut privates = Vec::new();
        let private_ip = if stack.has(Family::V4) {
            let ip = Ipv4Addr::new(10, 244, 0, n as u8);
            veth_family(&self.node, &ns, &host_veth, GATEWAY.into(), ip.into());
            privates.push(private_address(ip.into(), GATEWAY.into()));
            ip
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        let private_ip6 = stack.has(Family::V6).then(|| {
            let ip = pod_ip6(n);
            veth_family(&self.node, &ns, &host_veth, GATEWAY6.into(), ip.into());
            privates.push(private_address(ip.into(), GATEWAY6.into()));
            ip
        });
        let range = slice.map(|(a, b)| PortRange { start: a, end: b });
        if let Some(r) = range {
            wire_slice_pod(&ns, &privates, r, &self.node_addrs());
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
            n,
            private_ip,
            private_ip6,
            container_id,
            range,
        });
        self.pods.last().unwrap()
    }
}

/// One family of a plain veth pod, as ptp would leave it: the gateway on the host side, the
/// pod's address and a host route to it, and in the pod a route to the gateway and the default
/// route via it.
fn veth_family(node: &Netns, pod: &Netns, host_veth: &str, gateway: IpAddr, private: IpAddr) {
    let f = if gateway.is_ipv6() { "-6" } else { "-4" };
    let bits = Family::of(gateway).bits();
    // nodad (IPv6): usable at once; ignored for IPv4.
    let add = |ns: &Netns, ip: IpAddr, dev: &str| {
        let mut a = vec![f, "addr", "add"];
        let cidr = format!("{ip}/{bits}");
        a.extend([cidr.as_str(), "dev", dev]);
        if ip.is_ipv6() {
            a.push("nodad");
        }
        ns.ip(&a);
    };
    add(node, gateway, host_veth);
    add(pod, private, "eth0");
    node.ip(&[
        f,
        "route",
        "add",
        &format!("{private}/{bits}"),
        "dev",
        host_veth,
    ]);
    pod.ip(&[
        f,
        "route",
        "add",
        &format!("{gateway}/{bits}"),
        "dev",
        "eth0",
    ]);
    pod.ip(&[
        f,
        "route",
        "add",
        "default",
        "via",
        &gateway.to_string(),
        "dev",
        "eth0",
    ]);
}

fn private_address(ip: IpAddr, gateway: IpAddr) -> PrivateAddress {
    let bits = Family::of(ip).bits();
    PrivateAddress {
        cidr: format!("{ip}/{bits}").parse().expect("a host CIDR"),
        gateway: Some(gateway),
    }
}

/// The wiring the CNI plugin gives a slice pod of this topology with private addresses
/// `privates` on a node sharing `node` (docs/DESIGN.md, "The datapath").
pub fn pod_wiring(privates: &[PrivateAddress], range: PortRange, node: &NodeAddrs) -> PodWiring {
    let cluster: Vec<IpCidr> = [CLUSTER_CIDR4, CLUSTER_CIDR6]
        .iter()
        .map(|c| c.parse().expect("a CIDR"))
        .collect();
    PodWiring::new("eth0", range, node, privates, &cluster)
}

/// Wires a slice pod's netns with the plugin's own code: node addresses (/32, /128), default
/// routes from them, cluster CIDRs from the private addresses, policy rules, ephemeral range =
/// slice.
pub fn wire_slice_pod(ns: &Netns, privates: &[PrivateAddress], range: PortRange, node: &NodeAddrs) {
    let w = pod_wiring(privates, range, node);
    let name = ns.name.clone();
    in_netns(&ns.path(), move || wiring::apply(&w))
        .unwrap_or_else(|e| panic!("wiring the slice pod {name}: {e}"));
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
    drop_invalid(ns, "iptables");
}

/// [`drop_conntrack_invalid`] for IPv6 (ip6tables): conntrack then tracks every IPv6 packet
/// the host stack sees, as kube-proxy's IPv6 rules make it on a dual-stack node.
pub fn drop_conntrack_invalid6(ns: &Netns) {
    drop_invalid(ns, "ip6tables");
}

fn drop_invalid(ns: &Netns, tool: &str) {
    for chain in ["INPUT", "FORWARD"] {
        ns.run(
            tool,
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
