//! Activation safety: switch only when no thread has old code on its stack or stands inside
//! the bytes the jump overwrites.
//!
//! Two strategies: `wait` stops the process, checks every thread's stack, and if the code is
//! active resumes it and retries with backoff; `trap` (see [`crate::watchpoint::trap`]) puts
//! breakpoints on the old entries so the process is stopped exactly when it is about to enter
//! one, and on the return addresses of active frames so it learns when they leave.
use crate::error::{Error, Result};
use crate::process::{Mapping, ProcMem, Process};
use crate::ptrace::Stopped;
use crate::unwind::{self, Modules};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Stop, check the stacks, resume and retry with backoff.
    Wait,
    /// Breakpoints on the entries and on active frames' return addresses.
    #[default]
    Trap,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wait" => Ok(Strategy::Wait),
            "trap" => Ok(Strategy::Trap),
            _ => Err(format!("unknown strategy `{s}` (wait or trap)")),
        }
    }
}

/// Code that must not be active: an old function (or a copy being removed).
#[derive(Debug, Clone)]
pub struct Guarded {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// A thread found inside guarded code.
#[derive(Debug, Clone)]
pub struct Activation {
    pub tid: i32,
    pub thread: String,
    pub function: String,
    pub pc: u64,
    /// Depth of the frame (0 = the thread is executing it).
    pub depth: usize,
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "function `{}` is active on thread {} ({}) at {:#x}", self.function, self.tid, self.thread, self.pc)?;
        if self.depth > 0 {
            write!(f, ", {} frames down", self.depth)?;
        }
        Ok(())
    }
}

/// What the process looks like for stack checks: unwind tables, memory, maps.
pub struct View<'a> {
    pub proc: &'a Process,
    pub mem: &'a ProcMem,
    pub maps: &'a [Mapping],
    pub modules: &'a Modules,
}

/// Check every stopped thread; the first activation found, if any.
pub fn find_activation(v: &View, stopped: &Stopped, guarded: &[Guarded]) -> Result<Option<Activation>> {
    for tid in stopped.tids() {
        let regs = stopped.regs(tid)?;
        let stack = unwind::unwind(&regs, v.modules, v.mem, v.maps);
        for g in guarded {
            if let Some(pc) = stack.touches(g.start, g.end) {
                let depth = stack.pcs.iter().position(|p| *p == pc).unwrap_or(usize::MAX);
                return Ok(Some(Activation { tid, thread: v.proc.thread_name(tid), function: g.name.clone(), pc, depth: if depth == usize::MAX { 0 } else { depth } }));
            }
        }
    }
    Ok(None)
}

/// Every thread stopped, none in guarded code: the moment to switch.
pub struct Quiet {
    pub stopped: Stopped,
    pub attempts: u32,
    pub waited: Duration,
}

/// Wait with `strategy` until no thread is in guarded code. `entries` are the old entries a
/// thread may be held at (trap strategy).
pub fn until_inactive(v: &View, strategy: Strategy, guarded: &[Guarded], entries: &[crate::region::Entry], timeout: Duration) -> Result<Quiet> {
    match strategy {
        Strategy::Wait => wait_inactive(v, guarded, timeout),
        Strategy::Trap => trap::trap_inactive(v, guarded, entries, timeout),
    }
}

/// The `wait` strategy: returns with every thread stopped and none in guarded code.
pub fn wait_inactive(v: &View, guarded: &[Guarded], timeout: Duration) -> Result<Quiet> {
    let start = Instant::now();
    let mut backoff = Duration::from_micros(500);
    let mut attempts = 0;
    loop {
        attempts += 1;
        crate::cancel::check()?;
        v.proc.check_same()?;
        let t0 = Instant::now();
        let stopped = Stopped::all(v.proc, Duration::from_secs(10))?;
        let t1 = Instant::now();
        let found = find_activation(v, &stopped, guarded)?;
        tracing::debug!(threads = stopped.tids().len(), stop_us = (t1 - t0).as_micros() as u64, check_us = t1.elapsed().as_micros() as u64, "stack check");
        match found {
            None => return Ok(Quiet { stopped, attempts, waited: start.elapsed() }),
            Some(a) => {
                drop(stopped);
                if start.elapsed() >= timeout {
                    return Err(blocked(&a, timeout, Strategy::Wait));
                }
                std::thread::sleep(backoff.min(timeout.saturating_sub(start.elapsed())));
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// Old code stayed active until the timeout. The advice depends on the strategy: `trap`
/// already waited for the exact moment the code was left, so only a restart helps.
pub fn blocked(a: &Activation, timeout: Duration, strategy: Strategy) -> Error {
    let advice = match strategy {
        Strategy::Wait => "Retry later, use --strategy trap, or restart the process offline to get the fix",
        Strategy::Trap => "The code never left the old function (a loop that does not return?): restart the process offline to get the fix, or patch the functions it calls instead (--function)",
    };
    Error::Blocked(format!("{a} for {:.1} s (the timeout); the target is unchanged. {advice}", timeout.as_secs_f64()))
}

mod perf;
pub mod trap;
