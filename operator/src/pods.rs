//! What the operator needs to know about a pod, and which container of it a LivePatch targets.

use k8s_openapi::api::core::v1::Pod;
use livepatch_api::LivePatchSpec;

/// The pod annotation naming the default container (as kubectl uses it).
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// A pod, reduced to what the reconcile logic reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub uid: String,
    /// `spec.nodeName`: unset until the pod is scheduled.
    pub node: Option<String>,
    /// `status.phase`: Pending, Running, Succeeded, Failed, Unknown.
    pub phase: Option<String>,
    /// The pod has a deletion timestamp: its processes are about to end.
    pub terminating: bool,
    /// The container named by the default-container annotation, else the first container.
    pub default_container: Option<String>,
    /// The containers of `spec.containers`, with what `status.containerStatuses` says of them.
    pub containers: Vec<ContainerView>,
}

/// One container of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    /// `containerID` of the container's status (`containerd://...`), once it has started.
    pub container_id: Option<String>,
    /// The container is running now (`state.running`).
    pub running: bool,
}

impl PodView {
    /// Reduce a pod. `None` for a pod without name or uid (never the case for a pod read from the
    /// API server).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let name = pod.metadata.name.clone()?;
        let uid = pod.metadata.uid.clone()?;
        let spec = pod.spec.as_ref();
        let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_deref()).unwrap_or(&[]);
        let containers: Vec<ContainerView> = spec
            .map(|s| s.containers.as_slice())
            .unwrap_or(&[])
            .iter()
            .map(|c| {
                let status = statuses.iter().find(|s| s.name == c.name);
                ContainerView {
                    name: c.name.clone(),
                    container_id: status.and_then(|s| s.container_id.clone()).filter(|id| !id.is_empty()),
                    running: status
                        .and_then(|s| s.state.as_ref())
                        .is_some_and(|state| state.running.is_some()),
                }
            })
            .collect();
        let annotated = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION))
            .filter(|name| containers.iter().any(|c| &c.name == *name))
            .cloned();
        Some(Self {
            name,
            uid,
            node: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            default_container: annotated.or_else(|| containers.first().map(|c| c.name.clone())),
            containers,
        })
    }

    /// The pod's processes are gone or about to be: it finished, or it is being deleted.
    pub fn is_ending(&self) -> bool {
        self.terminating || matches!(self.phase.as_deref(), Some("Succeeded") | Some("Failed"))
    }
}

/// What a matching pod is for a LivePatch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The container runs: the task can be dispatched.
    Ready { node: String, container: String, container_id: String },
    /// Not yet: unscheduled, or the container is not running (starting, restarting).
    Waiting { reason: String },
    /// The pod can never be a target as the LivePatch is written (no such container).
    Invalid { reason: String },
}

/// Resolve a pod that matches the selector. `None`: not a target at all (the pod is ending).
pub fn resolve(spec: &LivePatchSpec, pod: &PodView) -> Option<Target> {
    if pod.is_ending() {
        return None;
    }
    let wanted = spec.container.as_ref().or(pod.default_container.as_ref());
    let Some(container) = wanted.and_then(|name| pod.containers.iter().find(|c| &c.name == name)) else {
        let reason = match &spec.container {
            Some(name) => format!("pod has no container {name:?}"),
            None => "pod has no container".to_string(),
        };
        return Some(Target::Invalid { reason });
    };
    let Some(node) = pod.node.clone() else {
        return Some(Target::Waiting { reason: "pod is not scheduled yet".into() });
    };
    match (&container.container_id, container.running) {
        (Some(id), true) => Some(Target::Ready {
            node,
            container: container.name.clone(),
            container_id: id.clone(),
        }),
        _ => Some(Target::Waiting {
            reason: format!("container {:?} is not running", container.name),
        }),
    }
}
