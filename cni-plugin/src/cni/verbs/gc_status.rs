//! GC and STATUS (CNI 1.1.0).

use super::{datapath_err, not_loaded, open_datapath};
use crate::cni::config::PluginConfig;
use crate::cni::error::{CniError, code};

fn needs_110(conf: &PluginConfig, verb: &str) -> Result<(), CniError> {
    if conf.version.has_gc_and_status() {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{verb} needs cniVersion 1.1.0"),
        ))
    }
}

/// Removes datapath entries of containers that are not in `cni.dev/valid-attachments`. Never a
/// substitute for DEL: the pods' netns are gone by the time GC runs, so only the node side is left.
pub fn gc(conf: &PluginConfig) -> Result<(), CniError> {
    needs_110(conf, "GC")?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "GC needs cni.dev/valid-attachments",
        )
    })?;
    let Some(mut dp) = open_datapath(&conf.pin_root)? else {
        return Ok(());
    };
    let ids: Vec<String> = valid.iter().map(|a| a.container_id.clone()).collect();
    let removed = dp
        .gc(&ids)
        .map_err(|e| datapath_err("GC of stale datapath entries failed", e))?;
    if !removed.is_empty() {
        tracing::info!(?removed, "removed stale attachments");
    }
    Ok(())
}

/// Ready when the node daemon has the datapath loaded.
pub fn status(conf: &PluginConfig) -> Result<(), CniError> {
    needs_110(conf, "STATUS")?;
    let e = match open_datapath(&conf.pin_root) {
        Ok(Some(_)) => return Ok(()),
        Ok(None) => not_loaded(&conf.pin_root),
        Err(e) => e,
    };
    Err(CniError::new(code::PLUGIN_NOT_AVAILABLE, e.msg).with_details(e.details))
}
