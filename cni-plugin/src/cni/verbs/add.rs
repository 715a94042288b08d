//! ADD: wire a slice pod (node address, routes, rules, sysctls, datapath) and print the previous
//! result with the node address added.
//!
//! Every other pod gets the previous result back untouched, whatever is wrong on our side (a
//! cniVersion we do not speak, a bad field of ours, no datapath, an interface that is no veth): a
//! chained plugin must never fail a pod it has no business with. Its one other effect is a
//! best-effort datapath entry for its host veth, so it can reach slice pods on the node address
//! (matrix row 4).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::slice::find_slice;
use super::{asks_for_slice, datapath_err, netns_err, not_loaded, open_datapath};
use crate::cni::config::{Envelope, PluginConfig};
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, code};
use crate::cni::result::{CniResult, PodAddress};
use portslice_datapath::{PinnedDatapath, PodAttachment, SliceBinding};
use portslice_netns::plan::PodWiring;
use portslice_netns::{thread::in_netns, wiring};

pub fn add(env: &CniEnv, envelope: &Envelope) -> Result<String, CniError> {
    let prev = envelope.prev_result().ok_or_else(|| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "ADD needs prevResult: portslice is a chained plugin",
        )
        .with_details("put it after the primary plugin (ptp, bridge, ...) in a conflist")
    })?;
    match PluginConfig::from_envelope(envelope) {
        Ok(conf) => {
            if let Some(slice) = find_slice(env, &conf)? {
                return add_slice_pod(env, &conf, prev, &slice);
            }
        }
        Err(e) => {
            if asks_for_slice(env, envelope) {
                return Err(e);
            }
            tracing::error!(error = %e, "the configuration cannot be used for slices; a pod that asks for none passes through");
        }
    }
    attach_plain_pod(env, &envelope.pin_root(), prev);
    Ok(prev.to_string())
}

/// A pod without a slice: its traffic passes untouched; the datapath only learns its host veth
/// so it can reach slice pods on the node address. Nothing here may fail the pod.
fn attach_plain_pod(env: &CniEnv, pin_root: &Path, prev: &Value) {
    match try_attach_plain_pod(env, pin_root, prev) {
        Ok(true) => {}
        Ok(false) => tracing::debug!("datapath not loaded; pod passes through"),
        Err(e) => tracing::warn!(
            error = %e,
            "pod passes through without a datapath entry: it cannot reach slice pods on the node address"
        ),
    }
}

fn try_attach_plain_pod(env: &CniEnv, pin_root: &Path, prev: &Value) -> Result<bool, CniError> {
    let pod = CniResult::from_value(prev.clone())?.pod_address(&env.ifname)?;
    let Some(mut dp) = open_datapath(pin_root)? else {
        return Ok(false);
    };
    let ifname = env.ifname.clone();
    let link = in_netns(&PathBuf::from(&env.netns), move || {
        wiring::pod_link(&ifname)
    })
    .map_err(|e| netns_err("reading the pod interface failed", e))?;
    // Not a veth (macvlan, ipvlan, ...): the pod works as the primary plugin made it, it just
    // cannot reach slice pods on the node address.
    let host_ifindex = link.peer_ifindex.ok_or_else(|| not_a_veth(env))?;
    let attachment = PodAttachment {
        container_id: env.container_id.clone(),
        host_veth_ifindex: host_ifindex,
        pod_private_ip: pod.private.addr,
        slice: None,
    };
    dp.attach_pod(&attachment)
        .map_err(|e| datapath_err("attaching the pod to the datapath failed", e))?;
    Ok(true)
}

fn add_slice_pod(
    env: &CniEnv,
    conf: &PluginConfig,
    prev: &Value,
    slice: &SliceBinding,
) -> Result<String, CniError> {
    let prev = CniResult::from_value(prev.clone())?;
    let pod = prev.pod_address(&env.ifname)?;
    wire_slice_pod(env, conf, &pod, slice)?;
    prev.with_node_address(conf.version, &pod, conf.node_ip)
        .to_json()
}

fn not_a_veth(env: &CniEnv) -> CniError {
    CniError::new(
        code::PREV_RESULT,
        format!("{} in the pod is not a veth to the node", env.ifname),
    )
    .with_details("portslice needs the primary plugin to connect pods to the node with veth pairs")
}

pub fn wiring_for(
    env: &CniEnv,
    conf: &PluginConfig,
    pod: &PodAddress,
    slice: &SliceBinding,
) -> PodWiring {
    PodWiring {
        ifname: env.ifname.clone(),
        node_ip: conf.node_ip,
        private: pod.private,
        gateway: pod.gateway,
        cluster_cidrs: conf.cluster_cidrs.clone(),
        range: slice.range,
    }
}

/// Steps in order, each undone (in reverse) when a later one fails.
fn wire_slice_pod(
    env: &CniEnv,
    conf: &PluginConfig,
    pod: &PodAddress,
    slice: &SliceBinding,
) -> Result<(), CniError> {
    let mut dp = open_datapath(&conf.pin_root)?.ok_or_else(|| not_loaded(&conf.pin_root))?;
    refuse_second_sliver(&dp, env, slice)?;
    tracing::debug!("datapath opened, no other sliver of the slice here");

    let w = wiring_for(env, conf, pod, slice);
    let netns = PathBuf::from(&env.netns);
    let w2 = w.clone();
    let applied = in_netns(&netns, move || wiring::apply(&w2))
        .map_err(|e| netns_err("wiring the pod's network namespace failed", e))?;
    let undo_netns = || {
        let (w, applied) = (w.clone(), applied.clone());
        if let Err(e) = in_netns(&netns, move || wiring::undo(&w, &applied)) {
            tracing::error!(error = %e, "undoing the pod's netns wiring failed");
        }
    };
    tracing::debug!(?applied.link, "pod netns wired");
    let Some(host_ifindex) = applied.link.peer_ifindex else {
        undo_netns();
        return Err(not_a_veth(env));
    };
    let attachment = PodAttachment {
        container_id: env.container_id.clone(),
        host_veth_ifindex: host_ifindex,
        pod_private_ip: pod.private.addr,
        slice: Some(slice.clone()),
    };
    if let Err(e) = dp.attach_pod(&attachment) {
        // attach_pod undoes its own partial work; ours is the netns.
        undo_netns();
        return Err(datapath_err(
            &format!("attaching slice {} to the datapath failed", slice.slice_key),
            e,
        ));
    }
    tracing::info!(slice = %slice.slice_key, range = %slice.range, host_ifindex, "slice pod wired");
    Ok(())
}

/// One sliver per slice per node: the same range may not belong to two pods here.
fn refuse_second_sliver(
    dp: &PinnedDatapath,
    env: &CniEnv,
    slice: &SliceBinding,
) -> Result<(), CniError> {
    let pods = dp
        .list_pods()
        .map_err(|e| datapath_err("listing the pods in the datapath failed", e))?;
    let clash = pods.iter().find(|p| {
        p.container_id != env.container_id
            && p.slice
                .as_ref()
                .is_some_and(|s| s.slice_key == slice.slice_key || s.range.overlaps(&slice.range))
    });
    match clash {
        None => Ok(()),
        Some(other) => Err(CniError::new(
            code::SLIVER_EXISTS,
            format!("slice {} already has a pod on this node", slice.slice_key),
        )
        .with_details(format!(
            "container {} holds ports {}; a slice has at most one pod per node (schedule the pods apart, e.g. with pod anti-affinity)",
            other.container_id,
            other.slice.as_ref().map(|s| s.range.to_string()).unwrap_or_default()
        ))),
    }
}
