//! What the operator publishes for an allocated slice, computed without I/O:
//! - a ConfigMap `<slice>-portslice` a container takes with `envFrom` (`PORTSLICE_RANGE`,
//!   `PORTSLICE_PORT_MIN`/`MAX`, `PORTSLICE_SIZE`, `PORTSLICE_PORT_<NAME>`);
//! - a headless, selector-less Service `<slice>` with the named ports, so cluster DNS answers
//!   `<slice>.<ns>.svc` and `_<name>._<proto>.<slice>.<ns>.svc`;
//! - an EndpointSlice per address family, `<slice>-ipv4` and (on dual-stack or IPv6 nodes)
//!   `<slice>-ipv6`, with one endpoint per sliver: its node address of that family, node, pod
//!   and readiness, so DNS answers A and AAAA.
//!
//! Every object is owned by the PortSlice (garbage-collected with it) and labelled as ours.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use portslice_crds::names::env_key;
use portslice_crds::{NamedPorts, PortRange, PortSlice, Protocol};

/// Label on every object we publish (and the selector our watches use).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "portslice-operator");
/// Label naming the slice an object belongs to.
pub const SLICE_LABEL: &str = "portslice.io/slice";
/// PortSlice annotation whose value (a JSON or YAML map) is copied onto the Service, e.g. for
/// external-dns.
pub const SERVICE_ANNOTATIONS: &str = "portslice.io/service-annotations";
/// What the EndpointSlice controller reads to leave our EndpointSlices alone.
const ENDPOINTSLICE_MANAGER: &str = "operator.portslice.io";

/// The ConfigMap's name for `slice`.
pub fn config_map_name(slice: &str) -> String {
    format!("{slice}-portslice")
}

/// An address family of the slivers' node addresses: one EndpointSlice each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn address_type(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    fn holds(self, ip: &str) -> bool {
        match self {
            Self::V4 => ip.parse::<std::net::Ipv4Addr>().is_ok(),
            Self::V6 => ip.parse::<std::net::Ipv6Addr>().is_ok(),
        }
    }
}

/// The EndpointSlice's name for `slice` and `family`.
pub fn endpoint_slice_name(slice: &str, family: Family) -> String {
    match family {
        Family::V4 => format!("{slice}-ipv4"),
        Family::V6 => format!("{slice}-ipv6"),
    }
}

/// A sliver's node address of `family`: from `status.hostIPs` (one per family), or the
/// primary `status.hostIP`.
fn node_address(pod: &Pod, family: Family) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .host_ips
        .iter()
        .flatten()
        .map(|h| h.ip.clone())
        .chain(status.host_ip.clone())
        .find(|ip| family.holds(ip))
}

/// Whether any sliver has a node address of `family` (an IPv6 EndpointSlice exists only then).
pub fn any_address(members: &[&Pod], family: Family) -> bool {
    members.iter().any(|p| node_address(p, family).is_some())
}

