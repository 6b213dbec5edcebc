//! The reconcile paths, without a server: a tiny in-memory "API server" applies the plans, and
//! a fake agent writes task status.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::LabelSelector, jiff::Timestamp};
use livepatch_api::{
    KeyRef, LivePatchSpec, PatchBundle, Rollout, Safety, Strategy, TargetExecutable, DEFAULT_TIMEOUT_SECONDS,
};

use super::*;
use crate::pods::ContainerView;

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn livepatch(max_concurrent: i32) -> LivePatch {
    let mut lp = LivePatch::new(
        "cart-fix",
        LivePatchSpec {
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("app".into(), "cart".into())])),
                ..Default::default()
            },
            container: Some("cart".into()),
            target: TargetExecutable { build_id: "0123456789abcdef".into(), path: Some("/usr/local/bin/cart".into()) },
            patch: PatchBundle {
                config_map_ref: Some(KeyRef { name: "cart-fix".into(), key: "patch.lpatch".into() }),
                secret_ref: None,
                url: None,
                sha256: SHA.into(),
            },
            safety: Safety { strategy: Strategy::Trap, timeout_seconds: DEFAULT_TIMEOUT_SECONDS },
            rollout: Rollout { max_concurrent },
        },
    );
    lp.metadata.namespace = Some("shop".into());
    lp.metadata.uid = Some("lp-uid-1".into());
    lp.metadata.generation = Some(1);
    lp
}

fn pod(name: &str, node: &str, container_id: &str) -> PodView {
    PodView {
        name: name.into(),
        uid: format!("uid-{name}"),
        node: Some(node.into()),
        phase: Some("Running".into()),
        terminating: false,
        default_container: Some("sidecar".into()),
        containers: vec![
            ContainerView { name: "sidecar".into(), container_id: Some("containerd://side".into()), running: true },
            ContainerView { name: "cart".into(), container_id: Some(container_id.into()), running: true },
        ],
    }
}

/// The LivePatch, the pods, the tasks as an API server would keep them.
struct World {
    lp: LivePatch,
    pods: Vec<PodView>,
    other_pods: BTreeMap<String, PodView>,
    tasks: BTreeMap<String, LivePatchTask>,
    gone_nodes: BTreeSet<String>,
    now: i64,
}

impl World {
    fn new(max_concurrent: i32, pods: Vec<PodView>) -> Self {
        Self {
            lp: livepatch(max_concurrent),
            pods,
            other_pods: BTreeMap::new(),
            tasks: BTreeMap::new(),
            gone_nodes: BTreeSet::new(),
            now: 0,
        }
    }

    fn observed(&self) -> Observed {
        Observed {
            pods: self.pods.clone(),
            other_pods: self.other_pods.clone(),
            tasks: self.tasks.values().cloned().collect(),
            gone_nodes: self.gone_nodes.clone(),
        }
    }

    /// One reconcile: plan, then carry the plan out like the API server would (server-side apply
    /// bumps a task's generation when its spec changes and keeps its status).
    fn reconcile(&mut self) -> Plan {
        self.now += 10;
        let plan = if self.lp.metadata.deletion_timestamp.is_some() {
            plan_cleanup(&self.lp, &self.observed(), t(self.now))
        } else {
            plan_apply(&self.lp, &self.observed(), t(self.now))
        };
        for desired in &plan.apply {
            let name = desired.name_any();
            let mut task = desired.clone();
            match self.tasks.get(&name) {
                Some(old) => {
                    task.status = old.status.clone();
                    let generation = old.metadata.generation.unwrap();
                    task.metadata.generation = Some(if old.spec == task.spec { generation } else { generation + 1 });
                }
                None => task.metadata.generation = Some(1),
            }
            self.tasks.insert(name, task);
        }
        for name in &plan.delete {
            self.tasks.remove(name);
        }
        if self.lp.status.as_ref() != Some(&plan.status) {
            self.lp.status = Some(plan.status.clone());
        }
        plan
    }

