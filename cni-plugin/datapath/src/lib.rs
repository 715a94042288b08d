//! The eBPF datapath: C programs in `bpf/` (built by `build.rs`), their map ABI ([`abi`]), the
//! daemon-side loader ([`loader`]) and the API the CNI plugin calls ([`PinnedDatapath`]).
//!
//! # Pinned layout (one source of truth for every process)
//!
//! ```text
//! <pin root>/v2/maps/<map>          every map of bpf/portslice_abi.h (pinned by name; reused on restart)
//! <pin root>/v2/progs/ps_ingress    uplink + lo ingress program
//! <pin root>/v2/progs/ps_pod_egress host-side veth ingress program (what a pod sends)
//! <pin root>/links/uplink, lo       tcx links of ps_ingress
//! <pin root>/links/pod-<ifindex>    tcx link of ps_pod_egress on a pod's host-side veth
//! ```
//!
//! `v2` is the ABI version ([`abi::ABI_VERSION`]); [`layout`] has the rules, [`loader`] the
//! upgrade from layout 1.
//!
//! The daemon (`portslice daemon`) loads and pins all of it; the CNI plugin only opens the pins:
//!
//! ```no_run
//! # use portslice_datapath::*;
//! # use std::path::Path;
//! # fn f(pod: &PodAttachment) -> Result<(), DatapathError> {
//! let mut dp = PinnedDatapath::open(Path::new(DEFAULT_PIN_ROOT))?; // NotLoaded if the daemon is not up
//! dp.attach_pod(pod)?;                         // ADD (idempotent)
//! dp.check_pod(pod)?;                          // CHECK
//! let sources = ["203.0.113.0/24".parse::<SourceCidr>().unwrap()];
//! dp.set_allowed_sources(&pod.container_id, &sources)?; // only these may reach its ports
//! dp.detach_pod(&pod.container_id, Some(pod.host_veth_ifindex))?; // DEL (idempotent)
//! let _all = dp.list_pods()?;                  // GC
//! # Ok(()) }
//! ```
//!
//! The caller must be in the node's network namespace (the interface is named by ifindex and its
//! sysctls are written under /proc/sys/net, both per-netns). `attach_pod` also sets, on the host
//! veth, `accept_local=1` and `rp_filter=0`: packets from a slice pod carry the node address as
//! source, which the host would otherwise drop as martian (IPv4; IPv6 has no such check).
//!
//! The port table is family-independent: a slice owns its ports on every node address (IPv4 and
//! IPv6, as the daemon's `config` names them), so nothing here depends on the pod's families.
//!
//! What the CNI plugin still owns: inside the pod, the node addresses (/32, /128), routes, policy
//! rules and `ip_local_port_range`; the datapath never enters the pod's netns.
#![deny(rust_2018_idioms)]

pub mod abi;
mod attach;
mod batch;
pub mod layout;
pub mod loader;
mod migrate;
pub mod sources;
mod steps;
pub mod table;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

pub use attach::AttachMode;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError};
use portslice_netns::{NetnsError, iface, sysctl};
pub use portslice_ports::{PortRange, Protocol};
pub use sources::{SourceCidr, SourceCidrError};
pub use steps::StepTimes;

/// Where the daemon pins everything unless told otherwise.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/portslice";

/// The compiled eBPF object (clang, `bpf/portslice.bpf.c`).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portslice.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Nothing is pinned there: the daemon has not loaded the datapath (yet).
    #[error(
        "the PortSlice datapath is not loaded at {pin_root}: is the portslice node daemon running? ({detail})"
    )]
    NotLoaded { pin_root: PathBuf, detail: String },
    /// Something is pinned there but cannot be used (another layout, a corrupt pin).
    #[error("the pinned datapath at {path} is unusable: {detail}")]
    Pin { path: PathBuf, detail: String },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("attaching to {ifname}: {detail}")]
    Attach { ifname: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid attachment: {0}")]
    Invalid(String),
    #[error("{protocol} port {port} already belongs to another pod (host interface index {owner})")]
    PortTaken {
        protocol: &'static str,
        port: u16,
        owner: u32,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("datapath check failed for container {container_id}: {detail}")]
    CheckFailed {
        container_id: String,
        detail: String,
    },
    #[error("{} errors: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Many(Vec<DatapathError>),
}

