//! Wall time of the steps of the last attach or detach: the CNI benchmark's breakdown of where
//! ADD and DEL spend their time (map writes, interface sysctls, the program's link). Always on:
//! a clock read per step costs nanoseconds against milliseconds of work.

use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone)]
pub struct StepTimes(Vec<(&'static str, Duration)>);

impl StepTimes {
    /// Runs `f`, adding its wall time to `step`.
    pub(crate) fn time<T>(&mut self, step: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let elapsed = start.elapsed();
        match self.0.iter_mut().find(|(s, _)| *s == step) {
            Some((_, total)) => *total += elapsed,
            None => self.0.push((step, elapsed)),
        }
        out
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Duration)> + '_ {
        self.0.iter().copied()
    }
}