    /// The agent reports on the task of `pod`.
    fn agent(&mut self, pod: &str, phase: TargetPhase, reason: Option<&str>) {
        let task = self.tasks.get_mut(&task_name("cart-fix", pod)).expect("task exists");
        task.status = Some(LivePatchTaskStatus {
            observed_generation: task.metadata.generation,
            phase,
            container_id: Some(task.spec.container_id.clone()),
            pids: vec![42],
            attempts: 1,
            reason: reason.map(str::to_string),
            message: reason.map(|r| format!("detail of {r}")),
            pause_micros: Some(120),
            patch_id: Some("p1".into()),
        });
    }

    fn status(&self) -> &LivePatchStatus {
        self.lp.status.as_ref().unwrap()
    }

    fn condition(&self, type_: &str) -> &Condition {
        self.status().conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn task(&self, pod: &str) -> &LivePatchTask {
        &self.tasks[&task_name("cart-fix", pod)]
    }
}

fn applied_pods(plan: &Plan) -> Vec<&str> {
    plan.apply.iter().map(|t| t.spec.pod_name.as_str()).collect()
}

fn reasons(plan: &Plan) -> Vec<&str> {
    plan.notes.iter().map(|n| n.reason.as_str()).collect()
}

fn three_pods() -> Vec<PodView> {
    vec![pod("cart-a", "node-1", "containerd://a1"), pod("cart-b", "node-2", "containerd://b1"), pod("cart-c", "node-1", "containerd://c1")]
}

#[test]
fn create_dispatches_within_the_rollout_limit() {
    let mut w = World::new(2, three_pods());
    let plan = w.reconcile();
    assert_eq!(applied_pods(&plan), ["cart-a", "cart-b"]);
    assert_eq!(reasons(&plan), ["Dispatched", "Dispatched"]);
    assert_eq!(plan.notes[0].note, "dispatched the patch to pod cart-a on node node-1");
    assert_eq!(plan.notes[1].pod, Some(("cart-b".to_string(), "uid-cart-b".to_string())));

    let task = w.task("cart-a");
    assert_eq!(task.spec.container_name, "cart");
    assert_eq!(task.spec.container_id, "containerd://a1");
    assert_eq!(task.spec.node_name, "node-1");
    assert_eq!(task.spec.action, TaskAction::Apply);
    assert_eq!(task.spec.live_patch_generation, 1);
    assert_eq!(task.spec.bundle.sha256, SHA);
    let labels = task.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[NODE_LABEL], "node-1");
    assert_eq!(labels[LIVEPATCH_LABEL], "cart-fix");
    let owner = &task.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("LivePatch", "lp-uid-1", Some(true)));

    let s = w.status();
    assert_eq!(s.phase, Some(LivePatchPhase::Progressing));
    assert_eq!((s.counts.targets, s.counts.pending, s.counts.patched), (3, 3, 0));
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(w.condition(PROGRESSING).status, "True");
    assert!(w.condition(PROGRESSING).message.contains("1 waiting for a rollout slot"));
    assert_eq!(w.condition(READY).status, "False");

    // Nothing reported yet: no slot frees up, nothing to do, nothing to write.
    let before = w.lp.status.clone();
    let plan = w.reconcile();
    assert!(plan.apply.is_empty() && plan.delete.is_empty() && plan.notes.is_empty());
    assert_eq!(Some(plan.status), before);

    // One agent reports: the third pod gets its slot.
    w.agent("cart-a", TargetPhase::Applied, None);
    let plan = w.reconcile();
    assert_eq!(applied_pods(&plan), ["cart-c"]);
    assert_eq!(w.status().counts.patched, 1);

    w.agent("cart-b", TargetPhase::Applied, None);
    w.agent("cart-c", TargetPhase::Applied, None);
    let plan = w.reconcile();
    assert!(plan.apply.is_empty());
    assert_eq!(reasons(&plan), ["Applied"]);
    let s = w.status();
    assert_eq!(s.phase, Some(LivePatchPhase::Applied));
    assert_eq!((s.counts.targets, s.counts.patched, s.counts.pending), (3, 3, 0));
    assert_eq!(w.condition(READY).status, "True");
    assert_eq!(w.condition(READY).reason, "AllTargetsPatched");
    assert_eq!(w.condition(PROGRESSING).status, "False");

    // Steady state: same status, lastTransitionTime kept, no events.
    let ready_since = w.condition(READY).last_transition_time.clone();
    let progressing_since = w.condition(PROGRESSING).last_transition_time.clone();
    let plan = w.reconcile();
    assert!(plan.apply.is_empty() && plan.notes.is_empty());
    assert_eq!(&plan.status, w.status());
    assert_eq!(w.condition(READY).last_transition_time, ready_since);
    assert_eq!(w.condition(PROGRESSING).last_transition_time, progressing_since);
    // Degraded has been False since the start.
    assert_eq!(w.condition(DEGRADED).last_transition_time.0, t(10));
}

