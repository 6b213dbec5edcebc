//! From the per-process outcomes to the task's status: plain functions over plain data.
//!
//! Apply:
//! * every process runs the patch: `Applied` (or `RestartRequired`, reason `TooManyPatches`, when
//!   the engine recommends an offline restart because too many patches are stacked);
//! * a process refused it in a way an offline restart fixes (data layout changed, a symbol the
//!   process lacks): `RestartRequired`;
//! * old code stayed active past the timeout: `Blocked`, retried while attempts remain, then
//!   `RestartRequired` (reason `ProcedureActive`);
//! * any other failure: `Failed` (retried while attempts remain when it may pass);
//! * no process of the container (not started yet, or exited): `Pending`, retried, then `Failed`
//!   (reason `ContainerNotRunning`).
//!
//! Revert: `Reverted` when no process of the container runs the patch any more (including "it was
//! never applied" and "the container is gone"); `Failed` otherwise, always retried (a newer patch
//! on top of this one can be reverted first by its own LivePatch).

use livepatch_api::{LivePatchTaskStatus, Reason, TargetPhase};

use crate::engine::Outcome;

/// What the controller must do after writing the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing until the task or its pod changes (or the periodic check of an applied task).
    Settled,
    /// Try again after a backoff.
    Retry,
}

/// The computed result of one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub phase: TargetPhase,
    pub reason: Option<Reason>,
    pub message: String,
    pub pids: Vec<i64>,
    pub pause_us: Option<u64>,
    pub next: Next,
    /// Some process was actually changed or an error happened (not only "already applied").
    pub worked: bool,
}

impl Verdict {
    /// The task status for this verdict.
    pub fn status(&self, generation: i64, container_id: &str, attempts: i32, patch_id: &str) -> LivePatchTaskStatus {
        LivePatchTaskStatus {
            observed_generation: Some(generation),
            phase: self.phase,
            container_id: Some(container_id.to_string()),
            pids: self.pids.clone(),
            attempts,
            reason: self.reason.map(String::from),
            message: Some(self.message.clone()),
            pause_micros: self.pause_us.map(|p| p as i64),
            patch_id: Some(patch_id.to_string()),
        }
    }

    /// A verdict without any process outcome (fetch or discovery stopped it).
    pub fn early(phase: TargetPhase, reason: Reason, message: String, next: Next) -> Self {
        Verdict { phase, reason: Some(reason), message, pids: vec![], pause_us: None, next, worked: true }
    }
}

/// Longest message written into a status.
const MAX_MESSAGE: usize = 1024;

fn clip(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn pid_list(pids: &[i32]) -> String {
    pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "es"
    }
}

/// The verdict of an apply attempt. `attempt` counts from 1; `last_attempt`: no retry follows.
pub fn apply_verdict(patch_id: &str, outcomes: &[Outcome], last_attempt: bool) -> Verdict {
    let mut applied = vec![];
    let mut changed = false;
    let mut pause = None::<u64>;
    let mut stacked = 0;
    let mut recommended = false;
    let mut failures = vec![];
    let mut gone = vec![];
    for o in outcomes {
        match o {
            Outcome::Applied { pid, already, pause_us, stacked: s, restart_recommended, .. } => {
                applied.push(*pid);
                changed |= !already;
                if !already {
                    pause = Some(pause.unwrap_or(0).max(*pause_us));
                }
                stacked = stacked.max(*s);
                recommended |= restart_recommended;
            }
            Outcome::Failed { pid, failure } => failures.push((*pid, failure)),
            Outcome::Gone { pid, why } => gone.push(format!("pid {pid} skipped: {why}")),
            Outcome::Reverted { .. } | Outcome::NotNewest { .. } => {}
        }
    }
    let mut pids: Vec<i64> = outcomes.iter().filter(|o| !matches!(o, Outcome::Gone { .. })).map(|o| i64::from(o.pid())).collect();
    pids.sort_unstable();
    let tail = if gone.is_empty() { String::new() } else { format!("; {}", gone.join("; ")) };

    if applied.is_empty() && failures.is_empty() {
        let message = format!("no process of the container is running on this node{tail}");
        return if last_attempt {
            Verdict { pids, ..Verdict::early(TargetPhase::Failed, Reason::ContainerNotRunning, clip(message), Next::Settled) }
        } else {
            Verdict { pids, ..Verdict::early(TargetPhase::Pending, Reason::ContainerNotRunning, clip(message), Next::Retry) }
        };
    }
    if !failures.is_empty() {
        let detail = failures.iter().map(|(pid, f)| format!("pid {pid}: {}", f.message)).collect::<Vec<_>>().join("; ");
        let ok = if applied.is_empty() { String::new() } else { format!("; applied to pid{} {}", plural(applied.len()), pid_list(&applied)) };
        let message = clip(format!("{detail}{ok}{tail}"));
        let hard = failures.iter().find(|(_, f)| !f.restart_required);
        let blocked = failures.iter().find(|(_, f)| f.reason == Reason::ProcedureActive);
        let restart = failures.iter().find(|(_, f)| f.restart_required && f.reason != Reason::ProcedureActive);
        let (phase, reason, next) = if let Some((_, f)) = hard {
            let next = if f.retryable && !last_attempt { Next::Retry } else { Next::Settled };
            (TargetPhase::Failed, f.reason, next)
        } else if let Some((_, f)) = restart {
            (TargetPhase::RestartRequired, f.reason, Next::Settled)
        } else if let Some((_, f)) = blocked {
            if last_attempt {
                (TargetPhase::RestartRequired, f.reason, Next::Settled)
            } else {
                (TargetPhase::Blocked, f.reason, Next::Retry)
            }
        } else {
            unreachable!("a failure is hard, restart-worthy or blocked")
        };
        return Verdict { phase, reason: Some(reason), message, pids, pause_us: pause, next, worked: true };
    }
    applied.sort_unstable();
    let verb = if changed { "applied" } else { "already applied" };
    let mut message = format!("{patch_id} {verb} in {} process{} (pid{} {})", applied.len(), plural(applied.len()), if applied.len() == 1 { "" } else { "s" }, pid_list(&applied));
    if let Some(p) = pause {
        message.push_str(&format!("; stopped at most {p} us"));
    }
    message.push_str(&tail);
    if recommended {
        message.push_str(&format!(
            "; {stacked} patches are stacked in the process: an offline restart on an executable with the fixes built in is recommended"
        ));
        return Verdict {
            phase: TargetPhase::RestartRequired,
            reason: Some(Reason::TooManyPatches),
            message: clip(message),
            pids,
            pause_us: pause,
            next: Next::Settled,
            worked: changed,
        };
    }
    Verdict { phase: TargetPhase::Applied, reason: None, message: clip(message), pids, pause_us: pause, next: Next::Settled, worked: changed }
}

