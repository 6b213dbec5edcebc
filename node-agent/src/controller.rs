//! The task controller: watches the `LivePatchTask`s labelled for this node (and the pods of this
//! node, to react when a container starts or restarts), and for each task:
//!
//! 1. checks the pod it names: same UID, on this node, and (for `Apply`) the task's container id
//!    is the pod's current container of that name;
//! 2. `Apply`: fetches and verifies the bundle, discovers the container's processes, and per
//!    process (several at once, bounded, each on one blocking thread) re-checks it, reads what it
//!    already runs from the process itself and applies only what is missing;
//!    `Revert`: per process, reverts the task's patch if it is there;
//! 3. writes the task status with server-side apply (field manager `livepatch-agent`), and
//!    keeps the pod label `livepatch.dev/restart-required=true` in line with the tasks of the pod.
//!
//! Triggers: a task seen for the first time or with a new generation (a spec change: the
//! operator's), pod changes, retries after a backoff and a periodic re-check of applied tasks (new
//! processes of the container get the patch too). The agent's own status writes do not trigger a
//! reconcile (the task watch is filtered by `metadata.generation`, which status writes leave
//! alone); pod events do (a container starting or restarting is a pod status change), and so
//! does the agent's own pod label write: a reconcile of the same task content before its
//! scheduled time (the retry backoff, the re-check period) only re-schedules it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{Future, Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Api, Patch, PatchParams},
    runtime::{
        controller::{Action, Config as ControllerConfig, Controller},
        predicates,
        reflector::{self, ObjectRef, Store},
        watcher, PredicateConfig, WatchStreamExt,
    },
    Client, ResourceExt,
};
use livepatch::{apply, bundle::Bundle};
use livepatch_api::{LivePatchTask, LivePatchTaskStatus, Reason, TargetPhase, TaskAction, AGENT_LABEL, NODE_LABEL, RESTART_REQUIRED_LABEL};
use serde_json::json;
use tokio::{sync::Semaphore, task::JoinSet};
use tracing::{debug, info, instrument, warn};

use crate::{
    discovery::{parse_container_id, Discovery, DiscoveryError, Found, Query, SkipKind},
    engine::{self, Engine, Outcome},
    fetch::Fetcher,
    metrics::Metrics,
    report::{self, Next, Verdict},
};

/// Field manager of every write, and the reporting component's name.
pub const AGENT_NAME: &str = "livepatch-agent";

/// A failure that trying again does not fix (the task or the pod must change).
fn is_final(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::BuildIDMismatch
            | Reason::NoMatchingProcess
            | Reason::BundleDoesNotFit
            | Reason::BundleInvalid
            | Reason::BundleSignatureInvalid
            | Reason::BundleSignerUntrusted
            | Reason::BundleTargetMismatch
            | Reason::DataLayoutChanged
            | Reason::LiveUpdateRefused
            | Reason::PermissionDenied
            | Reason::InvalidTask
            | Reason::PodOnAnotherNode
            | Reason::ContainerNotRunning
    )
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    pub engine: Arc<dyn Engine>,
    pub discovery: Discovery,
    pub fetcher: Fetcher,
    pub metrics: Arc<Metrics>,
    /// The tasks of this node (the controller's cache), for the pod label and the pod mapper.
    pub tasks: Store<LivePatchTask>,
    /// Engine calls in flight at once, over all tasks.
    pub processes: Arc<Semaphore>,
    /// Attempts per task generation before a retryable failure is final.
    pub max_attempts: i32,
    /// Re-check an applied task this often (new processes of the container).
    pub resync: Duration,
    /// First retry delay; doubles per attempt, capped at `resync`.
    pub backoff: Duration,
    /// Per task: the content (generation, container id) last worked on, and when to look again.
    schedule: Mutex<HashMap<(String, String), Scheduled>>,
    /// Which tasks this agent acts on (node agent or sidecar).
    pub scope: Scope,
}