fn all_applied(w: &mut World) {
    w.reconcile();
    let pods: Vec<String> = w.tasks.values().map(|t| t.spec.pod_name.clone()).collect();
    for p in pods {
        w.agent(&p, TargetPhase::Applied, None);
    }
    w.reconcile();
}

#[test]
fn scale_up_dispatches_to_the_new_pod() {
    let mut w = World::new(5, three_pods());
    all_applied(&mut w);
    assert_eq!(w.status().phase, Some(LivePatchPhase::Applied));
    w.pods.push(pod("cart-d", "node-3", "containerd://d1"));
    let plan = w.reconcile();
    assert_eq!(applied_pods(&plan), ["cart-d"]);
    assert_eq!(w.status().counts.targets, 4);
    assert_eq!(w.status().phase, Some(LivePatchPhase::Progressing));
    assert_eq!(w.task("cart-d").metadata.labels.as_ref().unwrap()[NODE_LABEL], "node-3");
}

#[test]
fn scale_down_deletes_the_task_of_a_deleted_pod() {
    let mut w = World::new(5, three_pods());
    all_applied(&mut w);
    w.pods.retain(|p| p.name != "cart-b");
    let plan = w.reconcile();
    assert!(plan.apply.is_empty());
    assert_eq!(plan.delete, [task_name("cart-fix", "cart-b")]);
    assert_eq!(w.status().counts.targets, 2);
    assert_eq!(w.status().phase, Some(LivePatchPhase::Applied));

    // A terminating pod is no target either: its processes are about to end.
    w.pods[0].terminating = true;
    let plan = w.reconcile();
    assert_eq!(plan.delete, [task_name("cart-fix", "cart-a")]);
}

#[test]
fn a_pod_no_longer_selected_is_reverted_then_released() {
    let mut w = World::new(5, three_pods());
    all_applied(&mut w);
    // cart-c loses its label: it is still running patched code.
    let c = w.pods.remove(2);
    w.other_pods.insert(c.name.clone(), c);
    let plan = w.reconcile();
    assert_eq!(applied_pods(&plan), ["cart-c"]);
    assert_eq!(plan.apply[0].spec.action, TaskAction::Revert);
    assert_eq!(reasons(&plan), ["RevertingTarget"]);
    assert_eq!(w.status().counts.targets, 2);
    assert!(w.condition(PROGRESSING).message.contains("no longer selected"));
    // Not yet reverted: nothing new.
    let plan = w.reconcile();
    assert!(plan.apply.is_empty() && plan.delete.is_empty());
    w.agent("cart-c", TargetPhase::Reverted, None);
    let plan = w.reconcile();
    assert_eq!(plan.delete, [task_name("cart-fix", "cart-c")]);
    assert_eq!(w.condition(PROGRESSING).status, "False");
}

