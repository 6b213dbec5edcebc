//! The controller: reads what `plan` needs from the API server, carries the plan out (server-side
//! apply of tasks and status, events, metrics), and wires the kube-rs `Controller`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{Future, StreamExt};
use k8s_openapi::{
    api::core::v1::{Node, ObjectReference, Pod},
    jiff::Timestamp,
};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams},
    core::{Selector, SelectorExt},
    runtime::{
        controller::{Action, Config as ControllerConfig, Controller},
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{finalizer, Event as FinalizerEvent},
        reflector::{ObjectRef, Store},
        watcher,
    },
    Client, Resource, ResourceExt,
};
use livepatch_api::{
    LivePatch, LivePatchTask, FINALIZER, LIVEPATCH_LABEL, MANAGED_BY_LABEL, OPERATOR_NAME,
};
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use crate::{
    metrics::Metrics,
    plan::{self, Observed, Plan},
    pods::PodView,
};

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The time source (fixed in tests).
    pub clock: fn() -> Timestamp,
    /// Requeue a settled LivePatch after this long (catches label changes the pod watch cannot
    /// attribute, and anything else missed).
    pub resync: Duration,
    /// Requeue a LivePatch waiting for its targets to be reverted after this long.
    pub revert_poll: Duration,
    /// Requeue after an error after this long.
    pub error_backoff: Duration,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, identity: &str) -> Self {
        let reporter = Reporter {
            controller: OPERATOR_NAME.to_string(),
            instance: Some(identity.to_string()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            clock: Timestamp::now,
            resync: Duration::from_secs(300),
            revert_poll: Duration::from_secs(10),
            error_backoff: Duration::from_secs(15),
        }
    }
}

/// Why a reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Not a failure: the finalizer stays until every target is reverted (the controller polls).
    #[error("waiting for {0} target(s) to be reverted")]
    RevertPending(i32),
    #[error("the LivePatch has no namespace")]
    MissingNamespace,
}

impl Error {
    /// The `kind` label of `livepatch_reconcile_errors_total`.
    pub fn kind(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(kube::Error::Api(status)) if status.is_conflict() => "conflict",
            Error::Kube(kube::Error::Api(status)) if status.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Finalizer(inner) => match inner.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.kind(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => "finalizer",
                F::UnnamedObject | F::InvalidFinalizer => "invalid_object",
            },
            Error::RevertPending(_) => "revert_pending",
            Error::MissingNamespace => "invalid_object",
        }
    }
}