#[derive(Clone, Debug)]
struct Scheduled {
    generation: i64,
    container_id: String,
    action: TaskAction,
    at: Instant,
}

/// Which tasks an agent acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// The node agent (DaemonSet, `hostPID`): every task of its node, except those of pods that
    /// carry their own agent (label `livepatch.dev/agent=sidecar`).
    #[default]
    Node,
    /// A sidecar agent: only the tasks of its own pod, read in its namespace (it sees nothing
    /// but its pod's processes: the pod's shared PID namespace).
    Pod { namespace: String, uid: String },
}

impl Scope {
    /// The objects of kind `K` this agent reads: every namespace, or its pod's.
    fn api<K>(&self, client: Client) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match self {
            Scope::Node => Api::all(client),
            Scope::Pod { namespace, .. } => Api::namespaced(client, namespace),
        }
    }

    /// Whether `task` is for this agent, before its pod is read: a sidecar's own pod only.
    fn takes(&self, task: &LivePatchTask) -> bool {
        match self {
            Scope::Node => true,
            Scope::Pod { uid, .. } => task.spec.pod_uid == *uid,
        }
    }

    /// Whether this agent acts on a task of `pod` (None: gone): a node agent leaves pods that
    /// carry their own agent.
    fn serves(&self, pod: Option<&Pod>) -> bool {
        match self {
            Scope::Node => pod.is_none_or(|p| p.labels().get(AGENT_LABEL).map(String::as_str) != Some("sidecar")),
            Scope::Pod { .. } => true,
        }
    }
}

impl Context {
    pub fn new(client: Client, node: String, engine: Arc<dyn Engine>, discovery: Discovery, fetcher: Fetcher, metrics: Arc<Metrics>, tasks: Store<LivePatchTask>) -> Self {
        Self {
            client,
            node,
            engine,
            discovery,
            fetcher,
            metrics,
            tasks,
            processes: Arc::new(Semaphore::new(4)),
            max_attempts: 5,
            resync: Duration::from_secs(300),
            backoff: Duration::from_secs(5),
            schedule: Mutex::new(HashMap::new()),
            scope: Scope::Node,
        }
    }

    fn key(task: &LivePatchTask) -> (String, String) {
        (task.namespace().unwrap_or_default(), task.name_any())
    }

    /// Time left before the same task content is due again (a reconcile triggered earlier by a
    /// pod event waits for it).
    fn not_yet(&self, task: &LivePatchTask) -> Option<Duration> {
        let schedule = self.schedule.lock().unwrap();
        let s = schedule.get(&Self::key(task))?;
        let same = Some(s.generation) == task.metadata.generation && s.container_id == task.spec.container_id && s.action == task.spec.action;
        let left = s.at.saturating_duration_since(Instant::now());
        (same && !left.is_zero()).then_some(left)
    }

    fn schedule(&self, task: &LivePatchTask, after: Option<Duration>) {
        let mut schedule = self.schedule.lock().unwrap();
        match after {
            Some(after) => {
                schedule.insert(
                    Self::key(task),
                    Scheduled {
                        generation: task.metadata.generation.unwrap_or(0),
                        container_id: task.spec.container_id.clone(),
                        action: task.spec.action,
                        at: Instant::now() + after,
                    },
                );
            }
            None => {
                schedule.remove(&Self::key(task));
            }
        }
    }

    fn retry_after(&self, attempts: i32) -> Duration {
        let factor = 1u32 << attempts.clamp(1, 16).saturating_sub(1);
        self.backoff.saturating_mul(factor).min(self.resync)
    }
}

/// Why a reconcile did not finish (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the task has no namespace")]
    MissingNamespace,
    #[error("a blocking engine thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(_) => "kube_api",
            Error::MissingNamespace => "invalid_task",
            Error::Join(_) => "internal",
        }
    }
}

