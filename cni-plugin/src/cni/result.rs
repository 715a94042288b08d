//! The CNI result (`interfaces`, `ips`, `routes`, `dns`), read from `prevResult` and written back
//! with the node address added. Unknown fields are kept (`extra`) so a chain loses nothing.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{CniError, code};
use super::version::Version;
use portslice_netns::Ipv4Cidr;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Set for interfaces inside the pod (the netns path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` or `"6"`; present before 1.0.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Address with prefix, e.g. `10.1.0.5/24`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What the primary plugin gave the pod on the CNI_IFNAME interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAddress {
    /// Index of the pod interface in `interfaces`.
    pub interface_index: usize,
    /// The pod's private IPv4 address and prefix.
    pub private: Ipv4Cidr,
    /// The gateway the primary plugin reported, if any.
    pub gateway: Option<Ipv4Addr>,
}

impl CniResult {
    pub fn from_value(value: Value) -> Result<Self, CniError> {
        serde_json::from_value(value).map_err(|e| {
            CniError::new(
                code::INVALID_NETWORK_CONFIG,
                "prevResult is not a CNI result",
            )
            .with_details(e.to_string())
        })
    }

    /// Finds the pod interface (`ifname` inside a sandbox) and its first IPv4 address.
    pub fn pod_address(&self, ifname: &str) -> Result<PodAddress, CniError> {
        let interface_index = self
            .interfaces
            .iter()
            .position(|i| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
            .ok_or_else(|| {
                CniError::new(
                    code::PREV_RESULT,
                    format!("prevResult has no interface {ifname:?} inside the pod"),
                )
                .with_details("portslice is chained after a plugin that creates the pod interface (ptp, bridge, ...)")
            })?;
        self.ips
            .iter()
            .filter(|ip| ip.interface == Some(interface_index))
            .find_map(|ip| {
                let private: Ipv4Cidr = ip.address.parse().ok()?;
                let gateway = ip.gateway.as_deref().and_then(|g| g.parse().ok());
                Some(PodAddress {
                    interface_index,
                    private,
                    gateway,
                })
            })
            .ok_or_else(|| {
                CniError::new(
                    code::PREV_RESULT,
                    format!("prevResult has no IPv4 address on {ifname:?}"),
                )
            })
    }

    /// The result ADD prints: the previous result with the node address /32 appended to the pod
    /// interface. Appended, not prepended: containerd takes the *first* IPv4 of the interface as
    /// the pod IP, and that must stay the private address. It carries the private address's
    /// gateway (the node address leaves through it too); the reference plugins' CHECK insists on a
    /// gateway for every address of their interface.
    pub fn with_node_address(
        mut self,
        version: Version,
        pod: &PodAddress,
        node_ip: Ipv4Addr,
    ) -> Self {
        let address = format!("{node_ip}/32");
        if !self.ips.iter().any(|ip| ip.address == address) {
            self.ips.push(IpConfig {
                version: None,
                address,
                gateway: pod.gateway.map(|g| g.to_string()),
                interface: Some(pod.interface_index),
                extra: Map::new(),
            });
        }
        self.into_version(version)
    }

    /// Rewrites version-dependent fields for the version we answer in.
    pub fn into_version(mut self, version: Version) -> Self {
        self.cni_version = version.as_str().to_string();
        for ip in &mut self.ips {
            ip.version = if version.ips_have_version() {
                Some(if ip.address.contains(':') { "6" } else { "4" }.to_string())
            } else {
                None
            };
        }
        self
    }

    pub fn to_json(&self) -> Result<String, CniError> {
        serde_json::to_string(self).map_err(|e| {
            CniError::new(code::IO_FAILURE, "could not encode the result")
                .with_details(e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's ptp plugin prints at 1.0.0.
    pub(crate) fn ptp_result() -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "veth1a2b3c4d", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/pod"}
            ],
            "ips": [{"address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    #[test]
    fn finds_the_pod_interface_and_private_address() {
        let r = CniResult::from_value(ptp_result()).unwrap();
        let pod = r.pod_address("eth0").unwrap();
        assert_eq!(pod.interface_index, 1);
        assert_eq!(pod.private.to_string(), "10.22.0.5/24");
        assert_eq!(pod.gateway, Some(Ipv4Addr::new(10, 22, 0, 1)));
        assert_eq!(r.pod_address("net1").unwrap_err().code, code::PREV_RESULT);
    }

    #[test]
    fn appends_the_node_address_after_the_private_one_once() {
        let r = CniResult::from_value(ptp_result()).unwrap();
        let pod = r.pod_address("eth0").unwrap();
        let node = Ipv4Addr::new(192, 0, 2, 10);
        let out = r.with_node_address(Version::V100, &pod, node);
        assert_eq!(out.ips.len(), 2);
        assert_eq!(
            out.ips[0].address, "10.22.0.5/24",
            "private address stays first"
        );
        assert_eq!(out.ips[1].address, "192.0.2.10/32");
        assert_eq!(out.ips[1].interface, Some(1));
        assert_eq!(out.ips[1].gateway.as_deref(), Some("10.22.0.1"));
        let again = out.clone().with_node_address(Version::V100, &pod, node);
        assert_eq!(again.ips.len(), 2, "idempotent");
        let json: Value = serde_json::from_str(&again.to_json().unwrap()).unwrap();
        assert_eq!(
            json["dns"],
            serde_json::json!({}),
            "unknown and empty fields pass through"
        );
        assert!(json["ips"][1].get("version").is_none());
    }

    #[test]
    fn version_040_results_carry_ip_versions() {
        let r = CniResult::from_value(ptp_result()).unwrap();
        let pod = r.pod_address("eth0").unwrap();
        let out = r.with_node_address(Version::V040, &pod, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(out.cni_version, "0.4.0");
        assert!(out.ips.iter().all(|ip| ip.version.as_deref() == Some("4")));
    }

    #[test]
    fn a_result_without_ipv4_on_the_pod_interface_is_refused() {
        let mut v = ptp_result();
        v["ips"] = serde_json::json!([{"address": "fd00::5/64", "interface": 1}]);
        let r = CniResult::from_value(v).unwrap();
        assert_eq!(r.pod_address("eth0").unwrap_err().code, code::PREV_RESULT);
        assert!(CniResult::from_value(serde_json::json!({"ips": 5})).is_err());
    }
}
