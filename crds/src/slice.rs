use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.range) || self.spec == oldSelf.spec")
        .message("spec is immutable once a range is allocated; create a new PortSlice to change it"),
)]
#[x_kube(validation = Rule::new("has(self.size) != has(self.ports)")
    .message("set exactly one of spec.size (any free range of that many ports) or spec.ports (these exact ports)"))]
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
}

impl PortSliceSpec {
    /// Number of ports the spec asks for.
    pub fn requested_size(&self) -> Option<u32> {
        match (self.size, self.ports) {
            (Some(n), None) => Some(n),
            (None, Some(r)) => Some(r.len()),
            _ => None,
        }
    }
}
