//! Daemon side: load the object, pin maps/programs, attach to uplink and lo ingress.
//!
//! Restart/upgrade story: maps are pinned by name and *reused* (aya opens an existing pin
//! instead of creating a map), so the port table survives; the uplink/lo tcx links are pinned
//! and atomically switched to the new program; pod links keep running the program they were
//! attached with (it shares the same maps) until the pod goes. Nothing is detached on exit.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::Array,
    programs::{SchedClassifier, links::PinnedLink},
};

use portslice_netns::iface;

use super::{AttachMode, BPF_OBJECT, DatapathError, abi, map_err};

/// Pin of the ingress link on `ifname` (the uplink or `lo`).
pub fn ingress_link_pin(pin_root: &Path, which: &str) -> PathBuf {
    pin_root.join("links").join(which)
}

/// Opens a program the daemon pinned, ready to attach.
pub fn pinned_program(pin_root: &Path, name: &str) -> Result<SchedClassifier, DatapathError> {
    let path = pin_root.join("progs").join(name);
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
    pub node_ip: Ipv4Addr,
    pub uplink: String,
    /// Also steer the host's own packets (lo ingress, matrix row 5).
    pub attach_lo: bool,
}

/// Loads (or reloads) the datapath and leaves it pinned and attached. Safe to run while traffic
/// flows through a previous load.
pub fn load_and_pin(setup: &NodeSetup) -> Result<AttachMode, DatapathError> {
    let root = &setup.pin_root;
    for d in ["maps", "progs", "links"] {
        std::fs::create_dir_all(root.join(d)).map_err(io(format!(
            "creating {} (is bpffs mounted at /sys/fs/bpf?)",
            root.join(d).display()
        )))?;
    }
    let uplink_ifindex = iface::index_of(&setup.uplink)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(root.join("maps"))
        .load(BPF_OBJECT)
        .map_err(|e| DatapathError::Load(format!("{e:#}")))?;

    {
        let map = ebpf
            .map_mut(abi::map::CONFIG)
            .ok_or_else(|| DatapathError::Load("object has no config map".into()))?;
        let mut config: Array<_, abi::NodeConfig> =
            Array::try_from(map).map_err(map_err(abi::map::CONFIG))?;
        let cfg = abi::NodeConfig {
            node_ip: u32::from_ne_bytes(setup.node_ip.octets()),
            uplink_ifindex,
        };
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
        let pin = root.join("progs").join(name);
        // bpffs refuses names with a dot.
        let tmp = root.join("progs").join(format!("{name}_new"));
        let _ = std::fs::remove_file(&tmp);
        prog.pin(&tmp)
            .map_err(|e| DatapathError::Load(format!("pinning {name}: {}", chain(&e))))?;
        std::fs::rename(&tmp, &pin).map_err(io(format!("replacing pin {}", pin.display())))?;
    }

    let ingress: &mut SchedClassifier = ebpf
        .program_mut(abi::prog::INGRESS)
        .ok_or_else(|| DatapathError::Load("no ingress program".into()))?
        .try_into()
        .map_err(|e| DatapathError::Load(format!("{e}")))?;
    mode.attach(ingress, &setup.uplink, &ingress_link_pin(root, "uplink"))?;
    if setup.attach_lo {
        mode.attach(ingress, "lo", &ingress_link_pin(root, "lo"))?;
    }
    tracing::info!(pin_root = %root.display(), uplink = %setup.uplink, node_ip = %setup.node_ip, ?mode, "datapath loaded and pinned");
    Ok(mode)
}

/// Detaches everything and removes every pin under `pin_root` (daemon uninstall). Collects
/// errors and carries on.
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
    let links = pin_root.join("links");
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
    for d in ["progs", "maps"] {
        if let Ok(entries) = std::fs::read_dir(pin_root.join(d)) {
            for e in entries.flatten() {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    errors.push(DatapathError::Io {
                        what: format!("removing {}", e.path().display()),
                        source: err,
                    });
                }
            }
        }
    }
    for d in ["links", "progs", "maps", ""] {
        let p = pin_root.join(d);
        if let Err(err) = std::fs::remove_dir(&p)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(DatapathError::Io {
                what: format!("removing {}", p.display()),
                source: err,
            });
        }
    }
    match errors.len() {
        0 => Ok(()),
        _ => Err(DatapathError::Many(errors)),
    }
}

/// Whether the daemon's own attachments are in place (health probe).
pub fn healthy(pin_root: &Path, attach_lo: bool) -> Result<(), String> {
    for p in [abi::prog::INGRESS, abi::prog::POD_EGRESS] {
        let path = pin_root.join("progs").join(p);
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
