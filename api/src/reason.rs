//! The machine-readable reasons the agent and the operator write: `LivePatchTask.status.reason`,
//! the `reason` of the LivePatch's conditions and the reason of the events recorded on it.
//!
//! On the wire a reason is a CamelCase string (the status fields stay strings, so a reason written
//! by a newer agent still reads); in code every reason is a [`Reason`], produced with
//! [`Reason::as_str`] and read back with [`str::parse`] ([`std::str::FromStr`]), never compared as
//! text.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Declares [`Reason`] once: each variant's name is its wire string.
macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident,)+) => {
        /// A machine-readable reason, serialised as its CamelCase name.
        #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $name,)+
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)+];

            /// The CamelCase string written into statuses, conditions and events.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)+
                }
            }
        }
    };
}

reasons! {
    // --- LivePatchTask status, written by the node agent ---
    /// The agent took the task and is applying the patch (`Pending`).
    Applying,
    /// The task's container is not the pod's current one (not started, or restarted: the
    /// operator writes the new id), or the pod is gone (`Pending`).
    ContainerNotCurrent,
    /// The pod of a `Revert` task is gone: nothing runs the patch (`Reverted`).
    PodGone,
    /// The pod runs on another node than the task names.
    PodOnAnotherNode,
    /// The task cannot be acted on (bad container id or pod UID).
    InvalidTask,
    /// The agent cannot list the processes of the host (`hostPID: true` missing).
    ProcUnreadable,
    /// No process of the container runs on this node.
    ContainerNotRunning,
    /// Processes of the container run, none with the bundle's executable (nor another build of it).
    NoMatchingProcess,
    /// The processes run another build of the executable than the bundle was built for.
    BuildIDMismatch,
    /// The container runs the fixed build already (the build the bundle's new code comes from,
    /// e.g. after a rollout to the fixed image): nothing to patch, counted as patched (`Applied`).
    UpToDate,
    /// The bundle was built for another build id than the LivePatch names.
    BundleTargetMismatch,
    /// The bundle could not be fetched (missing object or key, download failure).
    BundleUnavailable,
    /// The bundle does not hash to the spec's sha256.
    BundleDigestMismatch,
    /// The bundle is over the agent's size limit.
    BundleTooLarge,
    /// The bundle is not a valid patch bundle (or its executable cannot be read as one).
    BundleInvalid,
    /// The agent requires signed bundles and this one has no signature.
    BundleUnsigned,
    /// The bundle's signature does not verify.
    BundleSignatureInvalid,
    /// The bundle is signed by a key the agent does not trust.
    BundleSignerUntrusted,
    /// The live code differs from the executable the bundle was built against.
    BundleDoesNotFit,
    /// The data layout changed: only an offline restart gets the fix.
    DataLayoutChanged,
    /// The engine refused the update for another reason an offline restart fixes.
    LiveUpdateRefused,
    /// A patched procedure stayed active past the timeout.
    ProcedureActive,
    /// Too many patches are stacked in the process: an offline restart is recommended.
    TooManyPatches,
    /// A newer patch sits on top of this one in the process: revert that one first.
    PatchNotNewest,
    /// The agent may not attach to the process (capabilities, `hostPID`).
    PermissionDenied,
    /// The process could not be read or controlled (it may have exited).
    ProcessError,
    /// Any other engine failure.
    EngineError,

    // --- LivePatch conditions and events, written by the operator ---
    /// `Ready`: every target runs the new code.
    AllTargetsPatched,
    /// `Ready`: no pod is selected.
    NoTargets,
    /// `Ready`: targets are still being patched.
    Progressing,
    /// `Ready`, `Degraded`: some target failed or is blocked.
    TargetsFailed,
    /// `Ready`: some target needs an offline restart; also the event when that condition turns true.
    RestartRequired,
    /// `Progressing`: tasks are dispatched and not settled.
    Dispatching,
    /// `Progressing`: every target settled.
    RolloutComplete,
    /// `Degraded`, `RestartRequired`: nothing to report.
    AsExpected,
    /// `RestartRequired`: some pods need an offline restart to get the fix.
    OfflineRestartRequired,
    /// Every condition while the LivePatch is deleted; also the event when that starts.
    Reverting,
    /// `Degraded` while deleting: some target could not be reverted.
    RevertFailed,
    /// The selector cannot be turned into a query (conditions and event).
    InvalidSelector,
    /// Event: the patch was dispatched to a pod.
    Dispatched,
    /// Event: dispatched again (the container restarted, or the pod was recreated).
    Redispatched,
    /// Event: a pod no longer selected is being reverted.
    RevertingTarget,
    /// Event: every target is patched.
    Applied,
    /// Event: the `Degraded` condition turned true.
    Degraded,
    /// Event: the finalizer was released after every target was reverted or gone.
    Released,
    /// Event: the finalizer was released at once (force-release annotation).
    ForceReleased,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Reason`] (a reason of another version, or a typo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownReason(pub String);

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown reason {:?}", self.0)
    }
}

impl std::error::Error for UnknownReason {}

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == s).ok_or_else(|| UnknownReason(s.to_string()))
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> String {
        r.as_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant to its string and back, through `FromStr` and through serde; no two
    /// variants share a string.
    #[test]
    fn every_reason_round_trips() {
        let mut seen = std::collections::BTreeSet::new();
        for &r in Reason::ALL {
            let s = r.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(s.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric()), "{s} is not CamelCase");
            assert_eq!(s.parse::<Reason>(), Ok(r));
            assert_eq!(r.to_string(), s);
            assert_eq!(String::from(r), s);
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::Value::String(s.into()));
            assert_eq!(serde_json::from_value::<Reason>(serde_json::Value::String(s.into())).unwrap(), r);
        }
    }

    /// The strings the statuses carried before the enum existed are unchanged.
    #[test]
    fn wire_strings_are_the_documented_ones() {
        for (r, s) in [
            (Reason::BuildIDMismatch, "BuildIDMismatch"),
            (Reason::DataLayoutChanged, "DataLayoutChanged"),
            (Reason::TooManyPatches, "TooManyPatches"),
            (Reason::ProcedureActive, "ProcedureActive"),
            (Reason::OfflineRestartRequired, "OfflineRestartRequired"),
        ] {
            assert_eq!(r.as_str(), s);
        }
    }

    #[test]
    fn unknown_strings_are_refused() {
        for s in ["", "buildIDMismatch", "TooManyPatches ", "Unknown"] {
            assert_eq!(s.parse::<Reason>(), Err(UnknownReason(s.into())));
        }
        assert!(serde_json::from_str::<Reason>("\"NoSuchReason\"").is_err());
    }
}
