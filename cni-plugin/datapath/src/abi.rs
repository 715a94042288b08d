//! The kernel ABI: every map key/value the eBPF programs share with user space, field for field
//! the structs of `bpf/portslice_abi.h`. `layout_matches_c_header` checks the two agree.
#![allow(unsafe_code)] // aya::Pod is an unsafe marker trait: these are plain old data.

/// Port table slot of TCP ports: key = `PROTO_TCP * 65536 + port`.
pub const PROTO_TCP: u32 = 0;
/// Port table slot of UDP ports.
pub const PROTO_UDP: u32 = 1;
pub const PORT_TABLE_SIZE: u32 = 2 * 65536;
pub const MAX_PODS: u32 = 4096;
pub const CONTAINER_ID_LEN: usize = 128;
pub const SLICE_KEY_LEN: usize = 256;

/// The host ifindex is a veth: steer with `bpf_redirect_peer`.
pub const F_PEER: u32 = 0x1;
/// The pod holds a slice (without it the pod only gets row-4 steering).
pub const F_SLICE: u32 = 0x2;
pub const P_TCP: u8 = 0x1;
pub const P_UDP: u8 = 0x2;

/// Indexes of the `global_stats` array, with the names metrics export them under.
pub const GLOBAL_STATS: [(u32, &str); 7] = [
    (1, "steered"),
    (2, "passed_to_host"),
    (3, "forwarded"),
    (4, "drop_spoof"),
    (5, "drop_fragment"),
    (6, "icmp_steered"),
    (7, "fragment_steered"),
];
pub const G_MAX: u32 = 8;

/// Map names, as in the C object and as pinned under `<pin root>/maps/`.
pub mod map {
    pub const CONFIG: &str = "config";
    pub const PORT_OWNER: &str = "port_owner";
    pub const PODS: &str = "pods";
    pub const POD_STATS: &str = "pod_stats";
    pub const GLOBAL_STATS: &str = "global_stats";
    pub const FRAGS: &str = "frags";
    pub const ECHO_IDS: &str = "echo_ids";
    pub const POD_META: &str = "pod_meta";
}

