//! The upgrade from layout 1 (the first release: maps and programs pinned straight under
//! `<pin root>/maps` and `/progs`, no version) to this layout.
//!
//! The daemon migrates rather than running both layouts side by side: the uplink and `lo` have
//! one ingress hook each, and steering a port needs its owner in the table the attached program
//! reads. So [`loader::load_and_pin`](crate::loader::load_and_pin) copies every attachment of
//! layout 1 into the new maps *before* it switches the ingress links to the new program, then
//! switches every pod's egress link (tcx link update, or clsact filter replaced in place) and
//! removes layout 1's pins. Each switch is atomic, so the ports of running pods steer throughout
//! and established flows survive; a pod attached under layout 1 is then an ordinary attachment
//! of layout 2 (its DEL, CHECK and metrics work as for any other).
//!
//! What is not carried over: in-flight fragment state (at most the datagrams in flight during
//! the switch) and echo ids (a ping reply crossing the switch is lost; the next one arrives).
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};

use super::{DatapathError, PinnedDatapath, abi, layout, map_err, table};

/// Layout 1's maps, opened from their pins. The handles keep the maps alive after the pins are
/// removed, so entries written by a process that still had them open can be copied afterwards.
pub(crate) struct V1 {
    pod_meta: HashMap<MapData, abi::MetaKey, abi::PodMeta>,
    pods: HashMap<MapData, u32, abi::PodInfo>,
    pod_stats: HashMap<MapData, u32, abi::v1::PodStats>,
    port_owner: Array<MapData, abi::PortOwner>,
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
    pin_root: &Path,
    name: &'static str,
) -> Result<T, DatapathError> {
    let path = pin_root.join(layout::V1_MAPS).join(name);
    let bad = |detail: String| DatapathError::Pin {
        path: path.clone(),
        detail: format!("layout 1 pin: {detail}"),
    };
    let data = MapData::from_pin(&path).map_err(|e| bad(e.to_string()))?;
    let map = Map::from_map_data(data).map_err(|e| bad(e.to_string()))?;
    T::try_from(map).map_err(|e| bad(e.to_string()))
}

impl V1 {
    pub(crate) fn open(pin_root: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            pod_meta: open(pin_root, abi::map::POD_META)?,
            pods: open(pin_root, abi::map::PODS)?,
            pod_stats: open(pin_root, abi::map::POD_STATS)?,
            port_owner: open(pin_root, abi::map::PORT_OWNER)?,
        })
    }

    /// Host ifindexes of every pod attached under layout 1 (for uninstalling a node that was
    /// never upgraded).
    pub(crate) fn pod_ifindexes(&self) -> Vec<u32> {
        self.pod_meta
            .iter()
            .filter_map(|r| r.ok().map(|(_, m)| m.host_ifindex))
            .collect()
    }

    /// Copies every attachment not yet in `dp` (idempotent: run it again after the pins are gone
    /// to catch late writes). Ports are copied only where layout 1 still points at the pod and
    /// the new table has them free. Returns how many pods were copied.
    pub(crate) fn copy_into(&self, dp: &mut PinnedDatapath) -> Result<usize, DatapathError> {
        let mut copied = 0;
        for item in self.pod_meta.iter() {
            let (key, meta) = item.map_err(map_err(abi::map::POD_META))?;
            if dp.pod_meta.get(&key, 0).is_ok() {
                continue;
            }
            let ifindex = meta.host_ifindex;
            let info = match self.pods.get(&ifindex, 0) {
                Ok(i) => i,
                Err(_) => table::pod_info(&table::attachment_of(
                    &abi::unfixed(&key.container_id),
                    &meta,
                )),
            };
            let old = self.pod_stats.get(&ifindex, 0).unwrap_or_default();
            let stats = abi::PodStats {
                rx_packets: old.rx_packets,
                rx_bytes: old.rx_bytes,
                tx_packets: old.tx_packets,
                tx_bytes: old.tx_bytes,
                drop_src_port: old.drop_src_port,
                drop_other: old.drop_other,
                ..Default::default()
            };
            dp.pod_meta
                .insert(key, meta, 0)
                .map_err(map_err(abi::map::POD_META))?;
            dp.pods
                .insert(ifindex, info, 0)
                .map_err(map_err(abi::map::PODS))?;
            dp.pod_stats
                .insert(ifindex, stats, 0)
                .map_err(map_err(abi::map::POD_STATS))?;
            for k in table::meta_port_keys(&meta) {
                let Ok(o) = self.port_owner.get(&k, 0) else {
                    continue;
                };
                if o.host_ifindex != ifindex {
                    continue;
                }
                let cur = dp
                    .port_owner
                    .get(&k, 0)
                    .map_err(map_err(abi::map::PORT_OWNER))?;
                if cur.host_ifindex != 0 && cur.host_ifindex != ifindex {
                    tracing::warn!(
                        key = k,
                        owner = cur.host_ifindex,
                        ifindex,
                        "port held by another pod in the new table; not migrated"
                    );
                    continue;
                }
                dp.port_owner
                    .set(k, o, 0)
                    .map_err(map_err(abi::map::PORT_OWNER))?;
            }
            copied += 1;
            tracing::info!(container_id = %abi::unfixed(&key.container_id), ifindex, "attachment migrated from datapath layout 1");
        }
        Ok(copied)
    }
}

/// Removes layout 1's map and program pins (its programs stay alive while a link or filter
/// still runs them; its maps while anything holds them).
pub(crate) fn unpin_v1(pin_root: &Path) -> Result<(), DatapathError> {
    for d in [layout::V1_MAPS, layout::V1_PROGS] {
        let dir = pin_root.join(d);
        super::loader::remove_tree(&dir)?;
    }
    Ok(())
}
