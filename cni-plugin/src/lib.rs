//! PortSlice's node side: a chained CNI plugin that gives slice pods the node address and a node
//! daemon that owns the eBPF port steering. One binary, `portslice`, runs as either. The eBPF
//! datapath is `portslice-datapath`, the work inside a pod's netns `portslice-netns`.
#![deny(rust_2018_idioms)]

/// CNI protocol: spec types, configuration, results, errors and the verbs.
pub mod cni;
/// Node daemon: install into the conflist, load/attach/pin eBPF, reserve ports, reconcile, metrics.
pub mod daemon;
/// What the plugin and the daemon share on the node: the verb lock, reserved ports, pod state.
pub mod node;
/// Where a pod's slice and range come from: CNI args, config, API server, node cache.
pub mod slice_source;
