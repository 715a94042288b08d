//! The kernel ABI: every map key/value the eBPF programs share with user space, field for field
//! the structs of `bpf/portslice_abi.h`. `layout_matches_c_header` checks the two agree.
#![allow(unsafe_code)] // aya::Pod is an unsafe marker trait: these are plain old data.

/// The layout of this build's maps (`PS_ABI_VERSION`): its pins live under `<pin root>/v2/`.
/// Layout 1, the first release, pinned straight under `<pin root>/maps` and `/progs`.
pub const ABI_VERSION: u32 = 2;

/// Port table slot of TCP ports: key = `PROTO_TCP * 65536 + port`.
pub const PROTO_TCP: u32 = 0;
/// Port table slot of UDP ports.
pub const PROTO_UDP: u32 = 1;
pub const PORT_TABLE_SIZE: u32 = 2 * 65536;
pub const MAX_PODS: u32 = 4096;
pub const CONTAINER_ID_LEN: usize = 128;
pub const SLICE_KEY_LEN: usize = 256;
/// Datagrams in flight (first fragment seen, not yet complete) per owning pod.
pub const FRAG_QUOTA: u32 = 64;
pub const FRAG_ENTRIES: u32 = 2 * FRAG_QUOTA * MAX_PODS;
pub const FRAG_TIMEOUT_NS: u64 = 2_000_000_000;
/// `echo_ids` key of an ICMP (IPv4) echo id: `ECHO_V4 * 65536 + id`; ICMPv6 ids use `ECHO_V6`.
pub const ECHO_V4: u32 = 0;
pub const ECHO_V6: u32 = 1;
pub const ECHO_SLOTS: u32 = 2 * 65536;
pub const ECHO_TTL_UNITS: u32 = 30;
/// CIDRs in one slice pod's allowed-source list.
pub const MAX_SOURCES_PER_POD: usize = 128;
pub const SRC_ENTRIES: u32 = 2 * MAX_SOURCES_PER_POD as u32 * MAX_PODS;
/// Bits of a `src_allow` key after its prefix length: pod id, family, 16-byte address.
pub const SRC_KEY_BITS: u32 = 8 * (4 + 4 + 16);
/// `SrcData::family` of IPv4 and IPv6 entries.
pub const SRC_FAMILY_V4: u32 = 4;
pub const SRC_FAMILY_V6: u32 = 6;

/// The host ifindex is a veth: steer with `bpf_redirect_peer`.
pub const F_PEER: u32 = 0x1;
/// The pod holds a slice (without it the pod only gets row-4 steering).
pub const F_SLICE: u32 = 0x2;
/// `port_owner` only: the owner has a non-empty allowed-source list.
pub const F_SRC_FILTER: u32 = 0x4;
pub const P_TCP: u8 = 0x1;
pub const P_UDP: u8 = 0x2;

/// `FragKey::dir`: towards a pod, from the uplink or `lo` (`src` = the sender's address).
pub const FRAG_TO_POD: u8 = 0;
/// A pod's own datagram (`src` = the sending pod's host ifindex).
pub const FRAG_FROM_POD: u8 = 1;
/// Pod to pod on the node address (`src` = the sending pod's host ifindex).
pub const FRAG_HAIRPIN: u8 = 2;

/// IPv6 extension headers the programs walk before the transport header.
pub const MAX_EXT_HEADERS: u32 = 6;

/// Indexes of the `global_stats` array, with the names metrics export them under.
pub const GLOBAL_STATS: [(u32, &str); 11] = [
    (1, "steered"),
    (2, "passed_to_host"),
    (3, "forwarded"),
    (4, "drop_spoof"),
    (5, "drop_fragment"),
    (6, "icmp_steered"),
    (7, "fragment_steered"),
    (8, "drop_icmp_error"),
    (9, "drop_source"),
    (10, "fragment_untracked"),
    (11, "ipv6_chain_too_long"),
];
pub const G_MAX: u32 = 16;

/// Map names, as in the C object and as pinned under `<pin root>/v<version>/maps/`.
pub mod map {
    pub const CONFIG: &str = "node_config";
    pub const PORT_OWNER: &str = "port_owner";
    pub const PODS: &str = "pods";
    pub const POD_STATS: &str = "pod_stats";
    pub const GLOBAL_STATS: &str = "global_stats";
    pub const FRAGS: &str = "frag_verdicts";
    pub const ECHO_IDS: &str = "echo_slots";
    pub const SRC_ALLOW: &str = "src_allow";
    pub const POD_META: &str = "pod_meta";

