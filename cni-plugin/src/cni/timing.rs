//! Where one CNI invocation's time goes, for the benchmark's ADD/DEL breakdown.
//!
//! Off unless `PORTSLICE_TIMINGS` is set; then each phase's wall time is recorded and `main`
//! prints one line `portslice-timings [["phase", ms], ...]` on stderr, in the order the phases
//! first ran (stdout belongs to the result). The variable's value is the CLOCK_REALTIME, in nanoseconds, at which the caller
//! spawned us: that is how "process start" (fork, exec, loading, runtime set-up) is measured from
//! the inside. A phase measured twice adds up.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The environment variable that turns timings on.
pub const ENV: &str = "PORTSLICE_TIMINGS";
/// The stderr line's prefix.
pub const PREFIX: &str = "portslice-timings ";

static ENABLED: OnceLock<bool> = OnceLock::new();
static PHASES: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

fn enabled() -> bool {
    *ENABLED.get_or_init(|| std::env::var_os(ENV).is_some())
}

/// Records `elapsed` under `phase`.
pub fn record(phase: &'static str, elapsed: Duration) {
    if !enabled() {
        return;
    }
    if let Ok(mut phases) = PHASES.lock() {
        match phases.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, total)) => *total += elapsed,
            None => phases.push((phase, elapsed)),
        }
    }
}

/// Runs `f`, recording its wall time under `phase`.
pub fn phase<T>(phase: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    record(phase, start.elapsed());
    out
}

/// At the top of `main`: the time since the caller spawned us, as "process start".
pub fn process_started() {
    let Some(spawned_ns) = std::env::var(ENV).ok().and_then(|v| v.parse::<u128>().ok()) else {
        return;
    };
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        let ns = now.as_nanos().saturating_sub(spawned_ns);
        record("process start", Duration::from_nanos(ns as u64));
    }
}

/// The stderr line, or `None` when timings are off.
pub fn report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let phases = PHASES.lock().ok()?;
    let list: Vec<(&str, f64)> = phases
        .iter()
        .map(|(p, d)| (*p, d.as_secs_f64() * 1e3))
        .collect();
    Some(format!("{PREFIX}{}", serde_json::json!(list)))
}
