//! Daemon side: load the object, pin maps/programs, attach to uplink and lo ingress.
//!
//! Restart/upgrade story. Pins live under `<pin root>/v<ABI_VERSION>/` ([`crate::layout`]):
//! - Same layout (a restart, or an upgrade that kept the ABI): maps are pinned by name and
//!   *reused* (aya opens an existing pin instead of creating a map), after checking each against
//!   the shape this build expects, so the port table survives; programs are renamed over their
//!   pins; the uplink/lo links and every pod's egress link are switched to the new programs
//!   atomically (tcx link update, or the clsact filter replaced in place).
//! - Layout 1 pins (the first release): the new layout is built beside them, every attachment is
//!   copied over, the links are switched, and layout 1's pins are removed ([`crate::migrate`]).
//! - A newer layout: refused (a downgrade needs an uninstall).
//!
//! Nothing is detached on exit.
use std::path::{Path, PathBuf};

use aya::{
    EbpfLoader,
    maps::{Array, MapInfo},
    programs::{SchedClassifier, links::PinnedLink},
};

use portslice_netns::{NodeAddrs, iface};

use super::{AttachMode, BPF_OBJECT, DatapathError, PinnedDatapath, abi, layout, map_err, migrate};

/// Pin of the ingress link on `ifname` (the uplink or `lo`).
pub fn ingress_link_pin(pin_root: &Path, which: &str) -> PathBuf {
    layout::links_dir(pin_root).join(which)
}

/// Opens a program the daemon pinned, ready to attach.
pub fn pinned_program(pin_root: &Path, name: &str) -> Result<SchedClassifier, DatapathError> {
    let path = layout::prog_pin(pin_root, name);
    SchedClassifier::from_pin(&path).map_err(|e| DatapathError::NotLoaded {
        pin_root: pin_root.to_path_buf(),
        detail: format!("opening program {}: {e}", path.display()),
    })
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |source| DatapathError::Io { what, source }
}

/// What the node daemon needs to bring the datapath up.
#[derive(Clone, Debug)]
pub struct NodeSetup {
    pub pin_root: PathBuf,
    /// The node addresses slice pods share (IPv4, IPv6 or both); a family without one passes
    /// untouched.
    pub node: NodeAddrs,
    pub uplink: String,
    /// Also steer the host's own packets (lo ingress, matrix row 5).
    pub attach_lo: bool,
}

