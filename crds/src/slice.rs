use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::names::{NamedPorts, PortName};
use portslice_ports::{PortRange, Protocol};

/// A request for a contiguous range of ports on the shared node address.
///
/// Every pod annotated `portslice.io/slice: <name>` (same namespace) owns this range on its node's
/// address: packets to node-IP:port are steered to it without NAT, and its kernel picks ephemeral
/// source ports only from the range. Ranges are unique across the cluster.
#[derive(CustomResource, kube::KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portslice.io",
    version = "v1alpha1",
    kind = "PortSlice",
    namespaced,
    status = "PortSliceStatus",
    shortname = "ps",
    category = "portslice",
    doc = "PortSlice asks for a range of ports on the shared node address for the pods annotated portslice.io/slice=<name>.",
    derive = "PartialEq",
    printcolumn(name = "Range", type_ = "string", description = "Ports owned by the slice on every node", json_path = ".status.rangeText"),
    printcolumn(name = "Size", type_ = "integer", description = "Number of ports", json_path = ".status.size"),
    printcolumn(name = "Ready", type_ = "string", description = "Whether the range is allocated and usable", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Slivers", type_ = "integer", description = "Pods of the slice running on nodes", json_path = ".status.sliverCount"),
    printcolumn(name = "Reason", type_ = "string", priority = 1, description = "Why the slice is (not) ready", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Ports", type_ = "string", priority = 1, description = "Named ports", json_path = ".status.namedPortsText"),
    printcolumn(name = "Refused-On", type_ = "integer", description = "Nodes refusing the slice's pods now (see status.nodeRefusals)", json_path = ".status.nodeRefusalCount"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // allowedSources stays editable: it is a filter, not the allocation. (Ports are compared
    // field by field: comparing the optional objects whole is over the CEL cost budget.)
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.range) || \
         (self.spec.?size == oldSelf.spec.?size && \
          self.spec.?ports.?start == oldSelf.spec.?ports.?start && \
          self.spec.?ports.?end == oldSelf.spec.?ports.?end && \
          self.spec.protocols == oldSelf.spec.protocols)"
    )
    .message("spec.size, spec.ports and spec.protocols are immutable once a range is allocated; create a new PortSlice to change them"),
)]
#[x_kube(validation = Rule::new("has(self.size) != has(self.ports)")
    .message("set exactly one of spec.size (any free range of that many ports) or spec.ports (these exact ports)"))]
#[x_kube(validation = Rule::new(
    "!has(self.names) || self.names.all(n, n.offset + (has(n.count) ? n.count : 1) <= \
     (has(self.size) ? self.size : (has(self.ports) ? self.ports.end - self.ports.start + 1 : 65535)))"
).message("every named port must lie inside the slice: offset + count <= the slice's size"))]
#[x_kube(validation = Rule::new(
    "!has(self.names) || self.names.all(n, !has(n.protocol) || n.protocol in self.protocols)"
).message("a named port's protocol must be one of the slice's protocols"))]
#[serde(rename_all = "camelCase")]
pub struct PortSliceSpec {
    /// Number of contiguous ports wanted; the operator picks where they lie in the pool.
    /// Mutually exclusive with `ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub size: Option<u32>,

    /// Exact ports wanted (a reservation, e.g. 5060-5061 for SIP or 53 for DNS); may lie outside
    /// the pool. If another slice holds any of them, the older slice keeps them.
    /// Mutually exclusive with `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,

    /// Transport protocols steered to the slice's pods. Defaults to both.
    #[serde(default = "default_protocols")]
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q == p))").message("protocols must not repeat"))]
    pub protocols: Vec<Protocol>,

    /// Remote addresses (CIDRs of either family, e.g. `198.51.100.0/24`, `203.0.113.7/32` or
    /// `2001:db8::/32`) that may reach the slice's ports on the node addresses: a security group
    /// for SIP trunks, TURN peers or game clients. Empty means anyone; a list with entries of
    /// one family only refuses every source of the other. Enforced in eBPF on the uplink, before
    /// the pod sees a packet; traffic from inside the cluster is not filtered. Stays editable
    /// while pods run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("allowedSources must be CIDRs such as 198.51.100.0/24 or 2001:db8::/32"))]
    pub allowed_sources: Vec<String>,

    /// Names for ports of the slice, e.g. `{name: sip, offset: 0, protocol: UDP}` and
    /// `{name: rtp, offset: 2, count: 998}`: the operator publishes them in the slice's ConfigMap
    /// (`PORTSLICE_PORT_SIP`) and as SRV records (`_sip._udp.<slice>.<namespace>.svc`). Editable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(n, self.exists_one(m, m.name == n.name))").message("port names must be unique"))]
    pub names: Vec<PortName>,
}

