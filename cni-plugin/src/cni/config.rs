//! The network configuration on stdin: the spec's fields plus PortSlice's own. Pure parsing and
//! validation; nothing here touches the system.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use portslice_datapath::DEFAULT_PIN_ROOT;
use portslice_ports::{
    DEFAULT_API_SERVER_PORT, DEFAULT_DAEMON_PORT, DEFAULT_NODE_PORT_RANGE, NodeCritical, PortRange,
    RangeSet,
};
use serde::Deserialize;
use serde_json::Value;

use super::error::{CniError, code};
use super::result::CniResult;
use super::version::Version;
use portslice_netns::{IpCidr, NodeAddrs};

/// Where per-pod state lives between ADD and DEL when the config does not say (tmpfs: it goes
/// with a reboot, as the pods' netns do).
pub const DEFAULT_STATE_DIR: &str = "/run/portslice";
/// How long ADD waits for the API server when the config does not say.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(5);
/// The capability containerd fills with the pod's annotations.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// PortSlice's entry in a conflist, as written by the node daemon (or by hand for runtimes without
/// Kubernetes). Every field but `type` and `nodeIP` is optional. `nodeIP` is the node's shared
/// address, IPv4 or IPv6, or a list of one of each on a dual-stack node
/// (`["192.0.2.10", "2001:db8::10"]`); `clusterCIDRs` may hold both families:
///
/// ```json
/// { "type": "portslice",
///   "nodeIP": "192.0.2.10",
///   "clusterCIDRs": ["10.244.0.0/16", "10.96.0.0/12"],
///   "pinRoot": "/sys/fs/bpf/portslice",
///   "kubeconfig": "/etc/cni/net.d/portslice-kubeconfig",
///   "apiTimeoutMs": 5000,
///   "slices": { "media": "40000-40999", "team-a/sip": "5060-5061" },
///   "slice": "media",
///   "nodeCritical": { "apiServerPort": 6443, "nodePortRange": "30000-32767", "daemonPorts": [9465] },
///   "pool": "40000-59999",
///   "stateDir": "/run/portslice",
///   "nodeName": "worker-1",
///   "capabilities": { "io.kubernetes.cri.pod-annotations": true } }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    type_: Option<String>,
    prev_result: Option<Value>,
    #[serde(default)]
    runtime_config: BTreeMap<String, Value>,
    /// GC (1.1.0); libcni also sends the older spelling `cni.dev/attachments`.
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<Attachment>>,
    #[serde(rename = "nodeIP")]
    node_ip: Option<NodeIpField>,
    #[serde(rename = "clusterCIDRs", default)]
    cluster_cidrs: Vec<String>,
    pin_root: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    api_timeout_ms: Option<u64>,
    #[serde(default)]
    slices: BTreeMap<String, String>,
    slice: Option<String>,
    node_critical: Option<RawCritical>,
    pool: Option<String>,
    state_dir: Option<PathBuf>,
    node_name: Option<String>,
}

/// `nodeIP`: one address (every configuration before dual stack), or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum NodeIpField {
    One(String),
    Many(Vec<String>),
}

