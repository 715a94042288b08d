//! CNI ADD/DEL latency, for the datapath benchmark (`tests/bench.rs` can
//! `mod cni_common;` and call [`measure`]). Times the `portslice` invocation alone (the chained
//! plugin's own cost, process start included) and the whole chain (ptp + host-local + portslice).

use std::time::Duration;

use crate::Topology;
use crate::runtime::{CniPod, Conflist, Invocation, Runtime, TIMINGS_ENV, TempDir, portslice_conf};

/// p50/p99 of one measurement, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone)]
pub struct CniLatency {
    pub runs: usize,
    /// `portslice` ADD of a slice pod (datapath attach + netns wiring).
    pub add: Percentiles,
    /// `portslice` DEL of that pod.
    pub del: Percentiles,
    /// The whole chain's ADD (ptp + host-local + portslice).
    pub chain_add: Percentiles,
    pub chain_del: Percentiles,
    /// Where `portslice` ADD spends its time, phase by phase (the plugin's own timings).
    pub add_phases: Vec<(String, Percentiles)>,
    pub del_phases: Vec<(String, Percentiles)>,
}

/// Samples per phase, in the order phases first appear; "other" is what no phase covers (exit,
/// output, logging set-up).
#[derive(Default)]
struct PhaseSamples(Vec<(String, Vec<Duration>)>);

impl PhaseSamples {
    fn add(&mut self, inv: &Invocation) {
        let line = inv
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix(TIMING_PREFIX))
            .unwrap_or_else(|| {
                panic!(
                    "no timings from {} {}: {}",
                    inv.plugin, inv.command, inv.stderr
                )
            });
        let phases: Vec<(String, f64)> =
            serde_json::from_str(line).expect("timings are [phase, ms] pairs");
        let mut covered = Duration::ZERO;
        for (phase, ms) in phases {
            let d = Duration::from_secs_f64(ms / 1e3);
            covered += d;
            self.push(phase, d);
        }
        self.push("other".into(), inv.elapsed.saturating_sub(covered));
    }

    fn push(&mut self, phase: String, d: Duration) {
        match self.0.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, v)) => v.push(d),
            None => self.0.push((phase, vec![d])),
        }
    }

    /// Percentiles per phase; "other" last. A phase missing from some runs counts as 0 there.
    fn percentiles(self, runs: usize) -> Vec<(String, Percentiles)> {
        let (mut phases, other): (Vec<_>, Vec<_>) =
            self.0.into_iter().partition(|(p, _)| p != "other");
        phases.extend(other);
        phases
            .into_iter()
            .map(|(p, mut v)| {
                v.resize(runs.max(v.len()), Duration::ZERO);
                (p, percentiles(v))
            })
            .collect()
    }
}

/// The plugin's timings line prefix (`portslice_cni::cni::timing::PREFIX`).
const TIMING_PREFIX: &str = "portslice-timings ";

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
/// the topology `t` (which must have its daemon running). `attach_mode` forces the plugin's
/// program attachment (`tcx` or `clsact`); `None` lets it choose.
pub fn measure(t: &Topology, runs: usize, attach_mode: Option<&str>) -> CniLatency {
    let ipam = TempDir::new("ipam");
    let rt = Runtime {
        node: &t.node,
        list: Conflist::ptp("1.0.0", &ipam.0, portslice_conf(t)),
    };
    let (mut add, mut del, mut chain_add, mut chain_del) = (vec![], vec![], vec![], vec![]);
    let (mut add_phases, mut del_phases) = (PhaseSamples::default(), PhaseSamples::default());
    for _ in 0..runs {
        let mut pod = CniPod::new("PORTSLICE_RANGE=41000-41099");
        pod.extra_env.push((TIMINGS_ENV.into(), "1".into()));
        if let Some(mode) = attach_mode {
            pod.extra_env
                .push(("PORTSLICE_ATTACH_MODE".into(), mode.into()));
        }
        let start = std::time::Instant::now();
        // ptp first (as the chain would), then time portslice alone.
        let prev = rt.add_primary(&mut pod);
        let inv = rt.exec_last(&pod, "ADD", Some(&prev));
        assert!(inv.ok(), "portslice ADD: {inv:?}");
        chain_add.push(start.elapsed());
        add.push(inv.elapsed);
        add_phases.add(&inv);
        pod.result = Some(inv.json());
        let start = std::time::Instant::now();
        let inv = rt.exec_last(&pod, "DEL", pod.result.as_ref());
        assert!(inv.ok(), "portslice DEL: {inv:?}");
        del.push(inv.elapsed);
        del_phases.add(&inv);
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
        add_phases: add_phases.percentiles(runs),
        del_phases: del_phases.percentiles(runs),
    }
}

/// A markdown table of ADD and DEL phase by phase: p50 and p99 in ms.
pub fn breakdown_table(l: &CniLatency) -> String {
    let mut names: Vec<&str> = l.add_phases.iter().map(|(p, _)| p.as_str()).collect();
    for (p, _) in &l.del_phases {
        if !names.contains(&p.as_str()) {
            names.insert(names.len().saturating_sub(1), p);
        }
    }
    let get = |v: &[(String, Percentiles)], name: &str| {
        v.iter()
            .find(|(p, _)| p == name)
            .map_or("".to_string(), |(_, q)| {
                format!("{:.2} | {:.2}", q.p50_ms, q.p99_ms)
            })
    };
    let cell = |s: String| if s.is_empty() { "- | -".to_string() } else { s };
    let mut out = String::from(
        "| phase | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms |\n|---|---:|---:|---:|---:|\n",
    );
    for name in names {
        out.push_str(&format!(
            "| {name} | {} | {} |\n",
            cell(get(&l.add_phases, name)),
            cell(get(&l.del_phases, name))
        ));
    }
    out.push_str(&format!(
        "| **total** (the plugin process) | {:.2} | {:.2} | {:.2} | {:.2} |\n",
        l.add.p50_ms, l.add.p99_ms, l.del.p50_ms, l.del.p99_ms
    ));
    out
}
