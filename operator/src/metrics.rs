//! Prometheus metrics of the operator.

use std::time::Duration;

use livepatch_api::TargetCounts;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// Labels of `livepatch_reconcile_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error kind (`Error::kind`).
    pub kind: String,
}

/// Labels of `livepatch_targets`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub namespace: String,
    pub livepatch: String,
    /// patched, pending, failed, blocked, restart_required, reverted.
    pub phase: String,
}

/// The operator's metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// `livepatch_reconciles_total`: reconciles started.
    pub reconciles: Counter,
    /// `livepatch_reconcile_errors_total{kind}`: failed reconciles, by error kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// `livepatch_reconcile_duration_seconds`.
    pub duration: Histogram,
    /// `livepatch_targets{namespace,livepatch,phase}`: target pods per LivePatch and phase.
    pub targets: Family<TargetLabels, Gauge>,
    /// `livepatch_leader`: 1 while this replica holds the Lease (or runs without election).
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let targets = Family::<TargetLabels, Gauge>::default();
        let leader = Gauge::default();
        registry.register("livepatch_reconciles", "LivePatch reconciles started", reconciles.clone());
        registry.register("livepatch_reconcile_errors", "Failed LivePatch reconciles, by error kind", errors.clone());
        registry.register("livepatch_reconcile_duration_seconds", "Time spent in one reconcile", duration.clone());
        registry.register("livepatch_targets", "Target pods of each LivePatch, by phase", targets.clone());
        registry.register("livepatch_leader", "1 while this replica is the leader", leader.clone());
        Self { registry, reconciles, errors, duration, targets, leader }
    }
}

const PHASES: [&str; 6] = ["patched", "pending", "failed", "blocked", "restart_required", "reverted"];

impl Metrics {
    /// Count an error of this kind.
    pub fn error(&self, kind: &str) {
        self.errors.get_or_create(&ErrorLabels { kind: kind.to_string() }).inc();
    }

    /// Observe one reconcile's duration.
    pub fn observe(&self, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Set the targets-by-phase gauges of one LivePatch.
    pub fn set_targets(&self, namespace: &str, livepatch: &str, counts: &TargetCounts) {
        let values = [
            counts.patched,
            counts.pending,
            counts.failed,
            counts.blocked,
            counts.restart_required,
            counts.reverted,
        ];
        for (phase, value) in PHASES.iter().zip(values) {
            self.targets.get_or_create(&labels(namespace, livepatch, phase)).set(i64::from(value));
        }
    }

    /// Forget a LivePatch that is gone.
    pub fn forget(&self, namespace: &str, livepatch: &str) {
        for phase in PHASES {
            self.targets.remove(&labels(namespace, livepatch, phase));
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        livepatch_runtime::metrics::encode(&self.registry)
    }
}

fn labels(namespace: &str, livepatch: &str, phase: &str) -> TargetLabels {
    TargetLabels {
        namespace: namespace.to_string(),
        livepatch: livepatch.to_string(),
        phase: phase.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_metric() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.error("kube_api");
        m.observe(Duration::from_millis(20));
        m.set_targets("shop", "cart-fix", &TargetCounts { patched: 3, pending: 1, ..Default::default() });
        let text = m.encode();
        assert!(text.contains("livepatch_reconciles_total 1"), "{text}");
        assert!(text.contains("livepatch_reconcile_errors_total{kind=\"kube_api\"} 1"), "{text}");
        assert!(text.contains("livepatch_targets{namespace=\"shop\",livepatch=\"cart-fix\",phase=\"patched\"} 3"), "{text}");
        assert!(text.contains("livepatch_reconcile_duration_seconds_count 1"), "{text}");
        m.forget("shop", "cart-fix");
        assert!(!m.encode().contains("cart-fix"));
    }
}
