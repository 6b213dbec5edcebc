//! The engine calls of one process, each run on one blocking thread from the first check to the
//! last ptrace detach, and what came of them.
//!
//! The engine sits behind the [`Engine`] trait so the controller is tested against a fake one
//! (the mock-API tests) and runs the real one ([`LiveEngine`]) everywhere else.

use std::time::{Duration, Instant};

use livepatch::{apply, bundle::Bundle, error::RefusalKind, revert, status, watchpoint::Strategy};
use livepatch_api::Reason;

use crate::discovery::{Discovery, Query, Target};

/// The engine operations the agent uses (synchronous: call them on a blocking thread).
pub trait Engine: Send + Sync + 'static {
    fn status(&self, pid: i32) -> livepatch::Result<status::Status>;
    fn apply(&self, pid: i32, bundle: &Bundle, opts: &apply::Options) -> livepatch::Result<apply::Report>;
    /// Remove the newest patch of the process.
    fn revert_newest(&self, pid: i32, strategy: Strategy, timeout: Duration) -> livepatch::Result<revert::Report>;
}

/// The real engine: ptrace on the processes of this host.
pub struct LiveEngine;

impl Engine for LiveEngine {
    fn status(&self, pid: i32) -> livepatch::Result<status::Status> {
        status::status(pid)
    }
    fn apply(&self, pid: i32, bundle: &Bundle, opts: &apply::Options) -> livepatch::Result<apply::Report> {
        apply::apply(pid, bundle, opts)
    }
    fn revert_newest(&self, pid: i32, strategy: Strategy, timeout: Duration) -> livepatch::Result<revert::Report> {
        revert::revert(pid, false, strategy, timeout, Default::default())
    }
}

/// Classified engine failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The reason for the task status.
    pub reason: Reason,
    /// The `kind` label of `livepatch_agent_errors_total`.
    pub kind: &'static str,
    pub message: String,
    /// An offline restart gets the fix (the engine's `restart_required`).
    pub restart_required: bool,
    /// Trying again later may succeed.
    pub retryable: bool,
}

/// The task reason of an engine refusal.
pub fn refusal_reason(kind: RefusalKind) -> Reason {
    match kind {
        RefusalKind::DataLayout => Reason::DataLayoutChanged,
        RefusalKind::BuildIdMismatch => Reason::BuildIDMismatch,
        RefusalKind::CodeMismatch => Reason::BundleDoesNotFit,
        RefusalKind::FunctionTooShort
        | RefusalKind::UnsupportedReference
        | RefusalKind::RegisterContract
        | RefusalKind::MissingSymbol
        | RefusalKind::Recorded => Reason::LiveUpdateRefused,
    }
}

/// What the agent needs to attach, said where the engine's error does not say it already.
const PERMISSION_HINT: &str = "the agent needs hostPID: true and securityContext.capabilities.add: [SYS_PTRACE]";

impl Failure {
    pub fn of(e: &livepatch::Error) -> Self {
        use livepatch::Error as E;
        let message = e.to_string();
        let (reason, kind, retryable) = match e {
            E::BuildIdMismatch { .. } => (Reason::BuildIDMismatch, "build_id_mismatch", false),
            E::Blocked(_) => (Reason::ProcedureActive, "engine_blocked", true),
            E::Refused { kind, .. } => {
                let reason = refusal_reason(*kind);
                (reason, if reason == Reason::BuildIDMismatch { "build_id_mismatch" } else { "engine_refused" }, false)
            }
            E::Ptrace { errno: nix_errno, .. } if *nix_errno as i32 == libc::EPERM => (Reason::PermissionDenied, "permission", false),
            E::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => (Reason::PermissionDenied, "permission", false),
            E::Process { .. } => (Reason::ProcessError, "engine_other", true),
            E::Bundle(_) | E::Elf { .. } => (Reason::BundleInvalid, "engine_other", false),
            _ => (Reason::EngineError, "engine_other", true),
        };
        // A ptrace EPERM carries the engine's own advice; an I/O permission error does not.
        let engine_advised = matches!(e, E::Ptrace { advice, .. } if !advice.is_empty());
        let message = if reason == Reason::PermissionDenied && !engine_advised { format!("{message} ({PERMISSION_HINT})") } else { message };
        Failure { reason, kind, message, restart_required: e.restart_required(), retryable }
    }
}

/// What happened to one process.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The patch runs in the process (now, or already before).
    Applied {
        pid: i32,
        already: bool,
        pause_us: u64,
        stacked: usize,
        restart_recommended: bool,
        /// Engine time for the apply call.
        duration: Duration,
    },
    /// The patch was removed (or was not there).
    Reverted { pid: i32, was_applied: bool, pause_us: u64 },
    /// The engine refused or failed.
    Failed { pid: i32, failure: Failure },
    /// The patch is in the process but another patch was applied after it: the engine reverts
    /// only the newest one.
    NotNewest { pid: i32, newer: String },
    /// The process is gone or no longer passes the discovery checks: it was not touched.
    Gone { pid: i32, why: String },
}

impl Outcome {
    pub fn pid(&self) -> i32 {
        match self {
            Outcome::Applied { pid, .. }
            | Outcome::Reverted { pid, .. }
            | Outcome::Failed { pid, .. }
            | Outcome::NotNewest { pid, .. }
            | Outcome::Gone { pid, .. } => *pid,
        }
    }
}

/// Whether the live patches of `st` include `patch_id`, and the newest live patch.
fn live_patches(st: &status::Status) -> Vec<&status::PatchStatus> {
    let mut live: Vec<&status::PatchStatus> = st.patches.iter().filter(|p| p.state == "applied").collect();
    live.sort_by_key(|p| p.seq);
    live
}