/// A failed batch call on the port table.
fn batch_err(source: std::io::Error) -> DatapathError {
    DatapathError::Io {
        what: format!("batch access to the {} map", abi::map::PORT_OWNER),
        source,
    }
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// A pinned map of the wrong type or shape: not our layout.
fn pin_err(pin_root: &Path, map: &'static str) -> impl Fn(MapError) -> DatapathError {
    let path = layout::map_pin(pin_root, map);
    move |source| DatapathError::Pin {
        path: path.clone(),
        detail: source.to_string(),
    }
}

/// A pod's slice, as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceBinding {
    /// `namespace/name` of the PortSlice; the label of the per-slice metrics.
    pub slice_key: String,
    /// The slice's range on the node address.
    pub range: PortRange,
    /// Protocols whose ports the slice owns (ICMP echo ids are always confined to `range`).
    pub protocols: Vec<Protocol>,
}

/// One pod as wired into the datapath. Everything here is stored in pinned maps, so
/// [`PinnedDatapath::list_pods`] returns exactly what was attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAttachment {
    /// CNI_CONTAINERID (at most 127 bytes).
    pub container_id: String,
    /// Index of the pod's veth end in the node netns.
    pub host_veth_ifindex: u32,
    /// The primary CNI's IPv4 address of the pod (its traffic is never touched); `0.0.0.0` for
    /// an IPv6-only pod. Informational: recorded for the operator's eyes, never read by the
    /// programs, which steer by port on the node addresses whatever the pod's own addresses.
    pub pod_private_ip: Ipv4Addr,
    /// `None`: a pod without a slice. It gets only the steering that lets it reach slice pods on
    /// the node address (matrix row 4); its traffic otherwise passes untouched.
    pub slice: Option<SliceBinding>,
}

/// Handle on the maps and programs the daemon pinned. Cheap to open; holds only file descriptors.
pub struct PinnedDatapath {
    pin_root: PathBuf,
    mode: AttachMode,
    port_owner: Array<MapData, abi::PortOwner>,
    pods: HashMap<MapData, u32, abi::PodInfo>,
    pod_stats: HashMap<MapData, u32, abi::PodStats>,
    pod_meta: HashMap<MapData, abi::MetaKey, abi::PodMeta>,
    global_stats: Array<MapData, u64>,
    src_allow: LpmTrie<MapData, abi::SrcData, abi::SrcVal>,
    /// The same `port_owner` map, for whole runs of keys in one call.
    port_runs: batch::PortRuns,
    /// Where the last attach or detach spent its time.
    last_steps: StepTimes,
}