impl NodeIpField {
    /// The node addresses it names: at least one, at most one per family.
    fn addrs(&self) -> Result<NodeAddrs, String> {
        let texts: Vec<&str> = match self {
            Self::One(s) => vec![s.as_str()],
            Self::Many(v) => v.iter().map(String::as_str).collect(),
        };
        let addrs = texts
            .iter()
            .map(|t| {
                t.parse::<IpAddr>()
                    .map_err(|_| format!("nodeIP {t:?} is not an IPv4 or IPv6 address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        NodeAddrs::new(addrs).map_err(|e| format!("nodeIP: {e}"))
    }
}

/// `nodeCritical`: what the cluster moved of the node's own ports (see `NodeCritical`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCritical {
    api_server_port: Option<u16>,
    node_port_range: Option<String>,
    #[serde(default)]
    daemon_ports: Vec<u16>,
}

/// One attachment in GC's valid list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

/// The validated plugin configuration.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// The spec version of this invocation; every reply is written in it.
    pub version: Version,
    /// Network name (from the conflist).
    pub name: String,
    /// `nodeIP`: the node's shared addresses, one IPv4, one IPv6, or both. Each goes onto slice
    /// pods' interfaces (/32, /128) where the pod has that family, and is an address the eBPF
    /// programs steer by port: a slice owns its ports on every one of them.
    pub node: NodeAddrs,
    /// `clusterCIDRs`: pod and service CIDRs (either family) reached from the pod's *private*
    /// address of that family (routes with `src <private IP>`), so in-cluster traffic keeps
    /// using it. Everything else leaves from the node address.
    pub cluster_cidrs: Vec<IpCidr>,
    /// `pinRoot`: where the node daemon pinned the eBPF programs and maps
    /// (default `/sys/fs/bpf/portslice`).
    pub pin_root: PathBuf,
    /// `kubeconfig`: credentials for reading Pods and PortSlices (the daemon writes one at
    /// install). Without it, only static slices (`slices`, `PORTSLICE_RANGE`) are possible.
    pub kubeconfig: Option<PathBuf>,
    /// `apiTimeoutMs`: bound on all API server calls of one ADD (default 5000). When it runs out,
    /// ADD fails with code 11 (try again later) and the runtime retries.
    pub api_timeout: Duration,
    /// `slices`: static slices for runtimes without Kubernetes, `name` or `namespace/name` to a
    /// range (`"40000-40999"`). A pod picks one with CNI_ARGS `PORTSLICE_SLICE=name`.
    pub slices: BTreeMap<String, PortRange>,
    /// `slice`: a key of `slices` that every container on this network joins, for runtimes that
    /// cannot say per container which slice it wants (podman passes nothing but the container
    /// name). CNI_ARGS still win.
    pub network_slice: Option<String>,
    /// `nodeCritical`: the node's own ports, never held by a slice (default: Kubernetes' usual
    /// ports, NodePorts 30000-32767, API server 6443, daemon 9465). The daemon writes the
    /// cluster's values.
    pub critical: NodeCritical,
    /// `pool`: the cluster's pool, which the daemon keeps in `ip_local_reserved_ports`; a slice's
    /// ports outside it are reserved on the node while its pod runs (exact reservations).
    pub pool: Option<RangeSet>,
    /// `stateDir`: where per-pod state lives between ADD and DEL (the sysctls ADD changed).
    pub state_dir: PathBuf,
    /// `nodeName`: this node in Kubernetes, named in the Events ADD posts on a PortSlice the
    /// node refuses (default: the host name).
    pub node_name: Option<String>,
    /// `prevResult` (required for ADD and CHECK of a chained plugin).
    pub prev_result: Option<CniResult>,
    /// Pod annotations from `runtimeConfig["io.kubernetes.cri.pod-annotations"]`; `None` when
    /// the runtime did not pass the capability (then the Pod is read from the API server).
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// GC's valid attachments.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Reads only `cniVersion`, for VERSION and for answering errors in the caller's version.
pub fn peek_version(stdin: &str) -> Option<String> {
    let v: Value = serde_json::from_str(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

/// The configuration as JSON, before any of it is validated. ADD and DEL read from it what they
/// need to leave a pod that is not in a slice alone even when the rest cannot be used (a
/// cniVersion we do not speak, a bad field of ours): a chained plugin must not break pods it has
/// no business with.
#[derive(Debug, Clone)]
pub struct Envelope {
    value: Value,
}

impl Envelope {
    pub fn parse(stdin: &str) -> Result<Self, CniError> {
        let value: Value = serde_json::from_str(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "network configuration on stdin is not valid JSON",
            )
            .with_details(e.to_string())
        })?;
        Ok(Self { value })
    }

    /// `prevResult` exactly as the previous plugin (through libcni) gave it.
    pub fn prev_result(&self) -> Option<&Value> {
        self.value.get("prevResult").filter(|v| !v.is_null())
    }

    /// The pod annotations the runtime passed, if it passed any that read as a string map.
    pub fn pod_annotations(&self) -> Option<BTreeMap<String, String>> {
        let v = self
            .value
            .get("runtimeConfig")?
            .get(POD_ANNOTATIONS_CAPABILITY)?;
        serde_json::from_value(v.clone()).ok()
    }

    /// Whether the network itself puts every container into a slice (`slice`).
    pub fn has_network_slice(&self) -> bool {
        self.value.get("slice").is_some_and(|v| !v.is_null())
    }

    /// `pinRoot`, or the default when it is missing or unreadable.
    pub fn pin_root(&self) -> PathBuf {
        self.value
            .get("pinRoot")
            .and_then(Value::as_str)
            .map_or_else(Self::default_pin_root, PathBuf::from)
    }

    pub fn default_pin_root() -> PathBuf {
        PathBuf::from(DEFAULT_PIN_ROOT)
    }

    /// `stateDir`, or the default.
    pub fn state_dir(&self) -> PathBuf {
        self.value
            .get("stateDir")
            .and_then(Value::as_str)
            .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from)
    }

    /// `pool`, when it reads as a list of port ranges.
    pub fn pool(&self) -> Option<RangeSet> {
        self.value.get("pool")?.as_str()?.parse().ok()
    }

    /// `nodeIP`, when it names usable node addresses.
    pub fn node_addrs(&self) -> Option<NodeAddrs> {
        let field: NodeIpField = serde_json::from_value(self.value.get("nodeIP")?.clone()).ok()?;
        field.addrs().ok()
    }
}

impl PluginConfig {
    pub fn parse(stdin: &str) -> Result<Self, CniError> {
        Self::from_envelope(&Envelope::parse(stdin)?)
    }

    pub fn from_envelope(envelope: &Envelope) -> Result<Self, CniError> {
        let raw: RawConfig = serde_json::from_value(envelope.value.clone())
            .map_err(|e| invalid("a field has the wrong type", e))?;
        let version = match raw.cni_version.as_deref() {
            Some(v) => Version::parse(v)?,
            None => return Err(invalid_msg("cniVersion is missing")),
        };
        let version_err = |e: CniError| e.in_version(version.as_str());
        Self::validate(raw, version).map_err(version_err)
    }

    fn validate(raw: RawConfig, version: Version) -> Result<Self, CniError> {
        if raw.type_.as_deref().is_none_or(str::is_empty) {
            return Err(invalid_msg("type is missing"));
        }
        let name = raw.name.unwrap_or_default();
        let node = match &raw.node_ip {
            Some(field) => field.addrs().map_err(|e| invalid_msg(&e))?,
            None => {
                return Err(invalid_msg(
                    "nodeIP is missing: set the node's shared address (IPv4, IPv6, or a list of one of each)",
                ));
            }
        };
        let cluster_cidrs = raw
            .cluster_cidrs
            .iter()
            .map(|c| {
                c.parse::<IpCidr>()
                    .map_err(|e| invalid("clusterCIDRs has a bad entry", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let slices = raw
            .slices
            .iter()
            .map(|(name, range)| {
                let r = range
                    .parse::<PortRange>()
                    .map_err(|e| invalid(&format!("slices[{name:?}] is not a port range"), e))?;
                Ok((name.clone(), r))
            })
            .collect::<Result<BTreeMap<_, _>, CniError>>()?;
        if let Some(key) = raw.slice.as_deref()
            && !slices.contains_key(key)
        {
            return Err(invalid_msg(&format!(
                "slice {key:?} is not a key of slices: name one of the static slices"
            )));
        }
        let critical = match &raw.node_critical {
            None => NodeCritical::default(),
            Some(c) => {
                let node_ports = match &c.node_port_range {
                    Some(text) => text.parse::<PortRange>().map_err(|e| {
                        invalid(
                            &format!("nodeCritical.nodePortRange {text:?} is not a port range"),
                            e,
                        )
                    })?,
                    None => DEFAULT_NODE_PORT_RANGE,
                };
                let daemon = if c.daemon_ports.is_empty() {
                    vec![DEFAULT_DAEMON_PORT]
                } else {
                    c.daemon_ports.clone()
                };
                NodeCritical::new(
                    c.api_server_port.unwrap_or(DEFAULT_API_SERVER_PORT),
                    node_ports,
                    &daemon,
                )
            }
        };
        let pool = raw
            .pool
            .as_deref()
            .map(|p| {
                p.parse::<RangeSet>()
                    .map_err(|e| invalid(&format!("pool {p:?} is not a list of port ranges"), e))
            })
            .transpose()?;
        let api_timeout = match raw.api_timeout_ms {
            Some(0) => return Err(invalid_msg("apiTimeoutMs must be above 0")),
            Some(ms) => Duration::from_millis(ms),
            None => DEFAULT_API_TIMEOUT,
        };
        let prev_result = raw.prev_result.map(CniResult::from_value).transpose()?;
        let pod_annotations = match raw.runtime_config.get(POD_ANNOTATIONS_CAPABILITY) {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                invalid(
                    &format!("runtimeConfig[{POD_ANNOTATIONS_CAPABILITY:?}] is not a string map"),
                    e,
                )
            })?),
        };
        Ok(Self {
            version,
            name,
            node,
            cluster_cidrs,
            pin_root: raw
                .pin_root
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT)),
            kubeconfig: raw.kubeconfig,
            api_timeout,
            slices,
            network_slice: raw.slice,
            critical,
            pool,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            node_name: raw.node_name.filter(|n| !n.is_empty()),
            prev_result,
            pod_annotations,
            valid_attachments: raw.valid_attachments.or(raw.attachments),
        })
    }
}

fn invalid(msg: &str, source: impl std::fmt::Display) -> CniError {
    CniError::new(code::INVALID_NETWORK_CONFIG, msg).with_details(source.to_string())
}

fn invalid_msg(msg: &str) -> CniError {
    CniError::new(code::INVALID_NETWORK_CONFIG, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<PluginConfig, CniError> {
        PluginConfig::parse(&v.to_string())
    }

    fn base() -> Value {
        json!({"cniVersion": "1.0.0", "name": "net", "type": "portslice", "nodeIP": "192.0.2.10"})
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(base()).unwrap();
        assert_eq!(c.version, Version::V100);
        assert_eq!(c.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));
        assert_eq!(c.api_timeout, DEFAULT_API_TIMEOUT);
        assert!(c.prev_result.is_none() && c.pod_annotations.is_none());
        assert_eq!(c.critical, NodeCritical::default());
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    }

    #[test]
    fn node_ip_is_either_family_or_one_of_each() {
        let c = parse(base()).unwrap();
        assert_eq!(c.node, NodeAddrs::v4("192.0.2.10".parse().unwrap()));
        let mut v = base();
        v["nodeIP"] = json!("2001:db8::10");
        let c = parse(v).unwrap();
        assert_eq!(
            (c.node.v4, c.node.v6),
            (None, Some("2001:db8::10".parse().unwrap()))
        );
        let mut v = base();
        v["nodeIP"] = json!(["2001:db8::10", "192.0.2.10"]);
        v["clusterCIDRs"] = json!(["10.244.0.0/16", "fd00:10:244::/56"]);
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.node.to_string(), "192.0.2.10,2001:db8::10");
        assert!(c.cluster_cidrs[1].is_ipv6());
        assert_eq!(
            Envelope::parse(&v.to_string()).unwrap().node_addrs(),
            Some(c.node)
        );
        for bad in [
            json!(["192.0.2.10", "192.0.2.11"]),
            json!([]),
            json!(["fe80::1"]),
            json!(["192.0.2.10", 7]),
        ] {
            let mut v = base();
            v["nodeIP"] = bad.clone();
            assert_eq!(
                parse(v).unwrap_err().code,
                code::INVALID_NETWORK_CONFIG,
                "{bad}"
            );
        }
    }