/// The previous status, if it reports on the task's current content.
fn current_status(task: &LivePatchTask) -> Option<&LivePatchTaskStatus> {
    let s = task.status.as_ref()?;
    (s.observed_generation == task.metadata.generation && s.container_id.as_deref() == Some(task.spec.container_id.as_str())).then_some(s)
}

/// Nothing more to do for this task content, whatever triggered the reconcile.
fn settled(task: &LivePatchTask, max_attempts: i32) -> bool {
    let Some(s) = current_status(task) else { return false };
    let reason = s.known_reason();
    match (task.spec.action, s.phase) {
        (TaskAction::Revert, TargetPhase::Reverted) => true,
        (TaskAction::Revert, _) => false,
        (TaskAction::Apply, TargetPhase::Applied | TargetPhase::Pending | TargetPhase::Blocked | TargetPhase::Reverted) => false,
        // Too many stacked patches: looked at again after the re-check period.
        (TaskAction::Apply, TargetPhase::RestartRequired) => reason != Some(Reason::TooManyPatches),
        (TaskAction::Apply, TargetPhase::Failed) => s.attempts >= max_attempts || reason.is_some_and(is_final),
    }
}

/// How the pod relates to the task.
enum PodCheck {
    /// The pod is there, on this node, and runs the task's container.
    Current(Pod),
    /// The pod exists with this UID on this node, but the task's container is not its current one
    /// (not started yet, or restarted: the operator will write the new id).
    OtherContainer(Pod, String),
    /// No such pod (or another pod under that name): its processes are gone.
    Gone(String),
    /// The pod is on another node: not this agent's business.
    Elsewhere(String),
}

fn check_pod(task: &LivePatchTask, pod: Option<Pod>, node: &str) -> PodCheck {
    let spec = &task.spec;
    let Some(pod) = pod else {
        return PodCheck::Gone(format!(
            "pod {} does not exist in namespace {} (a task reaches only pods of its own namespace)",
            spec.pod_name,
            task.namespace().unwrap_or_default()
        ));
    };
    if pod.metadata.uid.as_deref() != Some(spec.pod_uid.as_str()) {
        return PodCheck::Gone(format!(
            "pod {} is another pod now (uid {}, the task names {})",
            spec.pod_name,
            pod.metadata.uid.as_deref().unwrap_or("?"),
            spec.pod_uid
        ));
    }
    let pod_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("");
    if pod_node != node {
        return PodCheck::Elsewhere(format!("pod {} runs on node {pod_node:?}, this agent serves node {node:?}", spec.pod_name));
    }
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_deref()).unwrap_or(&[]);
    let current = statuses.iter().find(|c| c.name == spec.container_name).and_then(|c| c.container_id.clone()).unwrap_or_default();
    if current == spec.container_id {
        PodCheck::Current(pod)
    } else {
        let msg = if current.is_empty() {
            format!("container {} of pod {} has not started", spec.container_name, spec.pod_name)
        } else {
            format!(
                "container {} of pod {} is now {current}, the task names {}; waiting for the operator to dispatch the new container",
                spec.container_name, spec.pod_name, spec.container_id
            )
        };
        PodCheck::OtherContainer(pod, msg)
    }
}