/// Whether `name` can name a Service (an RFC 1035 label): DNS names exist only for such slices.
pub fn is_service_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn meta(slice: &PortSlice, name: String) -> ObjectMeta {
    let owner = OwnerReference {
        api_version: PortSlice::api_version(&()).into_owned(),
        kind: PortSlice::kind(&()).into_owned(),
        name: slice.name_any(),
        uid: slice.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    ObjectMeta {
        name: Some(name),
        namespace: slice.namespace(),
        labels: Some(BTreeMap::from([
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
            (SLICE_LABEL.to_string(), slice.name_any()),
        ])),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    }
}

/// The environment a slice pod takes with `envFrom`.
pub fn env(range: PortRange, named: &[NamedPorts]) -> BTreeMap<String, String> {
    let mut data = BTreeMap::from([
        ("PORTSLICE_RANGE".to_string(), range.to_string()),
        ("PORTSLICE_PORT_MIN".to_string(), range.start.to_string()),
        ("PORTSLICE_PORT_MAX".to_string(), range.end.to_string()),
        ("PORTSLICE_SIZE".to_string(), range.len().to_string()),
    ]);
    for n in named {
        let key = env_key(&n.name);
        if n.count > 1 {
            data.insert(format!("{key}_MAX"), n.range().end.to_string());
            data.insert(format!("{key}_COUNT"), n.count.to_string());
        }
        data.insert(key, n.port.to_string());
    }
    data
}

pub fn config_map(slice: &PortSlice, range: PortRange, named: &[NamedPorts]) -> ConfigMap {
    ConfigMap {
        metadata: meta(slice, config_map_name(&slice.name_any())),
        data: Some(env(range, named)),
        ..ConfigMap::default()
    }
}

fn proto(p: Protocol) -> String {
    format!("{p:?}")
}

/// The Service's extra annotations from the PortSlice's `portslice.io/service-annotations`;
/// a value that is no map of strings is ignored (the caller warns).
pub fn service_annotations(slice: &PortSlice) -> Result<BTreeMap<String, String>, String> {
    match slice.annotations().get(SERVICE_ANNOTATIONS) {
        None => Ok(BTreeMap::new()),
        Some(text) => serde_yaml::from_str::<BTreeMap<String, String>>(text)
            .map_err(|e| format!("{SERVICE_ANNOTATIONS} is not a map of strings: {e}")),
    }
}

pub fn service(
    slice: &PortSlice,
    named: &[NamedPorts],
    annotations: BTreeMap<String, String>,
) -> Service {
    let mut metadata = meta(slice, slice.name_any());
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations);
    }
    let ports: Vec<ServicePort> = named
        .iter()
        .map(|n| ServicePort {
            name: Some(n.name.clone()),
            protocol: Some(proto(n.protocol)),
            port: i32::from(n.port),
            target_port: Some(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(n.port)),
            ),
            ..ServicePort::default()
        })
        .collect();
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Only ready slivers are answered: a starting server is found once it serves.
            publish_not_ready_addresses: Some(false),
            ports: (!ports.is_empty()).then_some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// One endpoint per sliver that has a node address of `family`, ordered by node.