/// Reconcile one LivePatch: add the finalizer, then dispatch (Apply) or revert and release
/// (Cleanup).
#[instrument(skip(lp, ctx), fields(namespace = %lp.namespace().unwrap_or_default(), livepatch = %lp.name_any(), generation = lp.metadata.generation.unwrap_or_default()))]
pub async fn reconcile(lp: Arc<LivePatch>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = lp.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<LivePatch> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, lp, |event| async {
        match event {
            FinalizerEvent::Apply(lp) => apply(&lp, &ctx).await,
            FinalizerEvent::Cleanup(lp) => cleanup(&lp, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::CleanupFailed(Error::RevertPending(n)) => Error::RevertPending(n),
        e => Error::Finalizer(Box::new(e)),
    });
    ctx.metrics.observe(started.elapsed());
    result
}

/// What to do after a failed reconcile.
pub fn error_policy(lp: Arc<LivePatch>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Error::RevertPending(n) = error {
        debug!(livepatch = %lp.name_any(), pending = n, "waiting for targets to be reverted");
        return Action::requeue(ctx.revert_poll);
    }
    ctx.metrics.error(error.kind());
    warn!(namespace = %lp.namespace().unwrap_or_default(), livepatch = %lp.name_any(), kind = error.kind(), %error, "reconcile failed");
    Action::requeue(ctx.error_backoff)
}

fn selector_of(lp: &LivePatch) -> Result<Selector, String> {
    match Selector::try_from(lp.spec.selector.clone()) {
        Ok(s) if s.selects_all() => Err("the selector is empty".to_string()),
        Ok(s) => Ok(s),
        Err(e) => Err(e.to_string()),
    }
}

async fn apply(lp: &LivePatch, ctx: &Context) -> Result<Action, Error> {
    let plan = match selector_of(lp) {
        Ok(selector) => {
            let observed = observe(lp, ctx, Some(&selector), false).await?;
            plan::plan_apply(lp, &observed, (ctx.clock)())
        }
        Err(e) => plan::plan_invalid_selector(lp, &e, (ctx.clock)()),
    };
    execute(lp, ctx, &plan).await?;
    let c = &plan.status.counts;
    let changed = !plan.apply.is_empty() || !plan.delete.is_empty() || lp.status.as_ref() != Some(&plan.status);
    if !changed {
        debug!(targets = c.targets, patched = c.patched, pending = c.pending, "reconciled: nothing to change");
        return Ok(Action::requeue(ctx.resync));
    }
    info!(targets = c.targets, patched = c.patched, pending = c.pending, failed = c.failed, blocked = c.blocked,
        restart_required = c.restart_required, applied = plan.apply.len(), deleted = plan.delete.len(), "reconciled");
    Ok(Action::requeue(ctx.resync))
}

async fn cleanup(lp: &LivePatch, ctx: &Context) -> Result<Action, Error> {
    let observed = if plan::force_release(lp) {
        Observed { tasks: list_tasks(lp, ctx).await?, ..Observed::default() }
    } else {
        observe(lp, ctx, selector_of(lp).ok().as_ref(), true).await?
    };
    let plan = plan::plan_cleanup(lp, &observed, (ctx.clock)());
    execute(lp, ctx, &plan).await?;
    if plan.release {
        ctx.metrics.forget(&lp.namespace().unwrap_or_default(), &lp.name_any());
        info!("released");
        Ok(Action::await_change())
    } else {
        Err(Error::RevertPending(plan.status.counts.pending + plan.status.counts.failed))
    }
}

/// The tasks of this LivePatch (labelled with its name and owned by this very object).
async fn list_tasks(lp: &LivePatch, ctx: &Context) -> Result<Vec<LivePatchTask>, Error> {
    let api: Api<LivePatchTask> = Api::namespaced(ctx.client.clone(), &lp.namespace().unwrap_or_default());
    let params = ListParams::default().labels(&format!("{LIVEPATCH_LABEL}={}", lp.name_any()));
    let uid = lp.uid();
    Ok(api
        .list(&params)
        .await?
        .items
        .into_iter()
        .filter(|t| t.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref()))
        .collect())
}

/// Read the pods and tasks (and, while cleaning up, the nodes) the plan needs.
async fn observe(lp: &LivePatch, ctx: &Context, selector: Option<&Selector>, check_nodes: bool) -> Result<Observed, Error> {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &lp.namespace().unwrap_or_default());
    let pods = match selector {
        Some(selector) => pods_api
            .list(&ListParams::default().labels_from(selector))
            .await?
            .items
            .iter()
            .filter_map(PodView::from_pod)
            .collect(),
        None => vec![],
    };
    let tasks = list_tasks(lp, ctx).await?;
    let mut other_pods = BTreeMap::new();
    for name in plan::unmatched_pod_names(&pods, &tasks) {
        if let Some(view) = pods_api.get_opt(&name).await?.as_ref().and_then(PodView::from_pod) {
            other_pods.insert(name, view);
        }
    }
    let mut observed = Observed { pods, other_pods, tasks, ..Observed::default() };
    if check_nodes {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        for node in plan::nodes_to_check(&observed) {
            if nodes.get_opt(&node).await?.is_none() {
                observed.gone_nodes.insert(node);
            }
        }
    }
    Ok(observed)
}