/// Reconcile one task.
#[instrument(skip(task, ctx), fields(namespace = %task.namespace().unwrap_or_default(), task = %task.name_any(), generation = task.metadata.generation.unwrap_or_default(), action = ?task.spec.action))]
pub async fn reconcile(task: Arc<LivePatchTask>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = task.namespace().ok_or(Error::MissingNamespace)?;
    // The watch selects this node's label; the spec must agree (a task is never acted on by
    // another node's agent).
    if task.spec.node_name != ctx.node || task.labels().get(NODE_LABEL).map(String::as_str) != Some(ctx.node.as_str()) {
        warn!(node = %task.spec.node_name, "task is not for this node; ignored");
        return Ok(Action::await_change());
    }
    if task.metadata.deletion_timestamp.is_some() || settled(&task, ctx.max_attempts) {
        return Ok(Action::await_change());
    }
    if let Some(left) = ctx.not_yet(&task) {
        return Ok(Action::requeue(left));
    }
    if !ctx.scope.takes(&task) {
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod = pods.get_opt(&task.spec.pod_name).await?;
    if !ctx.scope.serves(pod.as_ref()) {
        debug!(pod = %task.spec.pod_name, "the pod carries its own agent: its sidecar acts on the task");
        return Ok(Action::await_change());
    }
    let work = Work::new(&task, &ctx, &ns);
    match (task.spec.action, check_pod(&task, pod, &ctx.node)) {
        (_, PodCheck::Elsewhere(msg)) => {
            let v = Verdict::early(TargetPhase::Failed, Reason::PodOnAnotherNode, msg, Next::Settled);
            work.finish(v, true, None).await
        }
        (TaskAction::Apply, PodCheck::Gone(msg)) | (TaskAction::Apply, PodCheck::OtherContainer(_, msg)) => {
            let v = Verdict::early(TargetPhase::Pending, Reason::ContainerNotCurrent, msg, Next::Settled);
            work.finish(v, false, None).await
        }
        (TaskAction::Revert, PodCheck::Gone(msg)) => {
            let v = Verdict::early(TargetPhase::Reverted, Reason::PodGone, format!("{msg}: nothing runs the patch"), Next::Settled);
            work.finish(v, false, None).await
        }
        (TaskAction::Apply, PodCheck::Current(pod)) => work.apply(pod).await,
        (TaskAction::Revert, PodCheck::Current(pod)) => work.revert(pod, false).await,
        // The pod's status no longer vouches for the container id: only processes whose cgroup
        // names the pod are candidates.
        (TaskAction::Revert, PodCheck::OtherContainer(pod, _)) => work.revert(pod, true).await,
    }
}

/// One reconcile of one task.
struct Work<'a> {
    task: &'a LivePatchTask,
    ctx: &'a Arc<Context>,
    api: Api<LivePatchTask>,
    generation: i64,
    patch_id: String,
    /// Attempts recorded for this task content so far.
    attempts: i32,
}

impl<'a> Work<'a> {
    fn new(task: &'a LivePatchTask, ctx: &'a Arc<Context>, ns: &str) -> Self {
        Work {
            task,
            ctx,
            api: Api::namespaced(ctx.client.clone(), ns),
            generation: task.metadata.generation.unwrap_or(0),
            // What the agent recorded when it applied, else (the bundle not fetched yet: the id
            // is a digest of its content) the bundle named by the digest the spec pins.
            patch_id: task.status.as_ref().and_then(|s| s.patch_id.clone()).unwrap_or_else(|| {
                let sha = task.spec.bundle.sha256.to_ascii_lowercase();
                format!("bundle sha256:{}", sha.get(..12).unwrap_or(&sha))
            }),
            attempts: current_status(task).map(|s| s.attempts).unwrap_or(0),
        }
    }

    fn this_attempt(&self) -> i32 {
        self.attempts + 1
    }

    fn last_attempt(&self) -> bool {
        self.this_attempt() >= self.ctx.max_attempts
    }

    fn query(&self, build_id: Option<String>, pod_in_cgroup: bool) -> Result<Query, DiscoveryError> {
        Ok(Query {
            container_id: parse_container_id(&self.task.spec.container_id)?,
            pod_uid: self.task.spec.pod_uid.clone(),
            build_id,
            fixed_build_id: None,
            path: self.task.spec.target.path.clone(),
            pod_in_cgroup,
        })
    }