#[test]
fn container_restart_redispatches_with_the_new_container_id() {
    let mut w = World::new(1, three_pods());
    // Roll out one at a time.
    for _ in 0..3 {
        w.reconcile();
        let pending: Vec<String> = w.tasks.values().filter(|t| t.status.is_none()).map(|t| t.spec.pod_name.clone()).collect();
        for p in pending {
            w.agent(&p, TargetPhase::Applied, None);
        }
    }
    w.reconcile();
    assert_eq!(w.status().phase, Some(LivePatchPhase::Applied));
    let generation = w.task("cart-b").metadata.generation;

    // cart-b's container restarts: new id, old code.
    w.pods[1].containers[1].container_id = Some("containerd://b2".into());
    let plan = w.reconcile();
    assert_eq!(applied_pods(&plan), ["cart-b"]);
    assert_eq!(reasons(&plan), ["Redispatched"]);
    assert!(plan.notes[0].note.contains("restarted"));
    let task = w.task("cart-b");
    assert_eq!(task.spec.container_id, "containerd://b2");
    assert_ne!(task.metadata.generation, generation);
    // The old report is about the old container: the target is pending again.
    assert_eq!(w.status().counts.patched, 2);
    assert_eq!(w.status().counts.pending, 1);
    assert_eq!(w.status().phase, Some(LivePatchPhase::Progressing));

    w.agent("cart-b", TargetPhase::Applied, None);
    w.reconcile();
    assert_eq!(w.status().phase, Some(LivePatchPhase::Applied));

    // While the container is down (crash, restart), the target waits and its task stays.
    w.pods[2].containers[1].running = false;
    let plan = w.reconcile();
    assert!(plan.apply.is_empty() && plan.delete.is_empty());
    assert_eq!(w.status().counts.pending, 1);
}

#[test]
fn partial_failure_degrades_and_warns_once() {
    let mut w = World::new(5, three_pods());
    w.reconcile();
    w.agent("cart-a", TargetPhase::Applied, None);
    w.agent("cart-b", TargetPhase::Failed, Some("BuildIDMismatch"));
    w.agent("cart-c", TargetPhase::Blocked, Some("ProcedureActive"));
    let plan = w.reconcile();
    assert_eq!(reasons(&plan), ["Degraded"]);
    assert!(plan.notes[0].warning);
    let s = w.status();
    assert_eq!(s.phase, Some(LivePatchPhase::Degraded));
    assert_eq!((s.counts.patched, s.counts.failed, s.counts.blocked, s.counts.pending), (1, 1, 1, 0));
    let degraded = w.condition(DEGRADED);
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "TargetsFailed"));
    assert!(degraded.message.contains("cart-b: Failed: detail of BuildIDMismatch"));
    assert!(degraded.message.contains("cart-c: Blocked"));
    assert_eq!(w.condition(READY).reason, "TargetsFailed");
    // No new event while it stays degraded; failed targets are not retried by the operator.
    let plan = w.reconcile();
    assert!(plan.notes.is_empty() && plan.apply.is_empty());
}

#[test]
fn restart_required_is_listed_with_the_reason() {
    let mut w = World::new(5, three_pods());
    w.reconcile();
    w.agent("cart-a", TargetPhase::Applied, None);
    w.agent("cart-b", TargetPhase::Applied, None);
    w.agent("cart-c", TargetPhase::RestartRequired, Some("DataLayoutChanged"));
    let plan = w.reconcile();
    assert_eq!(reasons(&plan), ["RestartRequired"]);
    let s = w.status();
    assert_eq!(s.phase, Some(LivePatchPhase::RestartRequired));
    assert_eq!(s.counts.restart_required, 1);
    assert_eq!(
        s.restart_required,
        [RestartRequiredTarget {
            pod: "cart-c".into(),
            node: "node-1".into(),
            reason: "DataLayoutChanged: detail of DataLayoutChanged".into()
        }]
    );
    assert_eq!(w.condition(RESTART_REQUIRED).status, "True");
    assert_eq!(w.condition(DEGRADED).status, "False");
}

