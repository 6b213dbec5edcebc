//! Types used by both the `LivePatch` and the `LivePatchTask` spec.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which executable the patch was built for. The agent refuses to touch a process whose running
/// executable has another GNU build id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetExecutable {
    /// GNU build id (the `NT_GNU_BUILD_ID` note) of the executable the patch was built against, in
    /// lowercase hex, as `readelf -n` or `file` print it. Processes running another build are
    /// not patched (their target reports `Failed`).
    #[serde(rename = "buildID")]
    #[schemars(length(min = 8, max = 128))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[0-9a-f]+$')",
        "message": "buildID must be lowercase hex"
    }]))]
    pub build_id: String,

    /// Absolute path of the executable inside the container (optional). When set, only processes
    /// running this path are patched; otherwise every process of the container whose executable
    /// has the build id is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.startsWith('/')",
        "message": "path must be absolute"
    }]))]
    pub path: Option<String>,
}

/// Where the patch bundle is and what it must hash to. Exactly one of `configMapRef`, `secretRef`
/// and `url` is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.configMapRef), has(self.secretRef), has(self.url)].exists_one(x, x)",
    "message": "exactly one of configMapRef, secretRef and url must be set"
}]))]
pub struct PatchBundle {
    /// The bundle is the (binary) value of this key of a ConfigMap in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<KeyRef>,

    /// The bundle is the value of this key of a Secret in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,

    /// The bundle is downloaded by the node agent from this https URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isURL(self) && url(self).getScheme() == 'https' && url(self).getHost() != ''",
        "message": "url must be an https URL"
    }]))]
    pub url: Option<String>,

    /// SHA-256 digest of the bundle file, 64 lowercase hex characters. The agent refuses a bundle
    /// with another digest.
    #[schemars(length(min = 64, max = 64))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[0-9a-f]{64}$')",
        "message": "sha256 must be 64 lowercase hex characters"
    }]))]
    pub sha256: String,
}

/// A key of a ConfigMap or Secret in the namespace of the resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the ConfigMap or Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key whose value is the bundle.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How the agent makes sure no thread is executing a procedure while its entry is overwritten.
/// `Trap` (default): stop the process once, and if a patched procedure is active on some stack,
/// lead its entry to a gate in the patch region (new calls wait there, in the target) and switch
/// as soon as the active frames have left (docs/gates.md).
/// `Wait`: stop, check every stack, resume and retry until the procedures are inactive.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Strategy {
    /// Watched area: new calls wait at the entry's gate while the old frames drain.
    #[default]
    Trap,
    /// Poll: stop, check the stacks, resume, retry.
    Wait,
}