/// Opens one pinned map of this layout. The layout's directory appears only complete, so an
/// absent map inside it is as unusable as a corrupt one: [`DatapathError::Pin`]. Every caller
/// opens the datapath through this one path, so a corrupt pin is an error for every verb, never
/// "not loaded" for some.
fn open_map(pin_root: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let path = layout::map_pin(pin_root, name);
    if !path.exists() {
        return Err(DatapathError::Pin {
            path,
            detail: "absent from a complete layout directory".into(),
        });
    }
    let data = MapData::from_pin(&path).map_err(|e| DatapathError::Pin {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    Map::from_map_data(data).map_err(|e| DatapathError::Pin {
        path,
        detail: e.to_string(),
    })
}

/// [`DatapathError::NotLoaded`] when nothing is pinned at `pin_root`, [`DatapathError::Pin`]
/// when only pins of another layout are: this build must not mistake them for "not loaded" (a
/// pod would pass through unprotected) nor use them (another shape).
fn require_layout(pin_root: &Path) -> Result<(), DatapathError> {
    let dir = layout::dir(pin_root);
    if dir.is_dir() {
        return Ok(());
    }
    match layout::pinned_versions(pin_root).last() {
        Some(&v) => Err(DatapathError::Pin {
            path: pin_root.to_path_buf(),
            detail: format!(
                "pins of datapath layout {v} are here, and this build speaks layout {}: {}",
                abi::ABI_VERSION,
                if v < abi::ABI_VERSION {
                    "the node daemon of this build migrates them when it starts"
                } else {
                    "a newer build pinned them; downgrades need an uninstall first"
                }
            ),
        }),
        None => Err(DatapathError::NotLoaded {
            pin_root: pin_root.to_path_buf(),
            detail: format!("{} is absent", dir.display()),
        }),
    }
}

/// Writes `net.ipv4.conf.<ifname>.<key>` of the calling thread's netns.
fn write_if_sysctl(ifname: &str, key: &str, value: &str) -> Result<(), DatapathError> {
    Ok(sysctl::write(
        &sysctl::Key::interface("ipv4", ifname, key),
        value,
    )?)
}

pub(crate) fn pod_link_pin(pin_root: &Path, ifindex: u32) -> PathBuf {
    pin_root.join("links").join(format!("pod-{ifindex}"))
}

impl PinnedDatapath {
    /// Opens the pinned maps. Fails with [`DatapathError::NotLoaded`] when the daemon has not
    /// (yet) loaded the datapath at `pin_root`, with [`DatapathError::Pin`] when what is pinned
    /// there cannot be used.
    pub fn open(pin_root: &Path) -> Result<Self, DatapathError> {
        require_layout(pin_root)?;
        let get = |name: &'static str| open_map(pin_root, name);
        Ok(Self {
            pin_root: pin_root.to_path_buf(),
            mode: AttachMode::detect(),
            port_owner: get(abi::map::PORT_OWNER)?
                .try_into()
                .map_err(pin_err(pin_root, abi::map::PORT_OWNER))?,
            pods: get(abi::map::PODS)?
                .try_into()
                .map_err(pin_err(pin_root, abi::map::PODS))?,
            pod_stats: get(abi::map::POD_STATS)?
                .try_into()
                .map_err(pin_err(pin_root, abi::map::POD_STATS))?,
            pod_meta: get(abi::map::POD_META)?
                .try_into()
                .map_err(pin_err(pin_root, abi::map::POD_META))?,
            global_stats: get(abi::map::GLOBAL_STATS)?
                .try_into()
                .map_err(pin_err(pin_root, abi::map::GLOBAL_STATS))?,
            src_allow: get(abi::map::SRC_ALLOW)?
                .try_into()
                .map_err(pin_err(pin_root, abi::map::SRC_ALLOW))?,
            port_runs: batch::PortRuns::new(
                MapData::from_pin(layout::map_pin(pin_root, abi::map::PORT_OWNER)).map_err(
                    |e| DatapathError::Pin {
                        path: layout::map_pin(pin_root, abi::map::PORT_OWNER),
                        detail: e.to_string(),
                    },
                )?,
            ),
            last_steps: StepTimes::default(),
        })
    }

    /// [`Self::open`], with "not loaded" as `None`: a pod without a slice passes through then.
    pub fn open_if_loaded(pin_root: &Path) -> Result<Option<Self>, DatapathError> {
        match Self::open(pin_root) {
            Ok(dp) => Ok(Some(dp)),
            Err(DatapathError::NotLoaded { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// Where the last [`attach_pod`](Self::attach_pod) or [`detach_pod`](Self::detach_pod)
    /// spent its time, step by step.
    pub fn last_steps(&self) -> &StepTimes {
        &self.last_steps
    }

    /// Steers the slice's ports to this pod and enforces its egress. Idempotent: the same
    /// attachment again is a no-op; a changed one replaces the old. Undoes itself on failure.
    /// An allowed-source list stored for this container is kept (see
    /// [`attach_pod_with_sources`](Self::attach_pod_with_sources)).
    pub fn attach_pod(&mut self, pod: &PodAttachment) -> Result<(), DatapathError> {
        let keep = match self.stored_meta(&pod.container_id) {
            Some(old) => self.sources_of(old.host_ifindex)?,
            None => Vec::new(),
        };
        self.attach_pod_with_sources(pod, &keep)
    }

    /// [`attach_pod`](Self::attach_pod) with the pod's allowed-source list (empty: any source).
    /// The list is in place before the first port steers to the pod, so a filtered pod is never
    /// reachable from everyone, not even during ADD.
    pub fn attach_pod_with_sources(
        &mut self,
        pod: &PodAttachment,
        allowed_sources: &[SourceCidr],
    ) -> Result<(), DatapathError> {
        let (key, meta) = table::meta_of(pod)?;
        let want = sources::normalize(allowed_sources).map_err(DatapathError::Invalid)?;
        if !want.is_empty() && pod.slice.is_none() {
            return Err(DatapathError::Invalid(
                "allowed sources apply to slice pods only".into(),
            ));
        }
        if let Ok(old) = self.pod_meta.get(&key, 0) {
            if old == meta && self.link_ok(pod.host_veth_ifindex) {
                return self.apply_sources(&meta, &want);
            }
            self.detach_pod(&pod.container_id, Some(old.host_ifindex))?;
        }
        let ifname = iface::name_of(pod.host_veth_ifindex)?;
        let mut steps = StepTimes::default();
        let result = self.attach_inner(pod, &ifname, key, meta, &want, &mut steps);
        self.last_steps = steps;
        if result.is_err() {
            let _ = self.detach_pod(&pod.container_id, Some(pod.host_veth_ifindex));
        }
        result
    }

    fn attach_inner(
        &mut self,
        pod: &PodAttachment,
        ifname: &str,
        key: abi::MetaKey,
        meta: abi::PodMeta,
        sources: &[SourceCidr],
        steps: &mut StepTimes,
    ) -> Result<(), DatapathError> {
        let ifindex = pod.host_veth_ifindex;
        let filter = if sources.is_empty() {
            0
        } else {
            abi::F_SRC_FILTER
        };
        let owner = abi::PortOwner {
            host_ifindex: ifindex,
            flags: table::pod_flags(pod) | filter,
        };
        let runs = pod.slice.as_ref().map_or_else(Vec::new, |s| {
            batch::runs(
                s.range.start,
                s.range.end,
                s.protocols.contains(&Protocol::TCP),
                s.protocols.contains(&Protocol::UDP),
            )
        });
        let ports: u32 = runs.iter().map(|(a, b)| b - a + 1).sum();
        // Refuse before writing anything: a port held by another pod stays with it.
        for (k, cur) in steps.time("map reads", || self.port_owners(&runs))? {
            if cur.host_ifindex != 0 && cur.host_ifindex != ifindex {
                return Err(table::taken(k, cur.host_ifindex));
            }
        }
        steps.time("map writes", || -> Result<(), DatapathError> {
            self.pod_meta
                .insert(key, meta, 0)
                .map_err(map_err(abi::map::POD_META))?;
            self.pods
                .insert(ifindex, table::pod_info(pod), 0)
                .map_err(map_err(abi::map::PODS))?;
            self.pod_stats
                .insert(ifindex, abi::PodStats::default(), 0)
                .map_err(map_err(abi::map::POD_STATS))?;
            // The list before the ports: the first packet steered to the pod is already filtered.
            for c in sources {
                self.insert_source(ifindex, c)?;
            }
            for &(first, last) in &runs {
                self.set_port_owners(first, last, owner)?;
            }
            Ok(())
        })?;
        // The pod's packets carry the node address as source: without these the host drops
        // them as martians before our hairpin/host-port paths see them.
        steps.time("host veth sysctls", || -> Result<(), DatapathError> {
            write_if_sysctl(ifname, "accept_local", "1")?;
            write_if_sysctl(ifname, "rp_filter", "0")
        })?;
        let pin = pod_link_pin(&self.pin_root, ifindex);
        // clsact: "attached" cannot be checked (aya lists no filters), and attaching replaces
        // our filter in place, so always attach. tcx: a link that is there is ours.
        if self.mode == AttachMode::Clsact || !self.link_ok(ifindex) {
            if self.mode == AttachMode::Tcx {
                // A pin that cannot be opened as a link would block pinning the new one.
                let _ = self.mode.detach(ifname, &pin);
            }
            let mut prog = steps.time("program open", || {
                loader::pinned_program(&self.pin_root, abi::prog::POD_EGRESS)
            })?;
            steps.time(self.mode.link_step(), || {
                self.mode.attach(&mut prog, ifname, &pin)
            })?;
        }
        tracing::debug!(container_id = %pod.container_id, ifname, ports, sources = sources.len(), "pod attached");
        Ok(())
    }

    fn stored_meta(&self, container_id: &str) -> Option<abi::PodMeta> {
        let key = abi::MetaKey {
            container_id: abi::fixed(container_id)?,
        };
        self.pod_meta.get(&key, 0).ok()
    }

    /// Replaces the allowed-source list of an attached slice pod; empty: any source may reach
    /// its ports. Applies to TCP/UDP (and their fragments) to the slice's ports from the uplink
    /// and from other pods' private addresses; the node's own packets (host, other slice pods,
    /// all from the node address) and ICMP errors (routers on the path, PMTU) are not filtered.
    ///
    /// The filter is stateless and applies to everything arriving on the slice's ports, replies
    /// included: a filtered pod's own connections reach only listed peers.
    ///
    /// Safe while traffic flows: new entries are written before old ones go, and the pod's
    /// "filter on" flag is set before (or cleared only after) the list is non-empty, so during
    /// an edit the allowed set lies between old ∩ new and old ∪ new, never "anyone". At most
    /// [`abi::MAX_SOURCES_PER_POD`] entries.
    pub fn set_allowed_sources(
        &mut self,
        container_id: &str,
        allowed_sources: &[SourceCidr],
    ) -> Result<(), DatapathError> {
        let want = sources::normalize(allowed_sources).map_err(DatapathError::Invalid)?;
        let meta = self.stored_meta(container_id).ok_or_else(|| {
            DatapathError::Invalid(format!("container {container_id} is not attached"))
        })?;
        if meta.has_slice == 0 {
            if want.is_empty() {
                return Ok(());
            }
            return Err(DatapathError::Invalid(format!(
                "container {container_id} holds no slice: allowed sources apply to slice pods only"
            )));
        }
        self.apply_sources(&meta, &want)
    }

    /// The allowed-source list of an attached pod (empty: any source), sorted.
    pub fn allowed_sources(&self, container_id: &str) -> Result<Vec<SourceCidr>, DatapathError> {
        let meta = self.stored_meta(container_id).ok_or_else(|| {
            DatapathError::Invalid(format!("container {container_id} is not attached"))
        })?;
        self.sources_of(meta.host_ifindex)
    }

    /// Every list entry of the pod with host ifindex `ifindex`, sorted.
    fn sources_of(&self, ifindex: u32) -> Result<Vec<SourceCidr>, DatapathError> {
        let mut out = Vec::new();
        for k in self.src_allow.keys() {
            let k = k.map_err(map_err(abi::map::SRC_ALLOW))?;
            if let Some((pod, c)) = sources::cidr_of(&k)
                && pod == ifindex
            {
                out.push(c);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn insert_source(&mut self, ifindex: u32, c: &SourceCidr) -> Result<(), DatapathError> {
        self.src_allow
            .insert(&sources::key_of(ifindex, c), abi::SrcVal { allow: 1 }, 0)
            .map_err(map_err(abi::map::SRC_ALLOW))
    }

    /// Moves the pod's list to `want` (normalized) in the order that never opens the filter.
    fn apply_sources(
        &mut self,
        meta: &abi::PodMeta,
        want: &[SourceCidr],
    ) -> Result<(), DatapathError> {
        let ifindex = meta.host_ifindex;
        let have = self.sources_of(ifindex)?;
        if have == want {
            return self.set_filter_flag(meta, !want.is_empty());
        }
        // 1. New entries first: each one widens the set only towards the new list.
        let mut added = Vec::new();
        for c in want.iter().filter(|c| !have.contains(c)) {
            if let Err(e) = self.insert_source(ifindex, c) {
                for a in &added {
                    let _ = self.src_allow.remove(&sources::key_of(ifindex, a));
                }
                return Err(e);
            }
            added.push(*c);
        }
        // 2. The flag: on while the list is non-empty. Clearing it (an empty list) is the one
        //    step that opens the ports, which is what an empty list asks for.
        self.set_filter_flag(meta, !want.is_empty())?;
        // 3. Old entries last.
        let mut errors = Vec::new();
        for c in have.iter().filter(|c| !want.contains(c)) {
            ignore_missing(
                self.src_allow.remove(&sources::key_of(ifindex, c)),
                abi::map::SRC_ALLOW,
                &mut errors,
            );
        }
        many(errors)
    }

    /// The owner of every key of `runs`: one call per run where the kernel batches, one per key
    /// where it does not.
    fn port_owners(
        &self,
        runs: &[(u32, u32)],
    ) -> Result<Vec<(u32, abi::PortOwner)>, DatapathError> {
        let mut out = Vec::new();
        for &(first, last) in runs {
            match self.port_runs.read(first, last).map_err(batch_err)? {
                Some(owners) => out.extend((first..=last).zip(owners)),
                None => {
                    for k in first..=last {
                        let o = self
                            .port_owner
                            .get(&k, 0)
                            .map_err(map_err(abi::map::PORT_OWNER))?;
                        out.push((k, o));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes `owner` at keys `first..=last`, in one call where the kernel batches.
    fn set_port_owners(
        &mut self,
        first: u32,
        last: u32,
        owner: abi::PortOwner,
    ) -> Result<(), DatapathError> {
        let values = vec![owner; (last - first + 1) as usize];
        if self.port_runs.write(first, &values).map_err(batch_err)? {
            return Ok(());
        }
        for k in first..=last {
            self.port_owner
                .set(k, owner, 0)
                .map_err(map_err(abi::map::PORT_OWNER))?;
        }
        Ok(())
    }

    /// Frees the keys of `runs` that still point at `ifindex` (never a port someone else
    /// holds), each unbroken span of them in one write.
    fn free_ports_of(&mut self, ifindex: u32, runs: &[(u32, u32)]) -> Result<(), DatapathError> {
        let owners = self.port_owners(runs)?;
        let mut span: Option<(u32, u32)> = None;
        let mut spans = Vec::new();
        for (k, o) in owners {
            let ours = o.host_ifindex == ifindex;
            span = match (span, ours) {
                (Some((a, b)), true) if b + 1 == k => Some((a, k)),
                (Some(s), true) => {
                    spans.push(s);
                    Some((k, k))
                }
                (None, true) => Some((k, k)),
                (Some(s), false) => {
                    spans.push(s);
                    None
                }
                (None, false) => None,
            };
        }
        spans.extend(span);
        for (a, b) in spans {
            self.set_port_owners(a, b, abi::PortOwner::default())?;
        }
        Ok(())
    }

    /// Sets or clears [`abi::F_SRC_FILTER`] on every port slot the pod holds.
    fn set_filter_flag(&mut self, meta: &abi::PodMeta, on: bool) -> Result<(), DatapathError> {
        if meta.has_slice == 0 {
            return Ok(());
        }
        for k in table::meta_port_keys(meta) {
            let mut o = self
                .port_owner
                .get(&k, 0)
                .map_err(map_err(abi::map::PORT_OWNER))?;
            if o.host_ifindex != meta.host_ifindex || ((o.flags & abi::F_SRC_FILTER) != 0) == on {
                continue;
            }
            o.flags ^= abi::F_SRC_FILTER;
            self.port_owner
                .set(k, o, 0)
                .map_err(map_err(abi::map::PORT_OWNER))?;
        }
        Ok(())
    }

    /// Points every attached pod's interface at the egress program pinned now (the daemon does
    /// this after a reload, so running pods get the new program, not just new pods). Interfaces
    /// that are gone are skipped (reconcile removes them); returns how many were pointed.
    pub(crate) fn repoint_pods(&mut self) -> Result<usize, DatapathError> {
        let mut prog = loader::pinned_program(&self.pin_root, abi::prog::POD_EGRESS)?;
        let mut n = 0;
        for pod in self.list_pods()? {
            let Ok(ifname) = iface::name_of(pod.host_veth_ifindex) else {
                continue;
            };
            let pin = pod_link_pin(&self.pin_root, pod.host_veth_ifindex);
            match self.mode.attach(&mut prog, &ifname, &pin) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(container_id = %pod.container_id, ifname, error = %e, "pod keeps its previous egress program")
                }
            }
        }
        Ok(n)
    }

    fn link_ok(&self, ifindex: u32) -> bool {
        let pin = pod_link_pin(&self.pin_root, ifindex);
        match iface::name_of(ifindex) {
            Ok(name) => self.mode.is_attached(&name, &pin),
            Err(_) => false,
        }
    }

    /// Undoes [`attach_pod`](Self::attach_pod). Succeeds when nothing is there (CNI DEL is
    /// idempotent). `host_veth_ifindex` cleans up by interface when the container id is unknown.
    /// Collects errors and carries on, then reports them all.
    pub fn detach_pod(
        &mut self,
        container_id: &str,
        host_veth_ifindex: Option<u32>,
    ) -> Result<(), DatapathError> {
        let mut steps = StepTimes::default();
        let result = self.detach_inner(container_id, host_veth_ifindex, &mut steps);
        self.last_steps = steps;
        result
    }

    fn detach_inner(
        &mut self,
        container_id: &str,
        host_veth_ifindex: Option<u32>,
        steps: &mut StepTimes,
    ) -> Result<(), DatapathError> {
        let mut errors = Vec::new();
        let key = abi::fixed(container_id).map(|c| abi::MetaKey { container_id: c });
        let meta = key.as_ref().and_then(|k| self.pod_meta.get(k, 0).ok());
        let ifindex = meta.map(|m| m.host_ifindex).or(host_veth_ifindex);
        if let Some(ifindex) = ifindex {
            steps.time("map writes", || {
                // Walk only the pod's range, and free only slots that still point at this pod:
                // never a port someone else holds.
                let info = self.pods.get(&ifindex, 0).ok();
                let range = meta
                    .filter(|m| m.has_slice != 0)
                    .map(|m| (m.port_lo, m.port_hi))
                    .or(info
                        .filter(|i| i.flags & abi::F_SLICE != 0)
                        .map(|i| (i.port_lo, i.port_hi)));
                if let Some((lo, hi)) = range
                    && let Err(e) = self.free_ports_of(ifindex, &batch::runs(lo, hi, true, true))
                {
                    errors.push(e);
                }
                // The list goes after the ports: nothing steers to the pod by then.
                match self.sources_of(ifindex) {
                    Ok(list) => {
                        for c in list {
                            ignore_missing(
                                self.src_allow.remove(&sources::key_of(ifindex, &c)),
                                abi::map::SRC_ALLOW,
                                &mut errors,
                            );
                        }
                    }
                    Err(e) => errors.push(e),
                }
                ignore_missing(self.pods.remove(&ifindex), abi::map::PODS, &mut errors);
                ignore_missing(
                    self.pod_stats.remove(&ifindex),
                    abi::map::POD_STATS,
                    &mut errors,
                );
            });
            let pin = pod_link_pin(&self.pin_root, ifindex);
            // The interface may be gone already (netns deleted): the pin still has to go.
            let ifname = iface::name_of(ifindex).unwrap_or_default();
            if let Err(e) = steps.time(self.mode.link_step(), || self.mode.detach(&ifname, &pin)) {
                errors.push(e);
            }
        }
        if let Some(k) = key {
            ignore_missing(self.pod_meta.remove(&k), abi::map::POD_META, &mut errors);
        }
        many(errors)
    }

    /// For CNI CHECK: the stored attachment equals `pod`, every port of its range points at
    /// its host veth, and the program is attached there.
    pub fn check_pod(&self, pod: &PodAttachment) -> Result<(), DatapathError> {
        let fail = |detail: String| DatapathError::CheckFailed {
            container_id: pod.container_id.clone(),
            detail,
        };
        let (key, meta) = table::meta_of(pod)?;
        let stored = self
            .pod_meta
            .get(&key, 0)
            .map_err(|_| fail("no datapath state for this container".into()))?;
        if stored != meta {
            return Err(fail(format!(
                "stored attachment differs: {:?}",
                table::attachment_of(&pod.container_id, &stored)
            )));
        }
        let info = self
            .pods
            .get(&pod.host_veth_ifindex, 0)
            .map_err(|_| fail("host veth not in the pods map".into()))?;
        if info != table::pod_info(pod) {
            return Err(fail("pods map entry differs".into()));
        }
        let filtering = !self.sources_of(pod.host_veth_ifindex)?.is_empty();
        for k in table::port_keys(pod) {
            let o = self
                .port_owner
                .get(&k, 0)
                .map_err(map_err(abi::map::PORT_OWNER))?;
            if o.host_ifindex != pod.host_veth_ifindex {
                return Err(fail(format!(
                    "port table key {k} points at ifindex {}",
                    o.host_ifindex
                )));
            }
            if (o.flags & abi::F_SRC_FILTER != 0) != filtering {
                return Err(fail(format!(
                    "port table key {k} does not follow the allowed-source list (filtering: {filtering})"
                )));
            }
        }
        if !self.link_ok(pod.host_veth_ifindex) {
            return Err(fail("egress program not attached to the host veth".into()));
        }
        Ok(())
    }

    /// The attachment stored for `container_id`, if any.
    pub fn find_pod(&self, container_id: &str) -> Option<PodAttachment> {
        let key = abi::MetaKey {
            container_id: abi::fixed(container_id)?,
        };
        let meta = self.pod_meta.get(&key, 0).ok()?;
        Some(table::attachment_of(container_id, &meta))
    }

    /// Every attachment stored in the pinned maps (for CNI GC and daemon reconcile).
    pub fn list_pods(&self) -> Result<Vec<PodAttachment>, DatapathError> {
        let mut out = Vec::new();
        for item in self.pod_meta.iter() {
            let (k, m) = item.map_err(map_err(abi::map::POD_META))?;
            out.push(table::attachment_of(&abi::unfixed(&k.container_id), &m));
        }
        out.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        Ok(out)
    }

    /// Removes every attachment whose container id is not in `valid` (CNI GC). Returns the ids
    /// removed. Never a substitute for DEL.
    pub fn gc(&mut self, valid: &[String]) -> Result<Vec<String>, DatapathError> {
        let mut removed = Vec::new();
        let mut errors = Vec::new();
        for pod in self.list_pods()? {
            if valid.contains(&pod.container_id) {
                continue;
            }
            match self.detach_pod(&pod.container_id, Some(pod.host_veth_ifindex)) {
                Ok(()) => removed.push(pod.container_id),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(removed)
        } else {
            Err(DatapathError::Many(errors))
        }
    }

    /// Per-pod counters, by host veth ifindex.
    pub fn pod_stats(&self) -> Result<BTreeMap<u32, abi::PodStats>, DatapathError> {
        let mut out = BTreeMap::new();
        for item in self.pod_stats.iter() {
            let (k, v) = item.map_err(map_err(abi::map::POD_STATS))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Node-wide counters, by name (see [`abi::GLOBAL_STATS`]).
    pub fn global_stats(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        abi::GLOBAL_STATS
            .iter()
            .map(|&(i, name)| {
                self.global_stats
                    .get(&i, 0)
                    .map(|v| (name, v))
                    .map_err(map_err(abi::map::GLOBAL_STATS))
            })
            .collect()
    }
}

/// One error as itself, several as [`DatapathError::Many`].
fn many(mut errors: Vec<DatapathError>) -> Result<(), DatapathError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(DatapathError::Many(errors)),
    }
}

fn ignore_missing(r: Result<(), MapError>, map: &'static str, errors: &mut Vec<DatapathError>) {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => {}
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(DatapathError::Map { map, source: e }),
    }
}