    /// Pins of this layout from earlier builds whose maps changed shape under a new name (the
    /// release before dual stack: its IPv4-only config, fragment keys and echo slots). Nothing
    /// of a pod lives in them; the loader removes them once the links run this build.
    pub const RETIRED: &[&str] = &["config", "frags", "echo_ids"];
}

/// Program names, as in the C object and as pinned under `<pin root>/v<version>/progs/`.
pub mod prog {
    pub const INGRESS: &str = "ps_ingress";
    pub const POD_EGRESS: &str = "ps_pod_egress";
}

/// What a pinned map of this layout must look like. The loader checks every pin it would reuse
/// against this (aya reuses a pin by name whatever its shape), and the privileged tests load the
/// object, so a drift between this table and the C object fails at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub name: &'static str,
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;

const fn shape(
    name: &'static str,
    map_type: u32,
    key: usize,
    value: usize,
    max_entries: u32,
    flags: u32,
) -> MapShape {
    MapShape {
        name,
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
        flags,
    }
}

/// Every map of layout [`ABI_VERSION`].
pub const MAP_SHAPES: [MapShape; 9] = {
    use std::mem::size_of;
    [
        shape(
            map::CONFIG,
            BPF_MAP_TYPE_ARRAY,
            4,
            size_of::<NodeConfig>(),
            1,
            0,
        ),
        shape(
            map::PORT_OWNER,
            BPF_MAP_TYPE_ARRAY,
            4,
            size_of::<PortOwner>(),
            PORT_TABLE_SIZE,
            0,
        ),
        shape(
            map::PODS,
            BPF_MAP_TYPE_HASH,
            4,
            size_of::<PodInfo>(),
            MAX_PODS,
            0,
        ),
        shape(
            map::POD_STATS,
            BPF_MAP_TYPE_HASH,
            4,
            size_of::<PodStats>(),
            MAX_PODS,
            0,
        ),
        shape(map::GLOBAL_STATS, BPF_MAP_TYPE_ARRAY, 4, 8, G_MAX, 0),
        shape(
            map::FRAGS,
            BPF_MAP_TYPE_HASH,
            size_of::<FragKey>(),
            size_of::<FragVal>(),
            FRAG_ENTRIES,
            BPF_F_NO_PREALLOC,
        ),
        shape(
            map::ECHO_IDS,
            BPF_MAP_TYPE_ARRAY,
            4,
            size_of::<EchoSlot>(),
            ECHO_SLOTS,
            0,
        ),
        shape(
            map::SRC_ALLOW,
            BPF_MAP_TYPE_LPM_TRIE,
            size_of::<SrcKey>(),
            size_of::<SrcVal>(),
            SRC_ENTRIES,
            BPF_F_NO_PREALLOC,
        ),
        shape(
            map::POD_META,
            BPF_MAP_TYPE_HASH,
            size_of::<MetaKey>(),
            size_of::<PodMeta>(),
            MAX_PODS,
            0,
        ),
    ]
};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The IPv4 node address, network byte order; 0: none (IPv4 passes untouched).
    pub node_ip: u32,
    pub uplink_ifindex: u32,
    /// The IPv6 node address; all zero: none (IPv6 passes untouched).
    pub node_ip6: [u8; 16],
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
    /// ICMP errors the pod sent about flows not its own.
    pub drop_icmp_error: u64,
    /// Packets to the pod's ports from a source outside its allowed list.
    pub drop_source: u64,
    /// Fragment entries the pod owns now (a gauge: the quota's count).
    pub frag_live: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    /// The sender's address for [`FRAG_TO_POD`] (IPv4 in the first 4 bytes), else the sending
    /// pod's ifindex (host order, first 4 bytes).
    pub src: [u8; 16],
    pub daddr: [u8; 16],
    /// IPv4 IP id or IPv6 Fragment id, network order.
    pub id: u32,
    /// IPv4 protocol, or the IPv6 Fragment header's next header.
    pub proto: u8,
    pub dir: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragVal {
    pub host_ifindex: u32,
    pub flags: u32,
    pub seen: u32,
    pub total: u32,
    /// `struct bpf_timer`: opaque, owned by the kernel.
    pub timer: [u64; 2],
}

/// Value of `echo_ids[rewritten id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoSlot {
    /// 0 = never used.
    pub host_ifindex: u32,
    pub flags: u32,
    /// Network order.
    pub orig_id: u16,
    pub _pad: u16,
    pub stamp: u32,
    /// The request's destination (IPv4 in the first 4 bytes): only its replies steer to the pod.
    pub remote: [u8; 16],
}