/// The verdict of a revert attempt.
pub fn revert_verdict(patch_id: &str, outcomes: &[Outcome]) -> Verdict {
    let mut reverted = vec![];
    let mut absent = vec![];
    let mut pause = None::<u64>;
    let mut problems = vec![];
    let mut reason = None;
    for o in outcomes {
        match o {
            Outcome::Reverted { pid, was_applied: true, pause_us } => {
                reverted.push(*pid);
                pause = Some(pause.unwrap_or(0).max(*pause_us));
            }
            Outcome::Reverted { pid, was_applied: false, .. } => absent.push(*pid),
            Outcome::NotNewest { pid, newer } => {
                reason.get_or_insert(Reason::PatchNotNewest);
                problems.push(format!("pid {pid}: patch {newer} was applied after {patch_id}; revert {newer} first (the engine removes the newest patch only)"));
            }
            Outcome::Failed { pid, failure } => {
                reason.get_or_insert(failure.reason);
                problems.push(format!("pid {pid}: {}", failure.message));
            }
            Outcome::Gone { .. } | Outcome::Applied { .. } => {}
        }
    }
    let mut pids: Vec<i64> = outcomes.iter().filter(|o| !matches!(o, Outcome::Gone { .. })).map(|o| i64::from(o.pid())).collect();
    pids.sort_unstable();
    if !problems.is_empty() {
        return Verdict {
            phase: TargetPhase::Failed,
            reason,
            message: clip(problems.join("; ")),
            pids,
            pause_us: pause,
            next: Next::Retry,
            worked: true,
        };
    }
    let message = match (reverted.is_empty(), absent.is_empty()) {
        (true, true) => format!("no process of the container is running on this node: nothing runs {patch_id}"),
        (true, false) => format!("{patch_id} is not applied in any process of the container (pid{} {})", if absent.len() == 1 { "" } else { "s" }, pid_list(&absent)),
        _ => format!(
            "{patch_id} reverted in {} process{} (pid{} {}); stopped at most {} us",
            reverted.len(),
            plural(reverted.len()),
            if reverted.len() == 1 { "" } else { "s" },
            pid_list(&reverted),
            pause.unwrap_or(0)
        ),
    };
    Verdict { phase: TargetPhase::Reverted, reason: None, message, pids, pause_us: pause, next: Next::Settled, worked: !reverted.is_empty() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Failure;
    use std::time::Duration;

    fn applied(pid: i32, already: bool, pause_us: u64) -> Outcome {
        Outcome::Applied { pid, already, pause_us, stacked: 1, restart_recommended: false, duration: Duration::ZERO }
    }

    fn failed(pid: i32, reason: Reason, restart_required: bool, retryable: bool) -> Outcome {
        Outcome::Failed { pid, failure: Failure { reason, kind: "k", message: format!("{reason} happened"), restart_required, retryable } }
    }

    #[test]
    fn all_applied() {
        let v = apply_verdict("lp-1", &[applied(2, false, 40), applied(1, false, 90)], false);
        assert_eq!(v.phase, TargetPhase::Applied);
        assert_eq!(v.pids, vec![1, 2]);
        assert_eq!(v.pause_us, Some(90));
        assert_eq!(v.message, "lp-1 applied in 2 processes (pids 1, 2); stopped at most 90 us");
        assert!(v.worked);
        let v = apply_verdict("lp-1", &[applied(1, true, 0)], false);
        assert_eq!((v.phase, v.worked, v.pause_us), (TargetPhase::Applied, false, None));
        assert_eq!(v.message, "lp-1 already applied in 1 process (pid 1)");
    }

    #[test]
    fn too_many_patches_is_restart_required() {
        let o = Outcome::Applied { pid: 1, already: false, pause_us: 5, stacked: 5, restart_recommended: true, duration: Duration::ZERO };
        let v = apply_verdict("lp-1", &[o], false);
        assert_eq!(v.phase, TargetPhase::RestartRequired);
        assert_eq!(v.reason, Some(Reason::TooManyPatches));
        assert!(v.message.contains("5 patches are stacked"));
    }

    #[test]
    fn failures() {
        let v = apply_verdict("lp-1", &[applied(1, false, 5), failed(2, Reason::DataLayoutChanged, true, false)], false);
        assert_eq!((v.phase, v.reason, v.next), (TargetPhase::RestartRequired, Some(Reason::DataLayoutChanged), Next::Settled));
        assert!(v.message.contains("pid 2: DataLayoutChanged happened; applied to pid 1"), "{}", v.message);

        let v = apply_verdict("lp-1", &[failed(2, Reason::ProcedureActive, true, true)], false);
        assert_eq!((v.phase, v.next), (TargetPhase::Blocked, Next::Retry));
        let v = apply_verdict("lp-1", &[failed(2, Reason::ProcedureActive, true, true)], true);
        assert_eq!((v.phase, v.reason, v.next), (TargetPhase::RestartRequired, Some(Reason::ProcedureActive), Next::Settled));

        let v = apply_verdict("lp-1", &[failed(2, Reason::ProcedureActive, true, true), failed(3, Reason::EngineError, false, true)], false);
        assert_eq!((v.phase, v.next), (TargetPhase::Failed, Next::Retry));
        let v = apply_verdict("lp-1", &[failed(3, Reason::EngineError, false, true)], true);
        assert_eq!((v.phase, v.next), (TargetPhase::Failed, Next::Settled));
        let v = apply_verdict("lp-1", &[failed(3, Reason::BuildIDMismatch, false, false)], false);
        assert_eq!((v.phase, v.next), (TargetPhase::Failed, Next::Settled));
    }

    #[test]
    fn no_process() {
        let gone = Outcome::Gone { pid: 9, why: "exited".into() };
        let v = apply_verdict("lp-1", std::slice::from_ref(&gone), false);
        assert_eq!((v.phase, v.next, v.pids.len()), (TargetPhase::Pending, Next::Retry, 0));
        assert!(v.message.contains("pid 9 skipped: exited"));
        let v = apply_verdict("lp-1", &[], true);
        assert_eq!((v.phase, v.reason), (TargetPhase::Failed, Some(Reason::ContainerNotRunning)));
    }

    #[test]
    fn reverts() {
        let v = revert_verdict("lp-1", &[Outcome::Reverted { pid: 1, was_applied: true, pause_us: 7 }, Outcome::Reverted { pid: 2, was_applied: false, pause_us: 0 }]);
        assert_eq!((v.phase, v.pause_us), (TargetPhase::Reverted, Some(7)));
        assert_eq!(v.message, "lp-1 reverted in 1 process (pid 1); stopped at most 7 us");
        let v = revert_verdict("lp-1", &[]);
        assert_eq!(v.phase, TargetPhase::Reverted);
        assert!(v.message.starts_with("no process"));
        let v = revert_verdict("lp-1", &[Outcome::NotNewest { pid: 1, newer: "lp-2".into() }]);
        assert_eq!((v.phase, v.reason, v.next), (TargetPhase::Failed, Some(Reason::PatchNotNewest), Next::Retry));
        assert!(v.message.contains("revert lp-2 first"));
    }

    #[test]
    fn long_messages_are_clipped() {
        let many: Vec<Outcome> = (0..200).map(|p| failed(p, Reason::EngineError, false, true)).collect();
        let v = apply_verdict("lp-1", &many, false);
        assert!(v.message.len() <= MAX_MESSAGE && v.message.ends_with("..."));
    }
}