    /// Write the status if it changed, keep the pod label in line, choose the next action.
    async fn finish(&self, verdict: Verdict, counts_as_attempt: bool, pod: Option<&Pod>) -> Result<Action, Error> {
        let attempts = if counts_as_attempt || current_status(self.task).is_none() { self.this_attempt() } else { self.attempts };
        let status = verdict.status(self.generation, &self.task.spec.container_id, attempts, &self.patch_id);
        let status = self.keep_pause(status);
        if self.task.status.as_ref() != Some(&status) {
            self.write(&status).await?;
            info!(phase = ?status.phase, reason = status.reason.as_deref().unwrap_or(""), message = status.message.as_deref().unwrap_or(""), "task status");
        }
        if let Some(pod) = pod {
            self.sync_restart_label(pod, status.phase).await?;
        }
        let after = match (verdict.next, status.phase) {
            (Next::Retry, _) => Some(self.ctx.retry_after(attempts)),
            (Next::Settled, TargetPhase::Applied) => Some(self.ctx.resync),
            (Next::Settled, TargetPhase::RestartRequired) if verdict.reason == Some(Reason::TooManyPatches) => Some(self.ctx.resync),
            _ => None,
        };
        self.ctx.schedule(self.task, after);
        Ok(after.map_or_else(Action::await_change, Action::requeue))
    }

    /// A re-check that finds everything already applied keeps the pause measured when it was.
    fn keep_pause(&self, mut status: LivePatchTaskStatus) -> LivePatchTaskStatus {
        if let (None, Some(prev)) = (status.pause_micros, current_status(self.task)) {
            if prev.phase == status.phase {
                status.pause_micros = prev.pause_micros;
                if status.phase == TargetPhase::Applied {
                    status.message = prev.message.clone().or(status.message);
                }
            }
        }
        status
    }

    async fn write(&self, status: &LivePatchTaskStatus) -> Result<(), Error> {
        let body = json!({
            "apiVersion": "livepatch.dev/v1alpha1",
            "kind": "LivePatchTask",
            "status": status,
        });
        self.api.patch_status(&self.task.name_any(), &PatchParams::apply(AGENT_NAME).force(), &Patch::Apply(body)).await?;
        Ok(())
    }

