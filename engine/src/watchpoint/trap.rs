//! The `trap` strategy: a watched area on the old code.
//!
//! Instead of stopping the process again and again to poll its stacks, put execute
//! breakpoints on the old entries (a thread that reaches one is held there: it has not entered
//! the old code, so it is no activation) and on the return address of the outermost old frame
//! of every thread that is inside old code (so we learn the moment it leaves). Hardware
//! breakpoints (per thread, set in new threads as they appear) when four are enough: perf
//! events owned by our descriptors where the kernel allows them (they vanish if we are
//! killed), else debug registers written with ptrace; beyond four, `int3` bytes with the
//! original byte kept (forked children get the original bytes back: [`forks`]). When no
//! activation is left, every thread is stopped, the stacks are checked once more with a full
//! unwind, and the caller writes the jumps; held threads are moved straight to the new code.
//! Every breakpoint is removed on every path.
use super::{find_activation, perf, Activation, Guarded, Quiet, View};
use crate::arch::x86_64::{debugreg_offset, dr7_execute, HW_BREAKPOINTS, INT3};
use crate::error::{Error, Result};
use crate::process::MemoryReader;
use crate::ptrace::Stopped;
use crate::region::Entry;
use crate::unwind;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

mod forks;

// The embedder's choice of hardware breakpoints (perf is a private module of `watchpoint`).
pub use super::perf::{breakpoint_kind, set_breakpoint_kind, BreakpointKind};

/// Where a thread inside old code will come back out.
#[derive(Debug, Clone, Copy)]
struct Exit {
    /// Return address of the outermost old frame.
    ret: u64,
    /// Stack pointer once that frame has returned.
    sp: u64,
}

/// The breakpoints of one round.
struct Breakpoints {
    addrs: Vec<u64>,
    hardware: bool,
    /// int3 sites: address -> original byte.
    saved: BTreeMap<u64, u8>,
    /// Threads that hold our hardware breakpoints: as perf events (their descriptors), or in
    /// debug registers written with ptrace (None).
    armed: BTreeMap<i32, Option<Vec<OwnedFd>>>,
}

impl Breakpoints {
    fn new(addrs: Vec<u64>) -> Self {
        let hardware = addrs.len() <= HW_BREAKPOINTS;
        Breakpoints { addrs, hardware, saved: BTreeMap::new(), armed: BTreeMap::new() }
    }

    fn arm_all(&mut self, v: &View, s: &mut Stopped) -> Result<()> {
        if self.hardware {
            for tid in s.tids() {
                self.arm_thread(s, tid)?;
            }
        } else {
            let sites = self.addrs.iter().map(|&a| Ok((a, v.mem.read_vec(a, 1)?[0]))).collect::<Result<Vec<(u64, u8)>>>()?;
            // A child forked while the bytes are armed gets its original bytes back.
            forks::repair(s, sites.clone())?;
            for (a, orig) in sites {
                v.mem.write(a, &[INT3])?;
                self.saved.insert(a, orig);
            }
        }
        Ok(())
    }

    fn arm_thread(&mut self, s: &Stopped, tid: i32) -> Result<()> {
        if !self.hardware {
            return Ok(());
        }
        match self.addrs.iter().map(|a| perf::breakpoint(tid, *a)).collect::<std::io::Result<Vec<OwnedFd>>>() {
            Ok(fds) => {
                self.armed.insert(tid, Some(fds));
                return Ok(());
            }
            Err(e) if perf::breakpoint_kind() == BreakpointKind::Perf => {
                return Err(Error::Process { pid: s.pid, msg: format!("thread {tid}: perf breakpoints refused ({e}), and only perf breakpoints were allowed") });
            }
            Err(e) => tracing::debug!(tid, "perf breakpoints refused ({e}); using debug registers"),
        }
        for (i, a) in self.addrs.iter().enumerate() {
            s.poke_user(tid, debugreg_offset(i), *a)?;
        }
        let slots: Vec<usize> = (0..self.addrs.len()).collect();
        s.poke_user(tid, debugreg_offset(7), dr7_execute(&slots))?;
        self.armed.insert(tid, None);
        Ok(())
    }