pub fn endpoint_slice(
    slice: &PortSlice,
    named: &[NamedPorts],
    members: &[&Pod],
    family: Family,
) -> EndpointSlice {
    let mut metadata = meta(slice, endpoint_slice_name(&slice.name_any(), family));
    if let Some(labels) = metadata.labels.as_mut() {
        labels.insert("kubernetes.io/service-name".into(), slice.name_any());
        labels.insert(
            "endpointslice.kubernetes.io/managed-by".into(),
            ENDPOINTSLICE_MANAGER.into(),
        );
    }
    let mut endpoints: Vec<Endpoint> = members
        .iter()
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            let status = p.status.as_ref()?;
            let address = node_address(p, family)?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let terminating = p.metadata.deletion_timestamp.is_some();
            Some(Endpoint {
                addresses: vec![address],
                conditions: Some(EndpointConditions {
                    ready: Some(ready && !terminating),
                    serving: Some(ready),
                    terminating: Some(terminating),
                }),
                node_name: Some(node),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: p.metadata.name.clone(),
                    namespace: p.metadata.namespace.clone(),
                    uid: p.metadata.uid.clone(),
                    ..ObjectReference::default()
                }),
                ..Endpoint::default()
            })
        })
        .collect();
    endpoints.sort_by(|a, b| a.node_name.cmp(&b.node_name));
    EndpointSlice {
        metadata,
        address_type: family.address_type().into(),
        endpoints,
        ports: Some(
            named
                .iter()
                .map(|n| EndpointPort {
                    name: Some(n.name.clone()),
                    protocol: Some(proto(n.protocol)),
                    port: Some(i32::from(n.port)),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HostIP, PodCondition, PodSpec, PodStatus};
    use portslice_crds::PortSliceSpec;

    fn slice() -> PortSlice {
        let mut s = PortSlice::new("voice", PortSliceSpec::of_size(1000));
        s.metadata.namespace = Some("tel".into());
        s.metadata.uid = Some("u1".into());
        s
    }

    const R: PortRange = PortRange {
        start: 40000,
        end: 40999,
    };

    fn named() -> Vec<NamedPorts> {
        vec![
            NamedPorts {
                name: "sip".into(),
                protocol: Protocol::UDP,
                port: 40000,
                count: 1,
            },
            NamedPorts {
                name: "rtp-media".into(),
                protocol: Protocol::UDP,
                port: 40002,
                count: 998,
            },
        ]
    }

    fn pod(name: &str, node: &str, ip: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("tel".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                host_ip: Some(ip.into()),
                host_ips: Some(vec![HostIP { ip: ip.into() }]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn the_config_map_carries_the_range_and_every_name() {
        let cm = config_map(&slice(), R, &named());
        let d = cm.data.unwrap();
        assert_eq!(d["PORTSLICE_RANGE"], "40000-40999");
        assert_eq!(d["PORTSLICE_PORT_MIN"], "40000");
        assert_eq!(d["PORTSLICE_PORT_MAX"], "40999");
        assert_eq!(d["PORTSLICE_SIZE"], "1000");
        assert_eq!(d["PORTSLICE_PORT_SIP"], "40000");
        assert_eq!(d["PORTSLICE_PORT_RTP_MEDIA"], "40002");
        assert_eq!(d["PORTSLICE_PORT_RTP_MEDIA_MAX"], "40999");
        assert_eq!(cm.metadata.name.as_deref(), Some("voice-portslice"));
        let owner = &cm.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("PortSlice", "u1")
        );
    }

    #[test]
    fn endpoints_are_the_slivers_node_addresses_with_their_readiness() {
        let (a, b) = (
            pod("voice-b", "node-b", "198.18.0.12", false),
            pod("voice-a", "node-a", "198.18.0.11", true),
        );
        let es = endpoint_slice(&slice(), &named(), &[&a, &b], Family::V4);
        let got: Vec<_> = es
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.node_name.clone().unwrap(),
                    e.addresses[0].clone(),
                    e.conditions.as_ref().unwrap().ready.unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("node-a".into(), "198.18.0.11".into(), true),
                ("node-b".into(), "198.18.0.12".into(), false)
            ]
        );
        assert_eq!(es.ports.unwrap()[1].port, Some(40002));
        assert_eq!(
            es.metadata.labels.unwrap()["kubernetes.io/service-name"],
            "voice"
        );
    }

    #[test]
    fn dual_stack_slivers_get_one_endpoint_slice_per_family() {
        let mut a = pod("voice-a", "node-a", "198.18.0.11", true);
        if let Some(st) = a.status.as_mut() {
            st.host_ips = Some(vec![
                HostIP {
                    ip: "198.18.0.11".into(),
                },
                HostIP {
                    ip: "2001:2::11".into(),
                },
            ]);
        }
        let b = pod("voice-b", "node-b", "198.18.0.12", true);
        let v6 = endpoint_slice(&slice(), &named(), &[&a, &b], Family::V6);
        assert_eq!(v6.address_type, "IPv6");
        assert_eq!(v6.metadata.name.as_deref(), Some("voice-ipv6"));
        let addrs: Vec<_> = v6
            .endpoints
            .iter()
            .map(|e| e.addresses[0].as_str())
            .collect();
        assert_eq!(
            addrs,
            ["2001:2::11"],
            "an IPv4-only node has no IPv6 endpoint"
        );
        let v4 = endpoint_slice(&slice(), &named(), &[&a, &b], Family::V4);
        assert_eq!(v4.endpoints.len(), 2);
        assert!(any_address(&[&a], Family::V6) && !any_address(&[&b], Family::V6));
    }

    #[test]
    fn the_service_is_headless_with_the_named_ports_and_passed_annotations() {
        let mut s = slice();
        s.metadata.annotations = Some(BTreeMap::from([(
            SERVICE_ANNOTATIONS.to_string(),
            r#"{"external-dns.alpha.kubernetes.io/hostname": "voice.example.org"}"#.to_string(),
        )]));
        let svc = service(&s, &named(), service_annotations(&s).unwrap());
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert!(
            spec.selector.is_none(),
            "selector-less: we keep the endpoints"
        );
        assert_eq!(spec.ports.unwrap()[0].name.as_deref(), Some("sip"));
        assert_eq!(
            svc.metadata.annotations.unwrap()["external-dns.alpha.kubernetes.io/hostname"],
            "voice.example.org"
        );
        s.metadata.annotations = Some(BTreeMap::from([(
            SERVICE_ANNOTATIONS.to_string(),
            "[1, 2]".to_string(),
        )]));
        assert!(service_annotations(&s).is_err());
    }

    #[test]
    fn only_rfc_1035_labels_name_services() {
        assert!(is_service_name("voice-1"));
        assert!(!is_service_name("1voice"));
        assert!(!is_service_name("voice.eu"));
        assert!(!is_service_name(&"a".repeat(64)));
    }
}
