//! The `LivePatch` API types (custom resources) shared by the operator and the node agent.
//!
//! Two kinds, both namespaced, in the API group [`GROUP`] at version [`VERSION`]:
//!
//! * [`LivePatch`]: written by people (kubectl, Helm, GitOps). Which pods, which executable, which
//!   patch bundle, how carefully. Its status is written by the operator only.
//! * [`LivePatchTask`]: one per target pod, written by the operator (owned by the `LivePatch`,
//!   labelled with the node in [`NODE_LABEL`]); its status is written by the node agent of that node
//!   only.
//!
//! The doc comments on every field become the descriptions in the generated CRD schema, so they are
//! written for the person reading `kubectl explain livepatch.spec`.
//!
//! [`Reason`] is every machine-readable reason the two components write (task status, LivePatch
//! conditions, events): one enum, serialised as its CamelCase name.

mod common;
mod livepatch;
mod reason;
mod task;

pub use common::{KeyRef, PatchBundle, Strategy, TargetExecutable};
pub use livepatch::{
    LivePatch, LivePatchPhase, LivePatchSpec, LivePatchStatus, RestartRequiredTarget, Rollout, Safety,
    TargetCounts,
};
pub use reason::{Reason, UnknownReason};
pub use task::{LivePatchTask, LivePatchTaskSpec, LivePatchTaskStatus, TargetPhase, TaskAction};

/// The API group of both kinds.
pub const GROUP: &str = "livepatch.dev";
/// The API version of both kinds.
pub const VERSION: &str = "v1alpha1";

/// Label on every task: the name of the node whose agent must act on it.
/// Agents select their work with `livepatch.dev/node=<node name>`.
pub const NODE_LABEL: &str = "livepatch.dev/node";
/// Label on every task: the name of the `LivePatch` it belongs to.
pub const LIVEPATCH_LABEL: &str = "livepatch.dev/livepatch";
/// Label on every task: who manages it (`app.kubernetes.io/managed-by`).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The operator's name: field manager for server-side apply, event reporter, `managed-by` value.
pub const OPERATOR_NAME: &str = "livepatch-operator";
/// Finalizer the operator puts on every `LivePatch`: deleting it first reverts the patch.
pub const FINALIZER: &str = "livepatch.dev/revert";
/// Annotation on a `LivePatch`: `"true"` releases the finalizer at once, without waiting for the
/// agents to revert (for a node that is gone for good, or an agent that will never come back).
pub const FORCE_RELEASE_ANNOTATION: &str = "livepatch.dev/force-release";
/// Label the node agent puts on a pod that needs an ordinary (offline) restart to get the fix.
pub const RESTART_REQUIRED_LABEL: &str = "livepatch.dev/restart-required";
/// Pod label: `enabled` asks the operator's admission webhook for an agent sidecar in the pod
/// (sidecar mode, for clusters that forbid `hostPID`).
pub const SIDECAR_LABEL: &str = "livepatch.dev/sidecar";
/// Pod label set by the webhook: `sidecar` when the pod carries its own agent, so node agents
/// leave its tasks to it.
pub const AGENT_LABEL: &str = "livepatch.dev/agent";
/// Name of the injected sidecar container.
pub const SIDECAR_CONTAINER: &str = "livepatch-agent";

/// Default of `spec.safety.timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: i32 = 30;
/// Default of `spec.rollout.maxConcurrent`.
pub const DEFAULT_MAX_CONCURRENT: i32 = 1;

#[cfg(test)]
mod tests;