    /// How the breakpoints are held: `int3` bytes, `perf` events, or `debugreg` (debug registers
    /// written with ptrace, in some thread at least).
    fn kind(&self) -> &'static str {
        match (self.hardware, self.armed.values().all(Option::is_some)) {
            (false, _) => "int3",
            (true, true) => "perf",
            (true, false) => "debugreg",
        }
    }

    /// Whether `tid` holds our breakpoints as perf events.
    fn perf_armed(&self, tid: i32) -> bool {
        matches!(self.armed.get(&tid), Some(Some(_)))
    }

    fn disarm_thread(&mut self, s: &Stopped, tid: i32) {
        // Perf events go with their descriptors, dropped here.
        if let Some(None) = self.armed.remove(&tid) {
            let _ = s.poke_user(tid, debugreg_offset(7), 0);
            for i in 0..self.addrs.len() {
                let _ = s.poke_user(tid, debugreg_offset(i), 0);
            }
            let _ = s.poke_user(tid, debugreg_offset(6), 0);
        }
    }

    /// Remove everything (threads must be stopped).
    fn disarm_all(&mut self, v: &View, s: &mut Stopped) -> Result<()> {
        for tid in self.armed.keys().copied().collect::<Vec<_>>() {
            self.disarm_thread(s, tid);
        }
        let mut first_err = None;
        if !self.hardware {
            if let Err(e) = forks::stop(s) {
                first_err.get_or_insert(e);
            }
        }
        for (a, orig) in std::mem::take(&mut self.saved) {
            if let Err(e) = v.mem.write(a, &[orig]) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Which of our breakpoints a SIGTRAP stop of `tid` is; rewinds rip past an int3.
    fn hit(&self, s: &Stopped, tid: i32) -> Result<Option<u64>> {
        let mut regs = s.regs(tid)?;
        if self.perf_armed(tid) {
            let perf = s.siginfo(tid).is_some_and(|i| i.si_code == perf::TRAP_PERF);
            return Ok((perf && self.addrs.contains(&regs.rip)).then_some(regs.rip));
        }
        if self.hardware {
            let dr6 = s.peek_user(tid, debugreg_offset(6)).unwrap_or(0);
            let _ = s.poke_user(tid, debugreg_offset(6), 0);
            let idx = (0..self.addrs.len()).find(|i| dr6 & (1 << i) != 0);
            return Ok(idx.map(|i| self.addrs[i]).filter(|a| *a == regs.rip));
        }
        let a = regs.rip.wrapping_sub(1);
        if self.saved.contains_key(&a) {
            regs.rip = a;
            s.set_regs(tid, regs)?;
            return Ok(Some(a));
        }
        Ok(None)
    }

    /// Run `tid` past the breakpoint it stands on, then let it go.
    fn step_over(&mut self, v: &View, s: &mut Stopped, tid: i32, at: u64) -> Result<()> {
        if self.perf_armed(tid) {
            // The kernel set the resume flag (RF) on the way into the signal stop: the
            // instruction runs once without trapping again.
        } else if self.hardware {
            let _ = s.poke_user(tid, debugreg_offset(7), 0);
            s.single_step(tid)?;
            let slots: Vec<usize> = (0..self.addrs.len()).collect();
            s.poke_user(tid, debugreg_offset(7), dr7_execute(&slots))?;
        } else if let Some(orig) = self.saved.get(&at).copied() {
            // Other threads run meanwhile and may pass the site untrapped; the final full
            // stack check catches anything that slipped in.
            v.mem.write(at, &[orig])?;
            let r = s.single_step(tid);
            v.mem.write(at, &[INT3])?;
            r?;
        }
        s.resume(tid)
    }
}

/// Threads inside guarded code and where each will come out (None: cannot tell).
fn activations(v: &View, s: &Stopped, guarded: &[Guarded]) -> Result<(BTreeMap<i32, Option<Exit>>, Option<Activation>)> {
    let mut out = BTreeMap::new();
    let mut first = None;
    for tid in s.tids() {
        let regs = s.regs(tid)?;
        let st = unwind::unwind(&regs, v.modules, v.mem, v.maps);
        let in_guarded = |pc: u64, i: usize| guarded.iter().any(|g| g.holds(pc, i));
        tracing::trace!(tid, pcs = ?st.pcs, cfas = ?st.cfas, incomplete = ?st.incomplete, scanned = st.scanned.len(), "stack");
        let deepest_out = st.pcs.iter().enumerate().filter(|(i, pc)| in_guarded(**pc, *i)).map(|(i, _)| i).max();
        let scanned_hit = st.scanned.iter().any(|w| guarded.iter().any(|g| *w > g.start && *w <= g.end));
        if deepest_out.is_none() && !scanned_hit {
            continue;
        }
        let exit = match deepest_out {
            // Executing the body of a function with switchable return sites: it need not
            // return, only reach one of its calls; polled.
            Some(0) if guarded.iter().any(|g| g.holds(st.pcs[0], 0) && !g.switch.is_empty()) => None,
            Some(i) if !scanned_hit && i + 1 < st.pcs.len() && i < st.cfas.len() => Some(Exit { ret: st.pcs[i + 1], sp: st.cfas[i] }),
            _ => None,
        };
        if first.is_none() {
            first = super::activation_of(v, tid, &st, guarded);
        }
        out.insert(tid, exit);
    }
    Ok((out, first))
}

/// Wait, with breakpoints, until no thread is inside guarded code. Returns with every thread
/// stopped (threads that reached an entry are held there) and no breakpoint left.
pub fn trap_inactive(v: &View, guarded: &[Guarded], entries: &[Entry], timeout: Duration) -> Result<Quiet> {
    let start = Instant::now();
    let deadline = start + timeout;
    let entry_addrs: BTreeSet<u64> = entries.iter().map(|e| e.entry).collect();
    let mut s = Stopped::all(v.proc, Duration::from_secs(10))?;
    let mut held: BTreeSet<i32> = BTreeSet::new();
    let mut attempts = 0;
    loop {
        attempts += 1;
        crate::cancel::check()?;
        let (mut active, first) = activations(v, &s, guarded)?;
        if active.is_empty() {
            // Re-check with the exact rule used by the wait strategy.
            match find_activation(v, &s, guarded)? {
                None => return Ok(Quiet { stopped: s, attempts, waited: start.elapsed() }),
                Some(a) => {
                    active.insert(a.tid, None); // follow it by polling
                }
            }
        }
        if Instant::now() >= deadline {
            let a = first.or_else(|| find_activation(v, &s, guarded).ok().flatten());
            return Err(match a {
                Some(a) => super::blocked(&a, timeout, super::Strategy::Trap),
                None => Error::Blocked(format!("old code stayed active for {:.1} s; the target is unchanged", timeout.as_secs_f64())),
            });
        }
        // Held threads stay where they are; everyone else runs with the breakpoints armed.
        // Hardware breakpoints (perf events, gone with us if we are killed) are preferred to
        // `int3` bytes (which a killed tool leaves behind): when the entries fit, the exits
        // take the slots left and threads whose exit gets none are followed by polling.
        let mut addrs: Vec<u64> = entry_addrs.iter().copied().collect();
        let fits = addrs.len() <= HW_BREAKPOINTS;
        for e in active.values_mut() {
            let Some(x) = *e else { continue };
            if addrs.contains(&x.ret) {
                continue;
            }
            if fits && addrs.len() == HW_BREAKPOINTS {
                *e = None;
            } else {
                addrs.push(x.ret);
            }
        }
        let poll = active.values().any(|e| e.is_none());
        tracing::debug!(?active, ?held, "trap round {attempts}");
        let mut bps = Breakpoints::new(addrs);
        let round = run_round(v, &mut s, &mut bps, &mut active, &mut held, &entry_addrs, deadline, poll);
        // Whatever happened: every thread stopped, no breakpoint trap left queued, every
        // breakpoint gone.
        let stop = s.stop_running(Duration::from_secs(10)).and_then(|_| consume_queued_traps(&mut s, &bps));
        let disarm = bps.disarm_all(v, &mut s);
        round?;
        stop?;
        disarm?;
    }
}

/// A thread can be interrupted after hitting a breakpoint but before its SIGTRAP was reported;
/// the signal stays queued, and delivered after we detach it would kill the target. Let each
/// such thread report it (and rewind it off an int3) while it is still ours.
fn consume_queued_traps(s: &mut Stopped, bps: &Breakpoints) -> Result<()> {
    for tid in s.tids() {
        // Stopped on a breakpoint while we were stopping everyone: rewind it off an int3.
        let mut trapped = s.take_trapped(tid);
        if trapped {
            bps.hit(s, tid)?;
        }
        for _ in 0..4 {
            if !s.sigtrap_pending(tid) {
                break;
            }
            trapped = false;
            match s.run_until_stop(tid, crate::ptrace::Resume::Cont)? {
                WaitStatus::Stopped(_, Signal::SIGTRAP) => {
                    bps.hit(s, tid)?;
                    trapped = true;
                }
                // The target's own signal came first: keep it for later.
                WaitStatus::Stopped(_, sig) => s.keep_signal(tid, sig as i32),
                _ => {}
            }
        }
        if trapped {
            // Out of the SIGTRAP's signal-delivery-stop (see Stopped::settle).
            s.settle(tid)?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_round(
    v: &View,
    s: &mut Stopped,
    bps: &mut Breakpoints,
    active: &mut BTreeMap<i32, Option<Exit>>,
    held: &mut BTreeSet<i32>,
    entries: &BTreeSet<u64>,
    deadline: Instant,
    poll: bool,
) -> Result<()> {
    bps.arm_all(v, s)?;
    // The tests wait for this line (LIVEPATCH_LOG=debug) before they interrupt a trap wait.
    tracing::debug!(kind = bps.kind(), addrs = ?bps.addrs, "breakpoints armed");
    crate::fault::point("trap-armed");
    for tid in s.tids() {
        if !held.contains(&tid) {
            s.resume(tid)?;
        }
    }
    // Threads we cannot follow (no unwind information) are re-checked by polling.
    let round_end = if poll { (Instant::now() + Duration::from_millis(20)).min(deadline) } else { deadline };
    while !active.is_empty() && Instant::now() < round_end {
        crate::cancel::check()?;
        let Some((tid, st)) = s.next_event(round_end)? else { break };
        match st {
            WaitStatus::Stopped(_, Signal::SIGTRAP) => {
                let Some(at) = bps.hit(s, tid)? else {
                    tracing::debug!(tid, rip = s.regs(tid).map(|r| r.rip).unwrap_or(0), "SIGTRAP that is not ours");
                    // Not ours: the target's own trap.
                    s.resume_with(tid, Signal::SIGTRAP)?;
                    continue;
                };
                if entries.contains(&at) && !active.contains_key(&tid) {
                    // About to enter old code: keep it here, out of the SIGTRAP's
                    // signal-delivery-stop (were we killed, the kernel would deliver it).
                    s.settle(tid)?;
                    held.insert(tid);
                    continue;
                }
                if let Some(Some(exit)) = active.get(&tid) {
                    let regs = s.regs(tid)?;
                    if at == exit.ret && regs.rsp >= exit.sp {
                        active.remove(&tid); // left the old code
                    }
                }
                bps.step_over(v, s, tid, at)?;
            }
            WaitStatus::Stopped(_, sig) => s.resume_with(tid, sig)?,
            WaitStatus::PtraceEvent(..) => {
                // A new thread (or a clone event of its parent): give it the breakpoints.
                if bps.hardware && !bps.armed.contains_key(&tid) {
                    bps.arm_thread(s, tid)?;
                }
                s.resume(tid)?;
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                active.remove(&tid);
                held.remove(&tid);
            }
            _ => s.resume(tid)?,
        }
    }
    Ok(())
}

/// Move threads held at an old entry straight to the new code (the jump is written, so this
/// only saves them one instruction; it also keeps them off the old bytes entirely).
pub fn move_held_threads(s: &Stopped, entries: &[Entry]) -> Result<()> {
    for tid in s.tids() {
        let mut r = s.regs(tid)?;
        if let Some(e) = entries.iter().find(|e| e.entry == r.rip) {
            r.rip = e.target;
            s.set_regs(tid, r)?;
        }
    }
    Ok(())
}
