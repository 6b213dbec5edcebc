//! The `trap` strategy: while old code is active, the old entries lead to their gates
//! ([`crate::gate`]), so a thread about to enter an old function waits there, parked in the
//! target rather than held by us, and the active frames can only drain; the stacks are
//! polled with a short backoff until none is left. Nothing is armed that a killed tool could
//! leave behind: no breakpoint byte, no debug register. The gates give up on their own (the
//! old way) once the tool's heartbeat stops.
use super::{blocked, find_activation, Guarded, Quiet, Strategy, View};
use crate::error::Result;
use crate::ptrace::Stopped;
use std::time::{Duration, Instant};

/// Longest pause between two stack checks: a parked thread waits at most this much longer
/// than the old frames it waits for.
const MAX_BACKOFF: Duration = Duration::from_millis(5);

/// Wait until no thread is inside guarded code, calling `gate` (with every thread stopped)
/// the first time some is: it leads the entries to their gates. Returns with every thread
/// stopped and none in guarded code.
pub fn trap_inactive(v: &View, guarded: &[Guarded], gate: &mut dyn FnMut(&Stopped) -> Result<()>, timeout: Duration) -> Result<Quiet> {
    let start = Instant::now();
    let mut backoff = Duration::from_micros(200);
    let mut attempts = 0;
    let mut s = Stopped::all(v.proc, Duration::from_secs(10))?;
    loop {
        attempts += 1;
        crate::cancel::check()?;
        let a = match find_activation(v, &s, guarded)? {
            Ok(stacks) => return Ok(Quiet { stopped: s, attempts, waited: start.elapsed(), stacks }),
            Err(a) => a,
        };
        if start.elapsed() >= timeout {
            return Err(blocked(&a, timeout, Strategy::Trap));
        }
        gate(&s)?;
        tracing::trace!(%a, attempts, "still active");
        drop(s);
        std::thread::sleep(backoff.min(timeout.saturating_sub(start.elapsed())));
        backoff = (backoff * 2).min(MAX_BACKOFF);
        v.proc.check_same()?;
        s = Stopped::all(v.proc, Duration::from_secs(10))?;
    }
}
