//! The node daemon, `portslice daemon ...` (a DaemonSet in a cluster).
//!
//! Start-up, in order: load + pin + attach the eBPF datapath (reusing pins left by a previous
//! run, so traffic never stops across restarts and upgrades), record what
//! `net.ipv4.ip_local_reserved_ports` held (once) and reserve the pool in it, warn about host
//! listeners in the pool, install the binary into the CNI bin dir and append itself to the
//! node's conflist, write the kubeconfig the CNI plugin uses (and keep it on the current token). Then: serve `/metrics` and `/healthz`, and reconcile
//! the pinned pod state every `--reconcile-interval` seconds. Exiting detaches nothing;
//! `--uninstall` undoes all of it.
//!
//! Pure parts live in [`conflist`], [`reconcile`] and [`kubeconfig`]; this file and
//! [`install`] are the thin I/O around them.
pub mod chain_state;
pub mod conflist;
pub mod detect;
pub mod install;
pub mod kubeconfig;
pub mod metrics;
pub mod reconcile;
pub mod slice_cache;
pub mod sources;
pub mod tcpmux;

use std::sync::Arc;
use std::{net::IpAddr, net::SocketAddr, path::PathBuf, time::Duration};

use crate::cni::config::DEFAULT_STATE_DIR;
use crate::node::lock::NodeLock;
use crate::node::reserved_ports;
use anyhow::Context as _;
use portslice_netns::{NodeAddrs, listeners};
use portslice_ports::{DEFAULT_API_SERVER_PORT, DEFAULT_NODE_PORT_RANGE, Pool, PortRange};

use kube::runtime::reflector::Store;
use portslice_crds::PortSlice;
use portslice_datapath::{DEFAULT_PIN_ROOT, PinnedDatapath, loader};