fn default_protocols() -> Vec<Protocol> {
    Protocol::ALL.to_vec()
}

/// What the operator has decided for the slice. The operator rebuilds its allocation table from
/// these statuses on start: they are the only state.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortSliceStatus {
    /// The ports allocated to the slice. Absent until allocation succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,

    /// `range` as text ("40000-40999"), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_text: Option<String>,

    /// Number of ports allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,

    /// The slice's pods, at most one per node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slivers: Vec<Sliver>,

    /// Number of entries in `slivers`, for `kubectl get`.
    #[serde(default)]
    pub sliver_count: u32,

    /// When the last pod of a deleted slice went away (RFC 3339). The range stays reserved until
    /// the quarantine after this instant has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_at: Option<String>,

    /// `metadata.generation` that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The named ports of `spec.names`, resolved against the range.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPorts>,

    /// `namedPorts` as text (`sip=5060/UDP rtp=5062-6059/UDP`), for `kubectl get -o wide`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_ports_text: Option<String>,

    /// Nodes that refuse the slice's pods right now (a host process listens on one of its ports,
    /// or the node counts them among its own), as their CNI plugin reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_refusals: Vec<NodeRefusal>,

    /// Number of entries in `nodeRefusals`, for `kubectl get -o wide`.
    #[serde(default)]
    pub node_refusal_count: u32,

    /// Standard conditions: `Allocated` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One pod of the slice, on one node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Sliver {
    /// Node the pod runs on.
    pub node: String,
    /// Name of the pod.
    pub pod: String,
}

/// A node that refused a pod of the slice.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct NodeRefusal {
    /// The node.
    pub node: String,
    /// `HostPortInUse` or `Forbidden`.
    pub reason: String,
    /// What the node said.
    pub message: String,
    /// When it last said it (RFC 3339).
    pub last_seen: String,
}

/// A standard Kubernetes condition (same fields as metav1.Condition).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Allocated`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable CamelCase reason, e.g. `PoolExhausted`.
    pub reason: String,
    /// Human-readable explanation.
    pub message: String,
    /// Generation of the spec this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
}

/// Condition types and reasons used in `status.conditions`.
pub mod conditions {
    pub const ALLOCATED: &str = "Allocated";
    pub const READY: &str = "Ready";

    pub const REASON_ALLOCATED: &str = "Allocated";
    pub const REASON_POOL_EXHAUSTED: &str = "PoolExhausted";
    pub const REASON_CONFLICT: &str = "Conflict";
    pub const REASON_INVALID: &str = "Invalid";
    pub const REASON_TERMINATING: &str = "Terminating";
    /// The spec asks for ports a slice may not hold here (the node's own ports, or exact ports
    /// the reservations policy does not open to the namespace).
    pub const REASON_FORBIDDEN: &str = "Forbidden";
    /// The namespace is at its cap of ports or slices.
    pub const REASON_QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// A host process on a node listens on a port of the slice; that node refuses its pods.
    pub const REASON_HOST_PORT_IN_USE: &str = "HostPortInUse";
}

impl PortSliceSpec {
    /// Any free run of `size` ports, both protocols, from anyone.
    pub fn of_size(size: u32) -> Self {
        Self {
            size: Some(size),
            ports: None,
            protocols: default_protocols(),
            allowed_sources: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Exactly `ports`, both protocols, from anyone.
    pub fn exact(ports: PortRange) -> Self {
        Self {
            size: None,
            ports: Some(ports),
            protocols: default_protocols(),
            allowed_sources: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Number of ports the spec asks for.
    pub fn requested_size(&self) -> Option<u32> {
        match (self.size, self.ports) {
            (Some(n), None) => Some(n),
            (None, Some(r)) => Some(r.len()),
            _ => None,
        }
    }
}
