//! Named checks with honest outcomes. A check passes, fails with the reason, or is not run
//! (skipped by request, or because a check it depends on failed) — never silently green.
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    NotRun(String),
}

#[derive(Debug, Default)]
pub struct Report {
    results: Vec<(String, Outcome, Duration)>,
    skip: Vec<String>,
}

impl Report {
    /// `skip`: check names not to run (from `PORTSLICE_E2E_SKIP`, comma-separated).
    pub fn new(skip: &str) -> Self {
        let skip = skip
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        Report {
            results: Vec::new(),
            skip,
        }
    }

    /// Runs one check, prints and records its outcome; true when it passed.
    pub async fn check<F, Fut>(&mut self, name: &str, f: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        if self.skip.iter().any(|s| s == name) {
            self.not_run(name, "skipped by PORTSLICE_E2E_SKIP");
            return false;
        }
        eprintln!("[e2e] check {name} ...");
        let start = Instant::now();
        let outcome = match f().await {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(format!("{e:#}")),
        };
        let took = start.elapsed();
        match &outcome {
            Outcome::Pass => eprintln!("[e2e] check {name}: ok ({:.1}s)", took.as_secs_f64()),
            Outcome::Fail(why) => eprintln!(
                "[e2e] check {name}: FAILED ({:.1}s): {why}",
                took.as_secs_f64()
            ),
            Outcome::NotRun(_) => {}
        }
        let passed = outcome == Outcome::Pass;
        self.results.push((name.to_string(), outcome, took));
        passed
    }

    /// Runs `name` only when every check in `needs` has passed; otherwise records it as not run,
    /// naming the first that did not. Dependencies are by name, so reordering the scenario
    /// cannot skip the wrong checks.
    pub async fn check_after<F, Fut>(&mut self, name: &str, needs: &[&str], f: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        if let Some(missing) = needs.iter().find(|n| !self.passed_check(n)) {
            self.not_run(name, &format!("needs {missing}, which did not pass"));
            return false;
        }
        self.check(name, f).await
    }

    /// Whether the check `name` ran and passed.
    pub fn passed_check(&self, name: &str) -> bool {
        self.results
            .iter()
            .any(|(n, o, _)| n == name && *o == Outcome::Pass)
    }

    pub fn not_run(&mut self, name: &str, why: &str) {
        eprintln!("[e2e] check {name}: not run: {why}");
        self.results.push((
            name.to_string(),
            Outcome::NotRun(why.to_string()),
            Duration::ZERO,
        ));
    }

    pub fn failed(&self) -> usize {
        self.results
            .iter()
            .filter(|(_, o, _)| matches!(o, Outcome::Fail(_)))
            .count()
    }

    pub fn passed(&self) -> usize {
        self.results
            .iter()
            .filter(|(_, o, _)| *o == Outcome::Pass)
            .count()
    }

    /// The summary table; the last line is the one CI logs quote.
    pub fn summary(&self) -> String {
        let mut out = String::from("[e2e] summary\n");
        for (name, outcome, took) in &self.results {
            let (word, why) = match outcome {
                Outcome::Pass => ("ok", String::new()),
                Outcome::Fail(w) => ("FAILED", format!("  {}", w.lines().next().unwrap_or(""))),
                Outcome::NotRun(w) => ("not run", format!("  {w}")),
            };
            out += &format!("  {word:<8} {:>6.1}s  {name}{why}\n", took.as_secs_f64());
        }
        let not_run = self.results.len() - self.passed() - self.failed();
        out += &format!(
            "[e2e] {} passed, {} failed, {} not run",
            self.passed(),
            self.failed(),
            not_run
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_each_outcome_and_honours_skips() {
        let mut r = Report::new("b");
        assert!(r.check("a", || async { Ok(()) }).await);
        assert!(
            !r.check("b", || async { Ok(()) }).await,
            "a skipped check never passes"
        );
        assert!(!r.check("c", || async { anyhow::bail!("boom") }).await);
        r.not_run("d", "needs c");
        assert!(!r.check_after("e", &["a", "c"], || async { Ok(()) }).await);
        assert!(r.summary().contains("needs c, which did not pass"));
        assert!(r.check_after("f", &["a"], || async { Ok(()) }).await);
        assert_eq!((r.passed(), r.failed()), (2, 1));
        assert!(r.summary().ends_with("2 passed, 1 failed, 3 not run"));
        assert!(r.summary().contains("FAILED") && r.summary().contains("boom"));
    }
}
