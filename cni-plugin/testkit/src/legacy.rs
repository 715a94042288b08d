//! Nodes as earlier releases left them, loaded from those releases' own programs (`bpf/layout1/`,
//! `bpf/layout2/`, built by build.rs) and attached the way their loaders and `attach_pod` did. The
//! upgrade tests start from these and let the daemon of this build take over.
//! - [`Release::Layout1`], the first release: maps and programs pinned straight under
//!   `<pin root>/maps` and `/progs`, no version;
//! - [`Release::Layout2`], the release before dual stack: pins under `<pin root>/v2/`, with the
//!   IPv4-only `config`, `frags` and `echo_ids` this build renamed.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData},
    programs::SchedClassifier,
};
use portslice_datapath::{AttachMode, PodAttachment, abi, layout, loader, table};
use portslice_netns::{iface, sysctl};

/// An earlier release whose node this build must take over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    Layout1,
    Layout2,
}

/// The first release's compiled programs.
pub static LAYOUT1_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portslice_layout1.bpf.o"));
/// The release before dual stack's compiled programs.
pub static LAYOUT2_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portslice_layout2.bpf.o"));

impl Release {
    fn object(self) -> &'static [u8] {
        match self {
            Self::Layout1 => LAYOUT1_OBJECT,
            Self::Layout2 => LAYOUT2_OBJECT,
        }
    }

    /// Where the release pinned its maps and programs.
    fn dir(self, pin_root: &Path) -> PathBuf {
        match self {
            Self::Layout1 => pin_root.to_path_buf(),
            Self::Layout2 => layout::version_dir(pin_root, 2),
        }
    }

    pub fn maps_dir(self, pin_root: &Path) -> PathBuf {
        self.dir(pin_root).join("maps")
    }

    fn progs_dir(self, pin_root: &Path) -> PathBuf {
        self.dir(pin_root).join("progs")
    }
}

fn e(what: &str) -> impl Fn(&dyn std::fmt::Display) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// What the release's daemon did at start: load, pin maps and programs where it pinned them,
/// write the config, attach `ps_ingress` to the uplink and `lo` with links pinned under
/// `<root>/links`. Call it inside the node netns.
pub fn load(
    release: Release,
    pin_root: &Path,
    node_ip: Ipv4Addr,
    uplink: &str,
) -> Result<(), String> {
    load_into(
        release,
        pin_root,
        &release.maps_dir(pin_root),
        Some((node_ip, uplink)),
    )
}

/// Loads the release's object with its maps pinned in `maps_dir` (and nothing attached when
/// `attach` is None): that release's pins wherever a test wants them.
pub fn load_into(
    release: Release,
    pin_root: &Path,
    maps_dir: &Path,
    attach: Option<(Ipv4Addr, &str)>,
) -> Result<(), String> {
    for d in [
        maps_dir.to_path_buf(),
        release.progs_dir(pin_root),
        pin_root.join("links"),
    ] {
        std::fs::create_dir_all(&d).map_err(|x| e("mkdir")(&x))?;
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .load(release.object())
        .map_err(|x| e("loading the release's object")(&x))?;
    let Some((node_ip, uplink)) = attach else {
        return Ok(());
    };
    {
        // Both releases: the IPv4-only {node_ip, uplink_ifindex} under the name "config".
        let map = ebpf.map_mut("config").ok_or("no config map")?;
        let mut config: Array<_, abi::v1::NodeConfig> =
            Array::try_from(map).map_err(|x| e("config")(&x))?;
        let cfg = abi::v1::NodeConfig {
            node_ip: u32::from_ne_bytes(node_ip.octets()),
            uplink_ifindex: iface::index_of(uplink).map_err(|x| e("uplink")(&x))?,
        };
        config.set(0, cfg, 0).map_err(|x| e("config")(&x))?;
    }
    for name in [abi::prog::INGRESS, abi::prog::POD_EGRESS] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or("no program")?
            .try_into()
            .map_err(|x| e(name)(&x))?;
        prog.load().map_err(|x| e(name)(&x))?;
        prog.pin(release.progs_dir(pin_root).join(name))
            .map_err(|x| e(name)(&x))?;
    }
    let ingress: &mut SchedClassifier = ebpf
        .program_mut(abi::prog::INGRESS)
        .ok_or("no ingress")?
        .try_into()
        .map_err(|x| e("ingress")(&x))?;
    let mode = AttachMode::detect();
    mode.attach(
        ingress,
        uplink,
        &loader::ingress_link_pin(pin_root, "uplink"),
    )
    .map_err(|x| e("uplink")(&x))?;
    mode.attach(ingress, "lo", &loader::ingress_link_pin(pin_root, "lo"))
        .map_err(|x| e("lo")(&x))?;
    Ok(())
}

