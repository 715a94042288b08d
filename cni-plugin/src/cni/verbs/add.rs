//! ADD: wire a slice pod (node addresses, routes, rules, sysctls, datapath) and print the
//! previous result with the node addresses added: each family the node shares and the pod has.
//!
//! Every other pod gets the previous result back untouched, whatever is wrong on our side (a
//! cniVersion we do not speak, a bad field of ours, no datapath, an interface that is no veth): a
//! chained plugin must never fail a pod it has no business with. Its one other effect is a
//! best-effort datapath entry for its host veth, so it can reach slice pods on the node address
//! (matrix row 4).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use portslice_netns::NodeAddrs;

use serde_json::Value;

use super::slice::find_slice;
use super::{
    asks_for_slice, datapath_err, lock_node, netns_err, not_loaded, open_datapath,
    record_datapath_steps,
};
use crate::cni::config::{Envelope, PluginConfig};
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, code};
use crate::cni::result::{CniResult, PodAddresses};
use crate::cni::timing;
use crate::node::{pod_state, refusal, reserved_ports};
use crate::slice_source::FoundSlice;
use portslice_datapath::{PinnedDatapath, PodAttachment, SliceBinding, SourceCidr};
use portslice_netns::plan::PodWiring;
use portslice_netns::{listeners, thread::in_netns, wiring};
use portslice_ports::{NodeCritical, RangeSet};

