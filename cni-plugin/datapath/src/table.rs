//! Pure translation between a [`PodAttachment`] and the map entries that represent it.
use std::net::Ipv4Addr;

use super::{DatapathError, PodAttachment, PortRange, Protocol, SliceBinding, abi};

fn proto_bits(protocols: &[Protocol]) -> u8 {
    protocols.iter().fold(0, |b, p| {
        b | match p {
            Protocol::TCP => abi::P_TCP,
            Protocol::UDP => abi::P_UDP,
        }
    })
}

fn protocols_of(bits: u8) -> Vec<Protocol> {
    let mut v = Vec::new();
    if bits & abi::P_TCP != 0 {
        v.push(Protocol::TCP);
    }
    if bits & abi::P_UDP != 0 {
        v.push(Protocol::UDP);
    }
    v
}

/// Flags of the pod's port-table and pods-map entries. Host-side interfaces handed to us are
/// veths (ptp, bridge, kindnet, Calico all use them), so `bpf_redirect_peer` is safe.
pub fn pod_flags(pod: &PodAttachment) -> u32 {
    abi::F_PEER | if pod.slice.is_some() { abi::F_SLICE } else { 0 }
}

/// Keys of the port table the pod owns: its range for each of its protocols.
pub fn port_keys(pod: &PodAttachment) -> Vec<u32> {
    let Some(s) = &pod.slice else {
        return Vec::new();
    };
    let mut keys = Vec::with_capacity(s.range.len() as usize * s.protocols.len());
    for tcp in [true, false] {
        let p = if tcp { Protocol::TCP } else { Protocol::UDP };
        if s.protocols.contains(&p) {
            keys.extend((s.range.start..=s.range.end).map(|port| abi::port_key(tcp, port)));
        }
    }
    keys
}

/// Keys of the port table a stored attachment holds (its range for each of its protocols).
pub fn meta_port_keys(m: &abi::PodMeta) -> Vec<u32> {
    if m.has_slice == 0 || m.port_lo == 0 || m.port_lo > m.port_hi {
        return Vec::new();
    }
    let mut keys = Vec::new();
    for (tcp, bit) in [(true, abi::P_TCP), (false, abi::P_UDP)] {
        if m.protocols & bit != 0 {
            keys.extend((m.port_lo..=m.port_hi).map(|port| abi::port_key(tcp, port)));
        }
    }
    keys
}

/// The error for a port-table key that another pod holds.
pub fn taken(key: u32, owner: u32) -> DatapathError {
    DatapathError::PortTaken {
        protocol: if key >= 65536 { "UDP" } else { "TCP" },
        port: (key % 65536) as u16,
        owner,
    }
}

pub fn pod_info(pod: &PodAttachment) -> abi::PodInfo {
    let (lo, hi, protocols) = match &pod.slice {
        Some(s) => (s.range.start, s.range.end, proto_bits(&s.protocols)),
        None => (0, 0, 0),
    };
    abi::PodInfo {
        flags: pod_flags(pod),
        pod_ip: u32::from_ne_bytes(pod.pod_private_ip.octets()),
        port_lo: lo,
        port_hi: hi,
        protocols,
        _pad: [0; 3],
    }
}

