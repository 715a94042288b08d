//! Prometheus metrics. Pool gauges are set from the allocation table after every change; the
//! rest are counted where things happen.
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::allocator::PoolStats;
use portslice_crds::conditions;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pool_size: Gauge,
    pool_used: Gauge,
    pool_free: Gauge,
    slices_held: Gauge,
    pub allocations: Counter,
    pub releases: Counter,
    pub waiting: Family<OutcomeLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub overlaps_detected: Counter,
    pub leader: Gauge,
    pub publish_writes: Family<PublishLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portslice");
        let m = Self {
            pool_size: Gauge::default(),
            pool_used: Gauge::default(),
            pool_free: Gauge::default(),
            slices_held: Gauge::default(),
            allocations: Counter::default(),
            releases: Counter::default(),
            waiting: Family::default(),
            reconcile_errors: Family::default(),
            // 1 ms .. ~16 s
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            overlaps_detected: Counter::default(),
            leader: Gauge::default(),
            publish_writes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "publish_writes",
            "Writes of slices' ConfigMaps, Services and EndpointSlices, by kind",
            m.publish_writes.clone(),
        );
        registry.register(
            "pool_size_ports",
            "Ports in the allocation pool",
            m.pool_size.clone(),
        );
        registry.register(
            "pool_used_ports",
            "Pool ports held by a slice",
            m.pool_used.clone(),
        );
        registry.register(
            "pool_free_ports",
            "Pool ports free to allocate",
            m.pool_free.clone(),
        );
        registry.register(
            "slices_holding_ranges",
            "Slices that hold a range",
            m.slices_held.clone(),
        );
        registry.register("allocations", "Ranges handed out", m.allocations.clone());
        registry.register(
            "releases",
            "Ranges freed after deletion, drain and quarantine",
            m.releases.clone(),
        );
        registry.register(
            "waiting",
            "Allocation attempts that had to wait, by reason",
            m.waiting.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by error",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "overlaps_detected",
            "Statuses found overlapping another slice's range when rebuilding (should stay 0)",
            m.overlaps_detected.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        // Every series a dashboard or alert asks for exists from the start, at zero: an absent
        // series reads as "no data" rather than "none", and rate() misses the first increment.
        for reason in [
            conditions::REASON_POOL_EXHAUSTED,
            conditions::REASON_CONFLICT,
            conditions::REASON_QUOTA_EXCEEDED,
        ] {
            let _ = m.waiting.get_or_create(&OutcomeLabels { reason });
        }
        for error in ["conflict", "write_status", "publish", "fenced"] {
            let _ = m.reconcile_errors.get_or_create(&ErrorLabels { error });
        }
        Self { registry, ..m }
    }

    pub fn set_pool(&self, stats: PoolStats, held: usize) {
        self.pool_size.set(i64::from(stats.size));
        self.pool_used.set(i64::from(stats.used));
        self.pool_free.set(i64::from(stats.free));
        self.slices_held
            .set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_pool_and_reconcile_metrics() {
        let m = Metrics::new();
        m.set_pool(
            PoolStats {
                size: 100,
                used: 30,
                free: 70,
            },
            3,
        );
        m.allocations.inc();
        m.reconcile_errors
            .get_or_create(&ErrorLabels { error: "kube" })
            .inc();
        m.observe_reconcile(Duration::from_millis(3));
        let text = m.encode().unwrap();
        for needle in [
            "portslice_waiting_total{reason=\"PoolExhausted\"} 0",
            "portslice_reconcile_errors_total{error=\"publish\"} 0",
            "portslice_pool_size_ports 100",
            "portslice_pool_used_ports 30",
            "portslice_pool_free_ports 70",
            "portslice_allocations_total 1",
            "portslice_reconcile_errors_total{error=\"kube\"} 1",
            "portslice_reconcile_duration_seconds_count 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
