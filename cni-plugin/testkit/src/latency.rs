//! CNI ADD/DEL latency, for the datapath benchmark (`tests/bench.rs` can
//! `mod cni_common;` and call [`measure`]). Times the `portslice` invocation alone (the chained
//! plugin's own cost, process start included) and the whole chain (ptp + host-local + portslice).

use std::time::Duration;

use crate::Topology;
use crate::runtime::{CniPod, Conflist, Runtime, TempDir, portslice_conf};

/// p50/p99 of one measurement, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct CniLatency {
    pub runs: usize,
    /// `portslice` ADD of a slice pod (datapath attach + netns wiring).
    pub add: Percentiles,
    /// `portslice` DEL of that pod.
    pub del: Percentiles,
    /// The whole chain's ADD (ptp + host-local + portslice).
    pub chain_add: Percentiles,
    pub chain_del: Percentiles,
}

pub fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    Percentiles {
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

/// Runs `runs` ADD/DEL cycles of a slice pod (static range from CNI_ARGS, so no API server) in
/// the topology `t` (which must have its daemon running).
pub fn measure(t: &Topology, runs: usize) -> CniLatency {
    let ipam = TempDir::new("ipam");
    let rt = Runtime {
        node: &t.node,
        list: Conflist::ptp("1.0.0", &ipam.0, portslice_conf(t)),
    };
    let (mut add, mut del, mut chain_add, mut chain_del) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let mut pod = CniPod::new("PORTSLICE_RANGE=41000-41099");
        let start = std::time::Instant::now();
        // ptp first (as the chain would), then time portslice alone.
        let prev = rt.add_primary(&mut pod);
        let inv = rt.exec_last(&pod, "ADD", Some(&prev));
        assert!(inv.ok(), "portslice ADD: {inv:?}");
        chain_add.push(start.elapsed());
        add.push(inv.elapsed);
        pod.result = Some(inv.json());
        let start = std::time::Instant::now();
        let inv = rt.exec_last(&pod, "DEL", pod.result.as_ref());
        assert!(inv.ok(), "portslice DEL: {inv:?}");
        del.push(inv.elapsed);
        let ptp = rt.exec_at(0, &pod, "DEL", pod.result.as_ref());
        assert!(ptp.ok(), "ptp DEL: {ptp:?}");
        chain_del.push(start.elapsed());
    }
    CniLatency {
        runs,
        add: percentiles(add),
        del: percentiles(del),
        chain_add: percentiles(chain_add),
        chain_del: percentiles(chain_del),
    }
}