#[test]
fn spec_change_updates_tasks_within_the_rollout_limit() {
    let mut w = World::new(2, three_pods());
    all_applied(&mut w);
    all_applied(&mut w);
    assert_eq!(w.status().phase, Some(LivePatchPhase::Applied));
    // A new bundle: generation 2.
    w.lp.spec.patch.sha256 = "a".repeat(64);
    w.lp.metadata.generation = Some(2);
    let plan = w.reconcile();
    assert_eq!(applied_pods(&plan), ["cart-a", "cart-b"]);
    assert!(plan.apply.iter().all(|t| t.spec.live_patch_generation == 2 && t.spec.bundle.sha256 == "a".repeat(64)));
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    assert_eq!(w.status().observed_generation, Some(2));
    assert_eq!(w.status().counts.pending, 3);
    assert_eq!(w.task("cart-c").spec.live_patch_generation, 1);

    // A change that does not concern the agents (the rollout limit) re-dispatches nothing.
    w.agent("cart-a", TargetPhase::Applied, None);
    w.agent("cart-b", TargetPhase::Applied, None);
    w.reconcile();
    w.agent("cart-c", TargetPhase::Applied, None);
    w.reconcile();
    w.lp.spec.rollout.max_concurrent = 3;
    w.lp.metadata.generation = Some(3);
    let plan = w.reconcile();
    assert!(plan.apply.is_empty());
    assert_eq!(w.status().observed_generation, Some(3));
    assert_eq!(w.status().phase, Some(LivePatchPhase::Applied));
}

#[test]
fn pods_that_cannot_be_targets_yet_or_ever() {
    let mut waiting = pod("cart-w", "node-1", "containerd://w1");
    waiting.containers[1].running = false;
    let mut unscheduled = pod("cart-u", "node-1", "");
    unscheduled.node = None;
    let mut wrong = pod("cart-x", "node-1", "containerd://x1");
    wrong.containers.remove(1);
    let mut done = pod("cart-done", "node-1", "containerd://d1");
    done.phase = Some("Succeeded".into());
    let mut w = World::new(5, vec![waiting, unscheduled, wrong, done]);
    let plan = w.reconcile();
    assert!(plan.apply.is_empty());
    let s = w.status();
    assert_eq!((s.counts.targets, s.counts.pending, s.counts.failed), (3, 2, 1));
    assert!(w.condition(DEGRADED).message.contains("cart-x: Failed: pod has no container \"cart\""));
}

#[test]
fn default_container_is_used_when_none_is_named() {
    let mut w = World::new(5, vec![pod("cart-a", "node-1", "containerd://a1")]);
    w.lp.spec.container = None;
    w.reconcile();
    assert_eq!(w.task("cart-a").spec.container_name, "sidecar");
    assert_eq!(w.task("cart-a").spec.container_id, "containerd://side");
}

#[test]
fn no_targets_is_pending() {
    let mut w = World::new(1, vec![]);
    let plan = w.reconcile();
    assert!(plan.apply.is_empty());
    assert_eq!(w.status().phase, Some(LivePatchPhase::Pending));
    assert_eq!(w.condition(READY).reason, "NoTargets");
}

fn deleting(w: &mut World) {
    w.lp.metadata.deletion_timestamp = Some(Time(t(1000)));
    w.lp.metadata.finalizers = Some(vec![livepatch_api::FINALIZER.into()]);
}

