//! The reconcile logic as plain functions over plain data: from a LivePatch, the pods it selects
//! and the tasks that exist, compute the tasks to apply or delete, the status, and the events.
//! No I/O here; `controller` reads the inputs from the API server and carries the plan out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{Resource, ResourceExt};
use livepatch_api::{
    LivePatch, LivePatchPhase, LivePatchStatus, LivePatchTask, LivePatchTaskSpec, LivePatchTaskStatus,
    RestartRequiredTarget, TargetCounts, TargetPhase, TaskAction, FORCE_RELEASE_ANNOTATION, LIVEPATCH_LABEL,
    MANAGED_BY_LABEL, NODE_LABEL, OPERATOR_NAME, Reason,
};
use sha2::{Digest, Sha256};

use crate::pods::{resolve, PodView, Target};

/// Condition types on a LivePatch.
pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const RESTART_REQUIRED: &str = "RestartRequired";

/// At most this many pods are named in a condition message.
const LISTED: usize = 5;

/// What the controller read for one LivePatch.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Pods of the namespace matching the selector.
    pub pods: Vec<PodView>,
    /// Pods that tasks refer to, that do not match the selector (any more) but still exist, by name.
    pub other_pods: BTreeMap<String, PodView>,
    /// The tasks of this LivePatch.
    pub tasks: Vec<LivePatchTask>,
    /// Nodes that tasks refer to and that no longer exist (read during cleanup only).
    pub gone_nodes: BTreeSet<String>,
}

/// An event to record on the LivePatch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    /// The event's reason, e.g. `Dispatched`.
    pub reason: Reason,
    /// What the operator did, e.g. `Dispatch`.
    pub action: String,
    pub note: String,
    /// The pod the event is about (name, uid): recorded as the event's `related` object.
    pub pod: Option<(String, String)>,
}

impl Note {
    fn normal(reason: Reason, action: &str, note: impl Into<String>) -> Self {
        Self { warning: false, reason, action: action.into(), note: note.into(), pod: None }
    }
    fn warning(reason: Reason, action: &str, note: impl Into<String>) -> Self {
        Self { warning: true, ..Self::normal(reason, action, note) }
    }
    fn about(self, spec: &LivePatchTaskSpec) -> Self {
        Self { pod: Some((spec.pod_name.clone(), spec.pod_uid.clone())), ..self }
    }
}

/// What to do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Tasks to create or update with server-side apply (complete desired objects).
    pub apply: Vec<LivePatchTask>,
    /// Names of tasks to delete.
    pub delete: Vec<String>,
    /// The LivePatch status to write (when it differs from the current one).
    pub status: LivePatchStatus,
    /// Events to record.
    pub notes: Vec<Note>,
    /// Cleanup only: every target is reverted or gone (or release is forced): drop the finalizer.
    pub release: bool,
}

/// The name of the task of `livepatch` for `pod`: `<livepatch>-<pod>`, shortened with a digest
/// when longer than a resource name may be.
pub fn task_name(livepatch: &str, pod: &str) -> String {
    let name = format!("{livepatch}-{pod}");
    if name.len() <= 253 {
        return name;
    }
    let digest = hex::encode(Sha256::digest(name.as_bytes()));
    let head = name[..242].trim_end_matches(['-', '.']);
    format!("{head}-{}", &digest[..10])
}

/// The agent's report on the task's current content, if it has made one: a status whose
/// `observedGeneration` is the task's generation (and that is about the same container).
pub fn current_report(task: &LivePatchTask) -> Option<&LivePatchTaskStatus> {
    let status = task.status.as_ref()?;
    let generation = task.metadata.generation?;
    let same_container = status.container_id.as_deref().is_none_or(|id| id == task.spec.container_id);
    (status.observed_generation == Some(generation) && same_container).then_some(status)
}

/// An `Apply` task whose agent has not reported a final outcome for its current content.
fn in_flight(task: &LivePatchTask) -> bool {
    task.spec.action == TaskAction::Apply && !current_report(task).is_some_and(|s| s.phase.is_settled_apply())
}

