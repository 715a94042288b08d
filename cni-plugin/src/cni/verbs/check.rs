//! CHECK: the wiring of a slice pod is really in place — for each family it got, the address,
//! routes and rules, then the sysctls inside the pod and the datapath entry for its host veth. A pod without a slice always passes:
//! its one piece of our state (the entry that lets it reach slice pods on the node address) is
//! best effort, and a failed CHECK would make the runtime tear down a pod we have no business with.

use std::path::PathBuf;

use super::add::wiring_for;
use super::slice::find_slice;
use super::{netns_err, not_loaded, open_datapath};
use crate::cni::config::PluginConfig;
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, code};
use portslice_netns::{NetnsError, thread::in_netns, wiring};

pub fn check(env: &CniEnv, conf: &PluginConfig) -> Result<(), CniError> {
    if !conf.version.has_check() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, not {}",
                conf.version.as_str()
            ),
        ));
    }
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_NETWORK_CONFIG, "CHECK needs prevResult"))?;
    let dp = match open_datapath(&conf.pin_root) {
        Ok(dp) => dp,
        // A datapath we cannot open fails only the pods that are in a slice.
        Err(e) => {
            return match find_slice(env, conf)? {
                Some(_) => Err(e),
                None => {
                    tracing::warn!(error = %e, "the datapath cannot be opened; a pod without a slice passes CHECK");
                    Ok(())
                }
            };
        }
    };
    // What we attached is recorded in the datapath; the API server is asked only when the
    // record is missing, to tell a plain pod from a slice pod whose entry vanished.
    let recorded = dp.as_ref().and_then(|dp| dp.find_pod(&env.container_id));
    let slice = match &recorded {
        Some(a) => a.slice.clone(),
        None => find_slice(env, conf)?.map(|found| found.binding),
    };
    let Some(slice) = slice else {
        if let (Some(dp), Some(attachment)) = (&dp, &recorded)
            && let Err(e) = dp.check_pod(attachment)
        {
            tracing::warn!(error = %e, "a pod without a slice has a broken datapath entry; it cannot reach slice pods on the node address");
        }
        return Ok(());
    };
    let (dp, attachment) = match (dp, recorded) {
        (Some(dp), Some(attachment)) => (dp, attachment),
        (None, _) => return Err(not_loaded(&conf.pin_root)),
        (Some(_), None) => {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!(
                    "slice {} has no datapath entry for this pod",
                    slice.slice_key
                ),
            ));
        }
    };
    let pod = prev.pod_addresses(&env.ifname)?;
    let w = wiring_for(env, conf, &pod, &slice)?;
    let link =
        in_netns(&PathBuf::from(&env.netns), move || wiring::check(&w)).map_err(|e| match e {
            NetnsError::Check(_) => {
                CniError::new(code::CHECK_FAILED, "the pod's wiring is not in place")
                    .with_details(e.to_string())
            }
            other => netns_err("checking the pod's network namespace failed", other),
        })?;
    if link.peer_ifindex != Some(attachment.host_veth_ifindex) {
        return Err(CniError::new(
            code::CHECK_FAILED,
            "the datapath entry points at another host interface",
        ));
    }
    dp.check_pod(&attachment).map_err(|e| {
        CniError::new(code::CHECK_FAILED, "the datapath entry is not in place")
            .with_details(e.to_string())
    })
}