/// The data part of a `src_allow` key (aya's `lpm_trie::Key` adds the prefix length before it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcData {
    /// Host veth ifindex of the slice pod (always matched whole).
    pub pod: u32,
    /// [`SRC_FAMILY_V4`] or [`SRC_FAMILY_V6`] (always matched whole).
    pub family: u32,
    /// IPv4 in the first 4 bytes (network order), or IPv6.
    pub addr: [u8; 16],
}

/// A whole `src_allow` key as C sees it (`prefixlen` first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SrcKey {
    pub prefixlen: u32,
    pub data: SrcData,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SrcVal {
    pub allow: u32,
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

/// Layout 1 (the first release), as far as reading its pins for the migration needs it: its
/// `port_owner`, `pods` and `pod_meta` have the shapes of layout 2; its `pod_stats` is shorter;
/// its `config` (IPv4 only) is written anew by the loader; its `frags` and `echo_ids` (LRU hashes)
/// hold only in-flight state and are not carried over.
pub mod v1 {
    pub const ABI_VERSION: u32 = 1;

    /// Layout 1's `config`: IPv4 only.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct NodeConfig {
        pub node_ip: u32,
        pub uplink_ifindex: u32,
    }

    // SAFETY: #[repr(C)] u32 fields only, no padding.
    unsafe impl aya::Pod for NodeConfig {}

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

    // SAFETY: #[repr(C)] u64 fields only, no padding.
    unsafe impl aya::Pod for PodStats {}
}

