//! Where each datapath layout's pins live under a pin root, and which layouts a root holds.
//!
//! ```text
//! <pin root>/v2/maps/<map>          layout 2 (this build): maps, pinned by name, reused on restart
//! <pin root>/v2/progs/<program>     its programs, renamed over the old pins on reload
//! <pin root>/links/...              tcx links, one per interface: not part of a layout (a link
//!                                   is switched to another program atomically, whatever layout)
//! <pin root>/maps, <pin root>/progs layout 1 (the first release), migrated and removed on start
//! <pin root>/v2_staging/            a first load in progress; renamed to v2 once complete
//! ```
//!
//! The version in the path is the version record: a process of this build never opens pins of
//! another layout by mistake, and `v2` appears only complete (it is built as `v2_staging` and
//! renamed), so a missing map inside it is corruption, not "not loaded yet".
use std::path::{Path, PathBuf};

use super::abi::ABI_VERSION;

/// `<pin root>/v<ABI_VERSION>`: this build's maps and programs.
pub fn dir(pin_root: &Path) -> PathBuf {
    version_dir(pin_root, ABI_VERSION)
}

/// `<pin root>/v<version>` (layout 1 has no directory of its own: see [`V1_MAPS`]).
pub fn version_dir(pin_root: &Path, version: u32) -> PathBuf {
    pin_root.join(format!("v{version}"))
}

/// Where a first load of this layout builds its pins before they become [`dir`]. bpffs refuses
/// names with a dot.
pub fn staging_dir(pin_root: &Path) -> PathBuf {
    pin_root.join(format!("v{ABI_VERSION}_staging"))
}

pub fn maps_dir(pin_root: &Path) -> PathBuf {
    dir(pin_root).join("maps")
}

pub fn map_pin(pin_root: &Path, map: &str) -> PathBuf {
    maps_dir(pin_root).join(map)
}

pub fn prog_pin(pin_root: &Path, prog: &str) -> PathBuf {
    dir(pin_root).join("progs").join(prog)
}

/// Links are per interface and outlive layouts.
pub fn links_dir(pin_root: &Path) -> PathBuf {
    pin_root.join("links")
}

/// Layout 1's maps and programs, straight under the root.
pub const V1_MAPS: &str = "maps";
pub const V1_PROGS: &str = "progs";

/// The layouts pinned under `pin_root`, oldest first: 1 when layout 1's `maps` directory holds
/// a pin, N for every `vN` directory. A staging directory is no layout (nothing opens it).
pub fn pinned_versions(pin_root: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let v1 = pin_root.join(V1_MAPS);
    if std::fs::read_dir(&v1).is_ok_and(|mut d| d.next().is_some()) {
        out.push(1);
    }
    if let Ok(entries) = std::fs::read_dir(pin_root) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(v) = name
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if e.path().is_dir() && !out.contains(&v) {
                out.push(v);
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_tree() {
        let root = std::env::temp_dir().join(format!("portslice-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("links")).unwrap();
        assert!(pinned_versions(&root).is_empty());
        // An empty layout-1 maps dir holds nothing; a staging dir is no layout.
        std::fs::create_dir_all(root.join(V1_MAPS)).unwrap();
        std::fs::create_dir_all(staging_dir(&root)).unwrap();
        assert!(pinned_versions(&root).is_empty());
        std::fs::write(root.join(V1_MAPS).join("pods"), b"").unwrap();
        std::fs::create_dir_all(dir(&root)).unwrap();
        std::fs::create_dir_all(version_dir(&root, 9)).unwrap();
        assert_eq!(pinned_versions(&root), vec![1, ABI_VERSION, 9]);
        assert_eq!(map_pin(&root, "pods"), root.join("v2/maps/pods"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
