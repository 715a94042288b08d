//! What the chart no longer asks for: the uplink (the interface that holds the node's shared
//! address, found on each node) and the cluster CIDRs (pod CIDRs from the Nodes'
//! `spec.podCIDRs`, the service CIDRs from the ServiceCIDR API, else from the `kubernetes`
//! Service's ClusterIP). Values the user set still win.
//!
//! The choices ([`uplink_of`], [`aggregate`], [`service_cidr_fallback`]) are pure; the reads
//! around them (netlink, the API server) are small.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use portslice_netns::{Family, netlink::Nl};

/// `--uplink auto`.
pub const AUTO: &str = "auto";

/// The ifindex of the interface that holds the first of `node_ips` found, among
/// `(ifindex, address)` pairs.
pub fn uplink_of(addresses: &[(u32, IpAddr)], node_ips: &[IpAddr]) -> Option<u32> {
    node_ips.iter().find_map(|want| {
        addresses
            .iter()
            .find(|(_, ip)| ip == want)
            .map(|(ifindex, _)| *ifindex)
    })
}

/// The uplink's name: `configured` unless it is `auto`, else the interface that holds the node
/// address (IPv4 first) in this (the host's) network namespace. Netlink runs a runtime of its
/// own, so the lookup runs on a blocking thread.
pub async fn uplink(configured: &str, node_ips: &[IpAddr]) -> anyhow::Result<String> {
    if configured != AUTO {
        return Ok(configured.to_string());
    }
    let node_ips = node_ips.to_vec();
    tokio::task::spawn_blocking(move || uplink_holding(&node_ips))
        .await
        .context("the uplink lookup stopped")?
}

fn uplink_holding(node_ips: &[IpAddr]) -> anyhow::Result<String> {
    let nl = Nl::new().context("opening netlink to find the uplink")?;
    let mut addresses: Vec<(u32, IpAddr)> = Vec::new();
    for family in [Family::V4, Family::V6] {
        addresses.extend(
            nl.addresses(family)
                .context("listing the node's addresses")?
                .into_iter()
                .map(|a| (a.ifindex, a.ip)),
        );
    }
    let shown = node_ips
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ");
    let ifindex = uplink_of(&addresses, node_ips).ok_or_else(|| {
        anyhow::anyhow!(
            "the node address {shown} is on no interface of this node (a cloud 1:1 NAT public \
             address?): set the chart's node.uplink to the interface that carries the node's \
             traffic, and node.ipDetection=fixed with node.ip to an address on it"
        )
    })?;
    portslice_netns::iface::name_of(ifindex)
        .with_context(|| format!("naming interface {ifindex}, which holds {shown}"))
}

/// A CIDR as (network address, prefix length), host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: u128,
    len: u8,
    v4: bool,
}

impl Prefix {
    pub fn parse(text: &str) -> Option<Self> {
        let (ip, len) = text.trim().split_once('/')?;
        let len: u8 = len.parse().ok()?;
        let (addr, bits, v4) = match ip.parse::<IpAddr>().ok()? {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32u8, true),
            IpAddr::V6(a) => (u128::from(a), 128u8, false),
        };
        (len <= bits).then(|| Self {
            addr: addr & mask(len, bits),
            len,
            v4,
        })
    }

    fn bits(&self) -> u8 {
        if self.v4 { 32 } else { 128 }
    }

    fn covers(&self, other: &Prefix) -> bool {
        self.v4 == other.v4
            && self.len <= other.len
            && other.addr & mask(self.len, self.bits()) == self.addr
    }

    /// The prefix one bit shorter, if this is its lower half and `sibling` the upper.
    fn merge(&self, sibling: &Prefix) -> Option<Prefix> {
        if self.v4 != sibling.v4 || self.len != sibling.len || self.len == 0 {
            return None;
        }
        let bit = 1u128 << (self.bits() - self.len);
        (self.addr & bit == 0 && sibling.addr == self.addr | bit).then(|| Prefix {
            addr: self.addr,
            len: self.len - 1,
            v4: self.v4,
        })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip = if self.v4 {
            IpAddr::V4(Ipv4Addr::from(self.addr as u32))
        } else {
            IpAddr::V6(std::net::Ipv6Addr::from(self.addr))
        };
        write!(f, "{ip}/{}", self.len)
    }
}