    /// The pod carries `livepatch.dev/restart-required=true` while some `Apply` task of its
    /// current container is `RestartRequired`; it is removed once this task settled Applied or
    /// Reverted and no other task needs it.
    async fn sync_restart_label(&self, pod: &Pod, phase: TargetPhase) -> Result<(), Error> {
        let me = self.task;
        let others_need = self.ctx.tasks.state().iter().any(|t| {
            t.name_any() != me.name_any()
                && t.namespace() == me.namespace()
                && t.spec.pod_uid == me.spec.pod_uid
                && t.spec.action == TaskAction::Apply
                && current_status(t).is_some_and(|s| s.phase == TargetPhase::RestartRequired)
        });
        let mine = phase == TargetPhase::RestartRequired && me.spec.action == TaskAction::Apply;
        let has = pod.labels().get(RESTART_REQUIRED_LABEL).map(String::as_str);
        let value = if mine || others_need {
            if has == Some("true") {
                return Ok(());
            }
            json!("true")
        } else if matches!(phase, TargetPhase::Applied | TargetPhase::Reverted) && has.is_some() {
            serde_json::Value::Null
        } else {
            return Ok(());
        };
        let patch = json!({"metadata": {"uid": pod.metadata.uid, "labels": {RESTART_REQUIRED_LABEL: value}}});
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &pod.namespace().unwrap_or_default());
        pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        info!(pod = %pod.name_any(), set = !value.is_null(), "restart-required label");
        Ok(())
    }

    async fn apply(mut self, pod: Pod) -> Result<Action, Error> {
        let spec = &self.task.spec;
        let ns = self.task.namespace().unwrap_or_default();
        // Fetch, digest and signature come before discovery: a refused bundle never leads to a
        // process being looked at, let alone attached to.
        let bundle = match self.ctx.fetcher.fetch(&ns, &spec.bundle).await {
            Ok(b) => b,
            Err(e) => {
                let next = if self.last_attempt() || e.is_final() { Next::Settled } else { Next::Retry };
                let phase = if self.last_attempt() || e.is_signature() { TargetPhase::Failed } else { TargetPhase::Pending };
                if e.is_signature() {
                    self.ctx.metrics.error("signature");
                    warn!(reason = %e.reason(), error = %e, "bundle refused by the signature policy");
                } else {
                    self.ctx.metrics.error("fetch");
                }
                let v = Verdict::early(phase, e.reason(), format!("patch bundle: {e}"), next);
                return self.finish(v, true, Some(&pod)).await;
            }
        };
        self.patch_id = bundle.patch_id();
        let bundle_build_id = bundle.manifest.target.build_id.clone();
        if bundle_build_id != spec.target.build_id {
            let v = Verdict::early(
                TargetPhase::Failed,
                Reason::BundleTargetMismatch,
                format!("the bundle was built for build id {bundle_build_id}, the LivePatch names {}", spec.target.build_id),
                Next::Settled,
            );
            return self.finish(v, true, Some(&pod)).await;
        }
        let query = match self.query(Some(bundle_build_id), false) {
            Ok(q) => Query { fixed_build_id: bundle.manifest.new_build_id.clone(), ..q },
            Err(e) => return self.finish(Verdict::early(TargetPhase::Failed, Reason::InvalidTask, e.to_string(), Next::Settled), true, Some(&pod)).await,
        };
        let found = match self.find(&query).await? {
            Ok(found) => found,
            Err(v) => return self.finish(v, true, Some(&pod)).await,
        };
        if found.targets.is_empty() && !found.container_absent() {
            let any = |kind: SkipKind| found.skipped.iter().any(|s| s.kind == kind);
            if any(SkipKind::Fixed) && !any(SkipKind::OtherBuild) && !any(SkipKind::PermissionDenied) {
                // Rolled out to the fixed image: these pods have the fix, as patched ones do.
                let pids = found.skipped.iter().filter(|s| s.kind == SkipKind::Fixed).map(|s| i64::from(s.pid)).collect();
                let v = Verdict { pids, ..Verdict::early(TargetPhase::Applied, Reason::UpToDate, "the container runs the fixed build already: nothing to patch".into(), Next::Settled) };
                return self.finish(v, true, Some(&pod)).await;
            }
            let detail = found.skipped.iter().map(|s| format!("pid {}: {}", s.pid, s.reason)).collect::<Vec<_>>().join("; ");
            let (reason, metric) = if any(SkipKind::OtherBuild) {
                (Reason::BuildIDMismatch, "build_id_mismatch")
            } else if any(SkipKind::PermissionDenied) {
                (Reason::PermissionDenied, "permission")
            } else {
                (Reason::NoMatchingProcess, "no_matching_process")
            };
            self.ctx.metrics.error(metric);
            let v = Verdict::early(TargetPhase::Failed, reason, format!("no process of the container runs the bundle's executable: {detail}"), Next::Settled);
            return self.finish(v, true, Some(&pod)).await;
        }
        if !found.targets.is_empty() && current_status(self.task).is_none() {
            // Say at once that the agent took the task (a trap wait can take the whole timeout).
            let pids: Vec<i64> = found.targets.iter().map(|t| i64::from(t.pid)).collect();
            let v = Verdict {
                pids,
                ..Verdict::early(TargetPhase::Pending, Reason::Applying, format!("applying {} to {} process(es)", self.patch_id, found.targets.len()), Next::Retry)
            };
            let status = v.status(self.generation, &spec.container_id, self.this_attempt(), &self.patch_id);
            self.write(&status).await?;
        }
        let opts = apply::Options { strategy: engine::strategy(spec.strategy), timeout: Duration::from_secs(spec.timeout_seconds.max(1) as u64), ..Default::default() };
        let outcomes = self.run_engine(&query, found, Some(bundle), opts).await?;
        let verdict = report::apply_verdict(&self.patch_id, &outcomes, self.last_attempt());
        let worked = verdict.worked;
        self.finish(verdict, worked, Some(&pod)).await
    }

    async fn revert(self, pod: Pod, pod_in_cgroup: bool) -> Result<Action, Error> {
        let query = match self.query(Some(self.task.spec.target.build_id.clone()), pod_in_cgroup) {
            Ok(q) => q,
            Err(e) => return self.finish(Verdict::early(TargetPhase::Failed, Reason::InvalidTask, e.to_string(), Next::Settled), true, Some(&pod)).await,
        };
        let found = match self.find(&query).await? {
            Ok(found) => found,
            Err(v) => return self.finish(v, true, Some(&pod)).await,
        };
        let opts = apply::Options { strategy: engine::strategy(self.task.spec.strategy), timeout: Duration::from_secs(self.task.spec.timeout_seconds.max(1) as u64), ..Default::default() };
        let outcomes = self.run_engine(&query, found, None, opts).await?;
        let verdict = report::revert_verdict(&self.patch_id, &outcomes);
        self.finish(verdict, true, Some(&pod)).await
    }

    /// Discovery, or the verdict that stops the attempt.
    async fn find(&self, query: &Query) -> Result<Result<Found, Verdict>, Error> {
        let d = self.ctx.discovery.clone();
        let q = query.clone();
        let found = match tokio::task::spawn_blocking(move || d.find(&q)).await? {
            Ok(found) => found,
            Err(e) => {
                self.ctx.metrics.error("discovery");
                let v = match e {
                    DiscoveryError::ProcUnreadable { .. } => {
                        let next = if self.last_attempt() { Next::Settled } else { Next::Retry };
                        Verdict::early(TargetPhase::Failed, Reason::ProcUnreadable, format!("{e} (the agent needs hostPID: true)"), next)
                    }
                    _ => Verdict::early(TargetPhase::Failed, Reason::InvalidTask, e.to_string(), Next::Settled),
                };
                return Ok(Err(v));
            }
        };
        for refused in &found.other_pod {
            self.ctx.metrics.error("isolation");
            warn!(pid = refused.pid, reason = %refused.reason, "process refused: not of the task's pod");
        }
        debug!(targets = ?found.targets, skipped = ?found.skipped, "discovered");
        Ok(Ok(found))
    }

    /// The engine on every target, several at once (bounded by the context's semaphore), each on
    /// its own blocking thread. `bundle`: apply it; `None`: revert the task's patch.
    async fn run_engine(&self, query: &Query, found: Found, bundle: Option<Arc<Bundle>>, opts: apply::Options) -> Result<Vec<Outcome>, Error> {
        let mut set = JoinSet::new();
        for target in found.targets {
            let permit = self.ctx.processes.clone().acquire_owned().await.expect("the semaphore is never closed");
            let (engine, discovery, query, bundle, opts) = (self.ctx.engine.clone(), self.ctx.discovery.clone(), query.clone(), bundle.clone(), opts.clone());
            let patch_id = self.patch_id.clone();
            let sha = self.task.spec.bundle.sha256.to_ascii_lowercase();
            set.spawn_blocking(move || {
                let _permit = permit;
                match &bundle {
                    Some(bundle) => engine::apply_one(engine.as_ref(), &discovery, &query, &target, bundle, &opts),
                    None => engine::revert_one(engine.as_ref(), &discovery, &query, &target, &patch_id, &sha, opts.strategy, opts.timeout),
                }
            });
        }
        let mut outcomes = vec![];
        while let Some(joined) = set.join_next().await {
            let outcome = joined?;
            match &outcome {
                Outcome::Applied { already: false, duration, pause_us, .. } => self.ctx.metrics.observe_engine("apply", *duration, *pause_us),
                Outcome::Reverted { was_applied: true, pause_us, .. } => self.ctx.metrics.observe_engine("revert", Duration::ZERO, *pause_us),
                Outcome::Failed { pid, failure } => {
                    self.ctx.metrics.error(failure.kind);
                    warn!(pid, reason = %failure.reason, message = %failure.message, "engine");
                }
                Outcome::Gone { pid, why } => {
                    self.ctx.metrics.error("process_gone");
                    info!(pid, %why, "process not touched");
                }
                _ => {}
            }
            outcomes.push(outcome);
        }
        outcomes.sort_by_key(Outcome::pid);
        Ok(outcomes)
    }
}