// SAFETY: all of these are #[repr(C)] integers and byte arrays with explicit padding fields, so
// every bit pattern is valid and there are no implicit padding bytes.
unsafe impl aya::Pod for NodeConfig {}
unsafe impl aya::Pod for PortOwner {}
unsafe impl aya::Pod for PodInfo {}
unsafe impl aya::Pod for PodStats {}
unsafe impl aya::Pod for FragKey {}
unsafe impl aya::Pod for FragVal {}
unsafe impl aya::Pod for EchoSlot {}
unsafe impl aya::Pod for SrcData {}
unsafe impl aya::Pod for SrcKey {}
unsafe impl aya::Pod for SrcVal {}
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
        assert_eq!(size_of::<NodeConfig>(), 24);
        assert_eq!(size_of::<PortOwner>(), 8);
        assert_eq!(size_of::<PodInfo>(), 16);
        assert_eq!(offset_of!(PodInfo, protocols), 12);
        assert_eq!(size_of::<PodStats>(), 72);
        assert_eq!(size_of::<v1::PodStats>(), 48);
        assert_eq!(size_of::<v1::NodeConfig>(), 8);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragVal>(), 32);
        assert_eq!(size_of::<EchoSlot>(), 32);
        assert_eq!(size_of::<SrcKey>(), 28);
        assert_eq!(size_of::<SrcVal>(), 4);
        assert_eq!(size_of::<MetaKey>(), 128);
        assert_eq!(size_of::<PodMeta>(), 16 + SLICE_KEY_LEN);
        // aya's LPM key is the prefix length followed by our data: the same bytes as SrcKey.
        assert_eq!(
            size_of::<aya::maps::lpm_trie::Key<SrcData>>(),
            size_of::<SrcKey>()
        );
    }

    /// Compiles a probe against the real header with the host C compiler and compares every
    /// size and offset with the Rust mirror, so the two can never drift apart silently.
    #[test]
    fn c_header_layout_matches() {
        let checks: Vec<(&str, usize)> = vec![
            ("PS_ABI_VERSION", ABI_VERSION as usize),
            ("sizeof(struct ps_node_config)", size_of::<NodeConfig>()),
            (
                "offsetof(struct ps_node_config, uplink_ifindex)",
                offset_of!(NodeConfig, uplink_ifindex),
            ),
            (
                "offsetof(struct ps_node_config, node_ip6)",
                offset_of!(NodeConfig, node_ip6),
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
            (
                "offsetof(struct ps_pod_stats, drop_icmp_error)",
                offset_of!(PodStats, drop_icmp_error),
            ),
            (
                "offsetof(struct ps_pod_stats, drop_source)",
                offset_of!(PodStats, drop_source),
            ),
            (
                "offsetof(struct ps_pod_stats, frag_live)",
                offset_of!(PodStats, frag_live),
            ),
            ("sizeof(struct ps_frag_key)", size_of::<FragKey>()),
            (
                "offsetof(struct ps_frag_key, daddr)",
                offset_of!(FragKey, daddr),
            ),
            ("offsetof(struct ps_frag_key, id)", offset_of!(FragKey, id)),
            (
                "offsetof(struct ps_frag_key, proto)",
                offset_of!(FragKey, proto),
            ),
            (
                "offsetof(struct ps_frag_key, dir)",
                offset_of!(FragKey, dir),
            ),
            (
                "offsetof(struct ps_frag_key, family)",
                offset_of!(FragKey, family),
            ),
            ("sizeof(struct ps_frag_val)", size_of::<FragVal>()),
            (
                "offsetof(struct ps_frag_val, seen)",
                offset_of!(FragVal, seen),
            ),
            (
                "offsetof(struct ps_frag_val, total)",
                offset_of!(FragVal, total),
            ),
            (
                "offsetof(struct ps_frag_val, timer)",
                offset_of!(FragVal, timer),
            ),
            ("sizeof(struct ps_echo_slot)", size_of::<EchoSlot>()),
            (
                "offsetof(struct ps_echo_slot, flags)",
                offset_of!(EchoSlot, flags),
            ),
            (
                "offsetof(struct ps_echo_slot, orig_id)",
                offset_of!(EchoSlot, orig_id),
            ),
            (
                "offsetof(struct ps_echo_slot, stamp)",
                offset_of!(EchoSlot, stamp),
            ),
            (
                "offsetof(struct ps_echo_slot, remote)",
                offset_of!(EchoSlot, remote),
            ),
            ("sizeof(struct ps_src_key)", size_of::<SrcKey>()),
            (
                "offsetof(struct ps_src_key, pod)",
                offset_of!(SrcKey, data) + offset_of!(SrcData, pod),
            ),
            (
                "offsetof(struct ps_src_key, family)",
                offset_of!(SrcKey, data) + offset_of!(SrcData, family),
            ),
            (
                "offsetof(struct ps_src_key, addr)",
                offset_of!(SrcKey, data) + offset_of!(SrcData, addr),
            ),
            ("sizeof(struct ps_src_val)", size_of::<SrcVal>()),
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
            ("PS_FRAG_QUOTA", FRAG_QUOTA as usize),
            ("PS_FRAG_ENTRIES", FRAG_ENTRIES as usize),
            ("PS_FRAG_TIMEOUT_NS", FRAG_TIMEOUT_NS as usize),
            ("PS_ECHO_SLOTS", ECHO_SLOTS as usize),
            ("PS_ECHO_V4", ECHO_V4 as usize),
            ("PS_ECHO_V6", ECHO_V6 as usize),
            ("PS_MAX_EXT_HEADERS", MAX_EXT_HEADERS as usize),
            ("PS_ECHO_TTL_UNITS", ECHO_TTL_UNITS as usize),
            ("PS_MAX_SOURCES_PER_POD", MAX_SOURCES_PER_POD),
            ("PS_SRC_ENTRIES", SRC_ENTRIES as usize),
            ("PS_SRC_KEY_BITS", SRC_KEY_BITS as usize),
            ("PS_SRC_FAMILY_V4", SRC_FAMILY_V4 as usize),
            ("PS_SRC_FAMILY_V6", SRC_FAMILY_V6 as usize),
            ("PS_F_PEER", F_PEER as usize),
            ("PS_F_SLICE", F_SLICE as usize),
            ("PS_F_SRC_FILTER", F_SRC_FILTER as usize),
            ("PS_P_TCP", P_TCP as usize),
            ("PS_P_UDP", P_UDP as usize),
            ("PS_FRAG_TO_POD", FRAG_TO_POD as usize),
            ("PS_FRAG_FROM_POD", FRAG_FROM_POD as usize),
            ("PS_FRAG_HAIRPIN", FRAG_HAIRPIN as usize),
            ("PS_G_MAX", G_MAX as usize),
        ];
        // Every named global counter has its index in the header.
        let names = [
            ("PS_G_STEERED", "steered"),
            ("PS_G_PASSED", "passed_to_host"),
            ("PS_G_FORWARDED", "forwarded"),
            ("PS_G_DROP_SPOOF", "drop_spoof"),
            ("PS_G_DROP_FRAG", "drop_fragment"),
            ("PS_G_ICMP_STEERED", "icmp_steered"),
            ("PS_G_FRAG_STEERED", "fragment_steered"),
            ("PS_G_DROP_ICMP", "drop_icmp_error"),
            ("PS_G_DROP_SOURCE", "drop_source"),
            ("PS_G_FRAG_UNTRACKED", "fragment_untracked"),
            ("PS_G_V6_CHAIN_LONG", "ipv6_chain_too_long"),
        ];
        let mut checks = checks;
        for (c, name) in names {
            let idx = GLOBAL_STATS
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(i, _)| *i as usize)
                .unwrap_or(usize::MAX);
            checks.push((c, idx));
        }
        assert_eq!(names.len(), GLOBAL_STATS.len());
        assert!(GLOBAL_STATS.iter().all(|(i, _)| *i < G_MAX));
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
