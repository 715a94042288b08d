//! DEL: undo ADD in reverse order, from our own pinned state: CNI 0.3.x passes no prevResult on
//! DEL, and no version passes the slice. Succeeds for unknown containers, twice in a row, and when
//! the netns is already gone (kubernetes#43014): there is then nothing left inside it to remove.
//!
//! DEL puts back every sysctl ADD changed (saved by ADD under the state dir) and gives the slice's
//! ports outside the pool back to the host. Only a pod the datapath records as a slice pod can
//! fail DEL, and only when undoing its wiring failed (the runtime then retries). Any other pod's DEL succeeds whatever goes wrong, with the
//! errors logged: a plain pod must never be stuck terminating because of us.

use std::path::PathBuf;

use super::{datapath_err, lock_node, netns_err, open_datapath, record_datapath_steps};
use crate::cni::config::{DEFAULT_STATE_DIR, Envelope};
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, code};
use crate::cni::timing;
use crate::node::{pod_state, reserved_ports};
use portslice_netns::{NetnsError, NodeAddrs, thread::in_netns, wiring};
use portslice_ports::RangeSet;

pub fn del(env: &CniEnv, stdin: &str) -> Result<(), CniError> {
    // A config we cannot read still names no pin root or node address: fall back to defaults.
    let envelope = timing::phase("config", || Envelope::parse(stdin).ok());
    let pin_root = envelope
        .as_ref()
        .map_or_else(Envelope::default_pin_root, Envelope::pin_root);
    let state_dir = envelope
        .as_ref()
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), Envelope::state_dir);
    let node = envelope.as_ref().and_then(Envelope::node_addrs);

    let mut errors = Vec::new();
    let mut slice = None;
    let mut lock = None;
    match open_datapath(&pin_root) {
        Ok(Some(mut dp)) => {
            match lock_node(&pin_root) {
                Ok(l) => lock = Some(l),
                Err(e) => errors.push(e),
            }
            slice = dp.find_pod(&env.container_id).and_then(|p| p.slice);
            let detached = dp.detach_pod(&env.container_id, None);
            record_datapath_steps(&dp);
            if let Err(e) = detached {
                errors.push(datapath_err("removing the pod from the datapath failed", e));
            }
        }
        Ok(None) => {}
        Err(e) => errors.push(e),
    }
    let saved = pod_state::load(&state_dir, &env.container_id).unwrap_or_else(|e| {
        tracing::warn!(error = %format!("{e:#}"), "the pod's saved sysctls are unreadable");
        Vec::new()
    });
    if let (false, Some(node)) = (env.netns.is_empty(), node)
        && let Err(e) = timing::phase("netns teardown", || teardown_netns(env, node, saved))
    {
        errors.push(e);
    }
    // The slice's ports outside the pool go back to the host.
    if let (Some(s), Some(pool)) = (&slice, envelope.as_ref().and_then(Envelope::pool)) {
        let outside = RangeSet::new([s.range]).subtract(&pool);
        if !outside.is_empty()
            && let Err(e) = reserved_ports::release(&outside)
        {
            errors.push(
                CniError::new(
                    code::DATAPATH,
                    format!("releasing ports {outside} on the node failed"),
                )
                .with_details(format!("{e:#}")),
            );
        }
    }
    if let Err(e) = pod_state::remove(&state_dir, &env.container_id) {
        tracing::warn!(error = %format!("{e:#}"), "removing the pod's state failed");
    }
    drop(lock);
    match errors.into_iter().next() {
        None => Ok(()),
        Some(e) if slice.is_some() => Err(e),
        Some(e) => {
            tracing::warn!(error = %e, "DEL of a pod without a slice succeeds despite this");
            Ok(())
        }
    }
}

/// Removes what ADD put in the pod for every node address (a family the pod never got is a
/// no-op).
fn teardown_netns(
    env: &CniEnv,
    node: NodeAddrs,
    saved: Vec<(PathBuf, String)>,
) -> Result<(), CniError> {
    let ifname = env.ifname.clone();
    match in_netns(&PathBuf::from(&env.netns), move || {
        wiring::teardown(&ifname, &node, &saved)
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