/// Arguments of `portslice daemon`.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// The node's uplink interface (where the node address lives), or `auto`: the interface
    /// that holds the node address on this node.
    #[arg(long, env = "PORTSLICE_UPLINK", default_value = detect::AUTO)]
    pub uplink: String,
    /// The node addresses shared with slice pods: IPv4, IPv6, or one of each, comma-separated
    /// and/or repeated, as the kubelet's `--node-ip` (the chart passes `status.hostIPs`). A slice
    /// owns its ports on every one of them.
    #[arg(
        long,
        env = "PORTSLICE_NODE_IP",
        value_delimiter = ',',
        required = true,
        value_name = "IP[,IP]"
    )]
    pub node_ip: Vec<IpAddr>,
    /// Port pool of the cluster, comma-separated and/or repeated: `40000-59999` or
    /// `40000-44999,50000-54999`. A range below 1024 or in the NodePort range is refused.
    #[arg(
        long,
        env = "PORTSLICE_POOL",
        value_delimiter = ',',
        default_value = "40000-59999",
        value_name = "START-END[,...]"
    )]
    pub pool: Vec<PortRange>,
    /// The cluster's NodePort range (kube-apiserver --service-node-port-range), kept out of pools.
    #[arg(long, env = "PORTSLICE_NODE_PORT_RANGE", default_value_t = DEFAULT_NODE_PORT_RANGE)]
    pub node_port_range: PortRange,
    /// The API server's port on the nodes (its --secure-port): never a slice's.
    #[arg(long, env = "PORTSLICE_API_SERVER_PORT", default_value_t = DEFAULT_API_SERVER_PORT)]
    pub api_server_port: u16,
    /// Where per-pod state (the sysctls ADD changed) and the reserved ports found at install live,
    /// shared with the CNI plugin; tmpfs, so a reboot clears it with the pods.
    #[arg(long, env = "PORTSLICE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Serve TCPMUX (RFC 1078) on TCP port 1 of the node address: named TCP ports of the
    /// slices on this node, found by name (see `daemon/tcpmux.rs`).
    #[arg(long, env = "PORTSLICE_TCPMUX")]
    pub tcpmux: bool,
    /// This node's name in Kubernetes: the plugin names it in the Events it posts on PortSlices
    /// it refuses (default: the host name, which is the kubelet's default node name).
    #[arg(long, env = "PORTSLICE_NODE_NAME")]
    pub node_name: Option<String>,
    /// bpffs directory for maps, programs and links.
    #[arg(long, env = "PORTSLICE_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Where the runtime finds CNI plugins.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where the node's CNI conflist lives.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Do not touch the CNI bin/conf dirs (the datapath only).
    #[arg(long)]
    pub no_cni_install: bool,
    /// Address of the /metrics and /healthz server: loopback by default (the chart binds it to
    /// the node address for scraping). Its port is one of the node's own, never a slice's.
    /// An IPv6 host may come without brackets (`fd00::1:9465`, as the chart's
    /// `$(PORTSLICE_HOST_IP):port` gives on an IPv6-primary node): the last colon is the port's.
    #[arg(long, env = "PORTSLICE_METRICS_ADDR", default_value = "127.0.0.1:9465", value_parser = host_and_port)]
    pub metrics_addr: SocketAddr,
    /// Write a kubeconfig for the CNI plugin here, from the service account token, and rewrite
    /// it whenever the token file changes (bound tokens rotate).
    #[arg(long)]
    pub kubeconfig_out: Option<PathBuf>,
    /// The service account token the kubeconfig carries (a projected, rotating file).
    #[arg(long, default_value = kubeconfig::SA_TOKEN)]
    pub token_file: PathBuf,
    /// The CA the kubeconfig trusts.
    #[arg(long, default_value = kubeconfig::SA_CA)]
    pub ca_file: PathBuf,
    /// The API server the kubeconfig names (default: the in-cluster KUBERNETES_SERVICE_HOST).
    #[arg(long)]
    pub api_server: Option<String>,
    /// The cluster's pod and service CIDRs (comma-separated), written into the plugin's conflist
    /// entry: slice pods reach them from their private address (Services, cluster DNS).
    /// Given, it replaces detection (see `--pod-cidrs`, `--service-cidrs`).
    #[arg(long, env = "PORTSLICE_CLUSTER_CIDRS", value_delimiter = ',')]
    pub cluster_cidrs: Vec<String>,
    /// The cluster's pod CIDRs; default: detected from the Nodes' `spec.podCIDRs` and followed
    /// as nodes join.
    #[arg(long, env = "PORTSLICE_POD_CIDRS", value_delimiter = ',')]
    pub pod_cidrs: Vec<String>,
    /// The cluster's service CIDRs; default: detected from the ServiceCIDR API (else the
    /// `kubernetes` Service's ClusterIP).
    #[arg(long, env = "PORTSLICE_SERVICE_CIDRS", value_delimiter = ',')]
    pub service_cidrs: Vec<String>,
    /// Seconds between reconciles of the pinned pod state.
    #[arg(long, default_value_t = 10)]
    pub reconcile_interval: u64,
    /// JSON array of the live container ids; attachments not listed are removed on reconcile.
    /// Without it, an attachment is stale when its host veth is gone.
    #[arg(long)]
    pub live_containers_file: Option<PathBuf>,
    /// Undo everything a previous run did (conflist entry, binary, pins, links, sysctl) and exit.
    #[arg(long)]
    pub uninstall: bool,
    /// With `--uninstall`: first wait up to this many seconds until no daemon answers on the
    /// metrics port of this host (127.0.0.1), since a running daemon re-adds its conflist entry.
    /// The chart's post-delete Job uses it: the node daemon may still be terminating.
    #[arg(long, value_name = "SECONDS")]
    pub await_daemon_exit: Option<u64>,
}

impl DaemonArgs {
    /// `--node-ip` checked: at least one address, at most one per family, each shareable.
    pub fn node_addrs(&self) -> anyhow::Result<NodeAddrs> {
        NodeAddrs::new(self.node_ip.iter().copied()).context("checking --node-ip")
    }
}