/// A `Revert` task whose agent reports the original code runs again.
fn is_reverted(task: &LivePatchTask) -> bool {
    task.spec.action == TaskAction::Revert && current_report(task).is_some_and(|s| s.phase == TargetPhase::Reverted)
}

/// Same work for the agent: everything but the generation it was derived from.
fn same_work(a: &LivePatchTaskSpec, b: &LivePatchTaskSpec) -> bool {
    LivePatchTaskSpec { live_patch_generation: 0, ..a.clone() } == LivePatchTaskSpec { live_patch_generation: 0, ..b.clone() }
}

/// The complete task object the operator applies.
fn task_object(lp: &LivePatch, name: String, spec: LivePatchTaskSpec) -> LivePatchTask {
    let mut owner = lp.controller_owner_ref(&()).expect("a LivePatch from the API server has a name and uid");
    owner.block_owner_deletion = Some(true);
    let labels = BTreeMap::from([
        (NODE_LABEL.to_string(), spec.node_name.clone()),
        (LIVEPATCH_LABEL.to_string(), lp.name_any()),
        (MANAGED_BY_LABEL.to_string(), OPERATOR_NAME.to_string()),
    ]);
    LivePatchTask {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: lp.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// The task spec for a ready target.
fn desired_spec(lp: &LivePatch, pod: &PodView, node: &str, container: &str, container_id: &str) -> LivePatchTaskSpec {
    LivePatchTaskSpec {
        pod_name: pod.name.clone(),
        pod_uid: pod.uid.clone(),
        node_name: node.to_string(),
        container_name: container.to_string(),
        container_id: container_id.to_string(),
        bundle: lp.spec.patch.clone(),
        target: lp.spec.target.clone(),
        strategy: lp.spec.safety.strategy,
        timeout_seconds: lp.spec.safety.timeout_seconds,
        action: TaskAction::Apply,
        live_patch_generation: lp.metadata.generation.unwrap_or_default(),
    }
}

/// `spec`, derived from the LivePatch's current generation when its work differs from `existing`.
fn with_generation(lp: &LivePatch, mut spec: LivePatchTaskSpec, existing: Option<&LivePatchTask>) -> LivePatchTaskSpec {
    spec.live_patch_generation = match existing {
        Some(task) if same_work(&task.spec, &spec) => task.spec.live_patch_generation,
        _ => lp.metadata.generation.unwrap_or_default(),
    };
    spec
}

/// The `Revert` version of an existing task.
fn revert_of(lp: &LivePatch, task: &LivePatchTask) -> LivePatchTask {
    let spec = LivePatchTaskSpec { action: TaskAction::Revert, ..task.spec.clone() };
    let spec = with_generation(lp, spec, Some(task));
    task_object(lp, task.name_any(), spec)
}

/// The force-release annotation is set to "true".
pub fn force_release(lp: &LivePatch) -> bool {
    lp.annotations().get(FORCE_RELEASE_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// One target's state, for the status.
#[derive(Default)]
struct Tally {
    counts: TargetCounts,
    /// "pod: what" lines for Failed/Blocked targets.
    problems: Vec<String>,
    restart_required: Vec<RestartRequiredTarget>,
    waiting_for_slot: i32,
    reverting: i32,
}

impl Tally {
    fn outcome(&mut self, pod: &PodView, node: &str, task: Option<&LivePatchTask>) {
        let report = task.and_then(current_report);
        let detail = |s: &LivePatchTaskStatus| {
            s.message.clone().or_else(|| s.reason.clone()).unwrap_or_else(|| format!("{:?}", s.phase))
        };
        match report.map(|s| (s.phase, s)) {
            Some((TargetPhase::Applied, _)) => self.counts.patched += 1,
            Some((TargetPhase::Failed, s)) => {
                self.counts.failed += 1;
                self.problems.push(format!("{}: Failed: {}", pod.name, detail(s)));
            }
            Some((TargetPhase::Blocked, s)) => {
                self.counts.blocked += 1;
                self.problems.push(format!("{}: Blocked: {}", pod.name, detail(s)));
            }
            Some((TargetPhase::RestartRequired, s)) => {
                self.counts.restart_required += 1;
                let reason = match (&s.reason, &s.message) {
                    (Some(r), Some(m)) => format!("{r}: {m}"),
                    (Some(x), None) | (None, Some(x)) => x.clone(),
                    (None, None) => "cannot be patched live".to_string(),
                };
                self.restart_required.push(RestartRequiredTarget {
                    pod: pod.name.clone(),
                    node: node.to_string(),
                    reason,
                });
            }
            Some((TargetPhase::Pending | TargetPhase::Reverted, _)) | None => self.counts.pending += 1,
        }
    }
}

/// Plan for a LivePatch that is not being deleted.
pub fn plan_apply(lp: &LivePatch, observed: &Observed, now: Timestamp) -> Plan {
    let lp_name = lp.name_any();
    let tasks: BTreeMap<String, &LivePatchTask> = observed.tasks.iter().map(|t| (t.name_any(), t)).collect();
    let mut pods: Vec<&PodView> = observed.pods.iter().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));

    let mut plan = Plan::default();
    let mut tally = Tally::default();
    let mut claimed = BTreeSet::new();
    let mut in_flight_count = 0usize;
    // Tasks to create or update that need a rollout slot, in pod-name order.
    let mut candidates: Vec<(LivePatchTask, Option<&LivePatchTask>)> = vec![];

    for pod in pods {
        let name = task_name(&lp_name, &pod.name);
        let existing = tasks.get(&name).copied().filter(|t| t.spec.pod_name == pod.name);
        match resolve(&lp.spec, pod) {
            None => continue,
            Some(Target::Invalid { reason }) => {
                tally.counts.targets += 1;
                tally.counts.failed += 1;
                tally.problems.push(format!("{}: Failed: {reason}", pod.name));
            }
            Some(Target::Waiting { .. }) => {
                tally.counts.targets += 1;
                tally.counts.pending += 1;
                if existing.is_some() {
                    claimed.insert(name);
                }
            }
            Some(Target::Ready { node, container, container_id }) => {
                tally.counts.targets += 1;
                claimed.insert(name.clone());
                let spec = with_generation(lp, desired_spec(lp, pod, &node, &container, &container_id), existing);
                match existing {
                    Some(task) if same_work(&task.spec, &spec) => {
                        if in_flight(task) {
                            in_flight_count += 1;
                        }
                        tally.outcome(pod, &node, Some(task));
                    }
                    Some(task) if in_flight(task) => {
                        // Already holds a slot: update it in place.
                        in_flight_count += 1;
                        tally.counts.pending += 1;
                        plan.notes.extend(redispatch_note(task, &spec));
                        plan.apply.push(task_object(lp, name, spec));
                    }
                    _ => {
                        tally.counts.pending += 1;
                        candidates.push((task_object(lp, name, spec), existing));
                    }
                }
            }
        }
    }

    // The rollout limit: start as many as there are free slots.
    let max = usize::try_from(lp.spec.rollout.max_concurrent.max(1)).unwrap_or(1);
    let slots = max.saturating_sub(in_flight_count);
    for (i, (task, existing)) in candidates.into_iter().enumerate() {
        if i >= slots {
            tally.waiting_for_slot += 1;
            continue;
        }
        match existing {
            None => plan.notes.push(
                Note::normal(
                    Reason::Dispatched,
                    "Dispatch",
                    format!("dispatched the patch to pod {} on node {}", task.spec.pod_name, task.spec.node_name),
                )
                .about(&task.spec),
            ),
            Some(old) => plan.notes.extend(redispatch_note(old, &task.spec)),
        }
        plan.apply.push(task);
    }

    // Tasks no pod claims: their pod is gone (delete) or no longer a target (revert, then delete).
    for (name, task) in &tasks {
        if claimed.contains(name) {
            continue;
        }
        if pod_of(observed, task).is_none() || is_reverted(task) {
            plan.delete.push(name.clone());
        } else {
            tally.reverting += 1;
            if task.spec.action != TaskAction::Revert {
                plan.notes.push(
                    Note::normal(
                        Reason::RevertingTarget,
                        "Revert",
                        format!("pod {} is no longer a target: reverting the patch there", task.spec.pod_name),
                    )
                    .about(&task.spec),
                );
                plan.apply.push(revert_of(lp, task));
            }
        }
    }

    plan.status = apply_status(lp, tally, &now);
    plan.notes.extend(transition_notes(lp.status.as_ref(), &plan.status));
    plan
}

fn redispatch_note(old: &LivePatchTask, new: &LivePatchTaskSpec) -> Option<Note> {
    let note = if old.spec.pod_uid == new.pod_uid && old.spec.container_id != new.container_id {
        Note::normal(
            Reason::Redispatched,
            "Dispatch",
            format!(
                "container {} of pod {} restarted (new container id): dispatching the patch again",
                new.container_name, new.pod_name
            ),
        )
    } else if old.spec.pod_uid != new.pod_uid {
        Note::normal(
            Reason::Redispatched,
            "Dispatch",
            format!("pod {} was recreated: dispatching the patch again", new.pod_name),
        )
    } else {
        return None;
    };
    Some(note.about(new))
}

fn apply_status(lp: &LivePatch, tally: Tally, now: &Timestamp) -> LivePatchStatus {
    let c = &tally.counts;
    let phase = if c.targets == 0 {
        LivePatchPhase::Pending
    } else if c.pending > 0 {
        LivePatchPhase::Progressing
    } else if c.failed + c.blocked > 0 {
        LivePatchPhase::Degraded
    } else if c.restart_required > 0 {
        LivePatchPhase::RestartRequired
    } else {
        LivePatchPhase::Applied
    };
    let patched_msg = format!("{} of {} targets patched", c.patched, c.targets);
    let (ready, ready_reason) = match phase {
        LivePatchPhase::Applied => (true, Reason::AllTargetsPatched),
        LivePatchPhase::Pending => (false, Reason::NoTargets),
        LivePatchPhase::Progressing => (false, Reason::Progressing),
        LivePatchPhase::Degraded => (false, Reason::TargetsFailed),
        LivePatchPhase::RestartRequired | LivePatchPhase::Reverting => (false, Reason::RestartRequired),
    };
    let progressing = c.pending > 0 || tally.reverting > 0;
    let progressing_msg = if progressing {
        let mut parts = vec![format!("{} target(s) in progress", c.pending - tally.waiting_for_slot)];
        if tally.waiting_for_slot > 0 {
            parts.push(format!("{} waiting for a rollout slot", tally.waiting_for_slot));
        }
        if tally.reverting > 0 {
            parts.push(format!("{} pod(s) no longer selected being reverted", tally.reverting));
        }
        parts.join(", ")
    } else {
        patched_msg.clone()
    };
    let old = lp.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let generation = lp.metadata.generation;
    let restart_msg: Vec<String> = tally.restart_required.iter().map(|t| format!("{}: {}", t.pod, t.reason)).collect();
    let conditions = vec![
        condition(old, READY, ready, ready_reason, patched_msg, generation, now),
        condition(
            old,
            PROGRESSING,
            progressing,
            if progressing { Reason::Dispatching } else { Reason::RolloutComplete },
            progressing_msg,
            generation,
            now,
        ),
        condition(
            old,
            DEGRADED,
            !tally.problems.is_empty(),
            if tally.problems.is_empty() { Reason::AsExpected } else { Reason::TargetsFailed },
            list(&tally.problems),
            generation,
            now,
        ),
        condition(
            old,
            RESTART_REQUIRED,
            !restart_msg.is_empty(),
            if restart_msg.is_empty() { Reason::AsExpected } else { Reason::OfflineRestartRequired },
            list(&restart_msg),
            generation,
            now,
        ),
    ];
    LivePatchStatus {
        observed_generation: generation,
        phase: Some(phase),
        counts: tally.counts,
        restart_required: tally.restart_required,
        conditions,
    }
}

/// Plan for a LivePatch being deleted: ask every agent to revert, release once every target is
/// reverted or its pod or node is gone, or at once when release is forced.
pub fn plan_cleanup(lp: &LivePatch, observed: &Observed, now: Timestamp) -> Plan {
    if force_release(lp) {
        return Plan {
            status: lp.status.clone().unwrap_or_default(),
            notes: vec![Note::warning(
                Reason::ForceReleased,
                "Release",
                format!(
                    "{FORCE_RELEASE_ANNOTATION} is set: released without waiting for {} target(s) to be reverted",
                    observed.tasks.len()
                ),
            )],
            release: true,
            ..Plan::default()
        };
    }
    let mut plan = Plan::default();
    let mut counts = TargetCounts::default();
    let mut problems = vec![];
    let mut tasks: Vec<&LivePatchTask> = observed.tasks.iter().collect();
    tasks.sort_by_key(|t| t.name_any());
    for task in tasks {
        counts.targets += 1;
        let report = current_report(task);
        if is_reverted(task) || pod_of(observed, task).is_none() || observed.gone_nodes.contains(&task.spec.node_name) {
            counts.reverted += 1;
            continue;
        }
        if task.spec.action != TaskAction::Revert {
            plan.apply.push(revert_of(lp, task));
            counts.pending += 1;
        } else if let Some(s) = report.filter(|s| s.phase == TargetPhase::Failed) {
            counts.failed += 1;
            let detail = s.message.clone().or_else(|| s.reason.clone()).unwrap_or_default();
            problems.push(format!("{}: revert failed: {detail}", task.spec.pod_name));
        } else {
            counts.pending += 1;
        }
    }
    plan.release = counts.pending == 0 && counts.failed == 0;

    let old = lp.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let generation = lp.metadata.generation;
    let msg = format!("{} of {} targets reverted or gone", counts.reverted, counts.targets);
    let degraded_reason = if problems.is_empty() { Reason::AsExpected } else { Reason::RevertFailed };
    plan.status = LivePatchStatus {
        observed_generation: generation,
        phase: Some(LivePatchPhase::Reverting),
        conditions: vec![
            condition(old, READY, false, Reason::Reverting, msg.clone(), generation, &now),
            condition(old, PROGRESSING, true, Reason::Reverting, msg.clone(), generation, &now),
            condition(old, DEGRADED, !problems.is_empty(), degraded_reason, list(&problems), generation, &now),
            condition(old, RESTART_REQUIRED, false, Reason::Reverting, String::new(), generation, &now),
        ],
        counts,
        restart_required: vec![],
    };
    plan.notes = if plan.release {
        vec![Note::normal(Reason::Released, "Release", format!("{msg}: released"))]
    } else {
        transition_notes(lp.status.as_ref(), &plan.status)
    };
    plan
}

/// The pod a task refers to, if it still exists and its processes can still run patched code.
fn pod_of<'a>(observed: &'a Observed, task: &LivePatchTask) -> Option<&'a PodView> {
    observed
        .pods
        .iter()
        .find(|p| p.name == task.spec.pod_name)
        .or_else(|| observed.other_pods.get(&task.spec.pod_name))
        .filter(|p| p.uid == task.spec.pod_uid && !p.is_ending())
}