    #[test]
    fn full_config_is_read() {
        let mut v = base();
        v["clusterCIDRs"] = json!(["10.244.0.0/16", "10.96.0.0/12"]);
        v["pinRoot"] = json!("/sys/fs/bpf/x");
        v["apiTimeoutMs"] = json!(250);
        v["slices"] = json!({"media": "40000-40999"});
        v["slice"] = json!("media");
        v["nodeCritical"] = json!({"apiServerPort": 16443, "nodePortRange": "20000-20999", "daemonPorts": [9465, 1]});
        v["pool"] = json!("40000-44999,50000-50999");
        v["stateDir"] = json!("/run/ps-test");
        v["runtimeConfig"] = json!({POD_ANNOTATIONS_CAPABILITY: {"portslice.io/slice": "media"}});
        v["cni.dev/attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
        let c = parse(v).unwrap();
        assert_eq!(c.cluster_cidrs.len(), 2);
        assert_eq!(c.api_timeout, Duration::from_millis(250));
        assert_eq!(
            c.slices["media"],
            PortRange {
                start: 40000,
                end: 40999
            }
        );
        assert_eq!(c.network_slice.as_deref(), Some("media"));
        assert!(c.critical.overlap(&"16443".parse().unwrap()).is_some());
        assert!(c.critical.overlap(&"20500".parse().unwrap()).is_some());
        assert!(c.critical.overlap(&"30000".parse().unwrap()).is_none());
        assert_eq!(c.pool.unwrap().to_string(), "40000-44999,50000-50999");
        assert_eq!(c.state_dir, PathBuf::from("/run/ps-test"));
        assert_eq!(c.pod_annotations.unwrap()["portslice.io/slice"], "media");
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "a");
    }

