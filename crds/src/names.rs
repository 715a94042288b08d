//! Named ports: the names a slice's servers and clients know its ports by (`sip`, `rtp`,
//! `turn`), resolved against the allocated range. One place for the rules the CRD's CEL, the
//! operator's ConfigMap, Service and EndpointSlice, and the node daemon's TCPMUX all follow.
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use portslice_ports::{PortRange, Protocol};

/// A named port, or run of ports, inside the slice.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.name.matches('[a-z]') && !self.name.contains('--')")
    .message("names are IANA service names: lowercase letters, digits and single dashes, with at least one letter (the SRV label _<name>)"))]
pub struct PortName {
    /// The name (`sip`): an IANA service name, 1-15 characters, the `_<name>` of its SRV record
    /// and the suffix of its `PORTSLICE_PORT_<NAME>` variable.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Position of its first port in the slice: 0 is the range's first port.
    #[schemars(range(max = 65534))]
    pub offset: u32,
    /// Number of ports from there (a media range); default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub count: Option<u32>,
    /// The protocol clients use it with (SRV `_udp`/`_tcp`); default: the slice's protocol if it
    /// has one, else TCP. Must be one of the slice's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// A named port resolved against the slice's range.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct NamedPorts {
    pub name: String,
    pub protocol: Protocol,
    /// The first port.
    pub port: u16,
    /// How many ports from `port`.
    pub count: u32,
}

impl NamedPorts {
    /// The ports as a range.
    pub fn range(&self) -> PortRange {
        let end = u32::from(self.port) + self.count.max(1) - 1;
        PortRange {
            start: self.port,
            end: u16::try_from(end).unwrap_or(u16::MAX),
        }
    }

    /// `sip=5060/UDP`, `rtp=5062-6059/UDP`.
    pub fn text(&self) -> String {
        format!("{}={}/{:?}", self.name, self.range(), self.protocol)
    }
}

impl PortName {
    /// The protocol this name is used with, given the slice's protocols.
    pub fn protocol_in(&self, slice_protocols: &[Protocol]) -> Protocol {
        self.protocol.unwrap_or(match slice_protocols {
            [only] => *only,
            _ => Protocol::TCP,
        })
    }
}

/// Every name resolved against `range`; names that do not fit (the CEL rules keep them out of
/// the API, so only an object admitted under an older CRD) are left out.
pub fn resolve(
    names: &[PortName],
    range: PortRange,
    slice_protocols: &[Protocol],
) -> Vec<NamedPorts> {
    names
        .iter()
        .filter_map(|n| {
            let count = n.count.unwrap_or(1);
            let last = u32::from(range.start)
                .checked_add(n.offset)?
                .checked_add(count.checked_sub(1)?)?;
            if last > u32::from(range.end) {
                return None;
            }
            Some(NamedPorts {
                name: n.name.clone(),
                protocol: n.protocol_in(slice_protocols),
                port: u16::try_from(u32::from(range.start) + n.offset).ok()?,
                count,
            })
        })
        .collect()
}

/// The environment variable a named port's first port goes into: `PORTSLICE_PORT_SIP`,
/// `PORTSLICE_PORT_RTP_MEDIA` for `rtp-media`.
pub fn env_key(name: &str) -> String {
    format!(
        "PORTSLICE_PORT_{}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str, offset: u32, count: Option<u32>, protocol: Option<Protocol>) -> PortName {
        PortName {
            name: n.into(),
            offset,
            count,
            protocol,
        }
    }

    #[test]
    fn names_resolve_against_the_range_with_the_slices_protocol() {
        let range = PortRange {
            start: 5060,
            end: 6059,
        };
        let names = [
            name("sip", 0, None, None),
            name("rtp", 2, Some(998), None),
            name("late", 999, Some(2), None),
        ];
        let r = resolve(&names, range, &[Protocol::UDP]);
        assert_eq!(r.len(), 2, "the name past the range is left out: {r:?}");
        assert_eq!(r[0].text(), "sip=5060/UDP");
        assert_eq!(r[1].text(), "rtp=5062-6059/UDP");
        let both = resolve(&names[..1], range, &Protocol::ALL);
        assert_eq!(
            both[0].protocol,
            Protocol::TCP,
            "two protocols: TCP, as Kubernetes does"
        );
    }

    #[test]
    fn env_keys_are_shell_names() {
        assert_eq!(env_key("sip"), "PORTSLICE_PORT_SIP");
        assert_eq!(env_key("rtp-media"), "PORTSLICE_PORT_RTP_MEDIA");
    }
}
