//! The node's own ports: what a slice may never hold, whatever a PortSlice, a static slice or a
//! CNI_ARGS range says. Steering happens before netfilter on the node's uplink, so a slice on 22
//! or 10250 would take the node's sshd or kubelet traffic; these ports are refused by the
//! operator, the ValidatingAdmissionPolicy the chart ships, and the CNI plugin on the node.
//!
//! The list is fixed by what Kubernetes nodes run, with the parts a cluster may move
//! (the API server's port, the NodePort range, the PortSlice daemon's own ports) configurable.
use crate::{DEFAULT_NODE_PORT_RANGE, PortRange, RangeSet};

/// Whose port it is, for the messages that refuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriticalPort {
    pub range: PortRange,
    pub owner: String,
}

/// The node-critical ports of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCritical {
    ports: Vec<CriticalPort>,
}

/// The API server's default `--secure-port`.
pub const DEFAULT_API_SERVER_PORT: u16 = 6443;
/// The PortSlice node daemon's metrics and health port.
pub const DEFAULT_DAEMON_PORT: u16 = 9465;

impl NodeCritical {
    /// The fixed ports of a Kubernetes node plus the cluster's API server port, NodePort range
    /// and the PortSlice daemon's ports.
    pub fn new(api_server_port: u16, node_ports: PortRange, daemon_ports: &[u16]) -> Self {
        let one = |p: u16, owner: &str| CriticalPort {
            range: PortRange { start: p, end: p },
            owner: owner.to_string(),
        };
        let mut ports = vec![
            one(22, "sshd"),
            CriticalPort {
                range: PortRange {
                    start: 2379,
                    end: 2380,
                },
                owner: "etcd".into(),
            },
            one(api_server_port, "the Kubernetes API server"),
            one(10249, "kube-proxy's metrics"),
            one(10250, "the kubelet"),
            one(10255, "the kubelet's read-only port"),
            one(10256, "kube-proxy's health check"),
            CriticalPort {
                range: node_ports,
                owner: "the NodePort range (kube-proxy)".into(),
            },
        ];
        ports.extend(
            daemon_ports
                .iter()
                .map(|&p| one(p, "the PortSlice node daemon")),
        );
        ports.sort_by_key(|p| p.range);
        Self { ports }
    }

    pub fn ports(&self) -> &[CriticalPort] {
        &self.ports
    }

    /// Every node-critical port as one set.
    pub fn as_set(&self) -> RangeSet {
        RangeSet::new(self.ports.iter().map(|p| p.range))
    }

    /// The first node-critical port `range` touches, if any.
    pub fn overlap(&self, range: &PortRange) -> Option<&CriticalPort> {
        self.ports.iter().find(|p| p.range.overlaps(range))
    }

    /// A message refusing `range` because of `hit`, for conditions, Events and CNI errors.
    pub fn refusal(range: &PortRange, hit: &CriticalPort) -> String {
        format!(
            "ports {range} include {} ({}): a slice never holds the node's own ports",
            hit.range, hit.owner
        )
    }
}

impl Default for NodeCritical {
    fn default() -> Self {
        Self::new(
            DEFAULT_API_SERVER_PORT,
            DEFAULT_NODE_PORT_RANGE,
            &[DEFAULT_DAEMON_PORT],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    #[test]
    fn the_nodes_own_ports_are_critical() {
        let c = NodeCritical::default();
        for (port, owner) in [
            (22, "sshd"),
            (2379, "etcd"),
            (2380, "etcd"),
            (6443, "API server"),
            (10249, "kube-proxy"),
            (10250, "kubelet"),
            (10255, "kubelet"),
            (10256, "kube-proxy"),
            (30000, "NodePort"),
            (32767, "NodePort"),
            (9465, "daemon"),
        ] {
            let hit = c
                .overlap(&r(port, port))
                .unwrap_or_else(|| panic!("{port}"));
            assert!(hit.owner.contains(owner), "{port}: {hit:?}");
        }
        for free in [5060, 40000, 10251, 2381, 6444] {
            assert_eq!(c.overlap(&r(free, free)), None, "{free}");
        }
        let msg = NodeCritical::refusal(&r(10240, 10259), c.overlap(&r(10240, 10259)).unwrap());
        assert!(msg.contains("10249") && msg.contains("kube-proxy"), "{msg}");
    }

    #[test]
    fn the_cluster_moves_what_it_configures() {
        let c = NodeCritical::new(16443, r(20000, 20999), &[9465, 1]);
        assert!(c.overlap(&r(6443, 6443)).is_none());
        assert!(c.overlap(&r(16443, 16443)).is_some());
        assert!(c.overlap(&r(30000, 30000)).is_none());
        assert!(c.overlap(&r(20500, 20500)).is_some());
        assert!(
            c.overlap(&r(1, 1)).is_some(),
            "TCPMUX, when the daemon serves it"
        );
        assert!(c.as_set().contains(22));
    }
}
