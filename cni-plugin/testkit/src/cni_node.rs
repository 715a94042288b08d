//! A node whose pods are all created by the real CNI chain (ptp or bridge + host-local, then
//! `portslice`), for the matrix rows on the CNI path: the topology and its daemon, the conflist,
//! and every pod added through it (each DEL'd on Drop, as the runtime would).
use std::process::Command;

use crate::runtime::{CniPod, Conflist, Invocation, Runtime, TempDir, portslice_conf};
use crate::{Netns, Stack, Topology, unique};

/// The primary plugin of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Primary {
    Ptp,
    Bridge,
}

pub struct CniNode {
    pub ipam: TempDir,
    pub list: Conflist,
    pub pods: Vec<CniPod>,
    /// The bridge of a [`Primary::Bridge`] chain, removed on Drop.
    bridge: Option<String>,
    pub t: Topology,
}

impl CniNode {
    /// An IPv4 node behind ptp (as before dual stack).
    #[allow(clippy::new_without_default)] // builds namespaces and starts a daemon: not a default
    pub fn new() -> Self {
        Self::with(Stack::V4, Primary::Ptp)
    }

    /// A node of `stack` (its daemon shares the node addresses of `stack`) whose pods get
    /// addresses of `stack` from `primary` + host-local.
    pub fn with(stack: Stack, primary: Primary) -> Self {
        Self::with_pods(stack, stack, primary)
    }

    /// A node of `node` whose pods get addresses of `pods` (e.g. IPv6-only pods on a dual-stack
    /// node).
    pub fn with_pods(node: Stack, pods: Stack, primary: Primary) -> Self {
        let t = Topology::new_with(node);
        let ipam = TempDir::new("ipam");
        let (list, bridge) = match primary {
            Primary::Ptp => (
                Conflist::ptp_with("1.0.0", &ipam.0, portslice_conf(&t), pods),
                None,
            ),
            Primary::Bridge => {
                let bridge = format!("psb{}", unique());
                let list =
                    Conflist::bridge_with("1.0.0", &ipam.0, &bridge, portslice_conf(&t), pods);
                (list, Some(bridge))
            }
        };
        Self {
            ipam,
            list,
            pods: Vec::new(),
            bridge,
            t,
        }
    }

    fn runtime(&self) -> Runtime<'_> {
        Runtime {
            node: &self.t.node,
            list: self.list.clone(),
        }
    }

    /// ADD a pod through the chain; `slice` as the runtime would give it (CNI_ARGS).
    pub fn add(&mut self, slice: Option<(u16, u16)>) -> usize {
        self.try_add(slice)
            .unwrap_or_else(|e| panic!("CNI ADD: {e:?}"))
    }

    /// [`add`](Self::add) that returns the failing invocation instead of panicking (the pod is
    /// then not kept).
    pub fn try_add(&mut self, slice: Option<(u16, u16)>) -> Result<usize, Invocation> {
        let args = slice
            .map(|(a, b)| format!("PORTSLICE_RANGE={a}-{b}"))
            .unwrap_or_default();
        let mut pod = CniPod::new(&args);
        let added = self.runtime().add(&mut pod);
        if let Err(inv) = added {
            let _ = self.runtime().del(&pod);
            return Err(inv);
        }
        self.pods.push(pod);
        Ok(self.pods.len() - 1)
    }

    pub fn ns(&self, i: usize) -> &Netns {
        &self.pods[i].ns
    }

    /// CHECK through the whole chain for pod `i`.
    pub fn check(&self, i: usize) -> Result<(), Invocation> {
        self.runtime().check(&self.pods[i])
    }
}

impl Drop for CniNode {
    fn drop(&mut self) {
        let rt = self.runtime();
        for pod in &self.pods {
            let _ = rt.del(pod);
        }
        if let Some(b) = &self.bridge {
            let _ = Command::new("ip")
                .args(["-n", &self.t.node.name, "link", "del", b])
                .status();
        }
    }
}