/// Carry a plan out: apply and delete tasks, write the status if it changed, record the events.
async fn execute(lp: &LivePatch, ctx: &Context, plan: &Plan) -> Result<(), Error> {
    let ns = lp.namespace().unwrap_or_default();
    let name = lp.name_any();
    let tasks: Api<LivePatchTask> = Api::namespaced(ctx.client.clone(), &ns);
    let ssa = PatchParams::apply(OPERATOR_NAME).force();
    for task in &plan.apply {
        debug!(task = %task.name_any(), pod = %task.spec.pod_name, action = ?task.spec.action, "applying task");
        tasks.patch(&task.name_any(), &ssa, &Patch::Apply(task)).await?;
    }
    for task in &plan.delete {
        debug!(task = %task, "deleting task");
        match tasks.delete(task, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !plan.release && lp.status.as_ref() != Some(&plan.status) {
        let api: Api<LivePatch> = Api::namespaced(ctx.client.clone(), &ns);
        let body = json!({
            "apiVersion": LivePatch::api_version(&()),
            "kind": LivePatch::kind(&()),
            "status": plan.status,
        });
        api.patch_status(&name, &ssa, &Patch::Apply(&body)).await?;
    }
    if !plan.release {
        ctx.metrics.set_targets(&ns, &name, &plan.status.counts);
    }
    let reference = lp.object_ref(&());
    for note in &plan.notes {
        let event = KubeEvent {
            type_: if note.warning { EventType::Warning } else { EventType::Normal },
            reason: note.reason.as_str().to_string(),
            note: Some(truncate(&note.note, 1000)),
            action: note.action.clone(),
            secondary: note.pod.as_ref().map(|(pod, uid)| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.clone()),
                namespace: Some(ns.clone()),
                uid: Some(uid.clone()),
                ..ObjectReference::default()
            }),
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(reason = %note.reason, error = %e, "could not record event");
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The LivePatches (in `store`) whose selector matches this pod: a pod event reconciles them.
pub fn livepatches_for_pod(livepatches: &[Arc<LivePatch>], pod: &Pod) -> Vec<ObjectRef<LivePatch>> {
    let labels = pod.labels();
    livepatches
        .iter()
        .filter(|lp| lp.namespace() == pod.namespace())
        .filter(|lp| selector_of(lp).is_ok_and(|s| s.matches(labels)))
        .map(|lp| ObjectRef::from_obj(lp.as_ref()))
        .collect()
}

/// Run the controller until `shutdown` resolves. `namespace`: watch only this namespace.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (livepatches, tasks, pods): (Api<LivePatch>, Api<LivePatchTask>, Api<Pod>) = match &namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(livepatches, watcher::Config::default().any_semantic());
    let store: Store<LivePatch> = controller.store();
    info!(namespace = namespace.as_deref().unwrap_or("<all>"), "starting the LivePatch controller");
    controller
        .owns(tasks, watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={OPERATOR_NAME}")).any_semantic())
        .watches(pods, watcher::Config::default().any_semantic(), move |pod| livepatches_for_pod(&store.state(), &pod))
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(500)))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(object = %object, "reconciled"),
                Err(e) => debug!(error = %e, "controller"),
            }
        })
        .await;
    info!("the LivePatch controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use kube::core::ObjectMeta;

    fn lp(ns: &str, labels: &[(&str, &str)]) -> Arc<LivePatch> {
        let mut lp = LivePatch::new(
            "fix",
            serde_json::from_value(json!({
                "selector": {"matchLabels": {}},
                "target": {"buildID": "0123456789abcdef"},
                "patch": {"url": "https://x/y", "sha256": "0".repeat(64)},
            }))
            .unwrap(),
        );
        lp.spec.selector = LabelSelector {
            match_labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        };
        lp.metadata.namespace = Some(ns.into());
        Arc::new(lp)
    }

    #[test]
    fn pods_map_to_matching_livepatches_of_their_namespace() {
        let all = vec![lp("shop", &[("app", "cart")]), lp("other", &[("app", "cart")]), lp("shop", &[("app", "web")]), lp("shop", &[])];
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("cart-a".into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([("app".to_string(), "cart".to_string()), ("x".to_string(), "y".to_string())])),
                ..Default::default()
            },
            ..Default::default()
        };
        let refs = livepatches_for_pod(&all, &pod);
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].namespace.as_deref(), Some("shop"));
    }
}
