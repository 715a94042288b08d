//! Every privileged test of the node side, in one binary (one link of the test kit and the
//! dependencies instead of one per suite). The suites are modules, so `cargo test --test node --
//! chain::` runs one; each builds network namespaces of its own and tears them down.
//!
//! Needs root: a test that cannot run fails, unless `PORTSLICE_SKIP_PRIVILEGED=1` asks to skip it
//! (and then it says so).
//!
//! - `protocol`: the CNI protocol at the process boundary (codes, versions, pass-through);
//! - `chain`: the plugin behind ptp/bridge at every CNI version, through cnitool and podman;
//! - `kube`: slices read from a real kube-apiserver (`KUBECONFIG`, started by test-datapath.sh);
//! - `cni_matrix`: every row of the connectivity matrix with pods made by the CNI chain;
//! - `veth_matrix`: the same rows with plain veths, plus PMTU and zero conntrack;
//! - `veth_matrix6`, `cni_matrix6`: every row on an IPv6-only node, on both pod paths;
//! - `dual_stack`: a node with both families: one slice pod on both addresses, pods of one family;
//! - `daemon`: the node daemon (install/uninstall, restart mid-transfer, metrics, reconcile);
//! - `clsact`: the fallback attach mode for kernels without tcx;
//! - `node_ports`: the node's own ports and listeners, reserved ports, restored sysctls, the lock;
//! - `hardening`: ICMP errors only about own flows, per-pod fragment/echo state, allowed sources;
//! - `upgrade`: a node pinned by the first release (datapath layout 1) taken over by this build.
mod chain;
mod clsact;
mod cni_matrix;
mod cni_matrix6;
mod daemon;
mod dual_stack;
mod hardening;
mod kube;
mod node_ports;
mod protocol;
mod upgrade;
mod veth_matrix;
mod veth_matrix6;
