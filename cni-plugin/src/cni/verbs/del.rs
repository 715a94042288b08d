//! DEL: undo ADD in reverse order, from our own pinned state: CNI 0.3.x passes no prevResult on
//! DEL, and no version passes the slice. Succeeds for unknown containers, twice in a row, and when
//! the netns is already gone (kubernetes#43014): there is then nothing left inside it to remove.
//!
//! Only a pod the datapath records as a slice pod can fail DEL, and only when undoing its wiring
//! failed (the runtime then retries). Any other pod's DEL succeeds whatever goes wrong, with the
//! errors logged: a plain pod must never be stuck terminating because of us.

use std::path::PathBuf;

use super::{datapath_err, netns_err, open_datapath};
use crate::cni::config::Envelope;
use crate::cni::env::CniEnv;
use crate::cni::error::CniError;
use portslice_netns::{NetnsError, thread::in_netns, wiring};

pub fn del(env: &CniEnv, stdin: &str) -> Result<(), CniError> {
    // A config we cannot read still names no pin root or node address: fall back to defaults.
    let envelope = Envelope::parse(stdin).ok();
    let pin_root = envelope
        .as_ref()
        .map_or_else(Envelope::default_pin_root, Envelope::pin_root);
    let node_ip = envelope.as_ref().and_then(Envelope::node_ip);

    let mut errors = Vec::new();
    let mut slice_pod = false;
    match open_datapath(&pin_root) {
        Ok(Some(mut dp)) => {
            slice_pod = dp
                .find_pod(&env.container_id)
                .is_some_and(|p| p.slice.is_some());
            if let Err(e) = dp.detach_pod(&env.container_id, None) {
                errors.push(datapath_err("removing the pod from the datapath failed", e));
            }
        }
        Ok(None) => {}
        Err(e) => errors.push(e),
    }
    if let (false, Some(node_ip)) = (env.netns.is_empty(), node_ip)
        && let Err(e) = teardown_netns(env, node_ip)
    {
        errors.push(e);
    }
    match errors.into_iter().next() {
        None => Ok(()),
        Some(e) if slice_pod => Err(e),
        Some(e) => {
            tracing::warn!(error = %e, "DEL of a pod without a slice succeeds despite this");
            Ok(())
        }
    }
}

fn teardown_netns(env: &CniEnv, node_ip: std::net::Ipv4Addr) -> Result<(), CniError> {
    let ifname = env.ifname.clone();
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