pub fn add(env: &CniEnv, envelope: &Envelope) -> Result<String, CniError> {
    let prev = envelope.prev_result().ok_or_else(|| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "ADD needs prevResult: portslice is a chained plugin",
        )
        .with_details("put it after the primary plugin (ptp, bridge, ...) in a conflist")
    })?;
    match timing::phase("config", || PluginConfig::from_envelope(envelope)) {
        Ok(conf) => {
            if let Some(found) = timing::phase("slice lookup", || find_slice(env, &conf))? {
                let added = add_slice_pod(env, &conf, prev, &found);
                if let (Err(e), Some(portslice), Some(kubeconfig)) =
                    (&added, &found.portslice, &conf.kubeconfig)
                {
                    let node = refusal::node_name(conf.node_name.as_deref());
                    refusal::report(kubeconfig, portslice, &node, e, conf.api_timeout);
                }
                return added;
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
    // Whatever families the primary plugin gave it (IPv4, IPv6, both, none): the entry is by
    // host interface, and its private IPv4 address is only recorded.
    let pod = CniResult::from_value(prev.clone())?.pod_addresses(&env.ifname)?;
    let Some(mut dp) = open_datapath(pin_root)? else {
        return Ok(false);
    };
    let _lock = lock_node(pin_root)?;
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
        pod_private_ip: pod.first_v4().unwrap_or(Ipv4Addr::UNSPECIFIED),
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
    found: &FoundSlice,
) -> Result<String, CniError> {
    let prev = CniResult::from_value(prev.clone())?;
    let pod = prev.pod_addresses(&env.ifname)?;
    let w = wiring_for(env, conf, &pod, &found.binding)?;
    wire_slice_pod(env, conf, &w, &pod, &found.binding, &found.allowed_sources)?;
    prev.with_node_addresses(conf.version, pod.interface_index, &w)
        .to_json()
}

fn not_a_veth(env: &CniEnv) -> CniError {
    CniError::new(
        code::PREV_RESULT,
        format!("{} in the pod is not a veth to the node", env.ifname),
    )
    .with_details("portslice needs the primary plugin to connect pods to the node with veth pairs")
}

/// The slice pod's wiring: each family the node shares and the pod has. A pod with none of the
/// node's families cannot hold the slice (107).
pub fn wiring_for(
    env: &CniEnv,
    conf: &PluginConfig,
    pod: &PodAddresses,
    slice: &SliceBinding,
) -> Result<PodWiring, CniError> {
    let w = PodWiring::new(
        &env.ifname,
        slice.range,
        &conf.node,
        &pod.private,
        &conf.cluster_cidrs,
    );
    if w.is_empty() {
        let families = |v4: bool, v6: bool| match (v4, v6) {
            (true, true) => "IPv4 and IPv6",
            (true, false) => "IPv4",
            (false, true) => "IPv6",
            (false, false) => "no",
        };
        let has = |v6: bool| pod.private.iter().any(|p| p.cidr.is_ipv6() == v6);
        return Err(CniError::new(
            code::PREV_RESULT,
            format!(
                "prevResult has no address on {:?} of a family the node shares ({}; the pod has {})",
                env.ifname,
                families(conf.node.v4.is_some(), conf.node.v6.is_some()),
                families(has(false), has(true)),
            ),
        )
        .with_details(format!(
            "slice {} needs the pod to have an address of the family of a node address ({}): give the pod one, or the node (nodeIP) one of the pod's family",
            slice.slice_key, conf.node
        )));
    }
    Ok(w)
}

/// Steps in order, each undone (in reverse) when a later one fails. Under the node lock from the
/// one-sliver check to the last map write, so two pods of one slice landing together cannot both
/// pass it.
fn wire_slice_pod(
    env: &CniEnv,
    conf: &PluginConfig,
    w: &PodWiring,
    pod: &PodAddresses,
    slice: &SliceBinding,
    allowed_sources: &[SourceCidr],
) -> Result<(), CniError> {
    refuse_node_critical(conf, slice)?;
    let mut dp = open_datapath(&conf.pin_root)?.ok_or_else(|| not_loaded(&conf.pin_root))?;
    let _lock = lock_node(&conf.pin_root)?;
    timing::phase("host listeners check", || {
        refuse_host_listeners(slice, &conf.node)
    })?;
    timing::phase("one sliver check", || refuse_second_sliver(&dp, env, slice))?;
    tracing::debug!("datapath opened, no other sliver of the slice here");

    let w = w.clone();
    let netns = PathBuf::from(&env.netns);
    let w2 = w.clone();
    // Entering the netns (a thread, setns) and the wiring inside it (netlink, sysctls) apart.
    let called = std::time::Instant::now();
    let (applied, inside) = in_netns(&netns, move || {
        let entered = std::time::Instant::now();
        wiring::apply(&w2).map(|applied| (applied, entered.elapsed()))
    })
    .map_err(|e| netns_err("wiring the pod's network namespace failed", e))?;
    timing::record("pod netlink and sysctls", inside);
    timing::record("netns enter", called.elapsed().saturating_sub(inside));
    let undo_netns = || {
        let (w, applied) = (w.clone(), applied.clone());
        if let Err(e) = in_netns(&netns, move || wiring::undo(&w, &applied)) {
            tracing::error!(error = %e, "undoing the pod's netns wiring failed");
        }
        let _ = pod_state::remove(&conf.state_dir, &env.container_id);
    };
    tracing::debug!(?applied.link, "pod netns wired");
    let Some(host_ifindex) = applied.link.peer_ifindex else {
        undo_netns();
        return Err(not_a_veth(env));
    };
    if let Err(e) = timing::phase("pod state", || {
        pod_state::save(&conf.state_dir, &env.container_id, &applied.saved_sysctls())
    }) {
        undo_netns();
        return Err(
            CniError::new(code::IO_FAILURE, "saving the pod's state failed")
                .with_details(format!("{e:#}")),
        );
    }
    let attachment = PodAttachment {
        container_id: env.container_id.clone(),
        host_veth_ifindex: host_ifindex,
        pod_private_ip: pod.first_v4().unwrap_or(Ipv4Addr::UNSPECIFIED),
        slice: Some(slice.clone()),
    };
    // The source filter is in place before the first port steers to the pod.
    let attached = dp.attach_pod_with_sources(&attachment, allowed_sources);
    record_datapath_steps(&dp);
    if let Err(e) = attached {
        // attach_pod undoes its own partial work; ours is the netns.
        undo_netns();
        return Err(datapath_err(
            &format!("attaching slice {} to the datapath failed", slice.slice_key),
            e,
        ));
    }
    if let Some(ports) = outside_pool(conf, slice)
        && let Err(e) = reserved_ports::reserve(&ports)
    {
        let _ = dp.detach_pod(&env.container_id, Some(host_ifindex));
        undo_netns();
        return Err(CniError::new(
            code::DATAPATH,
            format!("reserving ports {ports} on the node failed"),
        )
        .with_details(format!("{e:#}")));
    }
    tracing::info!(slice = %slice.slice_key, range = %slice.range, host_ifindex, "slice pod wired");
    Ok(())
}

/// The slice's ports outside the pool (an exact reservation), which the node must keep out of
/// its own ephemeral ports while the pod runs; `None` when all are in the pool (the daemon
/// reserves it) or the config names no pool.
pub fn outside_pool(conf: &PluginConfig, slice: &SliceBinding) -> Option<RangeSet> {
    let pool = conf.pool.as_ref()?;
    let outside = RangeSet::new([slice.range]).subtract(pool);
    (!outside.is_empty()).then_some(outside)
}

/// The node's own ports are never a slice's, whatever the PortSlice, a static slice or CNI_ARGS
/// say: the operator refuses them too, this is the node's own line.
fn refuse_node_critical(conf: &PluginConfig, slice: &SliceBinding) -> Result<(), CniError> {
    match conf.critical.overlap(&slice.range) {
        None => Ok(()),
        Some(hit) => Err(CniError::new(
            code::FORBIDDEN_PORTS,
            format!(
                "slice {}: {}",
                slice.slice_key,
                NodeCritical::refusal(&slice.range, hit)
            ),
        )),
    }
}

/// A host process listening on a slice port would lose its traffic to the pod (steering runs
/// before the host's socket lookup, on every node address): this node refuses the slice while it
/// listens.
fn refuse_host_listeners(slice: &SliceBinding, node: &NodeAddrs) -> Result<(), CniError> {
    let taken = listeners::taken_by(
        &listeners::host_listeners(),
        &slice.range,
        &slice.protocols,
        node,
    );
    let Some(first) = taken.first() else {
        return Ok(());
    };
    let shown: Vec<String> = taken
        .iter()
        .take(5)
        .map(|l| format!("{:?}/{}", l.protocol, l.port))
        .collect();
    Err(CniError::new(
        code::HOST_PORT_IN_USE,
        format!(
            "slice {}: a host process on this node listens on {} (of ports {})",
            slice.slice_key,
            shown.join(", "),
            slice.range
        ),
    )
    .with_details(format!(
        "the node keeps its own listeners; move the process off port {} or run the slice's pods on other nodes",
        first.port
    )))
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