#[test]
fn delete_reverts_every_target_then_releases() {
    let mut w = World::new(5, three_pods());
    all_applied(&mut w);
    deleting(&mut w);
    let plan = w.reconcile();
    assert!(!plan.release);
    assert_eq!(applied_pods(&plan), ["cart-a", "cart-b", "cart-c"]);
    assert!(plan.apply.iter().all(|t| t.spec.action == TaskAction::Revert));
    assert_eq!(reasons(&plan), ["Reverting"]);
    let s = w.status();
    assert_eq!(s.phase, Some(LivePatchPhase::Reverting));
    assert_eq!((s.counts.targets, s.counts.pending, s.counts.reverted), (3, 3, 0));

    // Waiting: nothing more to apply.
    let plan = w.reconcile();
    assert!(!plan.release && plan.apply.is_empty());

    w.agent("cart-a", TargetPhase::Reverted, None);
    // cart-b's pod is gone, cart-c's node is gone for good.
    w.pods.retain(|p| p.name != "cart-b");
    w.gone_nodes.insert("node-1".into());
    // node-1 also holds cart-a, which is reverted anyway.
    let plan = w.reconcile();
    assert!(plan.release);
    assert_eq!(reasons(&plan), ["Released"]);
    assert_eq!(plan.status.counts.reverted, 3);
}

#[test]
fn delete_waits_for_a_failed_revert() {
    let mut w = World::new(5, vec![pod("cart-a", "node-1", "containerd://a1")]);
    all_applied(&mut w);
    deleting(&mut w);
    w.reconcile();
    w.agent("cart-a", TargetPhase::Failed, Some("RevertFailed"));
    let plan = w.reconcile();
    assert!(!plan.release);
    assert_eq!(plan.status.counts.failed, 1);
    assert_eq!(reasons(&plan), ["Degraded"]);
    assert_eq!(w.condition(DEGRADED).reason, "RevertFailed");
    let nodes = nodes_to_check(&w.observed());
    assert_eq!(nodes, BTreeSet::from(["node-1".to_string()]));
}

#[test]
fn forced_release_does_not_wait() {
    let mut w = World::new(5, three_pods());
    all_applied(&mut w);
    deleting(&mut w);
    w.lp.metadata.annotations = Some(BTreeMap::from([(FORCE_RELEASE_ANNOTATION.to_string(), "true".to_string())]));
    let plan = w.reconcile();
    assert!(plan.release);
    assert!(plan.apply.is_empty());
    assert_eq!(reasons(&plan), ["ForceReleased"]);
    assert!(plan.notes[0].warning);
}

#[test]
fn delete_before_anything_was_dispatched_releases_at_once() {
    let mut w = World::new(5, vec![]);
    deleting(&mut w);
    let plan = w.reconcile();
    assert!(plan.release);
}

#[test]
fn invalid_selector_is_reported_once() {
    let lp = livepatch(1);
    let plan = plan_invalid_selector(&lp, "bad operator", t(0));
    assert_eq!(plan.status.phase, Some(LivePatchPhase::Degraded));
    assert_eq!(reasons(&plan), ["InvalidSelector"]);
    let mut lp = lp;
    lp.status = Some(plan.status.clone());
    let again = plan_invalid_selector(&lp, "bad operator", t(5));
    assert!(again.notes.is_empty());
    assert_eq!(again.status, plan.status);
}

#[test]
fn task_names_fit() {
    assert_eq!(task_name("cart-fix", "cart-7d9f-abcde"), "cart-fix-cart-7d9f-abcde");
    let long_pod = format!("{}.{}", "p".repeat(190), "q".repeat(60));
    let name = task_name(&"l".repeat(63), &long_pod);
    assert_eq!(name.len(), 253);
    assert_eq!(name, task_name(&"l".repeat(63), &long_pod));
    assert!(name.chars().last().unwrap().is_ascii_alphanumeric());
    assert_ne!(name, task_name(&"l".repeat(63), &format!("{long_pod}x")));
}

#[test]
fn current_report_requires_the_current_generation_and_container() {
    let mut w = World::new(1, vec![pod("cart-a", "node-1", "containerd://a1")]);
    w.reconcile();
    w.agent("cart-a", TargetPhase::Applied, None);
    let mut task = w.task("cart-a").clone();
    assert!(current_report(&task).is_some());
    task.metadata.generation = Some(2);
    assert!(current_report(&task).is_none());
    task.metadata.generation = Some(1);
    task.spec.container_id = "containerd://other".into();
    assert!(current_report(&task).is_none());
}