fn release_map<T: TryFrom<Map, Error = aya::maps::MapError>>(
    release: Release,
    pin_root: &Path,
    name: &str,
) -> Result<T, String> {
    let data = MapData::from_pin(release.maps_dir(pin_root).join(name)).map_err(|x| e(name)(&x))?;
    let map = Map::from_map_data(data).map_err(|x| e(name)(&x))?;
    T::try_from(map).map_err(|x| e(name)(&x))
}

/// What the release's `attach_pod` wrote for a new pod: `pod_meta`, `pods`, `pod_stats`,
/// `port_owner`, the host veth's sysctls, and its egress program linked at
/// `<root>/links/pod-<ifindex>`. Call it inside the node netns.
pub fn attach_pod(release: Release, pin_root: &Path, pod: &PodAttachment) -> Result<(), String> {
    let (key, meta) = table::meta_of(pod).map_err(|x| e("attachment")(&x))?;
    let mut pod_meta: HashMap<MapData, abi::MetaKey, abi::PodMeta> =
        release_map(release, pin_root, abi::map::POD_META)?;
    let mut pods: HashMap<MapData, u32, abi::PodInfo> =
        release_map(release, pin_root, abi::map::PODS)?;
    let mut ports: Array<MapData, abi::PortOwner> =
        release_map(release, pin_root, abi::map::PORT_OWNER)?;
    let ifindex = pod.host_veth_ifindex;
    pod_meta
        .insert(key, meta, 0)
        .map_err(|x| e("pod_meta")(&x))?;
    pods.insert(ifindex, table::pod_info(pod), 0)
        .map_err(|x| e("pods")(&x))?;
    // Layout 1's per-pod counters were fewer; layout 2's are this build's.
    match release {
        Release::Layout1 => {
            let mut stats: HashMap<MapData, u32, abi::v1::PodStats> =
                release_map(release, pin_root, abi::map::POD_STATS)?;
            stats.insert(ifindex, abi::v1::PodStats::default(), 0)
        }
        Release::Layout2 => {
            let mut stats: HashMap<MapData, u32, abi::PodStats> =
                release_map(release, pin_root, abi::map::POD_STATS)?;
            stats.insert(ifindex, abi::PodStats::default(), 0)
        }
    }
    .map_err(|x| e("pod_stats")(&x))?;
    let owner = abi::PortOwner {
        host_ifindex: ifindex,
        flags: table::pod_flags(pod),
    };
    for k in table::port_keys(pod) {
        ports.set(k, owner, 0).map_err(|x| e("port_owner")(&x))?;
    }
    let ifname = iface::name_of(ifindex).map_err(|x| e("veth")(&x))?;
    for (k, v) in [("accept_local", "1"), ("rp_filter", "0")] {
        sysctl::write(&sysctl::Key::interface("ipv4", &ifname, k), v)
            .map_err(|x| e("sysctl")(&x))?;
    }
    let mut prog =
        SchedClassifier::from_pin(release.progs_dir(pin_root).join(abi::prog::POD_EGRESS))
            .map_err(|x| e("egress program")(&x))?;
    AttachMode::detect()
        .attach(
            &mut prog,
            &ifname,
            &pin_root.join("links").join(format!("pod-{ifindex}")),
        )
        .map_err(|x| e("egress link")(&x))
}
