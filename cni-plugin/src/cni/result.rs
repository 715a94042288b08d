//! The CNI result (`interfaces`, `ips`, `routes`, `dns`), read from `prevResult` and written back
//! with the node addresses added. Unknown fields are kept (`extra`) so a chain loses nothing.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{CniError, code};
use super::version::Version;
use portslice_netns::plan::{PodWiring, PrivateAddress};
use portslice_netns::{Family, IpCidr};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddresses {
    /// Index of the pod interface in `interfaces`.
    pub interface_index: usize,
    /// Its addresses of either family, in prevResult's order, each with the gateway the primary
    /// plugin reported for it. Possibly none (a plugin that leaves addressing to another).
    pub private: Vec<PrivateAddress>,
}

impl PodAddresses {
    /// The first private IPv4 address, if the pod has one.
    pub fn first_v4(&self) -> Option<Ipv4Addr> {
        self.private.iter().find_map(|p| match p.cidr {
            IpCidr::V4(c) => Some(c.addr),
            IpCidr::V6(_) => None,
        })
    }
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

    /// Finds the pod interface (`ifname` inside a sandbox) and its addresses. Fails only when
    /// there is no such interface: which families a pod must have is the caller's call (none for
    /// a pod without a slice).
    pub fn pod_addresses(&self, ifname: &str) -> Result<PodAddresses, CniError> {
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
        let private = self
            .ips
            .iter()
            .filter(|ip| ip.interface == Some(interface_index))
            .filter_map(|ip| {
                let cidr: IpCidr = ip.address.parse().ok()?;
                let gateway = ip
                    .gateway
                    .as_deref()
                    .and_then(|g| g.parse::<IpAddr>().ok())
                    .filter(|g| Family::of(*g) == cidr.family());
                Some(PrivateAddress { cidr, gateway })
            })
            .collect();
        Ok(PodAddresses {
            interface_index,
            private,
        })
    }

    /// The result ADD prints: the previous result with the node addresses the pod got (`/32`,
    /// `/128`, IPv4 first) appended to the pod interface. Appended, not prepended: containerd
    /// takes the *first* address of each family on the interface as the pod IPs, and those must
    /// stay the private ones. Each carries the private address's gateway of its family (the node
    /// address leaves through it too); the reference plugins' CHECK insists on a gateway for
    /// every address of their interface.
    pub fn with_node_addresses(
        mut self,
        version: Version,
        interface_index: usize,
        wiring: &PodWiring,
    ) -> Self {
        for f in wiring.families() {
            let address = format!("{}/{}", f.node_ip, f.family().bits());
            if !self.ips.iter().any(|ip| ip.address == address) {
                self.ips.push(IpConfig {
                    version: None,
                    address,
                    gateway: f.gateway.map(|g| g.to_string()),
                    interface: Some(interface_index),
                    extra: Map::new(),
                });
            }
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
    use portslice_netns::NodeAddrs;

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

    /// What Debian's ptp plugin prints for a dual-stack pod at 1.0.0.
    fn dual_stack_result() -> Value {
        let mut v = ptp_result();
        v["ips"] = serde_json::json!([
            {"address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 1},
            {"address": "fd00:22::5/64", "gateway": "fd00:22::1", "interface": 1}
        ]);
        v
    }

    fn wiring(r: &CniResult, node: &[&str]) -> PodWiring {
        let pod = r.pod_addresses("eth0").unwrap();
        let node = NodeAddrs::new(node.iter().map(|a| a.parse().unwrap())).unwrap();
        PodWiring::new(
            "eth0",
            portslice_ports::PortRange {
                start: 40000,
                end: 40099,
            },
            &node,
            &pod.private,
            &[],
        )
    }

    #[test]
    fn finds_the_pod_interface_and_private_address() {
        let r = CniResult::from_value(ptp_result()).unwrap();
        let pod = r.pod_addresses("eth0").unwrap();
        assert_eq!(pod.interface_index, 1);
        assert_eq!(pod.private.len(), 1);
        assert_eq!(pod.private[0].cidr.to_string(), "10.22.0.5/24");
        assert_eq!(pod.private[0].gateway, Some("10.22.0.1".parse().unwrap()));
        assert_eq!(pod.first_v4(), Some(Ipv4Addr::new(10, 22, 0, 5)));
        assert_eq!(r.pod_addresses("net1").unwrap_err().code, code::PREV_RESULT);
    }

    #[test]
    fn appends_the_node_address_after_the_private_one_once() {
        let r = CniResult::from_value(ptp_result()).unwrap();
        let pod = r.pod_addresses("eth0").unwrap();
        let w = wiring(&r, &["192.0.2.10"]);
        let out = r.with_node_addresses(Version::V100, pod.interface_index, &w);
        assert_eq!(out.ips.len(), 2);
        assert_eq!(
            out.ips[0].address, "10.22.0.5/24",
            "private address stays first"
        );
        assert_eq!(out.ips[1].address, "192.0.2.10/32");
        assert_eq!(out.ips[1].interface, Some(1));
        assert_eq!(out.ips[1].gateway.as_deref(), Some("10.22.0.1"));
        let again = out
            .clone()
            .with_node_addresses(Version::V100, pod.interface_index, &w);
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
        let r = CniResult::from_value(dual_stack_result()).unwrap();
        let w = wiring(&r, &["192.0.2.10", "2001:db8::10"]);
        let out = r.with_node_addresses(Version::V040, 1, &w);
        assert_eq!(out.cni_version, "0.4.0");
        let versions: Vec<_> = out.ips.iter().map(|ip| ip.version.as_deref()).collect();
        assert_eq!(versions, [Some("4"), Some("6"), Some("4"), Some("6")]);
    }

    #[test]
    fn dual_stack_pods_get_each_node_address_after_every_private_one() {
        let r = CniResult::from_value(dual_stack_result()).unwrap();
        let w = wiring(&r, &["192.0.2.10", "2001:db8::10"]);
        let out = r.with_node_addresses(Version::V100, 1, &w);
        let ips: Vec<_> = out
            .ips
            .iter()
            .map(|ip| (ip.address.as_str(), ip.gateway.as_deref()))
            .collect();
        assert_eq!(
            ips,
            [
                ("10.22.0.5/24", Some("10.22.0.1")),
                ("fd00:22::5/64", Some("fd00:22::1")),
                ("192.0.2.10/32", Some("10.22.0.1")),
                ("2001:db8::10/128", Some("fd00:22::1")),
            ]
        );
        // A node with IPv6 only adds only its IPv6 address; a pod with IPv6 only gets only it.
        let r = CniResult::from_value(dual_stack_result()).unwrap();
        let out = r
            .clone()
            .with_node_addresses(Version::V100, 1, &wiring(&r, &["2001:db8::10"]));
        assert_eq!(out.ips.len(), 3);
        assert_eq!(out.ips[2].address, "2001:db8::10/128");
    }

    #[test]
    fn an_ipv6_only_pod_interface_is_found_with_its_addresses() {
        let mut v = ptp_result();
        v["ips"] =
            serde_json::json!([{"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1}]);
        let r = CniResult::from_value(v).unwrap();
        let pod = r.pod_addresses("eth0").unwrap();
        assert_eq!(pod.first_v4(), None);
        assert!(pod.private[0].cidr.is_ipv6());
        // The IPv4-only node shares nothing with it.
        assert!(wiring(&r, &["192.0.2.10"]).is_empty());
        assert!(CniResult::from_value(serde_json::json!({"ips": 5})).is_err());
    }
}