fn mask(len: u8, bits: u8) -> u128 {
    if len == 0 {
        0
    } else {
        (u128::MAX << (128 - u32::from(len))) >> (128 - u32::from(bits))
    }
}

/// The same addresses in as few prefixes as exactly cover them (nothing more): covered ones
/// dropped, sibling pairs merged. Nodes' /24s allocated in a row become one prefix per run.
pub fn aggregate<'a>(cidrs: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut set: BTreeSet<Prefix> = cidrs.into_iter().filter_map(Prefix::parse).collect();
    loop {
        let list: Vec<Prefix> = set.iter().copied().collect();
        let mut next: BTreeSet<Prefix> = BTreeSet::new();
        let mut changed = false;
        let mut i = 0;
        while i < list.len() {
            let p = list[i];
            if next.iter().any(|q| q.covers(&p)) {
                changed = true;
                i += 1;
                continue;
            }
            match list.get(i + 1).and_then(|s| p.merge(s)) {
                Some(parent) => {
                    next.insert(parent);
                    changed = true;
                    i += 2;
                }
                None => {
                    next.insert(p);
                    i += 1;
                }
            }
        }
        // Drop any prefix a shorter one covers.
        let kept: BTreeSet<Prefix> = next
            .iter()
            .filter(|p| !next.iter().any(|q| q != *p && q.covers(p)))
            .copied()
            .collect();
        changed |= kept.len() != next.len();
        set = kept;
        if !changed {
            break;
        }
    }
    set.iter().map(ToString::to_string).collect()
}

/// Without the ServiceCIDR API: the `kubernetes` Service's ClusterIP is the range's first
/// address; the range itself is the API server's flag, so take kubeadm's and kind's default
/// size around it (10.96.0.0/12, fd00:10:96::/112) and say so.
pub fn service_cidr_fallback(cluster_ip: &str) -> Option<String> {
    let len = match cluster_ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(_) => 12,
        IpAddr::V6(_) => 112,
    };
    Prefix::parse(&format!("{cluster_ip}/{len}")).map(|p| p.to_string())
}

/// The cluster CIDRs as detected now, shared between the watch that follows them and the
/// reconcile loop that writes them into the conflist entry.
#[derive(Clone, Default)]
pub struct ClusterCidrs(Arc<RwLock<Detected>>);

#[derive(Default, Clone, PartialEq, Eq, Debug)]
pub struct Detected {
    pub pod: Vec<String>,
    pub service: Vec<String>,
}

impl ClusterCidrs {
    pub fn get(&self) -> Detected {
        self.0.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn set_pod(&self, pod: Vec<String>) -> bool {
        self.update(|d| d.pod = pod)
    }

    fn set_service(&self, service: Vec<String>) -> bool {
        self.update(|d| d.service = service)
    }

    fn update(&self, f: impl FnOnce(&mut Detected)) -> bool {
        let Ok(mut d) = self.0.write() else {
            return false;
        };
        let before = d.clone();
        f(&mut d);
        *d != before
    }
}

/// The service CIDRs: the ServiceCIDR objects' (networking.k8s.io/v1), else the fallback.
pub async fn service_cidrs(client: &Client) -> anyhow::Result<Vec<String>> {
    let api: Api<ServiceCIDR> = Api::all(client.clone());
    match api.list(&Default::default()).await {
        Ok(list) => {
            let cidrs: Vec<String> = list
                .items
                .iter()
                .filter_map(|s| s.spec.as_ref()?.cidrs.clone())
                .flatten()
                .collect();
            if !cidrs.is_empty() {
                return Ok(aggregate(cidrs.iter().map(String::as_str)));
            }
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e).context("listing ServiceCIDRs"),
    }
    let svc: Service = Api::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .context("reading the kubernetes Service")?;
    let spec = svc.spec.unwrap_or_default();
    // Dual-stack clusters list one ClusterIP per family.
    let ips = spec
        .cluster_ips
        .filter(|ips| !ips.is_empty())
        .or_else(|| spec.cluster_ip.map(|ip| vec![ip]))
        .context("the kubernetes Service has no ClusterIP")?;
    let mut cidrs = Vec::new();
    for ip in &ips {
        let cidr = service_cidr_fallback(ip)
            .with_context(|| format!("the kubernetes Service's ClusterIP {ip:?}"))?;
        tracing::warn!(%cidr, cluster_ip = %ip, "no ServiceCIDR API: assuming kubeadm's default range around the kubernetes Service; set cluster.serviceCIDRs if the cluster's differs");
        cidrs.push(cidr);
    }
    Ok(cidrs)
}

fn pod_cidrs(nodes: &[Node]) -> Vec<String> {
    let all: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref()?.pod_cidrs.clone())
        .flatten()
        .collect();
    aggregate(all.iter().map(String::as_str))
}

