//! What every check works with: the settings, the API client, the nodes, and the small
//! commands (helm, kubectl, a program on a node, the agent on the remote host).
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::Client;
use kube::api::{Api, ListParams};
use portslice_crds::PortRange;
use portslice_e2e::probe::{self, Answer};
use portslice_e2e::settings::Settings;
use portslice_e2e::shell::{self, with_prefix};

pub const SHORT: Duration = Duration::from_secs(30);
pub const LONG: Duration = Duration::from_secs(300);
/// The suite's own namespace; its values file (e2e/values-e2e.yaml) opens the pool's ports to it.
pub const SUITE_NAMESPACE: &str = "portslice-e2e";
/// The port the remote host's agent serves.
pub const REMOTE_PORT: u16 = 9000;

/// A node of the cluster: its name and the address slice pods on it share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 InternalIP on a dual-stack cluster: slice pods share it too.
    pub ip6: Option<Ipv6Addr>,
    pub control_plane: bool,
}

/// A pod of the suite and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAt {
    pub name: String,
    pub node: String,
    pub node_ip: Ipv4Addr,
    pub node_ip6: Option<Ipv6Addr>,
}

pub struct Ctx {
    pub s: Settings,
    pub client: Client,
    /// The suite's own namespace (deleted at the end).
    pub ns: String,
    pub nodes: Vec<Node>,
    /// Each node's ip_local_reserved_ports before install, to compare after uninstall.
    pub reserved_before: BTreeMap<String, String>,
    /// The slices' ranges, by slice name.
    pub slices: BTreeMap<String, PortRange>,
    /// The suite's pods, by app (`game`: one per node, `web`: one, `plain`: one per node).
    pub pods: BTreeMap<String, Vec<PodAt>>,
    /// The node of the operator replica holding the leader Lease.
    pub leader_node: Option<String>,
}

impl Ctx {
    pub fn helm(&self, args: &[&str]) -> Vec<String> {
        with_prefix(&[self.s.helm.to_string_lossy().into_owned()], args)
    }

    pub fn kubectl(&self, args: &[&str]) -> Vec<String> {
        with_prefix(&[self.s.kubectl.to_string_lossy().into_owned()], args)
    }

    /// Runs `argv` on `node`; its stdout.
    pub async fn on_node(&self, node: &str, argv: &[&str]) -> anyhow::Result<String> {
        shell::run_ok(&self.s.on_node(node, argv), SHORT).await
    }

    pub async fn node_exists(&self, node: &str, path: &str) -> anyhow::Result<bool> {
        Ok(
            shell::run(&self.s.on_node(node, &["test", "-e", path]), None, SHORT)
                .await?
                .success(),
        )
    }

    /// `kubectl exec` in a pod of the suite's namespace; Ok(output) only on exit 0.
    pub async fn pod_exec(&self, pod: &str, argv: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["-n", self.ns.as_str(), "exec", pod, "--"];
        a.extend_from_slice(argv);
        shell::run_ok(&self.kubectl(&a), SHORT).await
    }

    /// The agent in `pod` dials `addr`; who answered and whom they saw.
    pub async fn pod_dial(
        &self,
        pod: &str,
        proto: &str,
        addr: impl Into<SocketAddr>,
    ) -> anyhow::Result<Answer> {
        let addr: SocketAddr = addr.into();
        let out = self
            .pod_exec(
                pod,
                &["portslice-e2e-agent", "dial", proto, &addr.to_string()],
            )
            .await
            .with_context(|| format!("{pod} dialling {proto} {addr}"))?;
        Ok(probe::parse_answer(&out)?)
    }

    /// The agent on the remote host dials `addr`.
    pub async fn remote_dial(
        &self,
        proto: &str,
        addr: impl Into<SocketAddr>,
    ) -> anyhow::Result<Answer> {
        let addr: SocketAddr = addr.into();
        let agent = self.s.agent_bin.to_string_lossy().into_owned();
        let out = shell::run_ok(
            &with_prefix(
                &self.s.remote_exec,
                &[&agent, "dial", proto, &addr.to_string()],
            ),
            SHORT,
        )
        .await
        .with_context(|| format!("the remote host dialling {proto} {addr}"))?;
        Ok(probe::parse_answer(&out)?)
    }

    pub fn range_of(&self, slice: &str) -> anyhow::Result<PortRange> {
        self.slices
            .get(slice)
            .copied()
            .ok_or_else(|| anyhow!("no range for slice {slice}"))
    }

    pub fn pods_of(&self, app: &str) -> anyhow::Result<&[PodAt]> {
        self.pods
            .get(app)
            .map(Vec::as_slice)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| anyhow!("no pods of {app}"))
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name}"))
    }

    /// The remote's IPv6 address when the cluster is dual-stack (every node has an IPv6
    /// address and the settings name the remote's).
    pub fn dual_stack(&self) -> Option<Ipv6Addr> {
        self.s
            .remote_ip6
            .filter(|_| self.nodes.iter().all(|n| n.ip6.is_some()))
    }
}

/// The cluster's nodes and their InternalIP, sorted by name.
pub async fn list_nodes(client: &Client) -> anyhow::Result<Vec<Node>> {
    let api: Api<KubeNode> = Api::all(client.clone());
    let mut out = Vec::new();
    for n in api.list(&ListParams::default()).await?.items {
        let name = n.metadata.name.clone().context("a node without a name")?;
        let control_plane = n
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key("node-role.kubernetes.io/control-plane"));
        let internal: Vec<std::net::IpAddr> = n
            .status
            .and_then(|s| s.addresses)
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        let ip = internal
            .iter()
            .find_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(*v4),
                std::net::IpAddr::V6(_) => None,
            })
            .with_context(|| format!("node {name} has no IPv4 InternalIP"))?;
        let ip6 = internal.iter().find_map(|a| match a {
            std::net::IpAddr::V6(v6) => Some(*v6),
            std::net::IpAddr::V4(_) => None,
        });
        out.push(Node {
            name,
            ip,
            ip6,
            control_plane,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Polls `f` until it gives `Some`, or fails after `timeout` with the last error seen.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(format!("{e:#}")),
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                last.map(|l| format!(" (last error: {l})"))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