    #[test]
    fn malformed_json_is_a_decode_failure() {
        for bad in ["", "{", "not json", "{\"cniVersion\": }"] {
            assert_eq!(
                PluginConfig::parse(bad).unwrap_err().code,
                code::DECODE_FAILURE,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn unsupported_or_missing_version() {
        let mut v = base();
        v["cniVersion"] = json!("0.3.1");
        assert_eq!(parse(v.clone()).unwrap().version, Version::V031);
        v["cniVersion"] = json!("0.2.0");
        assert_eq!(parse(v).unwrap_err().code, code::INCOMPATIBLE_VERSION);
        let mut v = base();
        v.as_object_mut().unwrap().remove("cniVersion");
        assert_eq!(parse(v).unwrap_err().code, code::INVALID_NETWORK_CONFIG);
    }

    #[test]
    fn bad_fields_are_invalid_network_config_in_the_callers_version() {
        let cases: Vec<(&str, Value)> = vec![
            ("nodeIP", json!("not-an-ip")),
            ("nodeIP", json!("127.0.0.1")),
            ("nodeIP", json!(42)),
            ("clusterCIDRs", json!(["10.0.0.0"])),
            ("slices", json!({"x": "9-1"})),
            ("apiTimeoutMs", json!(0)),
            ("prevResult", json!({"ips": "nope"})),
            ("runtimeConfig", json!({POD_ANNOTATIONS_CAPABILITY: ["x"]})),
            ("type", json!("")),
            ("slice", json!("not-in-slices")),
            ("nodeCritical", json!({"nodePortRange": "x"})),
            ("nodeCritical", json!({"apiServerPort": 6443, "typo": 1})),
            ("pool", json!("1-2,x")),
        ];
        for (field, value) in cases {
            let mut v = base();
            v[field] = value.clone();
            let err = parse(v).unwrap_err();
            assert_eq!(err.code, code::INVALID_NETWORK_CONFIG, "{field}={value}");
        }
        let mut v = base();
        v["nodeIP"] = json!("x");
        assert_eq!(parse(v).unwrap_err().cni_version, "1.0.0");
        let mut v = base();
        v.as_object_mut().unwrap().remove("nodeIP");
        assert!(parse(v).unwrap_err().msg.contains("nodeIP"));
    }

    #[test]
    fn the_envelope_reads_what_pass_through_needs_from_any_config() {
        let stdin = json!({
            "cniVersion": "9.9.9", "nodeIP": 7, "pinRoot": "/sys/fs/bpf/x",
            "prevResult": {"cniVersion": "9.9.9", "ips": []},
            "runtimeConfig": {POD_ANNOTATIONS_CAPABILITY: {"a": "b"}}
        })
        .to_string();
        assert!(PluginConfig::parse(&stdin).is_err());
        let e = Envelope::parse(&stdin).unwrap();
        assert_eq!(e.prev_result().unwrap()["cniVersion"], "9.9.9");
        assert_eq!(e.pod_annotations().unwrap()["a"], "b");
        assert_eq!(e.pin_root(), PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(e.node_addrs(), None);
        assert!(!e.has_network_slice());
        let bare = Envelope::parse("{}").unwrap();
        assert!(bare.prev_result().is_none() && bare.pod_annotations().is_none());
        assert_eq!(bare.pin_root(), PathBuf::from(DEFAULT_PIN_ROOT));
        assert_eq!(
            Envelope::parse("nope").unwrap_err().code,
            code::DECODE_FAILURE
        );
    }

    #[test]
    fn peek_version_reads_only_the_version() {
        assert_eq!(
            peek_version(r#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
        assert_eq!(peek_version("garbage"), None);
    }
}