/// Detects both once (at start, before the conflist entry is first written).
pub async fn detect_once(client: &Client, into: &ClusterCidrs) -> anyhow::Result<()> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await
        .context("listing Nodes for their pod CIDRs")?;
    into.set_pod(pod_cidrs(&nodes.items));
    into.set_service(service_cidrs(client).await?);
    let d = into.get();
    tracing::info!(pod = ?d.pod, service = ?d.service, "detected the cluster CIDRs");
    Ok(())
}

/// Follows the Nodes as they join and leave; the reconcile loop rewrites the conflist entry.
pub async fn follow_nodes(client: Client, into: ClusterCidrs) {
    let (store, writer) = kube::runtime::reflector::store::<Node>();
    let stream = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            // A (re)list in progress: the store still holds the state before it, and reading
            // it now would write an empty or stale set over the detected one.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "watching Nodes");
                continue;
            }
        }
        let nodes: Vec<Node> = store.state().iter().map(|n| (**n).clone()).collect();
        if into.set_pod(pod_cidrs(&nodes)) {
            tracing::info!(pod = ?into.get().pod, "the pod CIDRs changed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uplink_is_the_interface_holding_the_node_address() {
        let a: Vec<(u32, IpAddr)> = vec![
            (1, "127.0.0.1".parse().unwrap()),
            (7, "198.19.0.2".parse().unwrap()),
        ];
        assert_eq!(uplink_of(&a, &["198.19.0.2".parse().unwrap()]), Some(7));
        assert_eq!(uplink_of(&a, &["203.0.113.9".parse().unwrap()]), None);
        assert_eq!(
            uplink_of(
                &a,
                &["2001:2::9".parse().unwrap(), "198.19.0.2".parse().unwrap()]
            ),
            Some(7),
            "either family"
        );
    }

    #[test]
    fn node_pod_cidrs_aggregate_exactly() {
        assert_eq!(
            aggregate(["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24"]),
            ["10.244.0.0/23", "10.244.2.0/24"]
        );
        assert_eq!(
            aggregate([
                "10.244.0.0/24",
                "10.244.1.0/24",
                "10.244.2.0/24",
                "10.244.3.0/24"
            ]),
            ["10.244.0.0/22"]
        );
        // Covered, duplicate and host-bit-set entries; nothing beyond the inputs is covered.
        assert_eq!(
            aggregate([
                "10.244.0.0/16",
                "10.244.7.0/24",
                "10.244.7.9/24",
                "10.1.0.0/24"
            ]),
            ["10.1.0.0/24", "10.244.0.0/16"]
        );
        assert_eq!(
            aggregate(["10.0.1.0/24", "10.0.2.0/24"]),
            ["10.0.1.0/24", "10.0.2.0/24"],
            "not siblings: never widened"
        );
        assert_eq!(
            aggregate(["fd00:10:244::/64", "fd00:10:244:1::/64"]),
            ["fd00:10:244::/63"]
        );
    }

    #[test]
    fn the_service_range_falls_back_to_kubeadms_around_the_cluster_ip() {
        assert_eq!(
            service_cidr_fallback("10.96.0.1").as_deref(),
            Some("10.96.0.0/12")
        );
        assert_eq!(
            service_cidr_fallback("fd00:10:96::1").as_deref(),
            Some("fd00:10:96::/112")
        );
        assert_eq!(service_cidr_fallback("nonsense"), None);
    }
}