/// After an error: count it, retry later.
pub fn error_policy(_task: Arc<LivePatchTask>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.kind());
    warn!(%error, "reconcile failed");
    Action::requeue(ctx.backoff)
}

/// The tasks of a pod (from the cache): a pod event reconciles them.
pub fn tasks_for_pod(tasks: &[Arc<LivePatchTask>], pod: &Pod) -> Vec<ObjectRef<LivePatchTask>> {
    tasks
        .iter()
        .filter(|t| t.namespace() == pod.namespace() && t.spec.pod_name == pod.name_any())
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// The task watch of a node: only its label.
pub fn task_watch_config(node: &str) -> watcher::Config {
    watcher::Config::default().labels(&format!("{NODE_LABEL}={node}")).any_semantic()
}

/// Of the task watch's objects, those that trigger a reconcile: a task seen for the first time
/// or with a new `metadata.generation` (its spec changed). A status write (the agent's own)
/// leaves the generation alone and is only cached.
pub fn reconcile_triggers<S>(tasks: S) -> impl Stream<Item = Result<LivePatchTask, watcher::Error>> + Send + 'static
where
    S: Stream<Item = Result<LivePatchTask, watcher::Error>> + Send + 'static,
{
    tasks.predicate_filter(predicates::generation, PredicateConfig::default())
}

/// The controller of this node's tasks; its `store()` is the cache for [`Context::tasks`]. The
/// cache follows every change of the tasks (statuses included); only [`reconcile_triggers`]
/// reach the reconciler.
pub fn task_controller(client: Client, node: &str, scope: &Scope) -> Controller<LivePatchTask> {
    let (store, writer) = reflector::store();
    let tasks = reflector::reflector(writer, watcher::watcher(scope.api(client), task_watch_config(node))).applied_objects();
    Controller::for_stream(reconcile_triggers(tasks), store)
}

/// Run `controller` (from [`task_controller`]) until `shutdown` resolves; `ready` is called once
/// the first list of tasks is in.
pub async fn run(
    controller: Controller<LivePatchTask>,
    ctx: Arc<Context>,
    concurrency: u16,
    ready: impl FnOnce() + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let node = ctx.node.clone();
    let pods_api: Api<Pod> = ctx.scope.api(ctx.client.clone());
    let store = controller.store();
    let waiting = store.clone();
    tokio::spawn(async move {
        // The store's readiness signal wakes only its latest waiter (the controller's runner):
        // poll again now and then instead of waiting once.
        loop {
            match tokio::time::timeout(Duration::from_millis(500), waiting.wait_until_ready()).await {
                Ok(Ok(())) => return ready(),
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });
    info!(%node, "starting the task controller");
    controller
        .watches(pods_api, watcher::Config::default().fields(&format!("spec.nodeName={node}")).any_semantic(), move |pod| {
            tasks_for_pod(&store.state(), &pod)
        })
        .with_config(ControllerConfig::default().concurrency(concurrency).debounce(Duration::from_millis(200)))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(object = %object, "reconciled"),
                Err(e) => debug!(error = %e, "controller"),
            }
        })
        .await;
    info!("the task controller stopped");
}

#[cfg(test)]
pub(crate) mod tests;