/// Every map pinned in `maps_dir` has the shape this build expects. aya reuses a pin by name
/// whatever its shape; a program verified against a map of another shape would misread it.
fn check_shapes(maps_dir: &Path) -> Result<(), DatapathError> {
    for want in abi::MAP_SHAPES {
        let path = maps_dir.join(want.name);
        let info = MapInfo::from_pin(&path).map_err(|e| DatapathError::Pin {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let got = abi::MapShape {
            name: want.name,
            map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        if got != want {
            return Err(DatapathError::Pin {
                path,
                detail: format!(
                    "pinned as {got:?}, layout {} expects {want:?}: pins of another build of the same layout version (remove them with `portslice daemon --uninstall`)",
                    abi::ABI_VERSION
                ),
            });
        }
    }
    Ok(())
}

/// Loads (or reloads) the datapath and leaves it pinned and attached, migrating layout 1 pins.
/// Safe to run while traffic flows through a previous load.
pub fn load_and_pin(setup: &NodeSetup) -> Result<AttachMode, DatapathError> {
    let root = &setup.pin_root;
    let links = layout::links_dir(root);
    std::fs::create_dir_all(&links).map_err(io(format!(
        "creating {} (is bpffs mounted at /sys/fs/bpf?)",
        links.display()
    )))?;
    let pinned = layout::pinned_versions(root);
    if let Some(&v) = pinned.iter().find(|&&v| v != 1 && v != abi::ABI_VERSION) {
        return Err(DatapathError::Pin {
            path: layout::version_dir(root, v),
            detail: format!(
                "pins of datapath layout {v}; this daemon speaks layout {} and migrates only layout 1: a downgrade needs `portslice daemon --uninstall` first",
                abi::ABI_VERSION
            ),
        });
    }
    let uplink_ifindex = iface::index_of(&setup.uplink)?;
    let current = layout::dir(root);
    // A first load builds the layout in a staging directory and renames it into place once
    // complete, so `v<N>` never exists half-built (open() calls a missing map corruption).
    let fresh = !current.is_dir();
    let work = if fresh {
        let staging = layout::staging_dir(root);
        remove_tree(&staging)?;
        staging
    } else {
        current.clone()
    };
    for d in ["maps", "progs"] {
        std::fs::create_dir_all(work.join(d))
            .map_err(io(format!("creating {}", work.join(d).display())))?;
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(work.join("maps"))
        .load(BPF_OBJECT)
        .map_err(|e| DatapathError::Load(format!("{e:#}")))?;
    // Before any program is verified against them or anything is written.
    check_shapes(&work.join("maps"))?;

    {
        let map = ebpf
            .map_mut(abi::map::CONFIG)
            .ok_or_else(|| DatapathError::Load("object has no config map".into()))?;
        let mut config: Array<_, abi::NodeConfig> =
            Array::try_from(map).map_err(map_err(abi::map::CONFIG))?;
        let cfg = node_config(&setup.node, uplink_ifindex);
        config.set(0, cfg, 0).map_err(map_err(abi::map::CONFIG))?;
    }

    let mode = AttachMode::detect();
    for name in [abi::prog::INGRESS, abi::prog::POD_EGRESS] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::Load(format!("object has no program {name}")))?
            .try_into()
            .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
        prog.load()
            .map_err(|e| DatapathError::Load(format!("verifying {name}: {e:#}")))?;
        // Pin under a temporary name and rename over the old pin: a CNI ADD running right now
        // sees either the old or the new program, never none.
        let pin = work.join("progs").join(name);
        // bpffs refuses names with a dot.
        let tmp = work.join("progs").join(format!("{name}_new"));
        let _ = std::fs::remove_file(&tmp);
        prog.pin(&tmp)
            .map_err(|e| DatapathError::Load(format!("pinning {name}: {}", chain(&e))))?;
        std::fs::rename(&tmp, &pin).map_err(io(format!("replacing pin {}", pin.display())))?;
    }
    if fresh {
        std::fs::rename(&work, &current).map_err(io(format!(
            "renaming {} to {}",
            work.display(),
            current.display()
        )))?;
    }

    // Layout 1's attachments go into the new maps before the new ingress program reads them.
    let mut dp = PinnedDatapath::open(root)?;
    let legacy = if pinned.contains(&1) {
        let v1 = migrate::V1::open(root)?;
        let n = v1.copy_into(&mut dp)?;
        tracing::info!(
            pods = n,
            "migrating datapath layout 1 to layout {}",
            abi::ABI_VERSION
        );
        Some(v1)
    } else {
        None
    };

    let ingress: &mut SchedClassifier = ebpf
        .program_mut(abi::prog::INGRESS)
        .ok_or_else(|| DatapathError::Load("no ingress program".into()))?
        .try_into()
        .map_err(|e| DatapathError::Load(format!("{e}")))?;
    mode.attach(ingress, &setup.uplink, &ingress_link_pin(root, "uplink"))?;
    if setup.attach_lo {
        mode.attach(ingress, "lo", &ingress_link_pin(root, "lo"))?;
    }
    // Running pods get the new egress program too (it may carry fixes), not only new pods.
    let pods = dp.repoint_pods()?;
    // Every link runs this build now: pins of maps it renamed are garbage.
    for name in abi::map::RETIRED {
        let pin = layout::map_pin(root, name);
        match std::fs::remove_file(&pin) {
            Ok(()) => tracing::info!(map = name, "retired map of an earlier build removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(pin = %pin.display(), error = %e, "could not remove a retired map's pin")
            }
        }
    }
    if let Some(v1) = legacy {
        migrate::unpin_v1(root)?;
        // A CNI process of the old build that opened layout 1 before the pins went may have
        // written since the first copy: copy again from the maps still held open.
        if v1.copy_into(&mut dp)? > 0 {
            dp.repoint_pods()?;
        }
        tracing::info!("datapath layout 1 removed");
    }
    tracing::info!(pin_root = %root.display(), uplink = %setup.uplink, node_ip = %setup.node, ?mode, pods, layout = abi::ABI_VERSION, "datapath loaded and pinned");
    Ok(mode)
}

/// The `config` map's entry for the node addresses `node`.
pub fn node_config(node: &NodeAddrs, uplink_ifindex: u32) -> abi::NodeConfig {
    abi::NodeConfig {
        node_ip: node.v4.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
        uplink_ifindex,
        node_ip6: node.v6.map_or([0; 16], |ip| ip.octets()),
    }
}

/// Removes a directory of pins and everything under it; absent is fine.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), DatapathError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(DatapathError::Io {
                what: format!("reading {}", dir.display()),
                source: e,
            });
        }
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            remove_tree(&path)?;
        } else {
            std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DatapathError::Io {
            what: format!("removing {}", dir.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Detaches everything and removes every pin under `pin_root`, of every layout (daemon
/// uninstall). Collects errors and carries on.
pub fn unload(pin_root: &Path, uplink: &str) -> Result<(), DatapathError> {
    let mode = AttachMode::detect();
    let mut errors = Vec::new();
    // Pods first, through the API (clsact filters have no pins to find them by).
    if let Ok(mut dp) = super::PinnedDatapath::open(pin_root)
        && let Ok(pods) = dp.list_pods()
    {
        for p in pods {
            if let Err(e) = dp.detach_pod(&p.container_id, Some(p.host_veth_ifindex)) {
                errors.push(e);
            }
        }
    }
    // A node never upgraded from layout 1: its pods' filters, by interface.
    if let Ok(v1) = migrate::V1::open(pin_root) {
        for ifindex in v1.pod_ifindexes() {
            if let Ok(name) = iface::name_of(ifindex) {
                let _ = mode.detach(&name, &super::pod_link_pin(pin_root, ifindex));
            }
        }
    }
    let links = layout::links_dir(pin_root);
    if let Ok(entries) = std::fs::read_dir(&links) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ifname = match name.as_str() {
                "uplink" => uplink.to_string(),
                "lo" => "lo".to_string(),
                other => other
                    .strip_prefix("pod-")
                    .and_then(|i| i.parse().ok())
                    .and_then(|i| iface::name_of(i).ok())
                    .unwrap_or_default(),
            };
            if let Err(err) = mode.detach(&ifname, &e.path()) {
                errors.push(err);
            }
        }
    }
    if mode == AttachMode::Clsact {
        let _ = mode.detach(uplink, Path::new(""));
        let _ = mode.detach("lo", Path::new(""));
    }
    if let Ok(entries) = std::fs::read_dir(pin_root) {
        for e in entries.flatten() {
            if let Err(err) = remove_tree(&e.path()) {
                errors.push(err);
            }
        }
    }
    if let Err(err) = std::fs::remove_dir(pin_root)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        errors.push(DatapathError::Io {
            what: format!("removing {}", pin_root.display()),
            source: err,
        });
    }
    match errors.len() {
        0 => Ok(()),
        _ => Err(DatapathError::Many(errors)),
    }
}

/// Whether the daemon's own attachments are in place (health probe).
pub fn healthy(pin_root: &Path, attach_lo: bool) -> Result<(), String> {
    for p in [abi::prog::INGRESS, abi::prog::POD_EGRESS] {
        let path = layout::prog_pin(pin_root, p);
        if !path.exists() {
            return Err(format!("{} missing", path.display()));
        }
    }
    if AttachMode::detect() == AttachMode::Tcx {
        let mut links = vec!["uplink"];
        if attach_lo {
            links.push("lo");
        }
        for l in links {
            PinnedLink::from_pin(ingress_link_pin(pin_root, l))
                .map_err(|e| format!("link {l}: {e}"))?;
        }
    }
    Ok(())
}

/// An error with its sources, for messages that must say *why* (aya wraps the errno).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_holds_each_family_the_node_has_and_zero_for_the_other() {
        let v4 = NodeAddrs::v4("198.18.0.1".parse().unwrap());
        let c = node_config(&v4, 3);
        assert_eq!(c.node_ip.to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!((c.node_ip6, c.uplink_ifindex), ([0; 16], 3));
        let v6 = NodeAddrs::new(["2001:2::1".parse().unwrap()]).unwrap();
        let c = node_config(&v6, 3);
        assert_eq!(c.node_ip, 0);
        assert_eq!(c.node_ip6[..4], [0x20, 0x01, 0, 2]);
        assert_eq!(c.node_ip6[15], 1);
    }
}
