//! DEL: undo ADD in reverse order. Succeeds for unknown containers, twice in a row, and when the
//! netns is already gone (kubernetes#43014): there is then nothing left inside it to remove.

use std::path::PathBuf;

use super::{datapath_err, netns_err, open_datapath};
use crate::cni::config::PluginConfig;
use crate::cni::env::CniEnv;
use crate::cni::error::CniError;
use crate::netns::{NetnsError, thread::in_netns, wiring};

pub fn del(env: &CniEnv, conf: &PluginConfig) -> Result<(), CniError> {
    if let Some(mut dp) = open_datapath(&conf.pin_root)? {
        dp.detach_pod(&env.container_id, None)
            .map_err(|e| datapath_err("removing the pod from the datapath failed", e))?;
    }
    if env.netns.is_empty() {
        return Ok(());
    }
    let (ifname, node_ip) = (env.ifname.clone(), conf.node_ip);
    match in_netns(&PathBuf::from(&env.netns), move || {
        wiring::teardown(&ifname, node_ip)
    }) {
        Ok(()) => Ok(()),
        Err(NetnsError::Gone(path)) => {
            tracing::debug!(%path, "netns already gone");
            Ok(())
        }
        // A path that is no netns any more (unmounted, corrupt): nothing of ours can be in it.
        Err(NetnsError::Enter { path, source }) => {
            tracing::warn!(%path, error = %source, "cannot enter the netns; assuming it is gone");
            Ok(())
        }
        Err(e) => Err(netns_err("removing the pod's netns wiring failed", e)),
    }
}