/// Program names, as in the C object and as pinned under `<pin root>/progs/`.
pub mod prog {
    pub const INGRESS: &str = "ps_ingress";
    pub const POD_EGRESS: &str = "ps_pod_egress";
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Network byte order; 0 disables the datapath.
    pub node_ip: u32,
    pub uplink_ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortOwner {
    /// 0 = the port is in no slice.
    pub host_ifindex: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub flags: u32,
    pub pod_ip: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    pub protocols: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drop_src_port: u64,
    pub drop_other: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub ip_id: u16,
    pub proto: u8,
    pub dir: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragVal {
    pub host_ifindex: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoKey {
    pub remote_ip: u32,
    pub id: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoVal {
    pub host_ifindex: u32,
    pub flags: u32,
    pub orig_id: u16,
    pub _pad: [u16; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaKey {
    pub container_id: [u8; CONTAINER_ID_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub host_ifindex: u32,
    pub pod_ip: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    pub protocols: u8,
    pub has_slice: u8,
    pub _pad: [u8; 2],
    pub slice_key: [u8; SLICE_KEY_LEN],
}

// SAFETY: all of these are #[repr(C)] integers and byte arrays with explicit padding fields, so
// every bit pattern is valid and there are no implicit padding bytes.
unsafe impl aya::Pod for NodeConfig {}
unsafe impl aya::Pod for PortOwner {}
unsafe impl aya::Pod for PodInfo {}
unsafe impl aya::Pod for PodStats {}
unsafe impl aya::Pod for FragKey {}
unsafe impl aya::Pod for FragVal {}
unsafe impl aya::Pod for EchoKey {}
unsafe impl aya::Pod for EchoVal {}
unsafe impl aya::Pod for MetaKey {}
unsafe impl aya::Pod for PodMeta {}

/// Key of a port in the `port_owner` table.
pub fn port_key(tcp: bool, port: u16) -> u32 {
    (if tcp { PROTO_TCP } else { PROTO_UDP }) * 65536 + u32::from(port)
}

/// NUL-padded fixed-size copy of `s`; `None` when it does not fit (a NUL must remain for C).
pub fn fixed<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() >= N || b.contains(&0) {
        return None;
    }
    let mut out = [0u8; N];
    out[..b.len()].copy_from_slice(b);
    Some(out)
}

/// The string in a NUL-padded field (lossy: the field was written by [`fixed`]).
pub fn unfixed(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Sizes and offsets that `bpf/portslice_abi.h` gives, checked against the C compiler itself
    /// by `c_header_layout_matches` below; written out here so a reader sees the ABI at a glance.
    #[test]
    fn layout_is_the_documented_one() {
        assert_eq!(size_of::<NodeConfig>(), 8);
        assert_eq!(size_of::<PortOwner>(), 8);
        assert_eq!(size_of::<PodInfo>(), 16);
        assert_eq!(offset_of!(PodInfo, protocols), 12);
        assert_eq!(size_of::<PodStats>(), 48);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<EchoKey>(), 8);
        assert_eq!(size_of::<EchoVal>(), 16);
        assert_eq!(size_of::<MetaKey>(), 128);
        assert_eq!(size_of::<PodMeta>(), 16 + SLICE_KEY_LEN);
    }

    /// Compiles a probe against the real header with the host C compiler and compares every
    /// size and offset with the Rust mirror, so the two can never drift apart silently.
    #[test]
    fn c_header_layout_matches() {
        let checks: Vec<(&str, usize)> = vec![
            ("sizeof(struct ps_node_config)", size_of::<NodeConfig>()),
            (
                "offsetof(struct ps_node_config, uplink_ifindex)",
                offset_of!(NodeConfig, uplink_ifindex),
            ),
            ("sizeof(struct ps_port_owner)", size_of::<PortOwner>()),
            (
                "offsetof(struct ps_port_owner, flags)",
                offset_of!(PortOwner, flags),
            ),
            ("sizeof(struct ps_pod_info)", size_of::<PodInfo>()),
            (
                "offsetof(struct ps_pod_info, pod_ip)",
                offset_of!(PodInfo, pod_ip),
            ),
            (
                "offsetof(struct ps_pod_info, port_lo)",
                offset_of!(PodInfo, port_lo),
            ),
            (
                "offsetof(struct ps_pod_info, port_hi)",
                offset_of!(PodInfo, port_hi),
            ),
            (
                "offsetof(struct ps_pod_info, protocols)",
                offset_of!(PodInfo, protocols),
            ),
            ("sizeof(struct ps_pod_stats)", size_of::<PodStats>()),
            (
                "offsetof(struct ps_pod_stats, drop_other)",
                offset_of!(PodStats, drop_other),
            ),
            ("sizeof(struct ps_frag_key)", size_of::<FragKey>()),
            (
                "offsetof(struct ps_frag_key, ip_id)",
                offset_of!(FragKey, ip_id),
            ),
            (
                "offsetof(struct ps_frag_key, proto)",
                offset_of!(FragKey, proto),
            ),
            (
                "offsetof(struct ps_frag_key, dir)",
                offset_of!(FragKey, dir),
            ),
            ("sizeof(struct ps_frag_val)", size_of::<FragVal>()),
            ("sizeof(struct ps_echo_key)", size_of::<EchoKey>()),
            ("offsetof(struct ps_echo_key, id)", offset_of!(EchoKey, id)),
            ("sizeof(struct ps_echo_val)", size_of::<EchoVal>()),
            (
                "offsetof(struct ps_echo_val, orig_id)",
                offset_of!(EchoVal, orig_id),
            ),
            ("sizeof(struct ps_meta_key)", size_of::<MetaKey>()),
            ("sizeof(struct ps_pod_meta)", size_of::<PodMeta>()),
            (
                "offsetof(struct ps_pod_meta, protocols)",
                offset_of!(PodMeta, protocols),
            ),
            (
                "offsetof(struct ps_pod_meta, has_slice)",
                offset_of!(PodMeta, has_slice),
            ),
            (
                "offsetof(struct ps_pod_meta, slice_key)",
                offset_of!(PodMeta, slice_key),
            ),
            ("PS_PORT_TABLE_SIZE", PORT_TABLE_SIZE as usize),
            ("PS_MAX_PODS", MAX_PODS as usize),
            ("PS_CONTAINER_ID_LEN", CONTAINER_ID_LEN),
            ("PS_SLICE_KEY_LEN", SLICE_KEY_LEN),
            ("PS_F_PEER", F_PEER as usize),
            ("PS_F_SLICE", F_SLICE as usize),
            ("PS_P_TCP", P_TCP as usize),
            ("PS_P_UDP", P_UDP as usize),
            ("PS_G_MAX", G_MAX as usize),
        ];
        let dir = std::env::temp_dir().join(format!("portslice-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut src = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include \"portslice_abi.h\"\nint main(void){\n",
        );
        for (expr, _) in &checks {
            src.push_str(&format!("printf(\"%zu\\n\", (size_t)({expr}));\n"));
        }
        src.push_str("return 0;}\n");
        let c = dir.join("probe.c");
        let exe = dir.join("probe");
        std::fs::write(&c, src).unwrap();
        let header_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bpf");
        let cc = std::process::Command::new("clang")
            .arg(format!("-I{header_dir}"))
            .arg(&c)
            .arg("-o")
            .arg(&exe)
            .status()
            .expect("clang runs (it builds the eBPF object too)");
        assert!(cc.success(), "compiling the ABI probe failed");
        let out = std::process::Command::new(&exe).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let got: Vec<usize> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        for ((expr, want), got) in checks.iter().zip(&got) {
            assert_eq!(got, want, "{expr}: C says {got}, Rust says {want}");
        }
        assert_eq!(got.len(), checks.len());
    }

    #[test]
    fn fixed_strings_round_trip_and_refuse_overflow() {
        let f: [u8; 8] = fixed("ns/a").unwrap();
        assert_eq!(unfixed(&f), "ns/a");
        assert!(fixed::<4>("abcd").is_none());
        assert!(fixed::<8>("a\0b").is_none());
    }

    #[test]
    fn port_keys_split_protocols() {
        assert_eq!(port_key(true, 80), 80);
        assert_eq!(port_key(false, 80), 65536 + 80);
        assert_eq!(port_key(false, 65535), PORT_TABLE_SIZE - 1);
    }
}