/// During cleanup: the nodes worth checking for existence (those of tasks still waiting for a
/// revert whose pod is still there).
pub fn nodes_to_check(observed: &Observed) -> BTreeSet<String> {
    observed
        .tasks
        .iter()
        .filter(|t| !is_reverted(t))
        .filter(|t| pod_of(observed, t).is_some())
        .map(|t| t.spec.node_name.clone())
        .collect()
}

/// The pod names tasks refer to that are not among the matching pods (to be read one by one).
pub fn unmatched_pod_names(pods: &[PodView], tasks: &[LivePatchTask]) -> BTreeSet<String> {
    tasks
        .iter()
        .map(|t| t.spec.pod_name.clone())
        .filter(|name| !pods.iter().any(|p| &p.name == name))
        .collect()
}

/// Plan for a LivePatch whose selector cannot be turned into a query: report, touch nothing.
pub fn plan_invalid_selector(lp: &LivePatch, error: &str, now: Timestamp) -> Plan {
    let old = lp.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let generation = lp.metadata.generation;
    let msg = format!("invalid selector: {error}");
    let status = LivePatchStatus {
        observed_generation: generation,
        phase: Some(LivePatchPhase::Degraded),
        counts: TargetCounts::default(),
        restart_required: vec![],
        conditions: vec![
            condition(old, READY, false, Reason::InvalidSelector, msg.clone(), generation, &now),
            condition(old, PROGRESSING, false, Reason::InvalidSelector, msg.clone(), generation, &now),
            condition(old, DEGRADED, true, Reason::InvalidSelector, msg.clone(), generation, &now),
            condition(old, RESTART_REQUIRED, false, Reason::AsExpected, String::new(), generation, &now),
        ],
    };
    let mut notes = vec![];
    if !is_true_with_reason(lp.status.as_ref(), DEGRADED, Reason::InvalidSelector) {
        notes.push(Note::warning(Reason::InvalidSelector, "Resolve", msg));
    }
    Plan { status, notes, ..Plan::default() }
}

