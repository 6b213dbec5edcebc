//! The `LivePatch` kind: what people write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{PatchBundle, Strategy, TargetExecutable};

/// Live-patch the running processes of the selected pods: replace a few procedures of their
/// executable with new code, without a restart.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "livepatch.dev",
    version = "v1alpha1",
    kind = "LivePatch",
    plural = "livepatches",
    singular = "livepatch",
    shortname = "lp",
    namespaced,
    status = "LivePatchStatus",
    derive = "PartialEq",
    doc = "LivePatch replaces a few procedures of the executable running in the selected pods with new code, live. The operator dispatches it to the node agents through LivePatchTasks and reports here.",
    validation = ::kube::core::Rule::new("size(self.metadata.name) <= 63").message("a LivePatch name must be at most 63 characters (it is used as a label value)"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Phase of the rollout"),
    printcolumn(name = "Targets", type_ = "integer", json_path = ".status.counts.targets", description = "Pods selected"),
    printcolumn(name = "Patched", type_ = "integer", json_path = ".status.counts.patched", description = "Pods running the new code"),
    printcolumn(name = "Restart-Required", type_ = "integer", json_path = ".status.counts.restartRequired", description = "Pods that need an offline restart"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct LivePatchSpec {
    /// Which pods to patch: a label selector over the pods of the LivePatch's own namespace. Must
    /// not be empty (a LivePatch never targets every pod by accident).
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)",
        "message": "selector must not be empty"
    }]))]
    pub selector: LabelSelector,

    /// Name of the container to patch in each pod. Default: the container named by the pod's
    /// `kubectl.kubernetes.io/default-container` annotation, else the pod's first container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub container: Option<String>,

    /// Which executable the patch applies to.
    pub target: TargetExecutable,

    /// Where the patch bundle is (exactly one source) and its digest.
    pub patch: PatchBundle,

    /// How carefully the new code is activated.
    #[serde(default)]
    pub safety: Safety,

    /// How many pods are patched at once.
    #[serde(default)]
    pub rollout: Rollout,
}

/// Activation safety.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Safety {
    /// How to wait until no thread is inside a patched procedure: `Trap` (watched area, default)
    /// or `Wait` (stop, check the stacks, retry).
    #[serde(default)]
    pub strategy: Strategy,

    /// How long the agent may wait for the patched procedures to become inactive in one process
    /// before it gives up on that attempt and reports the target `Blocked`. 1 to 3600, default 30.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,
}

impl Default for Safety {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            timeout_seconds: crate::DEFAULT_TIMEOUT_SECONDS,
        }
    }
}

fn default_timeout_seconds() -> i32 {
    crate::DEFAULT_TIMEOUT_SECONDS
}

/// Rollout limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// How many pods may be in progress (dispatched to their agent and not yet reported Applied,
    /// Failed, Blocked or RestartRequired) at the same time. At least 1, default 1.
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self >= 1",
        "message": "maxConcurrent must be at least 1"
    }]))]
    pub max_concurrent: i32,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            max_concurrent: crate::DEFAULT_MAX_CONCURRENT,
        }
    }
}

fn default_max_concurrent() -> i32 {
    crate::DEFAULT_MAX_CONCURRENT
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivePatchStatus {
    /// The `metadata.generation` of the LivePatch this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of the rollout: `Pending` (no target pod yet), `Progressing`, `Applied` (every
    /// target patched), `Degraded` (some target failed or is blocked), `RestartRequired` (every
    /// other target patched, some need an offline restart), `Reverting` (being deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LivePatchPhase>,

    /// How many target pods are in each state.
    #[serde(default)]
    pub counts: TargetCounts,

    /// The pods that cannot be patched live and need an ordinary (offline) restart, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_required: Vec<RestartRequiredTarget>,

    /// Standard conditions: `Ready` (every target patched), `Progressing` (targets still being
    /// patched or reverted), `Degraded` (some target failed or is blocked), `RestartRequired`
    /// (some target needs an offline restart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Summary phase of a LivePatch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum LivePatchPhase {
    /// No target pod (yet).
    Pending,
    /// Some targets are still being patched.
    Progressing,
    /// Every target is patched.
    Applied,
    /// Some target failed or is blocked.
    Degraded,
    /// Every other target is patched; some need an offline restart.
    RestartRequired,
    /// The LivePatch is being deleted and the agents revert it.
    Reverting,
}

/// Number of target pods in each state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetCounts {
    /// Pods selected (running or about to run) that the LivePatch targets.
    #[serde(default)]
    pub targets: i32,
    /// Targets whose processes run the new code.
    #[serde(default)]
    pub patched: i32,
    /// Targets not settled yet: waiting for a rollout slot, for their container to run, or for
    /// their agent.
    #[serde(default)]
    pub pending: i32,
    /// Targets where patching failed (wrong build, bad bundle, no such container, engine error).
    #[serde(default)]
    pub failed: i32,
    /// Targets where a patched procedure stayed active past the timeout.
    #[serde(default)]
    pub blocked: i32,
    /// Targets that cannot be patched live and need an offline restart.
    #[serde(default)]
    pub restart_required: i32,
    /// While reverting (being deleted): targets reverted or gone.
    #[serde(default)]
    pub reverted: i32,
}

/// A pod that needs an offline restart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartRequiredTarget {
    /// Pod name.
    pub pod: String,
    /// Node the pod runs on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Why a live update is unsafe or impossible for it, as reported by its agent.
    pub reason: String,
}