/// The node's addresses, IPv4 first.
/// `IP:port`, `[IPv6]:port`, or an unbracketed `IPv6:port`.
fn host_and_port(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is no host:port"))?;
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|e| format!("{host:?} in {text:?}: {e}"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("port {port:?} in {text:?}: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

fn node_ips(node: &NodeAddrs) -> Vec<std::net::IpAddr> {
    node.iter().collect()
}

/// Runs the daemon until SIGTERM/SIGINT (or, with `--uninstall`, uninstalls and returns).
pub async fn run(mut args: DaemonArgs) -> anyhow::Result<()> {
    let pool =
        Pool::new(args.pool.iter().copied(), args.node_port_range).context("checking --pool")?;
    let uplink_detected = args.uplink == detect::AUTO;
    if args.uninstall {
        // Best effort: an uninstall must not stop at a node whose address moved.
        if let Ok(node) = args.node_addrs()
            && let Ok(uplink) = detect::uplink(&args.uplink, &node_ips(&node)).await
        {
            args.uplink = uplink;
        }
        if let Some(secs) = args.await_daemon_exit {
            // Where the daemon listens (loopback, or the node address the chart gives it).
            let probe = match args.metrics_addr.ip() {
                ip if ip.is_unspecified() => {
                    SocketAddr::from(([127, 0, 0, 1], args.metrics_addr.port()))
                }
                _ => args.metrics_addr,
            };
            await_port_closed(probe, Duration::from_secs(secs)).await?;
        }
        return uninstall(&args, &pool);
    }
    let node = args.node_addrs()?;
    args.uplink = detect::uplink(&args.uplink, &node_ips(&node)).await?;
    tracing::info!(uplink = %args.uplink, detected = uplink_detected, "the uplink");
    let setup = loader::NodeSetup {
        pin_root: args.pin_root.clone(),
        node,
        uplink: args.uplink.clone(),
        attach_lo: true,
    };
    loader::load_and_pin(&setup).context("bringing up the eBPF datapath")?;
    reserved_ports::record_original(&reserved_before(&args))
        .context("recording ip_local_reserved_ports before install")?;
    reserved_ports::reserve(pool.as_set()).context("reserving the pool for slices")?;
    for l in listeners::host_listeners() {
        if pool.contains(l.port) && l.hears(&node) {
            tracing::warn!(
                protocol = ?l.protocol,
                addr = %l.addr,
                port = l.port,
                "a host process listens on a pool port: this node refuses slices that hold it"
            );
        }
    }
    let detect_cidrs = args.cluster_cidrs.is_empty()
        && (args.pod_cidrs.is_empty() || args.service_cidrs.is_empty());
    let facts = Arc::new(std::sync::RwLock::new(metrics::NodeFacts {
        uplink: args.uplink.clone(),
        node_ip: node_ips(&node)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        uplink_detected,
        cluster_cidrs: Vec::new(),
        cidrs_detected: detect_cidrs,
    }));
    let chain = chain_state::ChainState::default();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Healthy as soon as the datapath is up: detection below may wait for the API server, and
    // the kubelet's probes must not kill the daemon meanwhile.
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics server to {}", args.metrics_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics and /healthz");
    let server = tokio::spawn(
        axum::serve(
            listener,
            metrics::router(metrics::MetricsState {
                pin_root: args.pin_root.clone(),
                chain: chain.clone(),
                facts: facts.clone(),
                ready: ready.clone(),
            }),
        )
        .into_future(),
    );
    // The API server, when there is one (in a cluster, or --api-server): the cluster CIDRs,
    // the PortSlices' source filters and TCPMUX's names come from it.
    let client = api_client(&args).await;
    let cidrs = detect::ClusterCidrs::default();
    if detect_cidrs && let Some(client) = &client {
        detect_cluster_cidrs(client, &cidrs).await;
        tokio::spawn(detect::follow_nodes(client.clone(), cidrs.clone()));
    }
    if !args.no_cni_install {
        let a = with_cluster_cidrs(&args, &cidrs, &facts);
        chain.record(install::install_cni(&a).context("installing the CNI plugin")?);
    }
    let kubeconfig = Arc::new(kubeconfig::Follower::default());
    kubeconfig
        .refresh(&args)
        .context("writing the CNI plugin's kubeconfig")?;
    ready.store(true, std::sync::atomic::Ordering::SeqCst);

    // Slice pods' source filters follow their PortSlices' edits.
    let slices = Arc::new(std::sync::OnceLock::new());
    if let Some(client) = &client {
        tokio::spawn(sources::follow(
            args.clone(),
            client.clone(),
            slices.clone(),
        ));
    }
    // CNI ADD asks this node's slice cache before the API server.
    if let Some(client) = &client {
        let node_name = crate::node::refusal::node_name(args.node_name.as_deref());
        let (state_dir, client, slices) = (args.state_dir.clone(), client.clone(), slices.clone());
        tokio::spawn(async move {
            if let Err(e) = slice_cache::serve(state_dir, node_name, client, slices).await {
                tracing::error!(error = %format!("{e:#}"), "the slice cache stopped: CNI ADD asks the API server");
            }
        });
    }
    if args.tcpmux {
        let sources = tcpmux::Sources {
            pin_root: args.pin_root.clone(),
            slices: slices.clone(),
        };
        // The node address TCPMUX is served on (IPv4: an IPv6-only node has none to offer).
        let node_ip = node
            .v4
            .context("--tcpmux serves the node's IPv4 address, and --node-ip names none")?;
        tokio::spawn(async move {
            if let Err(e) = tcpmux::serve(node_ip, sources).await {
                tracing::error!(error = %format!("{e:#}"), "TCPMUX stopped");
            }
        });
    }
    let reconciler = reconcile_loop(args.clone(), chain, kubeconfig, slices, cidrs, facts);
    tokio::select! {
        r = server => r.context("metrics server")?.context("metrics server")?,
        r = reconciler => r?,
        _ = shutdown_signal() => tracing::info!("shutting down; datapath stays attached"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

async fn reconcile_loop(
    args: DaemonArgs,
    chain: chain_state::ChainState,
    kubeconfig: Arc<kubeconfig::Follower>,
    slices: Arc<std::sync::OnceLock<Store<PortSlice>>>,
    cidrs: detect::ClusterCidrs,
    facts: Arc<std::sync::RwLock<metrics::NodeFacts>>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(args.reconcile_interval.max(1)));
    loop {
        tick.tick().await;
        // The cluster CIDRs as detected now: a changed set rewrites the conflist entry.
        let a = with_cluster_cidrs(&args, &cidrs, &facts);
        let (chain, kubeconfig) = (chain.clone(), kubeconfig.clone());
        let filters = slices.get().map(sources::filters);
        // Map syscalls and file I/O are blocking: keep them off the async workers. The primary
        // CNI may write (or rewrite) its config after we started: keep our entry in it.
        let r = tokio::task::spawn_blocking(move || {
            if !a.no_cni_install {
                chain.record(install::ensure_conflist_entry(&a)?);
            }
            // Bound tokens rotate: keep the plugin's kubeconfig on the current one.
            kubeconfig.refresh(&a)?;
            if let Some(filters) = &filters {
                sources::sync(&a.pin_root, filters)?;
            }
            reconcile_once(&a)
        })
        .await?;
        if let Err(e) = r {
            tracing::warn!(error = %format!("{e:#}"), "reconcile failed");
        }
    }
}

/// `args` with the cluster CIDRs filled in from detection when none were given, and the
/// metrics told what is in use.
fn with_cluster_cidrs(
    args: &DaemonArgs,
    cidrs: &detect::ClusterCidrs,
    facts: &std::sync::RwLock<metrics::NodeFacts>,
) -> DaemonArgs {
    let mut a = args.clone();
    if a.cluster_cidrs.is_empty() {
        let detected = cidrs.get();
        let pick = |given: &[String], found: Vec<String>| {
            if given.is_empty() {
                found
            } else {
                given.to_vec()
            }
        };
        a.cluster_cidrs = pick(&args.pod_cidrs, detected.pod)
            .into_iter()
            .chain(pick(&args.service_cidrs, detected.service))
            .collect();
    }
    if let Ok(mut f) = facts.write() {
        f.cluster_cidrs = a.cluster_cidrs.clone();
    }
    a
}

/// An API client with the daemon's own token, when there is an API server to talk to.
async fn api_client(args: &DaemonArgs) -> Option<kube::Client> {
    let server = kubeconfig::server(args)?;
    if !args.token_file.exists() {
        tracing::info!("no service account token: working without the API server");
        return None;
    }
    match sources::client(args, server).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no API client: CIDRs, source filters and TCPMUX names need one");
            None
        }
    }
}

/// Detects the cluster CIDRs before the conflist entry is first written, retrying for a while
/// (the API server may be starting with the node); without them slice pods would reach Services
/// and cluster DNS from the node address, so say so loudly.
async fn detect_cluster_cidrs(client: &kube::Client, cidrs: &detect::ClusterCidrs) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match detect::detect_once(client, cidrs).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %format!("{e:#}"), "detecting the cluster CIDRs; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "could not detect the cluster CIDRs: slice pods reach Services from the node address until they are (set cluster.podCIDRs and cluster.serviceCIDRs to skip detection)");
                return;
            }
        }
    }
}