/// A condition, keeping `lastTransitionTime` from `old` when its status did not change.
pub fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: Reason,
    message: String,
    observed_generation: Option<i64>,
    now: &Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(now.round(k8s_openapi::jiff::Unit::Second).unwrap_or(*now)));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.as_str().to_string(),
        message,
        observed_generation,
        last_transition_time,
    }
}

fn find<'a>(status: Option<&'a LivePatchStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

fn is_true(status: Option<&LivePatchStatus>, type_: &str) -> bool {
    find(status, type_).is_some_and(|c| c.status == "True")
}

fn is_true_with_reason(status: Option<&LivePatchStatus>, type_: &str, reason: Reason) -> bool {
    find(status, type_).is_some_and(|c| c.status == "True" && c.reason.parse() == Ok(reason))
}

/// Events worth a person's attention, from the change between the old and the new status.
pub fn transition_notes(old: Option<&LivePatchStatus>, new: &LivePatchStatus) -> Vec<Note> {
    let mut notes = vec![];
    let old_phase = old.and_then(|s| s.phase);
    if new.phase == Some(LivePatchPhase::Applied) && old_phase != Some(LivePatchPhase::Applied) {
        notes.push(Note::normal(
            Reason::Applied,
            "Aggregate",
            format!("all {} target(s) patched", new.counts.targets),
        ));
    }
    if new.phase == Some(LivePatchPhase::Reverting) && old_phase != Some(LivePatchPhase::Reverting) {
        notes.push(Note::normal(
            Reason::Reverting,
            "Revert",
            format!("LivePatch deleted: asking the agents to revert {} target(s)", new.counts.targets),
        ));
    }
    for (type_, reason) in [(DEGRADED, Reason::Degraded), (RESTART_REQUIRED, Reason::RestartRequired)] {
        if let Some(c) = find(Some(new), type_).filter(|c| c.status == "True") {
            if !is_true(old, type_) && c.reason.parse() != Ok(Reason::InvalidSelector) {
                notes.push(Note::warning(reason, "Aggregate", c.message.clone()));
            }
        }
    }
    notes
}

/// "a; b; c; d; e; and 3 more"
fn list(items: &[String]) -> String {
    if items.len() <= LISTED {
        items.join("; ")
    } else {
        format!("{}; and {} more", items[..LISTED].join("; "), items.len() - LISTED)
    }
}

#[cfg(test)]
mod tests;