/// Validates the attachment and encodes it for the `pod_meta` map.
pub fn meta_of(pod: &PodAttachment) -> Result<(abi::MetaKey, abi::PodMeta), DatapathError> {
    let container_id = abi::fixed(&pod.container_id).filter(|_| !pod.container_id.is_empty());
    let Some(container_id) = container_id else {
        return Err(DatapathError::Invalid(format!(
            "container id {:?} must be 1-{} bytes without NUL",
            pod.container_id,
            abi::CONTAINER_ID_LEN - 1
        )));
    };
    if pod.host_veth_ifindex == 0 {
        return Err(DatapathError::Invalid("host veth ifindex 0".into()));
    }
    let mut meta = abi::PodMeta {
        host_ifindex: pod.host_veth_ifindex,
        pod_ip: u32::from_ne_bytes(pod.pod_private_ip.octets()),
        port_lo: 0,
        port_hi: 0,
        protocols: 0,
        has_slice: 0,
        _pad: [0; 2],
        slice_key: [0; abi::SLICE_KEY_LEN],
    };
    if let Some(s) = &pod.slice {
        meta.slice_key = abi::fixed(&s.slice_key).ok_or_else(|| {
            DatapathError::Invalid(format!("slice key {:?} too long", s.slice_key))
        })?;
        if s.range.start == 0 || s.range.start > s.range.end {
            return Err(DatapathError::Invalid(format!("port range {}", s.range)));
        }
        if s.protocols.is_empty() {
            return Err(DatapathError::Invalid("slice without protocols".into()));
        }
        meta.port_lo = s.range.start;
        meta.port_hi = s.range.end;
        meta.protocols = proto_bits(&s.protocols);
        meta.has_slice = 1;
    }
    Ok((abi::MetaKey { container_id }, meta))
}

/// Decodes a `pod_meta` entry.
pub fn attachment_of(container_id: &str, m: &abi::PodMeta) -> PodAttachment {
    PodAttachment {
        container_id: container_id.to_string(),
        host_veth_ifindex: m.host_ifindex,
        pod_private_ip: Ipv4Addr::from(m.pod_ip.to_ne_bytes()),
        slice: (m.has_slice != 0).then(|| SliceBinding {
            slice_key: abi::unfixed(&m.slice_key),
            range: PortRange {
                start: m.port_lo,
                end: m.port_hi,
            },
            protocols: protocols_of(m.protocols),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(slice: Option<(u16, u16, Vec<Protocol>)>) -> PodAttachment {
        PodAttachment {
            container_id: "c0ffee".into(),
            host_veth_ifindex: 7,
            pod_private_ip: Ipv4Addr::new(10, 1, 2, 3),
            slice: slice.map(|(a, b, p)| SliceBinding {
                slice_key: "ns/media".into(),
                range: PortRange { start: a, end: b },
                protocols: p,
            }),
        }
    }

    #[test]
    fn meta_round_trips() {
        for p in [
            pod(Some((40000, 40009, vec![Protocol::TCP, Protocol::UDP]))),
            pod(None),
        ] {
            let (k, m) = meta_of(&p).unwrap();
            assert_eq!(attachment_of(&abi::unfixed(&k.container_id), &m), p);
        }
    }

    #[test]
    fn port_keys_cover_range_per_protocol() {
        let k = port_keys(&pod(Some((100, 102, vec![Protocol::UDP]))));
        assert_eq!(k, vec![65636, 65637, 65638]);
        let k = port_keys(&pod(Some((
            65535,
            65535,
            vec![Protocol::TCP, Protocol::UDP],
        ))));
        assert_eq!(k, vec![65535, 131071]);
        assert!(port_keys(&pod(None)).is_empty());
        // The stored attachment names the same keys.
        for p in [
            pod(Some((100, 102, vec![Protocol::UDP]))),
            pod(Some((65534, 65535, vec![Protocol::TCP, Protocol::UDP]))),
            pod(None),
        ] {
            assert_eq!(meta_port_keys(&meta_of(&p).unwrap().1), port_keys(&p));
        }
    }

    #[test]
    fn invalid_attachments_are_refused() {
        let mut p = pod(Some((10, 9, vec![Protocol::TCP])));
        assert!(meta_of(&p).is_err());
        p = pod(Some((10, 11, vec![])));
        assert!(meta_of(&p).is_err());
        p = pod(None);
        p.container_id = "x".repeat(abi::CONTAINER_ID_LEN);
        assert!(meta_of(&p).is_err());
        p.container_id = String::new();
        assert!(meta_of(&p).is_err());
    }

    #[test]
    fn flags_and_taken_error() {
        assert_eq!(pod_flags(&pod(None)), abi::F_PEER);
        assert_eq!(
            pod_info(&pod(Some((1, 2, vec![Protocol::TCP])))).protocols,
            abi::P_TCP
        );
        assert!(taken(65536 + 53, 3).to_string().contains("UDP port 53"));
    }
}
