//! The `LivePatchTask` kind: one target pod's work for its node agent.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    common::{PatchBundle, Strategy, TargetExecutable},
    Reason,
};

/// The work for one target pod. Written by the operator (owned by the LivePatch, labelled
/// `livepatch.dev/node=<node>`); its status is written only by the node agent of that node.
// clippy reads the repeated `type_ = "string"` of the printer columns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "livepatch.dev",
    version = "v1alpha1",
    kind = "LivePatchTask",
    plural = "livepatchtasks",
    singular = "livepatchtask",
    shortname = "lpt",
    namespaced,
    status = "LivePatchTaskStatus",
    derive = "PartialEq",
    doc = "LivePatchTask is the work of one LivePatch for one target pod, for the node agent of the pod's node. Written by the operator; its status is written by the agent.",
    selectable = ".spec.nodeName",
    selectable = ".spec.podName",
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.podName"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Attempts", type_ = "integer", json_path = ".status.attempts", priority = 1),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct LivePatchTaskSpec {
    /// Name of the target pod.
    pub pod_name: String,

    /// UID of the target pod (a pod recreated under the same name is another target).
    pub pod_uid: String,

    /// Node the pod runs on; the same as the `livepatch.dev/node` label.
    pub node_name: String,

    /// Name of the container to patch.
    pub container_name: String,

    /// ID of the container to patch, as in the pod's status (`containerd://<id>`). When the
    /// container restarts, the operator writes the new ID here and the agent patches it again.
    pub container_id: String,

    /// Where the patch bundle is and its digest (copied from the LivePatch).
    pub bundle: PatchBundle,

    /// Which executable the patch applies to (copied from the LivePatch).
    pub target: TargetExecutable,

    /// Activation strategy (copied from the LivePatch).
    pub strategy: Strategy,

    /// Per-process activation timeout in seconds (copied from the LivePatch).
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,

    /// What the agent must do: `Apply` the patch, or `Revert` it (the LivePatch is being deleted
    /// or the pod is no longer a target).
    pub action: TaskAction,

    /// The LivePatch `metadata.generation` this task's content was last derived from.
    pub live_patch_generation: i64,
}

/// What the agent must do with a task.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum TaskAction {
    /// Make the target run the new code.
    #[default]
    Apply,
    /// Make the target run the original code again.
    Revert,
}

/// What the agent did, written only by the node agent of `spec.nodeName`.
///
/// The agent writes `observedGeneration` = the task's `metadata.generation` it acted on: the
/// operator treats a status whose `observedGeneration` is older than the task's generation as
/// not yet reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivePatchTaskStatus {
    /// The task's `metadata.generation` this status reports on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Outcome for the target: `Pending` (in progress), `Applied`, `Failed`, `Blocked` (a patched
    /// procedure stayed active past the timeout), `RestartRequired` (cannot be patched live),
    /// `Reverted`.
    pub phase: TargetPhase,

    /// The container ID the agent acted on (compare with `spec.containerId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,

    /// Host PIDs of the container's processes that the agent patched or tried to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<i64>,

    /// How many times the agent tried for this generation.
    #[serde(default)]
    pub attempts: i32,

    /// Machine-readable reason in CamelCase (e.g. `BuildIDMismatch`, `ProcedureActive`,
    /// `DataLayoutChanged`, `TooManyPatches`).
    // A string on the wire (a reason of another agent version still reads); written and read in
    // code as a [`Reason`] (see [`LivePatchTaskStatus::known_reason`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Longest time a process was stopped for the switch, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_micros: Option<i64>,

    /// ID of the patch as recorded in the target's patch region header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_id: Option<String>,
}

/// Outcome for one target pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum TargetPhase {
    /// The agent is working on it (or has not reported yet).
    #[default]
    Pending,
    /// Every process of the target runs the new code.
    Applied,
    /// Patching failed.
    Failed,
    /// A patched procedure stayed active past the timeout.
    Blocked,
    /// The change cannot be applied live; the pod needs an offline restart.
    RestartRequired,
    /// The original code runs again (or nothing had been applied).
    Reverted,
}

impl LivePatchTaskStatus {
    /// The reason as a [`Reason`]; `None` when there is none or it is one this version does not
    /// know (written by another version of the agent).
    pub fn known_reason(&self) -> Option<Reason> {
        self.reason.as_deref()?.parse().ok()
    }
}

impl TargetPhase {
    /// True for the outcomes of an `Apply` that end the agent's work on it (everything but
    /// `Pending` and `Reverted`).
    pub fn is_settled_apply(self) -> bool {
        matches!(
            self,
            TargetPhase::Applied | TargetPhase::Failed | TargetPhase::Blocked | TargetPhase::RestartRequired
        )
    }
}