/// One reconcile pass: removes attachments that no longer belong to a live pod, under the node
/// lock (a CNI ADD may be writing the same maps).
pub fn reconcile_once(args: &DaemonArgs) -> anyhow::Result<Vec<String>> {
    let mut dp = PinnedDatapath::open(&args.pin_root)?;
    let _lock = NodeLock::acquire(&args.pin_root, Duration::from_secs(10))?;
    let live = match &args.live_containers_file {
        Some(p) => Some(
            serde_json::from_slice::<Vec<String>>(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
        ),
        None => None,
    };
    let pods = dp.list_pods()?;
    let stale = reconcile::stale(&pods, live.as_deref(), |i| {
        portslice_netns::iface::name_of(i).is_ok()
    });
    for id in &stale {
        let ifindex = pods
            .iter()
            .find(|p| &p.container_id == id)
            .map(|p| p.host_veth_ifindex);
        dp.detach_pod(id, ifindex)?;
        tracing::info!(container_id = %id, "removed stale attachment");
    }
    Ok(stale)
}

/// Where the reserved ports found before the first install are recorded.
fn reserved_before(args: &DaemonArgs) -> PathBuf {
    args.state_dir.join("reserved-ports-before")
}

/// Waits until nothing accepts TCP connections on `addr` (the daemon has exited), or fails after
/// `timeout`.
pub async fn await_port_closed(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let probe =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                .await;
        if !matches!(probe, Ok(Ok(_))) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "a node daemon still answers on {addr} after {}s; uninstall would race with it",
                timeout.as_secs()
            );
        }
        tracing::info!(%addr, "waiting for the node daemon to exit before uninstalling");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn uninstall(args: &DaemonArgs, pool: &Pool) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    if !args.no_cni_install
        && let Err(e) = install::uninstall_cni(args)
    {
        errors.push(format!("CNI install: {e:#}"));
    }
    if let Err(e) = loader::unload(&args.pin_root, &args.uplink) {
        errors.push(format!("datapath: {e}"));
    }
    if let Err(e) = reserved_ports::restore_original(&reserved_before(args), pool.as_set()) {
        errors.push(format!("reserved ports: {e:#}"));
    }
    if let Err(e) = remove_state_dir(&args.state_dir) {
        errors.push(format!("state dir {}: {e}", args.state_dir.display()));
    }
    if let Some(out) = &args.kubeconfig_out {
        let _ = std::fs::remove_file(out);
    }
    if errors.is_empty() {
        tracing::info!("uninstalled");
        Ok(())
    } else {
        anyhow::bail!("uninstall finished with errors: {}", errors.join("; "))
    }
}

/// Empties the state dir and removes it, unless it is a mount point (in the chart it is the
/// hostPath volume itself, which only the host can remove; an empty dir on tmpfs is left).
fn remove_state_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod await_tests {
    use super::*;

    #[test]
    fn the_metrics_address_may_name_an_ipv6_host_without_brackets() {
        for (text, want) in [
            ("198.18.0.1:9465", "198.18.0.1:9465"),
            ("[2001:2::1]:9465", "[2001:2::1]:9465"),
            ("2001:2::1:9465", "[2001:2::1]:9465"),
        ] {
            assert_eq!(host_and_port(text).unwrap().to_string(), want);
        }
        assert!(host_and_port("eth0:9465").is_err());
        assert!(host_and_port("198.18.0.1").is_err());
    }

    #[tokio::test]
    async fn uninstall_waits_while_a_daemon_answers_and_proceeds_once_it_is_gone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let err = await_port_closed(addr, Duration::from_millis(300))
            .await
            .expect_err("a listening daemon must hold the uninstall back");
        assert!(err.to_string().contains("still answers"), "{err}");
        drop(listener);
        await_port_closed(addr, Duration::from_secs(5))
            .await
            .expect("uninstall proceeds once the daemon's port is closed");
    }
}
