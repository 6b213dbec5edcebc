//! Prometheus metrics of the agent.

use std::time::Duration;

use livepatch_api::TargetPhase;
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

/// Labels with one `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Labels with one `phase`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

/// Labels with one `action`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
}

pub struct Metrics {
    registry: Registry,
    /// `livepatch_agent_tasks{phase}`: tasks of this node by the phase of their status
    /// (`None` when the agent has not written one yet).
    pub tasks: Family<PhaseLabels, Gauge>,
    /// `livepatch_agent_reconciles_total`.
    pub reconciles: Counter,
    /// `livepatch_agent_errors_total{kind}`.
    pub errors: Family<KindLabels, Counter>,
    /// `livepatch_agent_engine_duration_seconds{action}`: one apply or revert of one process.
    pub engine_duration: Family<ActionLabels, Histogram, fn() -> Histogram>,
    /// `livepatch_agent_pause_seconds`: how long a process was stopped for the switch.
    pub pause: Histogram,
}

pub const PHASES: [&str; 7] = ["None", "Pending", "Applied", "Failed", "Blocked", "RestartRequired", "Reverted"];

pub fn phase_name(phase: Option<TargetPhase>) -> &'static str {
    match phase {
        None => "None",
        Some(TargetPhase::Pending) => "Pending",
        Some(TargetPhase::Applied) => "Applied",
        Some(TargetPhase::Failed) => "Failed",
        Some(TargetPhase::Blocked) => "Blocked",
        Some(TargetPhase::RestartRequired) => "RestartRequired",
        Some(TargetPhase::Reverted) => "Reverted",
    }
}

/// Buckets from 1 ms to about 1.5 min (a Trap wait may take the whole timeout).
fn engine_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.8, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let tasks = Family::<PhaseLabels, Gauge>::default();
        let reconciles = Counter::default();
        let errors = Family::<KindLabels, Counter>::default();
        let engine_duration = Family::<ActionLabels, Histogram, fn() -> Histogram>::new_with_constructor(engine_histogram);
        let pause = Histogram::new(exponential_buckets(0.000_01, 3.0, 12));
        registry.register("livepatch_agent_tasks", "LivePatchTasks of this node, by the phase of their status", tasks.clone());
        registry.register("livepatch_agent_reconciles", "Task reconciles started", reconciles.clone());
        registry.register("livepatch_agent_errors", "Errors, by kind", errors.clone());
        registry.register(
            "livepatch_agent_engine_duration_seconds",
            "Time of one engine apply or revert on one process",
            engine_duration.clone(),
        );
        registry.register("livepatch_agent_pause_seconds", "Time a process was stopped for the switch", pause.clone());
        for phase in PHASES {
            tasks.get_or_create(&PhaseLabels { phase: phase.into() }).set(0);
        }
        Self { registry, tasks, reconciles, errors, engine_duration, pause }
    }
}

impl Metrics {
    pub fn error(&self, kind: &str) {
        self.errors.get_or_create(&KindLabels { kind: kind.into() }).inc();
    }

    pub fn observe_engine(&self, action: &str, elapsed: Duration, pause_us: u64) {
        self.engine_duration.get_or_create(&ActionLabels { action: action.into() }).observe(elapsed.as_secs_f64());
        self.pause.observe(pause_us as f64 / 1e6);
    }

    /// Set the tasks-by-phase gauges from the phases of all current tasks.
    pub fn set_tasks(&self, phases: impl IntoIterator<Item = Option<TargetPhase>>) {
        let mut counts = [0i64; PHASES.len()];
        for p in phases {
            let name = phase_name(p);
            let i = PHASES.iter().position(|x| *x == name).expect("every phase is listed");
            counts[i] += 1;
        }
        for (phase, n) in PHASES.iter().zip(counts) {
            self.tasks.get_or_create(&PhaseLabels { phase: phase.to_string() }).set(n);
        }
    }

    pub fn encode(&self) -> String {
        livepatch_runtime::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition() {
        let m = Metrics::default();
        m.set_tasks([Some(TargetPhase::Applied), Some(TargetPhase::Applied), None]);
        m.error("fetch");
        m.observe_engine("apply", Duration::from_millis(12), 80);
        let text = m.encode();
        assert!(text.contains("livepatch_agent_tasks{phase=\"Applied\"} 2"), "{text}");
        assert!(text.contains("livepatch_agent_tasks{phase=\"None\"} 1"), "{text}");
        assert!(text.contains("livepatch_agent_tasks{phase=\"Failed\"} 0"), "{text}");
        assert!(text.contains("livepatch_agent_errors_total{kind=\"fetch\"} 1"), "{text}");
        assert!(text.contains("livepatch_agent_engine_duration_seconds_count{action=\"apply\"} 1"), "{text}");
        assert!(text.contains("livepatch_agent_pause_seconds_count 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