/// Apply to one process: re-check it, read what it already runs, apply only if the patch is not
/// there. Blocking.
pub fn apply_one(engine: &dyn Engine, discovery: &Discovery, query: &Query, target: &Target, bundle: &Bundle, opts: &apply::Options) -> Outcome {
    let pid = target.pid;
    if let Err(why) = discovery.recheck(target, query) {
        return Outcome::Gone { pid, why };
    }
    let patch_id = bundle.patch_id();
    match engine.status(pid) {
        Ok(st) => {
            let live = live_patches(&st);
            if live.iter().any(|p| p.patch_id == patch_id) {
                return Outcome::Applied {
                    pid,
                    already: true,
                    pause_us: 0,
                    stacked: st.stacked,
                    restart_recommended: st.restart_recommended,
                    duration: Duration::ZERO,
                };
            }
        }
        Err(e) => return Outcome::Failed { pid, failure: Failure::of(&e) },
    }
    // Right before the engine attaches: still the same process of the same container.
    if let Err(why) = discovery.recheck(target, query) {
        return Outcome::Gone { pid, why };
    }
    let started = Instant::now();
    match engine.apply(pid, bundle, opts) {
        Ok(r) => Outcome::Applied {
            pid,
            already: r.already_applied,
            pause_us: r.pause_us,
            stacked: r.stacked,
            restart_recommended: r.restart_recommended,
            duration: started.elapsed(),
        },
        Err(e) => Outcome::Failed { pid, failure: Failure::of(&e) },
    }
}

/// Revert the task's patch in one process if it is there and is the newest patch. The patch is
/// recognised by its id (`patch_id`: the one recorded at apply time) or by the bundle digest in its
/// region header (`sha256`). Blocking.
#[allow(clippy::too_many_arguments)]
pub fn revert_one(engine: &dyn Engine, discovery: &Discovery, query: &Query, target: &Target, patch_id: &str, sha256: &str, strategy: Strategy, timeout: Duration) -> Outcome {
    let pid = target.pid;
    if let Err(why) = discovery.recheck(target, query) {
        return Outcome::Gone { pid, why };
    }
    let st = match engine.status(pid) {
        Ok(st) => st,
        Err(e) => return Outcome::Failed { pid, failure: Failure::of(&e) },
    };
    let live = live_patches(&st);
    let ours = |p: &status::PatchStatus| p.patch_id == patch_id || p.bundle_sha256.eq_ignore_ascii_case(sha256);
    if !live.iter().any(|p| ours(p)) {
        return Outcome::Reverted { pid, was_applied: false, pause_us: 0 };
    }
    if let Some(newest) = live.last().filter(|p| !ours(p)) {
        return Outcome::NotNewest { pid, newer: newest.patch_id.clone() };
    }
    if let Err(why) = discovery.recheck(target, query) {
        return Outcome::Gone { pid, why };
    }
    match engine.revert_newest(pid, strategy, timeout) {
        Ok(r) => Outcome::Reverted { pid, was_applied: !r.reverted.is_empty(), pause_us: r.pause_us },
        Err(e) => Outcome::Failed { pid, failure: Failure::of(&e) },
    }
}

/// The engine's strategy for the API's.
pub fn strategy(s: livepatch_api::Strategy) -> Strategy {
    match s {
        livepatch_api::Strategy::Trap => Strategy::Trap,
        livepatch_api::Strategy::Wait => Strategy::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every engine refusal kind has its task reason; only the build-id and code mismatches are
    /// not "restart to get the fix".
    #[test]
    fn every_refusal_kind_maps_to_its_reason() {
        use RefusalKind as K;
        let all = [
            (K::DataLayout, Reason::DataLayoutChanged),
            (K::BuildIdMismatch, Reason::BuildIDMismatch),
            (K::CodeMismatch, Reason::BundleDoesNotFit),
            (K::FunctionTooShort, Reason::LiveUpdateRefused),
            (K::UnsupportedReference, Reason::LiveUpdateRefused),
            (K::RegisterContract, Reason::LiveUpdateRefused),
            (K::MissingSymbol, Reason::LiveUpdateRefused),
            (K::Recorded, Reason::LiveUpdateRefused),
        ];
        for (kind, reason) in all {
            assert_eq!(refusal_reason(kind), reason, "{kind:?}");
            let f = Failure::of(&livepatch::Error::refused_kind(kind, "no"));
            assert_eq!((f.reason, f.retryable, f.restart_required), (reason, false, true), "{kind:?}");
            let metric = if kind == K::BuildIdMismatch { "build_id_mismatch" } else { "engine_refused" };
            assert_eq!(f.kind, metric, "{kind:?}");
        }
    }

    #[test]
    fn other_engine_errors_map_to_their_reason() {
        use livepatch::Error as E;
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let cases = [
            (E::BuildIdMismatch { pid: 1, expected: "aa".into(), found: "bb".into() }, Reason::BuildIDMismatch, false),
            (E::Blocked("active".into()), Reason::ProcedureActive, true),
            (E::io("reading /proc/7/mem", denied), Reason::PermissionDenied, false),
            (E::Process { pid: 7, msg: "exited".into() }, Reason::ProcessError, true),
            (E::Bundle("truncated".into()), Reason::BundleInvalid, false),
            (E::Other("?".into()), Reason::EngineError, true),
        ];
        for (e, reason, retryable) in cases {
            let f = Failure::of(&e);
            assert_eq!((f.reason, f.retryable), (reason, retryable), "{e}");
            if reason == Reason::PermissionDenied {
                // Said once (a ptrace EPERM carries the engine's own advice instead).
                assert_eq!(f.message.matches("securityContext").count(), 1, "{}", f.message);
            }
        }
    }
}
